"""The dtypes of a training run: which weights live in which precision, in memory and in the final folder.

A caption run trains a small part of a large model (the projector in `align`, LoRA adapters and the projector in
`lora`), so most of its memory is frozen weights that no optimizer ever touches. They stay in the checkpoint's own
dtype (bf16 for a bf16 checkpoint; `--model-dtype` chooses another), as LLaVA keeps its frozen language model. What
trains is held in float32 master weights, as mixed precision (`--bf16`/`--fp16`) expects and AdamW's small updates
need; `--trainable-dtype bf16` asks for pure bf16 instead (frozen weights then default to bf16 too). This is
peft's `cast_mixed_precision_params` rule (frozen in half precision, trainable in float32), applied to every stage
and allowing bf16 for the trained part.

Runs that shard weights across processes (FSDP, DeepSpeed) keep one dtype for everything unless `--model-dtype`
says otherwise, as they did before: they shard the float32 weights, and DeepSpeed keeps its own master copy.

`OUTPUT_DIR/final` is written in the base checkpoint's dtype (`--final-dtype` chooses another).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..runtime import DTYPES
from .stages import PROJECTOR


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> "bfloat16", the name transformers writes in config.json."""
    return str(dtype).replace("torch.", "")


def weights_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of `model`'s floating-point weights as loaded: that of its first one (transformers' `model.dtype`)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


@dataclass(frozen=True)
class RunDtypes:
    """source: the base checkpoint's dtype; frozen / trainable: the dtypes of frozen and trained weights in memory;
    final: the dtype `OUTPUT_DIR/final` is written in."""

    source: torch.dtype
    frozen: torch.dtype
    trainable: torch.dtype
    final: torch.dtype

    @classmethod
    def of(cls, config: Any, source: torch.dtype, sharded: bool = False) -> RunDtypes:
        """The dtypes `config` (a TrainConfig) asks for, for a base model loaded in `source` (module docstring)."""
        trainable = DTYPES[config.trainable_dtype]
        if config.model_dtype:
            frozen = DTYPES[config.model_dtype]
        elif sharded or trainable != torch.float32:
            frozen = trainable
        else:
            frozen = source
        final = DTYPES[config.final_dtype] if config.final_dtype else source
        return cls(source=source, frozen=frozen, trainable=trainable, final=final)

    def describe(self) -> str:
        return (
            f"frozen weights {dtype_name(self.frozen)}, trained weights {dtype_name(self.trainable)}, "
            f"final model {dtype_name(self.final)} (base checkpoint {dtype_name(self.source)})"
        )


def apply_run_dtypes(model: nn.Module, dtypes: RunDtypes) -> nn.Module:
    """Cast every parameter of `model` (after the stage chose what trains) to its run dtype, in place.

    Parameters keep their identity (`param.data` is replaced, one tensor at a time, so the peak is one tensor above
    the larger of the two layouts); buffers keep theirs (rotary frequencies stay float32). The projector's first
    layer casts its input to its own dtype, since a frozen bf16 vision tower feeds a float32 projector
    (peft's LoRA layers do the same for their adapters).
    """
    for param in model.parameters():
        if not param.is_floating_point():
            continue
        wanted = dtypes.trainable if param.requires_grad else dtypes.frozen
        if param.dtype != wanted:
            param.data = param.data.to(wanted)
    for name, module in model.named_modules():
        if PROJECTOR in name and name.endswith("linear_1") and _cast_input not in module._forward_pre_hooks.values():
            module.register_forward_pre_hook(_cast_input)
    return model


def _cast_input(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: the first input in the module's weight dtype (a no-op when they already agree)."""
    first, *rest = args
    return (first.to(module.weight.dtype), *rest)


def cast_state_dict(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`state_dict` with its floating-point tensors in `dtype`: those already in it are the same tensors (no copy),
    and tensors that share memory (tied embeddings) still share it after the cast, so `save_pretrained` writes them
    once."""
    cast, copies = {}, {}
    for name, tensor in state_dict.items():
        if not tensor.is_floating_point() or tensor.dtype == dtype:
            cast[name] = tensor
            continue
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride())
        if key not in copies:
            copies[key] = tensor.detach().to(dtype)
        cast[name] = copies[key]
    return cast
