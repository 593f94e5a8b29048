"""MQwen as an installed package (`import mqwen`).

On the Hub the three files below travel without this one; transformers loads them as remote code.
"""

from .configuration_mqwen import MQwenConfig, MQwenVisionConfig
from .modeling_mqwen import MQwenForCausalLM, MQwenModel, MQwenVisionTransformer
from .processing_mqwen import MQwenImageToTextPipeline, MQwenProcessor

__all__ = [
    "MQwenConfig",
    "MQwenVisionConfig",
    "MQwenForCausalLM",
    "MQwenModel",
    "MQwenVisionTransformer",
    "MQwenProcessor",
    "MQwenImageToTextPipeline",
]
