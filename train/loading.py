"""`load_model_for_training`: the one place train/ loads the model it fine-tunes.

The base model comes in its checkpoint's own dtype (`from_pretrained(dtype="auto")`: bf16 for a bf16 checkpoint,
not a float32 copy twice its size). Which parts then train, and in which dtype each part lives, is decided after
loading, once the stage has frozen what it freezes (`stages.prepare_model_for_stage`, then
`precision.apply_run_dtypes`). A quantized base (QLoRA) is loaded here too: a `from_pretrained` argument.
"""

from __future__ import annotations

import os
from typing import Any

from ..modeling_mqwen import MQwenForCausalLM
from ..processing_mqwen import MQwenProcessor


def load_model_for_training(model: Any, processor: Any = None) -> tuple[Any, Any]:
    """An `MQwenForCausalLM` + `MQwenProcessor` from a folder / Hub id (weights in the checkpoint's own dtype), or
    the objects given (left as they are)."""
    if isinstance(model, (str, os.PathLike)):
        if processor is None:
            processor = MQwenProcessor.from_pretrained(str(model))
        model = MQwenForCausalLM.from_pretrained(str(model), dtype="auto")
    if model is None:
        raise ValueError("Pass a model: an MQwen folder or Hub id (--model), or an MQwenForCausalLM object.")
    if processor is None:
        raise ValueError("A model object needs its processor: train(config, processor=...).")
    return model, processor
