"""Images/s of a dataset captioning job: one process, Ray Data with 1 captioner actor, and with 2 (one thread each).

    python -m mqwen.benchmarks.dataset_caption                      # demo and mid shapes, writes RESULTS-dataset.*
    python -m mqwen.benchmarks.dataset_caption --models demo --images 64 --rounds 1

Every engine runs `caption_dataset` on the same WebDataset shards of random 480x640 JPEG photos (4 tar shards,
`--shard-size` images per output shard) with random weights at the demo model's shapes (`demo/model.py`, 64 px,
64 image tokens) and at the benchmark's mid shapes (`shapes.MID`, 224 px, 256 image tokens), greedy, a fixed
number of new tokens (random weights rarely stop early, and never at the same point for every engine: the
figures count images, and all engines make the same captions). Engines run in turn, `--rounds` times, in one
process that started one local Ray with 3 CPUs (2 actors + 1 for the preprocessing tasks) before any timing.

The figure is `job` = images / wall time of the whole `caption_dataset` call, Ray's start-up included (its
actors start, import torch and load the model: 15-35 s on a loaded 2-core VM). `seconds_to_first_rows` says
when the driver saw the first captions (`on_rows`). A steady rate cannot be read off the driver on jobs this
short: Ray Data hands the captions back per task, and a task's bundle holds many batches, so on these jobs
nearly every caption reaches the driver at the end; nor off shard rename times, for the same reason.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from ..common.atomic_files import write_atomically
from ..common.machine import load_average, machine_description
from ..common.photos import random_photos
from ..common.tiny_model import build_tiny, save_checkpoint
from .shapes import MID

ENGINES = ("single process", "ray 1 actor", "ray 2 actors")
FIGURES = ("job_images_per_s",)


def build_model(name: str, folder: Path) -> Path:
    if name == "demo":
        from ..demo.model import build_shapes_model

        model, processor = build_shapes_model()
    else:
        model, processor = build_tiny(vision=MID.vision, text=MID.text)
    return save_checkpoint(model, processor, folder / name)


def write_shards(folder: Path, n_images: int, n_shards: int = 4, size: tuple[int, int] = (480, 640)) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    photos = random_photos(n_images, size)
    paths = []
    for shard in range(n_shards):
        path = folder / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(shard, n_images, n_shards):
                buffer = io.BytesIO()
                photos[i].save(buffer, format="JPEG", quality=90)
                info = tarfile.TarInfo(f"{i:09d}.jpg")
                info.size = buffer.tell()
                buffer.seek(0)
                tar.addfile(info, buffer)
        paths.append(str(path))
    return paths


def one_run(
    engine: str, shards: list[str], model: str, out: Path, tokens: int, batch_size: int, shard_size: int
) -> dict:
    """The figures of one `caption_dataset` call."""
    import torch

    from ..caption.dataset import caption_dataset

    torch.set_num_threads(1)  # the single process: one thread, like each actor
    ray_options = {} if engine == "single process" else {"engine": "ray", "actors": int(engine.split()[1])}
    ticks = []  # (time, rows done)

    def on_rows(n):
        ticks.append((time.perf_counter(), n))

    start = time.perf_counter()
    report = caption_dataset(
        shards, str(model), out, max_new_tokens=tokens, batch_size=batch_size, shard_size=shard_size,
        device="cpu", progress=False, on_rows=on_rows, **ray_options,
    )  # fmt: skip
    end = time.perf_counter()
    return {
        "engine": engine,
        "images": report.captioned,
        "seconds": end - start,
        "seconds_to_first_rows": ticks[0][0] - start,
        "job_images_per_s": report.captioned / (end - start),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=("demo", "mid"), default=["demo", "mid"])
    parser.add_argument("--images", type=int, nargs="+", default=None, help="images per model (default 1536 48)")
    parser.add_argument("--tokens", type=int, default=8, help="new tokens per caption (default 8)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=None, help="default: images / 8")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS-dataset.json")))
    args = parser.parse_args(argv)
    images = dict(zip(args.models, args.images or [{"demo": 1536, "mid": 48}[m] for m in args.models]))

    import ray

    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    machine = dict(machine_description("cpu"), cores_usable=len(os.sched_getaffinity(0)), load_at_start=load_average())
    results = {"machine": machine, "date": time.strftime("%Y-%m-%d"), "settings": vars(args), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.models:
            model = build_model(name, tmp)
            shards = write_shards(tmp / f"{name}-shards", images[name])
            shard_size = args.shard_size or max(1, images[name] // 8)
            for round_ in range(args.rounds):
                order = ENGINES[round_ % 3 :] + ENGINES[: round_ % 3]  # the first engine rotates each round
                for engine in order:
                    out = tmp / f"{name}-{round_}-{engine.replace(' ', '-')}"
                    run = one_run(engine, shards, model, out, args.tokens, args.batch_size, shard_size)
                    results["runs"].append({"model": name, "round": round_, **run})
                    print(json.dumps(results["runs"][-1]), flush=True)
    ray.shutdown()
    results["ratios"] = ratios(results["runs"])
    write_atomically(args.out, json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["ratios"], indent=2))
    return 0


def ratios(runs: list[dict]) -> dict:
    """Per model: medians of each engine's figures, 1 actor / single process and 2 actors / 1 actor."""
    table = {}
    for model in dict.fromkeys(run["model"] for run in runs):
        med = {}
        for figure in FIGURES:
            for engine in ENGINES:
                values = [r[figure] for r in runs if r["model"] == model and r["engine"] == engine and r[figure]]
                med[(engine, figure)] = float(np.median(values)) if values else None
        row = {}
        for figure in FIGURES:
            single, one, two = (med[(engine, figure)] for engine in ENGINES)
            row[figure] = {"single process": single, "ray 1 actor": one, "ray 2 actors": two}
            row[figure]["1 actor / single process"] = one / single if one and single else None
            row[figure]["2 actors / 1 actor"] = two / one if two and one else None
        table[model] = row
    return table


if __name__ == "__main__":
    raise SystemExit(main())
