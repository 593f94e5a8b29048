"""Interleaved timing: every contender runs in every round, so background load hits them all alike.

On a shared machine a slow minute would bias whichever contender happened to run during it if each
ran its repetitions in a block. Here the contenders take turns (A B, then B A, ...: the starting
contender rotates so none always runs first, right after another one has warmed the caches), after
`warmup` untimed rounds, and each keeps every sample so the table can show min / median / max.
"""

import statistics
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers.generation.streamers import BaseStreamer

CLOCKS = {
    # what a user waits for; on a machine shared with other jobs it includes their share of the cores
    "wall": time.perf_counter,
    # CPU time of this process (all its threads): the work itself, whatever else the machine runs. Needs
    # idle OpenMP threads to sleep rather than spin (OMP_WAIT_POLICY=PASSIVE), or spinning counts as work.
    "cpu": time.process_time,
}
_clock = {"name": "wall", "fn": time.perf_counter}


def use_clock(name: str) -> None:
    if name not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {name!r}")
    _clock.update(name=name, fn=CLOCKS[name])


def now() -> float:
    """The current reading of the chosen clock (`use_clock`), in seconds."""
    return _clock["fn"]()


def unit() -> str:
    """How a duration reads in the table: "s" (wall clock) or "CPU-s"."""
    return "s" if _clock["name"] == "wall" else "CPU-s"


def synchronize(device: str | torch.device) -> None:
    """Wait for queued device work, so a timestamp means the work is done (a no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock(BaseStreamer):
    """A `generate(streamer=...)` hook that timestamps each step.

    `generate` calls `put` once with the prompt, then once per new token, right after the token is chosen
    (and copied to the host, which waits for the device). So `stamps[1]` marks the end of the prefill and
    the gaps after it are whole decode steps, including every line of Python a step runs.
    """

    def __init__(self):
        self.stamps = []

    def put(self, value: torch.Tensor) -> None:
        self.stamps.append(now())

    def end(self) -> None:
        pass

    def decode_seconds_per_step(self) -> float:
        if len(self.stamps) < 3:
            raise RuntimeError("Need at least two new tokens to time a decode step.")
        return (self.stamps[-1] - self.stamps[1]) / (len(self.stamps) - 2)


@dataclass
class Stats:
    samples: list

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)


def interleave(runs: dict, reps: int, warmup: int, desc: str = "") -> dict:
    """Call each `runs[name]()` (which returns a dict of metrics) `warmup` + `reps` times, interleaved.

    Returns `{name: {metric: Stats}}` over the `reps` timed calls only.
    """
    if reps < 1:
        raise ValueError(f"reps must be at least 1, got {reps}")
    names = list(runs)
    samples = {name: {} for name in names}
    with tqdm(total=(warmup + reps) * len(names), desc=desc, leave=False) as bar:
        for round_ in range(warmup + reps):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                metrics = runs[name]()
                bar.update()
                if round_ >= warmup:
                    for key, value in metrics.items():
                        samples[name].setdefault(key, []).append(value)
    return {name: {key: Stats(values) for key, values in metrics.items()} for name, metrics in samples.items()}
