"""The model shapes the benchmark runs at, and how much work each figure does.

Every contender is built from one `Shapes`, so a ratio never compares different amounts of arithmetic.

- `QUICK`: tiny, for tests and smoke runs (seconds).
- `MID`: the CPU benchmark. ViT width 512 x 12 layers, patch 14 at 224 px (256 image tokens), Qwen2 hidden
  1024 x 12 layers (MLP 2048, 16 heads, 2 KV heads), sized so that each figure takes about two minutes on
  two idle cores. The vocabulary (10240) makes the LM head ~9% of the language model's weights, as in
  Qwen2.5-7B (545M of 7.6B); a 152k vocabulary on a 1024-wide model would make the head dominate every
  figure and hide the differences the benchmark is about.
- `GPU_7B`: `--device cuda`: Qwen2.5-7B-Instruct's language model and OpenAI's ViT-L/14 at 224 px.
"""

from dataclasses import dataclass, field, replace

from ..configuration_mqwen import QWEN25_7B_INSTRUCT


@dataclass(frozen=True)
class Shapes:
    name: str
    vision: dict
    text: dict
    image_size_in: tuple = (480, 640)  # (height, width) of the raw photos the processor resizes
    caption_tokens: int = 32  # new tokens per caption (figure 2)
    decode_tokens: int = 48  # new tokens timed for decode tokens/s (figure 1)
    caption_batches: tuple = (1, 8)
    train_batch: int = 2
    train_text_tokens: int = 24  # caption tokens after the prompt in a training sample
    reps: int = 5  # timed repetitions per contender, after `warmup`
    warmup: int = 1
    # figure 4b: the sharded LM checkpoint written for `convert build`
    build_lm_bytes: int = 1 << 30
    build_shard_bytes: int = 256 << 20
    build_text: dict = None  # the sharded LM's shapes in figure 4b (default `text`, with more layers)
    memory_reps: int = 3  # fresh processes per memory figure
    memory_context: bool = True  # figure 4 also loads the bare LM, to show transformers' own overhead
    extra: dict = field(default_factory=dict)

    def with_(self, **changes) -> "Shapes":
        return replace(self, **changes)


QUICK = Shapes(
    name="quick",
    vision=dict(image_size=56, patch_size=14, width=32, layers=4, heads=2, output_dim=16),
    text=dict(
        model_type="qwen2",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
    image_size_in=(60, 80),
    caption_tokens=4,
    decode_tokens=6,
    caption_batches=(1, 2),
    train_batch=2,
    train_text_tokens=8,
    reps=2,
    warmup=1,
    build_lm_bytes=4 << 20,
    build_shard_bytes=1 << 20,
    memory_context=False,
    memory_reps=1,
)

MID = Shapes(
    name="mid",
    vision=dict(image_size=224, patch_size=14, width=512, layers=12, heads=8, output_dim=512),
    text=dict(
        model_type="qwen2",
        vocab_size=10240,
        hidden_size=1024,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=16,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
    ),
)

GPU_7B = Shapes(
    name="qwen2.5-7b+vit-l/14",
    vision=dict(image_size=224, patch_size=14, width=1024, layers=24, heads=16, output_dim=768),
    text=dict(QWEN25_7B_INSTRUCT, eos_token_id=None, bos_token_id=None),
    decode_tokens=64,
    train_batch=4,
    build_text=MID.text,  # figure 4b is a CPU figure at ~1 GB whatever the device: 7B embeddings alone are 4 GB
)


def pick(device: str, quick: bool) -> Shapes:
    if quick:
        return QUICK
    return GPU_7B if device == "cuda" else MID
