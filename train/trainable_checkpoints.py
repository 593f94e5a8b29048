"""Checkpoints that hold what was trained: the trainable parameters, not the frozen model around them.

In the `align` stage only the projector trains (about 0.2 % of a 7B MQwen); the stock Trainer checkpoint would
write the whole model every `--save-steps`, about 30 GB at 7B in float32. `CaptionTrainer` writes
`trainable.safetensors` instead (the trainable parameters under their model names, in their training dtype, so a
resumed run continues bit for bit), beside the stock optimizer, scheduler, RNG and trainer state. Resuming
rebuilds the model from the base (`--model`) and loads these tensors over it.

The `lora` stage needs nothing of this: peft's `save_pretrained`, which the stock Trainer calls for a `PeftModel`,
already writes the adapters and the projector alone (`adapter_model.safetensors`), and the Trainer resumes from
it. Full fine-tuning keeps full checkpoints. The file is not named `model.safetensors` on purpose: it is not a
model, and `from_pretrained` must not mistake it for one (it would fill in every other weight at random).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

TRAINABLE_WEIGHTS = "trainable.safetensors"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters of `model`, by name (shared parameters once)."""
    return {name: param.detach() for name, param in model.named_parameters() if param.requires_grad}


def holds_trainable_weights(folder: str | os.PathLike) -> bool:
    return (Path(folder) / TRAINABLE_WEIGHTS).is_file()


def save_trainable_weights(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Write `model`'s trainable parameters to `folder/trainable.safetensors`; the base model's name goes in the
    file's metadata, so that resuming on another base can say so."""
    path = Path(folder) / TRAINABLE_WEIGHTS
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.contiguous() for name, tensor in trainable_state(model).items()}
    save_file(tensors, path, metadata={"format": "pt", "base_model": _base_name(model)})
    return path


def load_trainable_weights(model: nn.Module, folder: str | os.PathLike) -> None:
    """Load `folder/trainable.safetensors` over `model` (rebuilt from the base, frozen as before).

    The file must hold exactly the parameters that train now, in their shapes: a checkpoint of another stage or
    another model is refused with what differs, never half-loaded.
    """
    path = Path(folder) / TRAINABLE_WEIGHTS
    expected = trainable_state(model)
    with safe_open(path, "pt") as handle:
        base = (handle.metadata() or {}).get("base_model", "")
    state = load_file(path)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"--resume-from-checkpoint {folder}: its {TRAINABLE_WEIGHTS} holds other parameters than this run trains "
            f"(missing {missing[:4]}, unexpected {unexpected[:4]}). Resume with the --stage and settings that "
            f"wrote it{f' (base model {base})' if base else ''}."
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"--resume-from-checkpoint {folder}: {name} has shape {tuple(tensor.shape)} in the checkpoint but "
                f"{tuple(expected[name].shape)} in the model; it was trained on another base model"
                f"{f' ({base})' if base else ''}."
            )
    with torch.no_grad():
        for name, tensor in state.items():
            expected[name].copy_(tensor)


def _base_name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "_name_or_path", "") or "")
