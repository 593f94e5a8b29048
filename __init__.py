"""MQwen as an installed package (`import mqwen`).

On the Hub the three files below travel without this one; transformers loads them as remote code. Names are
imported lazily, on first use: pytest also imports this file on its own (the repository root is a package to
it), where relative imports cannot work.
"""

import importlib

_EXPORTS = {
    "MQwenConfig": "configuration_mqwen",
    "MQwenVisionConfig": "configuration_mqwen",
    "MQwenForCausalLM": "modeling_mqwen",
    "MQwenModel": "modeling_mqwen",
    "MQwenVisionTransformer": "modeling_mqwen",
    "MQwenProcessor": "processing_mqwen",
    "MQwenImageToTextPipeline": "processing_mqwen",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> object:
    if name in _EXPORTS and __package__:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __package__:  # imported as the package: make AutoConfig (and so AutoTokenizer) know model_type "mqwen"
    from transformers import AutoConfig as _AutoConfig

    from .configuration_mqwen import MQwenConfig as _MQwenConfig

    _AutoConfig.register("mqwen", _MQwenConfig, exist_ok=True)
