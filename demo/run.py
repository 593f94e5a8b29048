"""The main job: the whole life of an MQwen model on a CPU, end to end, with a measured result.

1. generate the shapes data (`shapes.py`): train / validation / test, test images written as PNGs;
2. build a small MQwen from scratch (`model.py`, with convert/'s `build_tiny` and tokenizer trainer);
3. train it on CPU with train/'s `CaptionTrainer` (stage "full" + the vision tower);
4. evaluate it on the test split with train/'s `evaluate_captions` (exact match, BLEU-4, CIDEr-D);
5. save it in the Hub format (train/'s `save_final_model`: written to a temporary folder, then renamed);
6. reload it in a fresh process through `pipeline("image-to-text", trust_remote_code=True)` (`reload.py`),
   caption the test PNGs again and check the captions equal the in-process ones;
7. write `captions.png` (test images with predicted and true captions), `loss.png` and `results.json`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from ..common.atomic_files import write_atomically
from ..common.machine import machine_description
from ..train import TrainConfig, build_trainer, evaluate_captions, save_final_model
from ..train.curriculum import ShortCaptionsFirstSampler
from ..train.metrics import caption_scores
from ..train.recipe import CaptionRecipe
from .model import PRESETS, build_shapes_model
from .other_renderer import draw_set
from .plots import caption_grid, loss_curve
from .settings import DemoSettings
from .shapes import HELD_OUT_ONE_IN, lazy_split, make_split, write_split

# The training loss sits near this value while the model still guesses every shape: ln(3) nats for each shape
# word, about a quarter of the caption tokens. From the logged step after which the caption loss stays under it,
# training has left the plateau (results.json: "plateau_exit_step"). "Stays": a curriculum's one-shape steps dip
# under it before the harder images arrive.
PLATEAU_LOSS = 0.25


def plateau_exit_step(log_history: Sequence[dict], threshold: float = PLATEAU_LOSS) -> int | None:
    """The first logged step from which every logged caption loss is under `threshold` (vision warm-up steps
    aside), or None if the last one is not."""
    caption = [(e["step"], e["loss"]) for e in log_history if "loss" in e and not e.get("vision_warmup")]
    exit_step = None
    for step, loss in caption:
        if loss >= threshold:
            exit_step = None
        elif exit_step is None:
            exit_step = step
    return exit_step


def _atomic_write_json(path: Path, data):
    write_atomically(path, json.dumps(data, indent=2))


def _progress_callbacks(max_minutes):
    """A progress bar that shows the loss instead of printing every log line, and an optional time limit."""

    class LossInBarProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
                self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)

    class TimeLimit(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.deadline = time.monotonic() + 60 * max_minutes

        def on_step_end(self, args, state, control, **kwargs):
            if time.monotonic() > self.deadline:
                control.should_training_stop = True

    return LossInBarProgress, ([TimeLimit()] if max_minutes else [])


def _phase_clock(warmup_steps: int):
    """A callback that times the vision warm-up's steps and the caption steps apart: they differ in cost about
    twofold, so their mean step times say how fast this machine ran the job (results.json, `timings`), which
    the total time alone does not when machines of one kind differ in speed from day to day."""

    class PhaseClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start = self.boundary = self.end = time.perf_counter()
            self.steps = 0

        def on_step_end(self, args, state, control, **kwargs):
            self.end = time.perf_counter()
            self.steps = state.global_step
            if state.global_step <= warmup_steps:
                self.boundary = self.end

        def ms_per_step(self) -> dict[str, float | None]:
            """Mean milliseconds a step of each phase took (None: the phase had no steps)."""
            warmup = min(warmup_steps, self.steps)
            captions = self.steps - warmup
            return {
                "vision_warmup_ms_per_step": 1e3 * (self.boundary - self.start) / warmup if warmup else None,
                "caption_ms_per_step": 1e3 * (self.end - self.boundary) / captions if captions else None,
            }

    return PhaseClock()


def schedule_small_shapes(trainer: Any, examples: Sequence, settings: DemoSettings) -> int:
    """Mark the training examples that steps from `small_shapes_from_step` on will draw, so that they draw their
    shapes smaller (`shapes.make_example`'s `shrink_to`); returns how many were marked.

    Why late: shapes under the task's smallest size are what a model trained on it gets wrong on other drawings
    (the other renderer's 10 % of the side), but drawn from the start they hold it longer on its plateau and it
    ends worse (demo/EXPERIMENTS.md). Which examples those steps draw is known before training: train/'s
    curriculum sampler fixes its order from the seed, and the trainer builds the same one for its data loader.
    """
    if not settings.small_shapes_from_step or settings.small_shapes_from_step >= settings.max_steps:
        return 0
    if not 0 < settings.small_shapes_scale <= 1:
        raise ValueError(f"small_shapes_scale must be in (0, 1], got {settings.small_shapes_scale}.")
    sampler = trainer._get_train_sampler()
    if not isinstance(sampler, ShortCaptionsFirstSampler):
        raise ValueError(
            "small_shapes_from_step needs the curriculum's sampler, whose order is fixed before training: set "
            "curriculum_steps (--curriculum-steps) above 0, or small_shapes_from_step to None "
            "(--small-shapes-from-step 0)."
        )
    late = list(sampler)[settings.small_shapes_from_step * settings.batch_size :]
    for index in late:
        examples[index].shrink_to = settings.small_shapes_scale
    return len(late)


def _schedule_arguments(settings: DemoSettings) -> dict:
    args = {"save_strategy": "no"}
    if settings.lr_scheduler == "warmup_stable_decay":
        args["lr_scheduler_kwargs"] = {"num_decay_steps": max(1, round(settings.decay_ratio * settings.max_steps))}
    return args


def train_model(
    settings: DemoSettings, model: Any, processor: Any, train_pairs: Sequence, out_dir: Path
) -> tuple[Any, Path, dict[str, float | None]]:
    """Train with train/'s API; returns (trainer, model_dir, timings): `train_seconds` and each phase's mean step
    time (`_phase_clock`)."""
    config = TrainConfig(
        model=model,
        data=train_pairs,
        output_dir=str(out_dir / "train"),
        stage="full",
        train_vision_tower=True,
        instructions=(processor.caption_instruction,),  # the prompt the pipeline will use
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        warmup_ratio=settings.warmup_ratio,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        logging_steps=max(1, settings.max_steps // 100),
        seed=settings.seed,
        **CaptionRecipe.of(settings).as_settings(),  # curriculum and vision warm-up, as the demo sets them
        disable_tqdm=not settings.progress,
        dataloader_num_workers=settings.loader_workers,
        lr_scheduler_type=settings.lr_scheduler,
        training_args=_schedule_arguments(settings),
    )
    progress, extra_callbacks = _progress_callbacks(settings.max_train_minutes)
    clock = _phase_clock(settings.vision_warmup_steps)
    trainer = build_trainer(config, model=model, processor=processor, callbacks=[*extra_callbacks, clock])
    schedule_small_shapes(trainer, [example for example, _ in train_pairs], settings)
    if settings.progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(progress())
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    model_dir = save_final_model(trainer, config, out_dir / "model")
    return trainer, model_dir, {"train_seconds": train_seconds, **clock.ms_per_step()}


def reload_in_fresh_process(
    model_dir: str | os.PathLike,
    images_dir: str | os.PathLike,
    out_json: str | os.PathLike,
    max_new_tokens: int,
    progress: bool = True,
) -> dict:
    command = [
        sys.executable,
        "-m",
        "mqwen.demo.reload",
        str(model_dir),
        str(images_dir),
        str(out_json),
        "--max-new-tokens",
        str(max_new_tokens),
    ]
    if not progress:
        command.append("--no-progress")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    subprocess.run(command, check=True, env=env)
    return json.loads(Path(out_json).read_text())


def make_data(settings: DemoSettings, out_dir: Path) -> dict:
    """Step 1: the splits (training images drawn on demand; held-out splits kept and saved as PNGs) and the
    other renderer's test set."""
    image_size = PRESETS[settings.preset].image_size
    train = lazy_split("train", settings.train_size, settings.seed, image_size, settings.progress, settings.augment)
    splits = {"train": train}
    for name, size in (("validation", settings.validation_size), ("test", settings.test_size)):
        splits[name] = make_split(name, size, settings.seed, image_size, settings.progress)
    splits["other_renderer"] = draw_set(settings.other_test_size, settings.seed, settings.progress)
    write_split(splits["test"], out_dir / "data" / "test")
    write_split(splits["validation"], out_dir / "data" / "validation")
    return splits


def parameter_counts(model: Any) -> dict:
    return {
        part: sum(p.numel() for p in getattr(model, part).parameters())
        for part in ("vision_tower", "multi_modal_projector", "language_model")
    }


def evaluate_in_process(settings: DemoSettings, model: Any, processor: Any, splits: dict) -> dict:
    """Step 4: exact match, BLEU-4 and CIDEr-D of the trained model on each held-out set."""
    return {
        name: evaluate_captions(
            model,
            processor,
            [(example.image, example.caption) for example in splits[name]],
            batch_size=settings.eval_batch_size,
            max_new_tokens=settings.max_new_tokens,
            progress=settings.progress,
        )
        for name in ("validation", "test", "other_renderer")
    }


def score_reloaded(settings: DemoSettings, model_dir: str | os.PathLike, out_dir: Path, test_split: Sequence) -> dict:
    """Step 5: caption the saved test PNGs with the saved model in a fresh process, and score those captions."""
    reloaded = reload_in_fresh_process(
        model_dir,
        out_dir / "data" / "test",
        out_dir / "reloaded_captions.json",
        settings.max_new_tokens,
        settings.progress,
    )
    files = [f"{i:05d}.png" for i in range(len(test_split))]
    captions = [reloaded["captions"][name] for name in files]
    truth = [example.caption for example in test_split]
    metrics, _ = caption_scores(dict(enumerate(captions)), {i: [c] for i, c in enumerate(truth)})
    return {**reloaded, "files": files, "predicted": captions, "truth": truth, "metrics": metrics}


def report(
    settings: DemoSettings, scores: dict, reloaded: dict, in_process: list, log: Callable[[str], object] = print
) -> None:
    """Step 6: a few test captions and the scores, on the console."""
    for pred, true in list(zip(reloaded["predicted"], reloaded["truth"]))[: settings.show]:
        log(f"      {'ok ' if pred == true else 'BAD'}  predicted: {pred!r:58} true: {true!r}")
    test = reloaded["metrics"]
    log(
        f"      exact match {test['exact_match']:.1%}   BLEU-4 {test['bleu4']:.3f}   CIDEr-D {test['cider']:.3f}   "
        f"({test['images']} images; validation exact match {scores['validation']['metrics']['exact_match']:.1%})"
    )
    other = scores["other_renderer"]["metrics"]
    log(
        f"      other renderer (other code, image sizes, shape sizes, colours): exact match "
        f"{other['exact_match']:.1%} ({other['images']} images)"
    )
    log(
        f"      reloaded captions equal the in-process ones for {reloaded['identical']}/{len(in_process)} images "
        f"(loaded as {reloaded['model_class']})"
    )


def results_record(
    settings: DemoSettings,
    processor: Any,
    trainer: Any,
    exit_step: int | None,
    parameters: dict,
    timings: dict[str, float],
    scores: dict,
    reloaded: dict,
    in_process: list[str],
    files: dict[str, str],
) -> dict:
    """What results.json holds: settings, model size, timings and the machine, every score, the loss log, every
    test caption."""
    history = trainer.state.log_history
    return {
        "settings": asdict(settings),
        "model": {
            "size": PRESETS[settings.preset].to_dict(),
            "parameters": parameters,
            "vocab_size": len(processor.tokenizer),
            "image_seq_length": trainer.model.config.image_seq_length,
        },
        "held_out": f"test arrangements of 2-3 shapes (left-to-right colour-shape sequences) never seen in "
        f"training; about 1 in {HELD_OUT_ONE_IN} such arrangements is held out; single shapes are all trained on",
        "seed": settings.seed,
        "steps": trainer.state.global_step,
        "plateau_exit_step": exit_step,
        "threads": torch.get_num_threads(),
        "timings": {k: None if v is None else round(v, 1) for k, v in timings.items()},
        "machine": machine_description("cpu"),
        "test": reloaded["metrics"],
        "test_in_process": scores["test"]["metrics"],
        "validation": scores["validation"]["metrics"],
        "other_renderer": scores["other_renderer"]["metrics"],
        "reload": {
            "identical_captions": reloaded["identical"],
            "images": len(in_process),
            "model_class": reloaded["model_class"],
            "pipeline_class": reloaded["pipeline_class"],
        },
        "loss": [
            {"step": e["step"], "loss": e["loss"], "vision_warmup": bool(e.get("vision_warmup"))}
            | ({"vision_aux_loss": e["vision_aux_loss"]} if "vision_aux_loss" in e else {})
            for e in history
            if "loss" in e
        ],
        "samples": [
            {"file": f, "predicted": p, "in_process": q, "true": t}
            for f, p, q, t in zip(reloaded["files"], reloaded["predicted"], in_process, reloaded["truth"])
        ],
        "files": files,
    }


def run(settings: DemoSettings, log: Callable[[str], object] = print) -> dict:
    """Run the main job; returns the results dict (also written to OUT_DIR/results.json)."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    out_dir = Path(settings.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings = {}

    log(f"[1/6] Generating shapes data (seed {settings.seed}) ...")
    t = time.perf_counter()
    splits = make_data(settings, out_dir)
    timings["data_seconds"] = time.perf_counter() - t
    log(
        f"      train {len(splits['train'])}, validation {len(splits['validation'])}, test {len(splits['test'])} "
        f"images (every 2-3-shape one a held-out arrangement) in {out_dir / 'data'}; other renderer "
        f"{len(splits['other_renderer'])}"
    )

    log(f"[2/6] Building a '{settings.preset}' MQwen from scratch ...")
    model, processor = build_shapes_model(PRESETS[settings.preset], seed=settings.seed)
    parameters = parameter_counts(model)
    by_part = ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in parameters.items())
    log(
        f"      {sum(parameters.values()) / 1e6:.2f} M parameters ({by_part}); vocabulary {len(processor.tokenizer)} "
        f"tokens; {model.config.image_seq_length} image tokens per image; {torch.get_num_threads()} CPU threads"
    )

    log(f"[3/6] Training for {settings.max_steps} steps of {settings.batch_size} ...")
    train_pairs = [(example, example.caption) for example in splits["train"]]
    trainer, model_dir, train_timings = train_model(settings, model, processor, train_pairs, out_dir)
    timings.update(train_timings)
    model = trainer.model.eval()
    history = trainer.state.log_history
    exit_step = plateau_exit_step(history)
    per_step = ", ".join(
        f"{name} {timings[key]:.0f} ms a step"
        for name, key in (("vision warm-up", "vision_warmup_ms_per_step"), ("captions", "caption_ms_per_step"))
        if timings[key] is not None
    )
    log(
        f"      {trainer.state.global_step} steps in {timings['train_seconds']:.0f} s ({per_step}); caption loss under "
        f"{PLATEAU_LOSS} (off the plateau) from step {exit_step}; saved to {model_dir}"
    )

    log("[4/6] Evaluating in this process (validation, test, other renderer) ...")
    t = time.perf_counter()
    scores = evaluate_in_process(settings, model, processor, splits)
    timings["eval_seconds"] = time.perf_counter() - t
    in_process = [entry["caption"] for entry in scores["test"]["per_image"]]

    log("[5/6] Reloading the saved model in a fresh process: pipeline('image-to-text', trust_remote_code=True) ...")
    t = time.perf_counter()
    reloaded = score_reloaded(settings, model_dir, out_dir, splits["test"])
    reloaded["identical"] = sum(a == b for a, b in zip(reloaded["predicted"], in_process))
    timings["reload_seconds"] = time.perf_counter() - t

    log("[6/6] Results (test split, reloaded model):")
    report(settings, scores, reloaded, in_process, log)
    n = min(settings.grid, len(splits["test"]))
    grid_path = caption_grid(
        [example.image for example in splits["test"][:n]],
        reloaded["predicted"][:n],
        reloaded["truth"][:n],
        out_dir / "captions.png",
        title="test split: predicted (reloaded model) vs true",
    )
    loss_path = loss_curve(history, out_dir / "loss.png", plateau=PLATEAU_LOSS)
    timings["total_seconds"] = time.perf_counter() - started
    results = results_record(
        settings,
        processor,
        trainer,
        exit_step,
        parameters,
        timings,
        scores,
        reloaded,
        in_process,
        {
            "model": str(model_dir),
            "captions_png": str(grid_path),
            "loss_png": str(loss_path),
            "test_images": str(out_dir / "data" / "test"),
        },
    )
    _atomic_write_json(out_dir / "results.json", results)
    log(
        f"      wrote {grid_path}, {loss_path} and {out_dir / 'results.json'} "
        f"(total {timings['total_seconds']:.0f} s, of which training {timings['train_seconds']:.0f} s)"
    )
    log(f"      caption your own images: mqwen-caption IMAGE_OR_DIR --model {model_dir}")
    return results
