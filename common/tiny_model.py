"""A complete, random, tiny, Hub-ready MQwen checkpoint in seconds (`mqwen-convert tiny OUT_DIR`).

Tests and examples use it; it has every file a published MQwen has (config with auto_map, safetensors,
tokenizer with Qwen's special tokens and `<image>`, processor config, chat template, the three code files).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig

from ..configuration_mqwen import MQwenConfig, MQwenVisionConfig
from ..modeling_mqwen import MQwenForCausalLM
from ..processing_mqwen import CHAT_TEMPLATE, MQwenProcessor
from .small_tokenizer import train_qwen_style_tokenizer, wrap_as_transformers_tokenizer

TINY_VISION = dict(image_size=56, patch_size=14, width=32, layers=2, heads=2, output_dim=16)
TINY_TEXT = dict(
    model_type="qwen2",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


def pad_vocab(n: int, multiple: int = 64) -> int:
    """Embedding rows for `n` tokens, rounded up the way Qwen pads its vocabulary."""
    return -(-n // multiple) * multiple


def build_tiny(
    seed: int = 0, vision: dict | None = None, text: dict | None = None, tokenizer: Any = None, **config_kwargs: Any
) -> tuple[Any, Any]:
    """A tiny random MQwenForCausalLM and its processor (in memory)."""
    torch.manual_seed(seed)
    if tokenizer is None:
        tokenizer = wrap_as_transformers_tokenizer(train_qwen_style_tokenizer(), chat_template=CHAT_TEMPLATE)
    text_config = dict(TINY_TEXT, **(text or {}))
    text_config.setdefault("vocab_size", pad_vocab(len(tokenizer)))
    text_config.update(
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = MQwenVisionConfig(**dict(TINY_VISION, **(vision or {})))
    config = MQwenConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        **config_kwargs,
    )
    model = MQwenForCausalLM(config).eval()
    model.generation_config = generation_defaults(tokenizer)
    processor = MQwenProcessor.from_model_config(config, tokenizer)
    return model, processor


def generation_defaults(tokenizer: Any) -> GenerationConfig:
    """Qwen2.5-Instruct's stopping behaviour: stop on <|im_end|> or <|endoftext|>, pad with <|endoftext|>."""
    stop = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    return GenerationConfig(eos_token_id=stop, pad_token_id=tokenizer.pad_token_id, do_sample=False)


def save_checkpoint(model: Any, processor: Any, out_dir: str | Path) -> Path:
    """Write model + processor as one Hub-ready folder (safetensors only)."""
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir


def write_tiny(out_dir: str | Path, seed: int = 0, **kwargs: Any) -> Path:
    """A tiny random checkpoint (`build_tiny`) written to `out_dir`; returns the folder."""
    model, processor = build_tiny(seed=seed, **kwargs)
    return save_checkpoint(model, processor, out_dir)
