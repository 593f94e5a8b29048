"""Images/s of a dataset captioning job: one process, Ray Data with 1 captioner actor, and with 2 (one thread each).

    python -m mqwen.benchmarks.dataset_caption                      # demo and mid shapes, writes RESULTS-dataset.*
    python -m mqwen.benchmarks.dataset_caption --models demo --images 64 --rounds 1

Every engine runs `caption_dataset` on the same WebDataset shards of random 480x640 JPEG photos (4 tar shards,
`--shard-size` images per output shard) with random weights at the demo model's shapes (`demo/model.py`, 64 px,
64 image tokens) and at the benchmark's mid shapes (`shapes.MID`, 224 px, 256 image tokens), greedy, a fixed
number of new tokens (random weights rarely stop early, and never at the same point for every engine: the
figures count images, and all engines make the same captions). Engines run in turn, `--rounds` times, in one
process that started one local Ray with 3 CPUs (2 actors + 1 for the preprocessing tasks) before any timing.

Two figures per engine: `job` = images / wall time of the whole `caption_dataset` call on the larger set (Ray's
actors start, import torch and load the model in that time), and `marginal` = (large - small images) / (large -
small job time), each engine run on a set of N and of 3N images: the fixed start-up cancels, what is left is the
rate a long job runs at, which the issue's targets are about. (Shard rename times cannot give it: Ray completes
most units together at the end.)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from ..convert.staging import write_atomically
from ..convert.tiny import build_tiny, save_checkpoint
from .shapes import MID

ENGINES = ("single process", "ray 1 actor", "ray 2 actors")
FIGURES = ("marginal_images_per_s", "job_images_per_s")


def build_model(name: str, folder: Path) -> Path:
    if name == "demo":
        from ..demo.model import build_shapes_model

        model, processor = build_shapes_model()
    else:
        model, processor = build_tiny(vision=MID.vision, text=MID.text)
    return save_checkpoint(model, processor, folder / name)


def write_shards(folder: Path, n_images: int, n_shards: int = 4, size=(480, 640)) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for shard in range(n_shards):
        path = folder / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(shard, n_images, n_shards):
                buffer = io.BytesIO()
                pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
                info = tarfile.TarInfo(f"{i:09d}.jpg")
                info.size = buffer.tell()
                buffer.seek(0)
                tar.addfile(info, buffer)
        paths.append(str(path))
    return paths


def one_run(engine, shards, model, out, tokens, batch_size, shard_size) -> tuple[int, float]:
    """(images captioned, seconds of the `caption_dataset` call)."""
    import torch

    from ..caption.dataset import caption_dataset

    torch.set_num_threads(1)  # the single process: one thread, like each actor
    ray_options = {} if engine == "single process" else {"engine": "ray", "actors": int(engine.split()[1])}
    start = time.perf_counter()
    report = caption_dataset(
        shards, str(model), out, max_new_tokens=tokens, batch_size=batch_size, shard_size=shard_size,
        device="cpu", progress=False, **ray_options,
    )  # fmt: skip
    return report.captioned, time.perf_counter() - start


def machine() -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor()
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)), "load_average_at_start": os.getloadavg()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=("demo", "mid"), default=["demo", "mid"])
    parser.add_argument("--images", type=int, nargs="+", default=None, help="N per model (default 96 8): N and 3N")
    parser.add_argument("--tokens", type=int, default=8, help="new tokens per caption (default 8)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=None, help="default: images / 8")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS-dataset.json")))
    args = parser.parse_args(argv)
    images = dict(zip(args.models, args.images or [{"demo": 96, "mid": 8}[m] for m in args.models]))

    import ray

    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "settings": vars(args), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.models:
            model = build_model(name, tmp)
            sets = {n: write_shards(tmp / f"{name}-{n}", n) for n in (images[name], 3 * images[name])}
            shard_size = args.shard_size or max(1, images[name] // 4)
            for round_ in range(args.rounds):
                order = ENGINES[round_ % 3 :] + ENGINES[: round_ % 3]  # the first engine rotates each round
                for engine in order:
                    run = {"model": name, "round": round_, "engine": engine}
                    for size, shards in sets.items():
                        out = tmp / f"{name}-{round_}-{engine.replace(' ', '-')}-{size}"
                        run[f"seconds_{len(run) - 3}"] = one_run(
                            engine, shards, model, out, args.tokens, args.batch_size, shard_size
                        )
                    (small, t_small), (large, t_large) = run.pop("seconds_0"), run.pop("seconds_1")
                    run.update(images_small=small, seconds_small=t_small, images_large=large, seconds_large=t_large)
                    run["job_images_per_s"] = large / t_large
                    run["marginal_images_per_s"] = (large - small) / (t_large - t_small) if t_large > t_small else None
                    results["runs"].append(run)
                    print(json.dumps(run), flush=True)
    ray.shutdown()
    results["ratios"] = ratios(results["runs"])
    write_atomically(args.out, json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["ratios"], indent=2))
    return 0


def ratios(runs) -> dict:
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
