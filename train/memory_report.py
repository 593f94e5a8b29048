"""What a run's weights and optimizer occupy, said before the first step (`MemoryReport`, a Trainer callback).

A user who asks whether a 7B align run fits a 24 GB GPU gets the answer in the log before any activation is
allocated: bytes of frozen weights, of trainable weights, and of the optimizer's states (AdamW keeps two per
trained value, in the trained value's dtype: its exp_avg and exp_avg_sq). Activations come on top and depend on
batch, sequence length and `--gradient-checkpointing`.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .precision import dtype_name

logger = logging.getLogger(__name__)

# Optimizer state tensors per parameter, each shaped like it, for the optimizers whose state is not created
# until their first step (torch's Adam/AdamW: exp_avg, exp_avg_sq).
_STATES_PER_PARAMETER = {"Adam": 2, "AdamW": 2}


def weight_bytes(model: nn.Module) -> dict[str, dict[str, int]]:
    """{"frozen": {dtype name: bytes}, "trainable": {dtype name: bytes}} of `model`'s parameters (shared ones once)."""
    out = {"frozen": Counter(), "trainable": Counter()}
    for param in model.parameters():
        part = "trainable" if param.requires_grad else "frozen"
        out[part][dtype_name(param.dtype)] += param.numel() * param.element_size()
    return {part: dict(counts) for part, counts in out.items()}


def optimizer_state_bytes(optimizer: torch.optim.Optimizer | None) -> int | None:
    """Bytes of the optimizer's per-parameter state: counted where it exists (a resumed run), else what an Adam /
    AdamW first step allocates; None for another optimizer whose state does not exist yet."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
    if inner is None:
        return None
    params = [p for group in inner.param_groups for p in group["params"]]
    if any(inner.state.get(p) for p in params):
        return sum(
            value.numel() * value.element_size()
            for p in params
            for value in inner.state.get(p, {}).values()
            if torch.is_tensor(value) and value.dim() > 0
        )
    states = _STATES_PER_PARAMETER.get(type(inner).__name__)
    if states is None:
        return None
    return states * sum(p.numel() * p.element_size() for p in params)


def memory_figures(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    weights = weight_bytes(model)
    return {**weights, "optimizer": optimizer_state_bytes(optimizer)}


def describe(figures: dict) -> str:
    def part(counts):
        total = sum(counts.values())
        dtypes = ", ".join(f"{name} {_gb(size)}" for name, size in sorted(counts.items())) or "none"
        return f"{_gb(total)} ({dtypes})"

    optimizer = figures["optimizer"]
    total = sum(sum(figures[p].values()) for p in ("frozen", "trainable")) + (optimizer or 0)
    return (
        f"Memory before the first step: frozen weights {part(figures['frozen'])}, trainable weights "
        f"{part(figures['trainable'])}, optimizer states "
        f"{_gb(optimizer) if optimizer is not None else 'not estimated for this optimizer'}; "
        f"{_gb(total)} in all, activations not counted."
    )


def _gb(size: int) -> str:
    return f"{size / 1e9:.3f} GB" if size >= 1e7 else f"{size / 1e6:.3f} MB"


class MemoryReport(TrainerCallback):
    """Logs `describe(memory_figures(...))` once training begins: the optimizer exists, no step has run."""

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs,
    ) -> None:
        if state.is_world_process_zero and model is not None:
            logger.info(describe(memory_figures(model, optimizer)))
