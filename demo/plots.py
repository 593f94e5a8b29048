"""The demo's two PNGs: a grid of test images with predicted and true captions, and the training loss curve.

matplotlib runs with the non-interactive Agg backend, so the figures are written on machines without a
display. Files are written to a temporary name and renamed, so a PNG on disk is always complete.
"""

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..common.atomic_files import staged_file

if TYPE_CHECKING:
    from PIL import Image


def _pyplot():
    import matplotlib  # optional: the train extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: the train extra

    return plt


def _save(fig, path):
    with staged_file(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
    return Path(path)


def caption_grid(
    images: Sequence["Image.Image"],
    predicted: Sequence[str],
    truth: Sequence[str],
    path: str | os.PathLike,
    columns: int = 4,
    title: str | None = None,
) -> Path:
    """A grid of images, each titled with its predicted caption (green if exact, red if not) and the truth."""
    plt = _pyplot()
    n = len(images)
    if not n or not len(predicted) == len(truth) == n:
        raise ValueError(f"caption_grid needs as many captions as images (got {n}, {len(predicted)}, {len(truth)})")
    columns = min(columns, n)
    rows = -(-n // columns)
    # Each cell is an image with up to four caption lines below it (two predicted, two true); the row
    # spacing leaves room for them so a caption never runs into the next row's image.
    fig, axes = plt.subplots(
        rows,
        columns,
        figsize=(3.2 * columns, 3.9 * rows),
        squeeze=False,
        gridspec_kw=dict(hspace=0.3, wspace=0.08, top=0.93 if title else 0.98, bottom=0.07),
    )
    for ax in axes.flat:
        ax.axis("off")
    wrap = lambda s: "\n".join(textwrap.wrap(s, 34)) or "(empty)"  # noqa: E731
    for ax, image, pred, true in zip(axes.flat, images, predicted, truth):
        ax.imshow(image, interpolation="nearest")
        ok = pred == true
        pred_text = ax.text(
            0,
            -0.03,
            f"pred: {wrap(pred)}",
            fontsize=8,
            transform=ax.transAxes,
            va="top",
            color="green" if ok else "red",
        )
        lines = pred_text.get_text().count("\n") + 1
        ax.text(0, -0.03 - 0.075 * lines, f"true: {wrap(true)}", fontsize=8, transform=ax.transAxes, va="top")
    if title:
        fig.suptitle(title)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def loss_curve(
    log_history: Sequence[dict], path: str | os.PathLike, title: str = "training loss", plateau: int | None = None
) -> Path:
    """The Trainer's logged training loss against the step (from `trainer.state.log_history`).

    Steps of train/'s vision warm-up (logged with `vision_warmup`) are drawn apart: their loss is the warm-up
    objective's, not the caption loss. Where that objective stays on after the warm-up (`vision_aux_loss`, logged
    beside the caption loss), it continues the warm-up's line, dashed. `plateau` draws the caption loss of guessing
    every shape, for reference.
    """
    plt = _pyplot()
    logged = [entry for entry in log_history if "loss" in entry and "step" in entry]
    if not logged:
        raise ValueError("The training log holds no loss values; lower logging_steps so at least one is logged.")
    fig, ax = plt.subplots(figsize=(6, 4))
    marker = "." if len(logged) < 50 else None
    warmup_colour = None
    for warmup, label in ((True, "vision warm-up (words named by the ViT alone)"), (False, "caption loss")):
        points = [(e["step"], e["loss"]) for e in logged if bool(e.get("vision_warmup")) == warmup]
        if points:
            steps, losses = zip(*points)
            (line,) = ax.plot(steps, losses, marker=marker, label=label)
            if warmup:
                warmup_colour = line.get_color()
    auxiliary = [(e["step"], e["vision_aux_loss"]) for e in logged if "vision_aux_loss" in e]
    if auxiliary:
        steps, losses = zip(*auxiliary)
        label = "the warm-up's loss, kept on beside the caption loss"
        ax.plot(steps, losses, linestyle="--", color=warmup_colour, marker=marker, label=label)
    if plateau is not None:
        ax.axhline(plateau, color="grey", linestyle=":", label="plateau exit threshold")
    losses = [e["loss"] for e in logged] + [loss for _, loss in auxiliary]
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats per token / per word)")
    if min(losses) > 0 and max(losses) / min(losses) > 10:  # from ~6 nats at the start to ~0.01
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
