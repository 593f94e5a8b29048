"""The projector between the ViT and the language model: fresh, or loaded from a file and shape-checked.

A projector file may come from an MQwen checkpoint (`multi_modal_projector.linear_1.weight`, ...), from
transformers' LLaVA (same names) or from the original LLaVA code (`model.mm_projector.0.weight`, where
index 0 is the first Linear and 2 the second). Names are normalised to MQwen's `linear_1`/`linear_2`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..modeling_mqwen import MQwenMultiModalProjector
from .errors import ConvertError
from .hub import is_pickle, pickle_refused
from .shards import open_weights

if TYPE_CHECKING:
    from ..modeling_mqwen import MQwenPreTrainedModel

PROJECTOR_PREFIX = "multi_modal_projector."
_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.", "model.mm_projector.", "mm_projector.")
_LLAVA_INDEX = {"0": "linear_1", "2": "linear_2"}


def read_projector(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The projector tensors of `path`, named `linear_1.weight`, `linear_1.bias`, `linear_2.weight`, ..."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"--projector file {path} does not exist.")
    if is_pickle(path) and not allow_pickle:
        raise pickle_refused(path, "Projector")
    reader = open_weights(path)
    state = {}
    for key in reader.keys():
        name = key
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        name = re.sub(r"^([02])\.", lambda m: _LLAVA_INDEX[m.group(1)] + ".", name)
        if name in ("weight", "bias"):  # a single nn.Linear saved on its own (LLaVA's "linear" projector)
            name = f"linear_1.{name}"
        state[name] = reader.get(key).clone()
    reader.close()
    if not state:
        raise ConvertError(f"--projector file {path} holds no tensors.")
    return state


def projector_type_of(state: Mapping[str, torch.Tensor]) -> str:
    return "mlp2x_gelu" if any(name.startswith("linear_2.") for name in state) else "linear"


def check_projector(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    path: str | os.PathLike,
    vision_width: int,
    hidden_size: int,
) -> None:
    """Raise a clear error unless `state` has exactly the names and shapes of `expected` (name -> shape)."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConvertError(
            f"--projector {path} does not hold an MQwen projector: missing {missing}, unexpected {unexpected}. "
            "Expected linear_1.{weight,bias} (+ linear_2.* for mlp2x_gelu), optionally under multi_modal_projector."
        )
    for name, shape in expected.items():
        if tuple(state[name].shape) != tuple(shape):
            raise ConvertError(
                f"--projector {path}: {name} has shape {tuple(state[name].shape)} but this build needs "
                f"{tuple(shape)}. The projector maps the vision width ({vision_width}) to the language model's "
                f"hidden size ({hidden_size}); this file was trained for a different vision tower or LLM."
            )


def fresh_projector(model: MQwenPreTrainedModel, seed: int) -> dict[str, torch.Tensor]:
    """A newly initialised projector, with the model's own `_init_weights` (what from_pretrained would do)."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        module = MQwenMultiModalProjector(model.config)
        for submodule in module.modules():
            model._init_weights(submodule)
    finally:
        torch.random.set_rng_state(generator_state)
    return {name: tensor.detach() for name, tensor in module.state_dict().items()}
