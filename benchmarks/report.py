"""The results table and the description of the machine it came from."""

import datetime
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

from .timing import Stats


@dataclass
class Row:
    """One figure: MQwen's samples against a reference's, and the target for the ratio of medians."""

    figure: str
    metric: str  # with its unit, e.g. "decode tokens/s"
    ours: str
    ours_stats: Stats
    reference: str
    reference_stats: Stats
    target: str = ""  # e.g. ">= 0.98"; empty for figures without one
    notes: list = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.ours_stats.median / self.reference_stats.median

    def to_dict(self) -> dict:
        return {
            "figure": self.figure,
            "metric": self.metric,
            "ours": self.ours,
            "ours_samples": self.ours_stats.samples,
            "reference": self.reference,
            "reference_samples": self.reference_stats.samples,
            "ratio_of_medians": self.ratio,
            "target": self.target,
            "met": self.met,
        }

    @property
    def met(self) -> bool | None:
        if not self.target:
            return None
        op, value = self.target.split()
        return self.ratio >= float(value) if op == ">=" else self.ratio <= float(value)


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def _triple(stats: Stats) -> str:
    if len(stats.samples) == 1:
        return _fmt(stats.median)
    return f"{_fmt(stats.min)} / **{_fmt(stats.median)}** / {_fmt(stats.max)}"


def markdown_table(rows: Iterable[Row]) -> str:
    """min / **median** / max of each side, the ratio of medians (ours / reference) and the target."""
    lines = [
        "| # | metric | MQwen | min / **median** / max | reference | min / **median** / max | ratio | target | met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        met = {True: "yes", False: "**no**", None: ""}[row.met]
        lines.append(
            f"| {row.figure} | {row.metric} | {row.ours} | {_triple(row.ours_stats)} | {row.reference} "
            f"| {_triple(row.reference_stats)} | {row.ratio:.3f} | {row.target} | {met} |"
        )
    return "\n".join(lines)


def render(
    rows: Iterable[Row],
    machine: dict,
    settings: dict,
    notes: Iterable[str],
    load_before: str,
    load_after: str,
    elapsed_s: float,
) -> str:
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    parts = [
        "# MQwen benchmark results",
        "",
        f"`{' '.join(['mqwen-bench', *sys.argv[1:]])}`, {when}, {elapsed_s / 60:.1f} min.",
        "",
        "Machine: " + ", ".join(f"{key} {value}" for key, value in machine.items()) + ".",
        f"Load average (1 / 5 / 15 min) before: {load_before}; after: {load_after}.",
        "Settings: " + ", ".join(f"{key} {value}" for key, value in settings.items()) + ".",
        "",
        markdown_table(rows),
        "",
        "Ratios are MQwen's median over the reference's median. Contenders ran interleaved (round-robin, "
        "rotating which one starts), after warm-up rounds that are not counted.",
    ]
    notes = [note for note in notes if note]
    if notes:
        parts += ["", "Notes:", ""] + [f"- {note}" for note in notes]
    return "\n".join(parts) + "\n"
