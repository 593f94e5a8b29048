"""The inputs of a dataset captioning job: what the user names, split into units of work, each row with a key.

`plan_units(inputs)` turns image files, folders, globs, WebDataset tar shards (globs and brace ranges such as
`shards/{00000..00009}.tar`), Parquet files and 🤗 `datasets` folders into `Unit`s, and lists every unit's keys
while doing so (tar member names, the key column, file paths: no image is read), so that a missing path, an
unreadable tar, a missing column or a repeated key is a clear `InputError` before any work starts.

`read_unit(unit)` yields the unit's rows as `(key, payload)`: `payload` is the image's bytes, or an `ImageError`
saying why there is no image (a tar sample without an image member, a null cell, a missing file). `decode_image`
turns bytes into an RGB PIL image or raises `ImageError` (corrupt, truncated, zero-byte, oversized). Both the
single-process engine and Ray's CPU tasks read through these, so both see the same keys and the same errors.

A unit is a plain dict (JSON-able, cheap to send to a Ray task): one tar shard, one Parquet file, a run of rows
of a `datasets` split, or up to `shard_size` image files. Each unit becomes one output shard (`shards.py`).
"""

from __future__ import annotations

import glob
import io
import tarfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from braceexpand import braceexpand  # optional: the caption extra (with webdataset)
from PIL import Image, UnidentifiedImageError
from webdataset.tariterators import group_by_keys  # optional: the caption extra

from .kinds import DEFAULT_MAX_IMAGE_PIXELS, input_kind

# A WebDataset sample's image member: the first of these suffixes it has, then any other suffix PIL reads.
PREFERRED_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img")
DEFAULT_KEY_COLUMN = "key"


class InputError(ValueError):
    """An input that cannot be captioned at all (missing, unreadable, ambiguous): reported before any work."""


class ImageError(ValueError):
    """One row whose image cannot be read: it becomes an error row, and the job goes on."""


def image_suffixes() -> set[str]:
    """Suffixes PIL can open, without the dot ("png", "jpg", ...)."""
    return {ext.lower().lstrip(".") for ext in Image.registered_extensions()}


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Each input with brace ranges (`{00000..00009}`) and globs (`*`, `?`, `[...]`) expanded, in order.

    A pattern that matches nothing and a plain path that does not exist are an InputError naming them.
    """
    paths, missing = [], []
    for item in inputs:
        for text in braceexpand(str(item)):
            if glob.has_magic(text):
                matches = sorted(glob.glob(text))
                paths.extend(Path(m) for m in matches)
                if not matches:
                    missing.append(f"{text} (matches nothing)")
            elif Path(text).exists():
                paths.append(Path(text))
            else:
                missing.append(f"{text} (no such file or folder)")
    if missing:
        raise InputError("input not found: " + ", ".join(missing) + ". Check the paths (globs are expanded here).")
    return paths


def plan_units(
    inputs: list[str],
    shard_size: int = 1000,
    recursive: bool = False,
    image_column: str | None = None,
    key_column: str | None = None,
) -> list[tuple[dict, list[str]]]:
    """[(unit, its keys)] for every input, in input order; every key unique across all of them.

    Raises InputError for a missing input, an unreadable tar or Parquet file, a missing column, or a key that
    appears twice (image files named twice are counted once).
    """
    if shard_size < 1:
        raise InputError(f"shard_size must be at least 1, got {shard_size}")
    planned, files = [], []

    def flush_files():
        for start in range(0, len(files), shard_size):
            chunk = files[start : start + shard_size]
            planned.append(({"kind": "files", "paths": chunk}, chunk))
        files.clear()

    seen_files = set()
    for path in expand_inputs(inputs):
        kind = input_kind(path)
        if kind in ("image", "folder"):
            if kind == "folder":
                suffixes = image_suffixes()
                found = path.rglob("*") if recursive else path.iterdir()
                found = sorted(p for p in found if p.is_file() and p.suffix.lower().lstrip(".") in suffixes)
            else:
                found = [path]
            for file in map(str, found):
                if file not in seen_files:
                    seen_files.add(file)
                    files.append(file)
            continue
        flush_files()
        if kind == "tar":
            planned.append(({"kind": "tar", "path": str(path)}, tar_keys(path)))
        elif kind == "parquet":
            planned.extend(parquet_units(path, shard_size, image_column, key_column))
        else:
            planned.extend(datasets_units(path, shard_size, image_column, key_column))
    flush_files()
    _check_unique(planned)
    return planned


def _check_unique(planned):
    where = {}
    for unit, keys in planned:
        for key in keys:
            if key in where:
                raise InputError(
                    f"the key {key!r} appears twice (in {describe_unit(where[key])} and {describe_unit(unit)}); "
                    "each row needs its own key: caption these inputs in separate jobs, or pass --key-column "
                    "a column whose values are unique."
                )
            where[key] = unit


def describe_unit(unit: dict) -> str:
    """A short human name for a unit, for messages."""
    if unit["kind"] == "files":
        return f"{len(unit['paths'])} image files from {unit['paths'][0]}"
    if "start" in unit:
        return f"{unit['path']} rows {unit['start']}-{unit['stop'] - 1}"
    return unit["path"]


# --- WebDataset tar shards ---------------------------------------------------------------------------------


def _tar_members(tar, path):
    """Regular members as webdataset's tar reader sees them (its `__meta__` entries skipped)."""
    for member in tar:
        if member.isfile() and not member.name.startswith("__"):
            yield member


def _samples(tar, path):
    members = ({"fname": m.name, "data": m, "__url__": path} for m in _tar_members(tar, path))
    # webdataset's own grouping: KEY.jpg, KEY.json, KEY.txt -> one sample with __key__ KEY.
    yield from group_by_keys(members)


def tar_keys(path: Path) -> list[str]:
    """The sample keys of a WebDataset shard, from its member names only (no image is read)."""
    try:
        with tarfile.open(path) as tar:
            return [sample["__key__"] for sample in _samples(tar, str(path))]
    except (tarfile.TarError, OSError, EOFError) as error:
        raise InputError(f"cannot read the tar shard {path}: {error}. Is it a complete tar file?") from error
    except ValueError as error:  # webdataset: a file name twice in one sample
        raise InputError(f"the tar shard {path} is not a valid WebDataset shard: {error}") from error


def _image_member(sample):
    suffixes = [s for s in sample if not s.startswith("__")]
    for suffix in PREFERRED_IMAGE_SUFFIXES:
        if suffix in sample:
            return sample[suffix]
    readable = image_suffixes()
    for suffix in suffixes:
        if suffix.rsplit(".", 1)[-1] in readable:
            return sample[suffix]
    found = ", ".join(f"{sample['__key__']}.{s}" for s in suffixes)
    raise ImageError(f"the sample has no image member (it holds {found}); images are KEY.jpg, KEY.png, KEY.webp")


def _read_tar(unit):
    path = unit["path"]
    with tarfile.open(path) as tar:
        for sample in _samples(tar, path):
            try:
                member = _image_member(sample)
                payload = tar.extractfile(member).read()
            except ImageError as error:
                payload = error
            yield sample["__key__"], payload


# --- Parquet -----------------------------------------------------------------------------------------------


def _pick_columns(names, image_column, key_column, where):
    if image_column is None:
        image_column = next((c for c in IMAGE_COLUMNS if c in names), None)
        if image_column is None:
            raise InputError(
                f"{where} has no image column (looked for {', '.join(IMAGE_COLUMNS)}; it has {', '.join(names)}); "
                "pass --image-column NAME"
            )
    if image_column not in names:
        raise InputError(f"{where} has no column {image_column!r} (it has {', '.join(names)}); fix --image-column")
    if key_column is not None and key_column not in names:
        raise InputError(f"{where} has no column {key_column!r} (it has {', '.join(names)}); fix --key-column")
    if key_column is None and DEFAULT_KEY_COLUMN in names:
        key_column = DEFAULT_KEY_COLUMN
    return image_column, key_column


def parquet_units(path: Path, shard_size: int, image_column: str | None, key_column: str | None) -> list:
    """One unit per run of row groups of about `shard_size` rows; keys from the key column (or `PATH#ROW`)."""
    import pyarrow.parquet as pq  # optional: the caption extra

    try:
        file = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ... for a file that is not Parquet
        raise InputError(f"cannot read the Parquet file {path}: {error}") from error
    image_column, key_column = _pick_columns(file.schema_arrow.names, image_column, key_column, str(path))
    units, start, groups, rows = [], 0, [], 0
    metadata = file.metadata
    for group in range(metadata.num_row_groups):
        groups.append(group)
        rows += metadata.row_group(group).num_rows
        if rows >= shard_size or group == metadata.num_row_groups - 1:
            unit = {"kind": "parquet", "path": str(path), "row_groups": groups, "start": start, "stop": start + rows}
            unit.update(image_column=image_column, key_column=key_column)
            if key_column is None:
                keys = [f"{path}#{i}" for i in range(start, start + rows)]
            else:
                table = file.read_row_groups(groups, columns=[key_column])
                keys = [str(v) for v in table.column(key_column).to_pylist()]
            units.append((unit, keys))
            start, groups, rows = start + rows, [], 0
    return units


def _cell_payload(cell, base_dir):
    """Bytes from an image cell: bytes, a path (absolute or relative to the table's folder), or a 🤗 Image
    struct {"bytes", "path"}; an ImageError for a null cell or a path that is not there."""
    if isinstance(cell, dict):
        cell = cell.get("bytes") or cell.get("path")
    if cell is None:
        raise ImageError("the image cell is null")
    if isinstance(cell, (bytes, bytearray, memoryview)):
        return bytes(cell)
    if isinstance(cell, str):
        path = Path(cell)
        if not path.is_absolute() and not path.exists() and base_dir is not None:
            path = Path(base_dir) / path
        if not path.is_file():
            raise ImageError(f"the image file {cell!r} named in the image column does not exist")
        return path.read_bytes()
    raise ImageError(f"the image cell holds a {type(cell).__name__}; expected image bytes or a file path")


def _rows_of(keys, cells, base_dir):
    for key, cell in zip(keys, cells):
        try:
            yield key, _cell_payload(cell, base_dir)
        except (ImageError, OSError) as error:
            yield key, ImageError(str(error))


def _read_parquet(unit):
    import pyarrow.parquet as pq  # optional: the caption extra

    columns = [unit["image_column"]] + ([unit["key_column"]] if unit["key_column"] else [])
    table = pq.ParquetFile(unit["path"]).read_row_groups(unit["row_groups"], columns=columns)
    if unit["key_column"]:
        keys = [str(v) for v in table.column(unit["key_column"]).to_pylist()]
    else:
        keys = [f"{unit['path']}#{i}" for i in range(unit["start"], unit["stop"])]
    yield from _rows_of(keys, table.column(unit["image_column"]).to_pylist(), Path(unit["path"]).parent)


# --- 🤗 datasets folders (save_to_disk) ------------------------------------------------------------------------


def _load_split(path, split):
    from datasets import load_from_disk  # optional: the train extra; only folders written by `save_to_disk` need it

    loaded = load_from_disk(str(path))
    return loaded[split] if split is not None else loaded


def datasets_units(path: Path, shard_size: int, image_column: str | None, key_column: str | None) -> list:
    """Runs of `shard_size` rows of each split; images read undecoded (bytes or path)."""
    try:
        loaded = _load_split(path, None)
    except ImportError as error:
        raise InputError(f"{path} is a 🤗 datasets folder; reading it needs `pip install datasets`") from error
    except Exception as error:
        raise InputError(f"cannot load the datasets folder {path}: {error}") from error
    splits = list(loaded) if hasattr(loaded, "keys") else [None]
    units = []
    for split in splits:
        table = loaded[split] if split is not None else loaded
        where = f"{path}" + (f" (split {split})" if split else "")
        image_column_, key_column_ = _pick_columns(table.column_names, image_column, key_column, where)
        for start in range(0, len(table), shard_size):
            stop = min(start + shard_size, len(table))
            unit = {"kind": "datasets", "path": str(path), "split": split, "start": start, "stop": stop}
            unit.update(image_column=image_column_, key_column=key_column_)
            units.append((unit, _datasets_keys(table.select(range(start, stop)), unit)))
    return units


def _datasets_keys(rows, unit):
    """Keys of `rows` (the unit's rows of its split): the key column, or `FOLDER[/SPLIT]#ROW`."""
    if unit["key_column"] is None:
        prefix = unit["path"] + (f"/{unit['split']}" if unit["split"] else "")
        return [f"{prefix}#{i}" for i in range(unit["start"], unit["stop"])]
    return [str(v) for v in rows[unit["key_column"]]]


def _read_datasets(unit):
    from datasets import Image as ImageFeature  # optional: the train extra

    table = _load_split(unit["path"], unit["split"]).select(range(unit["start"], unit["stop"]))
    column = unit["image_column"]
    if isinstance(table.features[column], ImageFeature):
        table = table.cast_column(column, ImageFeature(decode=False))  # bytes/path, decoded by decode_image
    yield from _rows_of(_datasets_keys(table, unit), table[column], None)


# --- image files -------------------------------------------------------------------------------------------


def _read_files(unit):
    for path in unit["paths"]:
        try:
            yield path, Path(path).read_bytes()
        except OSError as error:
            yield path, ImageError(f"cannot read the file: {error.strerror or error}")


_READERS = {"files": _read_files, "tar": _read_tar, "parquet": _read_parquet, "datasets": _read_datasets}


def read_unit(unit: dict, skip: set | frozenset = frozenset()) -> Iterator[tuple[str, bytes | ImageError]]:
    """The unit's rows as (key, image bytes or ImageError), in its order, each key once, `skip` left out."""
    seen = set(skip)
    for key, payload in _READERS[unit["kind"]](unit):
        if key not in seen:
            seen.add(key)
            yield key, payload


def decode_image(payload: bytes | ImageError, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Any:
    """An RGB PIL image from image bytes; an ImageError with the reason for anything else."""
    # Imported here: processing_mqwen pulls in transformers' image processing and torchvision, 3.7 s of the
    # 10 s `mqwen-caption --help` took on this 2-core VM when imported at the top; only decoding needs it.
    from ..processing_mqwen import to_rgb_image

    if isinstance(payload, ImageError):
        raise payload
    if not payload:
        raise ImageError("the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked below
            with Image.open(io.BytesIO(payload)) as opened:
                pixels = opened.width * opened.height
                if pixels > max_pixels:
                    raise ImageError(
                        f"the image is {opened.width}x{opened.height} = {pixels:,} pixels, over the limit of "
                        f"{max_pixels:,} (raise --max-image-pixels to caption it)"
                    )
                opened.load()
                return to_rgb_image(opened.copy())
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("cannot decode the image: not a format PIL reads, or its header is corrupt") from None
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise ImageError(f"cannot decode the image: {error}") from None
