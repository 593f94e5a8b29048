"""The Ray Data engine of `caption_dataset`: read and preprocess in CPU tasks, caption in actors, write here.

    units (one row each) -> flat_map(read_rows)          CPU tasks: a tar shard / Parquet file / files per task
                         -> map_batches(preprocess)      CPU tasks: decode, resize, the processor (fused with read)
                         -> map_batches(Captioner)       `actors` actors, each loads the model once, `generate`
                         -> iter_batches on the driver   rows collected per unit, each unit written as one shard

The captioners get ready tensors, so they never wait on PIL (vllm#21873). Only captions (short strings) travel
back to the driver, so DIR need only exist where the driver runs. Ray restarts a dead actor and retries its
batches (Ray Data sets `max_restarts=-1`, `max_task_retries=-1` on its actors); a retried task may hand some rows
over twice, so exactly-once comes from here: rows are kept per unit by key, the first of each wins, and a unit is
written once, when it holds every key it should.

`add_captions(rows, model, ...)` also serves an existing Ray pipeline: give it a dataset with columns `unit` (any
int), `key`, `payload` (image bytes) and `error` ("" for a row with an image), get back `unit`, `key`, `caption`,
`error`.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable

# ray is imported here, at module top: this module is only imported for `engine="ray"` (dataset.py imports it
# lazily), so the seconds `import ray` costs are paid only by Ray jobs.
import numpy as np
import pyarrow as pa  # optional: the caption extra
import ray  # optional: the caption extra
import torch
from PIL import Image

from ..runtime import generate_captions, load_for_inference, on_model, processor_inputs
from .inputs import ImageError, decode_image, read_unit
from .kinds import DEFAULT_MAX_IMAGE_PIXELS

MODEL_COLUMNS = ("input_ids", "attention_mask", "pixel_values")
# Between the stages a row without error has error "" (Ray turns None in a numpy object column into NaN); the
# captioners' output, an Arrow table, has null there.
NO_ERROR = ""


def read_rows(row: dict) -> list[dict]:
    """flat_map: one unit (a JSON string) -> its rows {unit, key, payload, error}, keys already done left out."""
    item = json.loads(row["item"])
    rows = []
    for key, payload in read_unit(item["unit"], frozenset(item["skip"])):
        error = str(payload) if isinstance(payload, ImageError) else NO_ERROR
        rows.append({"unit": item["index"], "key": key, "payload": b"" if error else payload, "error": error})
    return rows


@functools.lru_cache(maxsize=2)
def _processor(model: str):
    """The processor, loaded once per worker process (Ray reuses the processes of its CPU tasks)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model, trust_remote_code=True)


@functools.lru_cache(maxsize=2)
def _blank(model: str, prompt: str | None) -> dict:
    """Model inputs of one placeholder image: what an error row carries, so every batch has the same columns."""
    batch = processor_inputs(_processor(model), [Image.new("RGB", (8, 8))], prompt)
    return {name: batch[name][0].numpy() for name in MODEL_COLUMNS}


def preprocess(
    batch: dict, model: str, prompt: str | None = None, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> dict:
    """map_batches (numpy): decode each payload and run the processor; a row that cannot be decoded keeps
    placeholder inputs and its `error` (NO_ERROR for the others)."""
    errors = list(batch["error"])
    images, good = [], []
    for i, payload in enumerate(batch["payload"]):
        if errors[i] != NO_ERROR:
            continue
        try:
            images.append(decode_image(bytes(payload), max_image_pixels))
            good.append(i)
        except ImageError as error:
            errors[i] = str(error)
    blank = _blank(model, prompt)
    columns = {name: np.stack([blank[name]] * len(errors)) for name in MODEL_COLUMNS}
    if images:
        inputs = processor_inputs(_processor(model), images, prompt)
        for name in MODEL_COLUMNS:
            columns[name][good] = inputs[name].numpy()
    return {"unit": batch["unit"], "key": batch["key"], "error": np.array(errors, dtype=object), **columns}


class Captioner:
    """map_batches actor: loads the model once (`runtime.load_for_inference`), captions the batches it gets."""

    def __init__(self, model: str, device: str = "auto", dtype: str = "auto", max_new_tokens: int = 64, threads=1):
        if threads:
            torch.set_num_threads(max(1, int(threads)))
        self.model, self.processor = load_for_inference(model, device, dtype)
        self.max_new_tokens = max_new_tokens

    def __call__(self, batch: dict) -> dict:
        from transformers import BatchFeature

        errors = list(batch["error"])
        good = [i for i, error in enumerate(errors) if error == NO_ERROR]
        captions = [None] * len(errors)
        if good:
            inputs = BatchFeature({name: torch.from_numpy(batch[name][good]) for name in MODEL_COLUMNS})
            generated = generate_captions(
                self.model, self.processor, on_model(self.model, inputs), self.max_new_tokens, do_sample=False
            )
            for i, caption in zip(good, generated):
                captions[i] = caption
        # An Arrow table keeps None as null (a numpy object column would come back as NaN).
        return pa.table(
            {
                "unit": pa.array(batch["unit"], pa.int64()),
                "key": pa.array(list(batch["key"]), pa.string()),
                "caption": pa.array(captions, pa.string()),
                "error": pa.array([error or None for error in errors], pa.string()),
            }
        )


def caption_on_ray(
    work: list,
    write: Callable[[list[dict]], None],
    model: str,
    *,
    prompt: str | None,
    max_new_tokens: int,
    batch_size: int,
    max_image_pixels: int,
    device: str = "auto",
    dtype: str = "auto",
    ray_address: str | None = None,
    actors: int = 1,
    gpus_per_actor: float = 0,
    cpus_per_actor: float = 1,
    progress: bool = True,
    tick: Callable[[int], None] = lambda n: None,
) -> None:
    """Run `work` (dataset.WorkItem list) on Ray Data; `write(rows)` gets each unit's rows once, complete;
    `tick(n)` is called as n more rows arrive."""
    if actors < 1:
        raise ValueError(f"actors must be at least 1, got {actors}")
    if os.path.isdir(model):
        model = os.path.abspath(model)  # the workers' working directory is not ours
    if gpus_per_actor and device == "auto":
        device = "cuda"
    started = not ray.is_initialized()
    if started:
        init = {"address": ray_address} if ray_address else {"num_cpus": _local_cpus(actors, cpus_per_actor)}
        ray.init(**init, logging_level="WARNING", log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    try:
        items = [{"item": json.dumps({"index": w.index, "unit": w.unit, "skip": w.skip})} for w in work]
        rows = ray.data.from_items(items, override_num_blocks=len(items)).flat_map(read_rows)
        captioned = add_captions(
            rows, model, prompt=prompt, max_new_tokens=max_new_tokens, batch_size=batch_size,
            max_image_pixels=max_image_pixels, device=device, dtype=dtype, actors=actors,
            gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor,
        )  # fmt: skip
        write_units(captioned, {w.index: w.expected for w in work}, write, tick)
    finally:
        if started:
            ray.shutdown()


def _local_cpus(actors, cpus_per_actor):
    """CPUs for a local Ray: the machine's, but at least one more than the actors hold, for the CPU tasks."""
    return max(os.cpu_count() or 1, int(np.ceil(actors * cpus_per_actor)) + 1)


def add_captions(
    rows: ray.data.Dataset,
    model: str,
    *,
    prompt: str | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    device: str = "auto",
    dtype: str = "auto",
    actors: int = 1,
    gpus_per_actor: float = 0,
    cpus_per_actor: float = 1,
) -> ray.data.Dataset:
    """`rows` (columns `unit`, `key`, `payload`: image bytes, `error`: NO_ERROR or why there is no image) with
    `caption` and `error` (null when captioned): `preprocess` in CPU tasks, then `actors` `Captioner`s."""
    ds = rows.map_batches(
        preprocess,
        batch_size=batch_size,
        batch_format="numpy",
        fn_kwargs={"model": model, "prompt": prompt, "max_image_pixels": max_image_pixels},
    )
    return ds.map_batches(
        Captioner,
        batch_size=batch_size,
        batch_format="numpy",
        fn_constructor_kwargs={
            "model": model,
            "device": device,
            "dtype": dtype,
            "max_new_tokens": max_new_tokens,
            "threads": cpus_per_actor,
        },
        concurrency=actors,
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor or None,
        # Ray Data's defaults, said here because exactly-once relies on them: a dead actor is restarted and its
        # batches retried. Naming them also keeps the preprocessing out of the actors: Ray fuses a task stage
        # into the actor stage after it only when their remote arguments are equal.
        max_restarts=-1,
        max_task_retries=-1,
    )


def write_units(
    captioned: ray.data.Dataset,
    expected: dict[int, int],
    write: Callable[[list[dict]], None],
    tick: Callable[[int], None] = lambda n: None,
) -> None:
    """Collect `captioned` rows per unit, the first row of each key kept; `write(rows)` each unit once, when
    it holds its `expected` number of keys. A unit still short at the end is a RuntimeError."""
    pending: dict[int, dict[str, dict]] = {}
    written = set()
    for batch in captioned.iter_batches(batch_size=None, batch_format="pyarrow"):
        for unit, key, caption, error in zip(
            *(batch.column(c).to_pylist() for c in ("unit", "key", "caption", "error"))
        ):
            if unit in written:
                continue  # a retried task's repeat of a unit already written
            rows = pending.setdefault(unit, {})
            if key not in rows:
                rows[key] = {"key": key, "caption": caption, "error": error}
                tick(1)
            if len(rows) == expected[unit]:
                write(list(rows.values()))
                written.add(unit)
                del pending[unit]
    missing = {unit: f"{len(pending.get(unit, {}))} of {n}" for unit, n in expected.items() if unit not in written}
    if missing:
        raise RuntimeError(f"Ray Data returned incomplete units (unit: rows received): {missing}")
