"""Sharded safetensors, read and written one tensor at a time.

Why not `safetensors.torch.save_file` per shard: it needs every tensor of the shard in memory at once, so
converting a 4 GB bf16 shard to fp32 would hold 8 GB (and older safetensors releases copy each tensor to
bytes on top). A converter that must stay under ~2x the largest input shard in peak memory instead writes
the documented safetensors layout itself: the header (names, dtypes, shapes, offsets) is known before any
data is read, so each tensor is loaded, converted, written and freed in turn. Reading opens the source file
for each tensor, so no source shard stays mapped (mapped pages count towards the process's RSS).

The files are ordinary safetensors; the tests read them back with `safetensors.safe_open` and transformers.
"""

import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .errors import ConvertError

_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"), ("uint32", "U32")):
    if hasattr(torch, _name):
        _DTYPE_NAMES[getattr(torch, _name)] = _code
_DTYPES = {code: dtype for dtype, code in _DTYPE_NAMES.items()}

WEIGHTS_NAME = "model.safetensors"
CHUNK_BYTES = 64 * 2**20
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


@dataclass
class TensorPlan:
    """One tensor of the output: its final name, dtype and shape, and how to produce its data."""

    name: str
    dtype: torch.dtype
    shape: tuple
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize


# ------------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------------


class SafetensorsFile:
    """Lazy access to one safetensors file: metadata from the header, tensors on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with safe_open(self.path, framework="pt") as handle:
                self._info = {}
                for key in handle.keys():
                    piece = handle.get_slice(key)
                    self._info[key] = (_DTYPES[piece.get_dtype()], tuple(piece.get_shape()))
        except Exception as error:  # a truncated download or a file that is not safetensors
            raise ConvertError(f"Could not read {self.path} as safetensors: {error}") from error

    def keys(self) -> list[str]:
        return list(self._info)

    def info(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """(dtype, shape) without reading the data."""
        return self._info[key]

    def get(self, key: str) -> torch.Tensor:
        with safe_open(self.path, framework="pt") as handle:
            return handle.get_tensor(key)

    def close(self) -> None:
        pass


class PickleFile:
    """A torch.save'd state dict, loaded with `weights_only=True`.

    Zip-format files (torch >= 1.6) are memory-mapped and re-opened for each tensor, which is cheap and
    keeps only that tensor resident; legacy files cannot be mapped and are held in memory until `close`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._cached = None
        self._info = {key: (value.dtype, tuple(value.shape)) for key, value in self._load().items()}

    def _load(self):
        if self._cached is not None:
            return self._cached
        try:
            state, mapped = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True), True
        except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
            state, mapped = torch.load(self.path, map_location="cpu", weights_only=True), False
        except Exception as error:
            raise ConvertError(f"Could not read {self.path} with torch.load(weights_only=True): {error}") from error
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ConvertError(f"{self.path} does not hold a state dict (got {type(state).__name__})")
        state = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
        if not mapped:
            self._cached = state
        return state

    def keys(self) -> list[str]:
        return list(self._info)

    def info(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self._info[key]

    def get(self, key: str) -> torch.Tensor:
        return self._load()[key]

    def close(self) -> None:
        self._cached = None


def open_weights(path: str | os.PathLike) -> SafetensorsFile | PickleFile:
    """A reader for a safetensors or (already allowed) pickle weight file."""
    path = Path(path)
    return SafetensorsFile(path) if path.suffix == ".safetensors" else PickleFile(path)


# ------------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------------


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '2GiB' / 123 -> bytes."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    cleaned = str(text).strip().upper()
    number = cleaned.rstrip("KMGIB")
    unit = cleaned[len(number) :]
    try:
        return int(float(number) * units[unit])
    except (KeyError, ValueError):
        raise ConvertError(f"Cannot read {text!r} as a size: use e.g. 5GB, 500MB or a number of bytes") from None


def plan_shards(entries: Iterable[TensorPlan], max_bytes: int) -> list[list[TensorPlan]]:
    """Split tensors, in order, into shards of at most `max_bytes` (a larger tensor gets a shard alone)."""
    shards, current, size = [], [], 0
    for entry in entries:
        if current and size + entry.nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += entry.nbytes
    if current:
        shards.append(current)
    return shards


def _header(entries, metadata):
    header = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for entry in entries:
        header[entry.name] = {
            "dtype": _DTYPE_NAMES[entry.dtype],
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-(8 + len(encoded)) % 8)  # tensor data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(encoded)) + encoded


def write_safetensors(
    path: str | os.PathLike,
    entries: Iterable[TensorPlan],
    progress: Any = None,
    metadata: Iterable[tuple[str, str]] | dict[str, str] = (("format", "pt"),),
) -> None:
    """Write `entries` to one safetensors file, producing and freeing one tensor at a time."""
    # Larger element types first, so that every tensor's offset is a multiple of its element size.
    entries = sorted(entries, key=lambda entry: -entry.dtype.itemsize)
    with open(path, "wb") as handle:
        handle.write(_header(entries, metadata))
        for entry in entries:
            tensor = entry.load()
            if tuple(tensor.shape) != tuple(entry.shape):
                raise ConvertError(f"{entry.name}: produced shape {tuple(tensor.shape)}, planned {tuple(entry.shape)}")
            flat = tensor.detach().cpu().contiguous().reshape(-1)
            # Converted piece by piece, so a dtype change never holds a second full copy of a large tensor.
            step = max(1, CHUNK_BYTES // entry.dtype.itemsize)
            for start in range(0, flat.numel(), step):
                piece = flat[start : start + step].to(entry.dtype)
                handle.write(memoryview(piece.view(torch.uint8).numpy()))
            if progress is not None:
                progress.update(entry.nbytes)
            del tensor, flat


def write_sharded(
    out_dir: str | os.PathLike, entries: Iterable[TensorPlan], max_bytes: int, progress: Any = None
) -> list[str]:
    """Write `entries` as `model.safetensors`, or as numbered shards plus `model.safetensors.index.json`.

    Returns the list of files written (names relative to `out_dir`).
    """
    out_dir = Path(out_dir)
    shards = plan_shards(entries, max_bytes)
    if len(shards) == 1:
        write_safetensors(out_dir / WEIGHTS_NAME, shards[0], progress)
        return [WEIGHTS_NAME]
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    index = {
        "metadata": {"total_size": sum(entry.nbytes for shard in shards for entry in shard)},
        "weight_map": {entry.name: name for name, shard in zip(names, shards) for entry in shard},
    }
    for name, shard in zip(names, shards):
        write_safetensors(out_dir / name, shard, progress)
    (out_dir / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names + [WEIGHTS_INDEX_NAME]
