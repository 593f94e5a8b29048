"""MQwen's registration with lmms-eval: the `lmms_eval.models` entry point (setup.cfg) names `manifest`.

lmms-eval loads every entry point of that group when `lmms_eval.models` is first imported, so this module only
builds the `ModelManifest`; the model class (`lmms_model.MQwenLMMS`, torch and transformers) is imported by
lmms-eval when `--model mqwen` is asked for.
"""

from __future__ import annotations

from typing import Any


def manifest() -> Any:
    """`ModelManifest("mqwen")`: `lmms-eval --model mqwen --model_args pretrained=DIR_OR_REPO,batch_size=8`."""
    from lmms_eval.models.registry_v2 import ModelManifest  # only lmms-eval calls this, with lmms-eval installed

    return ModelManifest(model_id="mqwen", simple_class_path="mqwen.evaluation.lmms_model.MQwenLMMS")
