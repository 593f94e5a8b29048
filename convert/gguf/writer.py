"""Stream tensors into a GGUF file one at a time, in the precision `--outtype` asks for.

GGUFWriter normally keeps every tensor in memory until `write_tensors_to_file`. Here each tensor is first
declared (name, shape, type, byte size) so the header can be written, then read, converted and written in
the same order, so the export holds one tensor at a time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from ..errors import ConvertError

if TYPE_CHECKING:
    import gguf

OUTTYPES = ("f32", "f16", "q8_0")


@dataclass
class PlannedTensor:
    """One GGUF tensor: its name, numpy shape, how to read it (float32 numpy), and its kind.

    kind: "matrix" (quantizable weight), "conv" (the patch embedding: ggml's conv kernels take F16/F32),
    "keep_f32" (norms, biases, embeddings added to activations, which llama.cpp reads as F32).
    """

    name: str
    shape: tuple
    load: Callable[[], np.ndarray]
    kind: str = "matrix"


def ggml_type(tensor: PlannedTensor, outtype: str) -> gguf.GGMLQuantizationType:
    import gguf  # optional: the gguf extra

    if tensor.kind == "keep_f32" or len(tensor.shape) == 1 or outtype == "f32":
        return gguf.GGMLQuantizationType.F32
    if outtype == "f16" or tensor.kind == "conv":
        return gguf.GGMLQuantizationType.F16
    return gguf.GGMLQuantizationType.Q8_0


def check_quantizable(tensors: Sequence[PlannedTensor], outtype: str) -> None:
    """q8_0 packs rows in blocks of 32 values: refuse (naming the tensor) when a row length does not allow it."""
    import gguf  # optional: the gguf extra

    if outtype != "q8_0":
        return
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    bad = [
        f"{t.name} {t.shape}"
        for t in tensors
        if ggml_type(t, outtype) == gguf.GGMLQuantizationType.Q8_0 and t.shape[-1] % block
    ]
    if bad:
        raise ConvertError(
            f"--outtype q8_0 needs every weight row to be a multiple of {block} values, and these are not: "
            f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}. Export with --outtype f16 instead."
        )


def _encode(array, qtype):
    import gguf  # optional: the gguf extra

    if qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(array, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)


def _nbytes(shape, qtype):
    import gguf  # optional: the gguf extra

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def write_gguf(
    path: str | os.PathLike,
    writer: gguf.GGUFWriter,
    tensors: Sequence[PlannedTensor],
    outtype: str,
    progress: bool = True,
    desc: str | None = None,
) -> None:
    """Declare `tensors`, write the header and metadata already added to `writer`, then stream the data."""
    check_quantizable(tensors, outtype)
    types = [ggml_type(t, outtype) for t in tensors]
    for tensor, qtype in zip(tensors, types):
        writer.add_tensor_info(
            tensor.name, tensor.shape, np.dtype(np.float32), _nbytes(tensor.shape, qtype), raw_dtype=qtype
        )
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor, qtype in tqdm(list(zip(tensors, types)), desc=desc, unit="tensor", disable=not progress, leave=False):
        array = tensor.load()
        if tuple(array.shape) != tuple(tensor.shape):
            raise ConvertError(f"{tensor.name}: expected shape {tensor.shape}, the checkpoint holds {array.shape}")
        writer.write_tensor_data(_encode(array, qtype))
    writer.close()
