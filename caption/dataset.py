"""`caption_dataset(...)`: caption a whole dataset into an output folder, resumably, in one process or on Ray.

    from mqwen.caption.dataset import caption_dataset
    report = caption_dataset(["shards/{00000..00009}.tar"], model="user/mqwen-7b", output="captions/")
    report = caption_dataset(["images.parquet"], model="./mqwen", output="captions/", engine="ray", actors=4,
                             gpus_per_actor=1, ray_address="auto")

The inputs are planned first (`inputs.plan_units`: every key listed, every input checked), keys already in a
completed shard of `output` are left out (`shards.OutputFolder`), then the remaining units are captioned, each
written as one shard when all its rows are done. Rerun the same call after a crash and it finishes the job:
every key ends up in `output` exactly once. Read the result with `shards.read_output(output)` or any Parquet
reader (`pandas.read_parquet(output)` reads the folder's shards together).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm
from transformers import AutoConfig

from ..runtime import caption_images, load_for_inference
from .inputs import ImageError, decode_image, plan_units, read_unit
from .kinds import DEFAULT_MAX_IMAGE_PIXELS
from .shards import OutputFolder, job_settings

ENGINES = ("transformers", "ray")


class ModelError(ValueError):
    """The model cannot be loaded from what `model` names."""


def check_model(model: str, load: Callable[[], Any]) -> Any:
    """`load()`, its failure turned into a ModelError that says what `model` must be."""
    try:
        return load()
    except Exception as error:  # from_pretrained raises OSError, ValueError, EnvironmentError, ... for a bad model
        raise ModelError(
            f"could not load the model from {model!r}: {error}\nPass --model a folder written by save_pretrained "
            "(config.json, model.safetensors, processor files) or a Hub repo id you can reach."
        ) from error


@dataclass
class CaptionReport:
    """What a `caption_dataset` call did."""

    output: str
    inputs: int = 0  # keys in the inputs
    already_done: int = 0  # keys found in completed shards and not captioned again
    captioned: int = 0  # rows written by this call (errors included)
    errors: int = 0  # of those, rows whose image could not be read
    shards: list = field(default_factory=list)  # shards written by this call


@dataclass
class WorkItem:
    """One unit still to caption: `expected` keys will be written (those in `skip` are already done)."""

    index: int
    unit: dict
    expected: int
    skip: list


def plan_work(planned: list, done: set) -> tuple[list[WorkItem], int]:
    """(units with keys still to caption, how many keys are already done)."""
    work, already = [], 0
    for index, (unit, keys) in enumerate(planned):
        skip = [key for key in keys if key in done] if done else []
        already += len(skip)
        if len(skip) < len(keys):
            work.append(WorkItem(index, unit, len(keys) - len(skip), skip))
    return work, already


def caption_dataset(
    inputs: list[str] | str,
    model: str,
    output: str,
    *,
    format: str = "parquet",
    engine: str = "transformers",
    prompt: str | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    shard_size: int = 1000,
    device: str = "auto",
    dtype: str = "auto",
    overwrite: bool = False,
    recursive: bool = False,
    image_column: str | None = None,
    key_column: str | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    progress: bool = True,
    on_rows: Callable[[int], None] | None = None,
    ray_address: str | None = None,
    actors: int = 1,
    gpus_per_actor: float = 0,
    cpus_per_actor: float = 1,
) -> CaptionReport:
    """Caption every image of `inputs` with `model` into the folder `output` (see the module docstring).

    `inputs`: image files, folders, globs, WebDataset `.tar` shards (brace ranges allowed), `.parquet` files,
    `datasets` folders. `engine`: "transformers" (this process, `model.generate`) or "ray" (Ray Data: CPU tasks
    decode and preprocess, `actors` captioner actors each load the model once; `ray_address` None starts a
    local Ray). Raises `inputs.InputError` / `shards.OutputError` before any work when an input or the output
    folder cannot be used; an image that cannot be read is an error row, never an exception. `progress` shows a
    tqdm bar; `on_rows(n)`, if given, is called each time n more rows are done (for a notebook's own display).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    settings = job_settings(model, prompt, max_new_tokens, format)
    planned = plan_units(inputs, shard_size, recursive, image_column, key_column)
    report = CaptionReport(output=str(output), inputs=sum(len(keys) for _, keys in planned))
    with OutputFolder(output, settings, overwrite) as folder:
        work, report.already_done = plan_work(planned, folder.done_keys())
        del planned
        if report.already_done:
            print(
                f"mqwen-caption: {report.already_done} of {report.inputs} keys already captioned in {output}; "
                "captioning the rest",
                file=sys.stderr,
            )
        options = dict(
            prompt=prompt, max_new_tokens=max_new_tokens, batch_size=batch_size, max_image_pixels=max_image_pixels
        )
        with tqdm(
            total=sum(item.expected for item in work), desc="captioning", unit="img", disable=not progress
        ) as bar:

            def write(rows):
                report.shards.append(folder.write_shard(rows))
                report.captioned += len(rows)
                report.errors += sum(row["error"] is not None for row in rows)

            def tick(n):
                bar.update(n)
                if on_rows is not None:
                    on_rows(n)

            if not work:
                pass
            elif engine == "ray":
                from .ray_engine import caption_on_ray  # imports ray (seconds): only for --engine ray

                check_model(model, lambda: AutoConfig.from_pretrained(model, trust_remote_code=True))
                caption_on_ray(
                    work,
                    write,
                    model,
                    device=device,
                    dtype=dtype,
                    ray_address=ray_address,
                    actors=actors,
                    gpus_per_actor=gpus_per_actor,
                    cpus_per_actor=cpus_per_actor,
                    progress=progress,
                    tick=tick,
                    **options,
                )
            else:
                loaded = check_model(model, lambda: load_for_inference(model, device, dtype))
                caption_locally(work, write, *loaded, tick=tick, **options)
    return report


def error_row(key: str, error: Exception) -> dict:
    return {"key": key, "caption": None, "error": str(error)}


def caption_locally(
    work: list[WorkItem],
    write: Callable[[list[dict]], None],
    model: Any,
    processor: Any,
    prompt: str | None,
    max_new_tokens: int,
    batch_size: int,
    max_image_pixels: int,
    tick: Callable[[int], None] = lambda n: None,
) -> None:
    """The single-process engine: each unit read, decoded and captioned `batch_size` images at a time
    (`runtime.caption_images`), then written as one shard by `write(rows)`; `tick(n)` as rows get done."""
    for item in work:
        rows = []
        images = _decoded(item, rows, max_image_pixels, tick)  # lazily: one batch of decoded images at a time
        generate = dict(prompt=prompt, max_new_tokens=max_new_tokens, progress=False, do_sample=False)
        captions = []
        for caption in caption_images(model, processor, images, batch_size, **generate):
            captions.append(caption)
            tick(1)
        captions = iter(captions)
        for row in rows:
            if row["error"] is None:
                row["caption"] = next(captions)
        write(rows)


def _decoded(item: WorkItem, rows: list, max_image_pixels: int, tick: Callable[[int], None]):
    """Yield the unit's decodable images; append one row per key to `rows` (errors filled in, captions not)."""
    for key, payload in read_unit(item.unit, frozenset(item.skip)):
        try:
            image = decode_image(payload, max_image_pixels)
        except ImageError as error:
            rows.append(error_row(key, error))
            tick(1)
            continue
        rows.append({"key": key, "caption": None, "error": None})
        yield image
