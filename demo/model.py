"""The demo's model: a small MQwen built from scratch with the project's own convert/ code.

- Tokenizer: Qwen2's byte-level BPE pipeline and special tokens (`mqwen.convert.tokenizer`), trained on the
  shapes captions and the default caption prompt, so every word the model reads or writes is one token.
- Vision: an OpenCLIP-layout ViT (`MQwenVisionConfig`) sized for 64 px images with 8 px patches: 64 image
  tokens. `vision_feature_layer=-1`: trained from scratch, the last block is as good a feature as any, and
  taking it means no block is computed for nothing. Its position embedding starts as 2D sin-cos codes
  (`sincos_2d`, as in MAE) scaled to 0.3, instead of near-zero noise, and it has 8 heads of 16 channels.
- Language model: a small Qwen2 (a vocabulary of a few hundred tokens).

Why these choices, and what else was tried, with the measurements: `EXPERIMENTS.md` next to this file.

`PRESETS["full"]` is what the main job trains; `PRESETS["quick"]` is a smaller one for tests and smoke runs.
"""

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..common.small_tokenizer import train_qwen_style_tokenizer, wrap_as_transformers_tokenizer
from ..common.tiny_model import build_tiny
from ..processing_mqwen import CHAT_TEMPLATE, DEFAULT_CAPTION_INSTRUCTION, DEFAULT_SYSTEM_PROMPT
from .shapes import COLOURS, SHAPES, caption_for

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ModelSize:
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 3
    vision_heads: int = 8
    hidden_size: int = 128
    intermediate_size: int = 384
    text_layers: int = 2
    attention_heads: int = 4
    kv_heads: int = 2
    image_token_pooling: int = 1
    sincos_positions: float = 0.3  # scale of a 2D sin-cos initialisation of the ViT's position embedding
    initializer_range: float = 0.02  # std of the random Linear, Conv2d and Embedding weights
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    "full": ModelSize(),
    "quick": ModelSize(
        vision_width=32,
        vision_layers=1,
        vision_heads=2,
        hidden_size=32,
        intermediate_size=64,
        text_layers=1,
        attention_heads=2,
        kv_heads=1,
        image_token_pooling=2,
    ),
}


def tokenizer_corpus(caption_instruction: str, system_prompt: str) -> list[str]:
    """What the demo tokenizer learns from: every colour-shape phrase in every slot, and the prompt's words.

    Repeated chat fragments make BPE merge them into whole tokens, which keeps the prompt short.
    """
    phrases = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    captions = [caption_for(phrases[i : i + k]) for k in (1, 2, 3) for i in range(0, len(phrases) - k + 1)]
    prompt = ["system\n" + system_prompt, "user\n", "\n" + caption_instruction, "assistant\n"]
    return captions + prompt * 20


def sincos_2d(grid: int, width: int) -> "torch.Tensor":
    """(grid * grid, width) fixed 2D sin-cos position codes (as in MAE): half the channels encode the row,
    half the column, each as sines and cosines over geometrically spaced frequencies."""
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )
    codes = []
    for position in (rows.flatten(), cols.flatten()):
        angles = position[:, None] * omega[None, :]
        codes += [angles.sin(), angles.cos()]
    return torch.cat(codes, dim=1).float()


def build_shapes_model(size: ModelSize = PRESETS["full"], seed: int = 0) -> tuple[Any, Any]:
    """(MQwenForCausalLM, MQwenProcessor), randomly initialised, with a tokenizer trained on the task."""
    corpus = tokenizer_corpus(DEFAULT_CAPTION_INSTRUCTION, DEFAULT_SYSTEM_PROMPT)
    tokenizer = wrap_as_transformers_tokenizer(
        train_qwen_style_tokenizer(corpus, vocab_size=400), chat_template=CHAT_TEMPLATE
    )
    vision = dict(
        image_size=size.image_size,
        patch_size=size.patch_size,
        width=size.vision_width,
        layers=size.vision_layers,
        heads=size.vision_heads,
        output_dim=size.vision_width // 2,
        hidden_act="gelu",
        # The generator's images are plain light backgrounds; centring on mid-grey suits them better than
        # CLIP's photo statistics.
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
    )
    text = dict(
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.text_layers,
        num_attention_heads=size.attention_heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        initializer_range=size.initializer_range,
    )
    model, processor = build_tiny(
        seed=seed,
        vision=vision,
        text=text,
        tokenizer=tokenizer,
        vision_feature_layer=-1,
        image_token_pooling=size.image_token_pooling,
        **size.extra,
    )
    if size.sincos_positions:
        positions = model.vision_tower.positional_embedding
        with torch.no_grad():
            positions[0].zero_()
            positions[1:] = size.sincos_positions * sincos_2d(size.image_size // size.patch_size, size.vision_width)
    return model, processor
