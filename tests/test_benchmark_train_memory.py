"""benchmarks/train_memory.py's 7B arithmetic: parameter counts from the meta model equal Qwen2.5-7B's and LoRA's by
hand, and the per-stage bytes follow from them (frozen bf16, trained float32 + gradient + AdamW's two states)."""

import pytest

from mqwen.benchmarks.train_memory import memory_7b, parameters_7b


@pytest.fixture(scope="module")
def parts():
    return parameters_7b(lora_r=16)


def test_7b_parameter_counts_equal_the_hand_counts(parts):
    hidden, inter, kv, layers = 3584, 18944, 512, 28  # Qwen2.5-7B: 4 KV heads of 128
    per_layer = {"q": (hidden, hidden), "k": (hidden, kv), "v": (hidden, kv), "o": (hidden, hidden)}
    per_layer.update(gate=(hidden, inter), up=(hidden, inter), down=(inter, hidden))
    assert parts["lora_adapters"] == layers * sum(16 * (i + o) for i, o in per_layer.values())
    assert parts["projector"] == 1024 * hidden + hidden + hidden * hidden + hidden  # mlp2x_gelu from ViT-L's 1024
    assert 7.6e9 < parts["language_model"] < 7.7e9  # Qwen2.5-7B: 7.62 B with its untied head
    assert 3.0e8 < parts["vision_tower"] < 3.1e8  # ViT-L/14: 304 M


def test_7b_memory_per_stage_follows_from_the_bytes_per_parameter(parts):
    memory = memory_7b(parts, {"frozen": 2.0, "trainable": 4.0, "optimizer": 8.0})
    base = parts["vision_tower"] + parts["projector"] + parts["language_model"]
    assert memory["align"]["total"] == pytest.approx(
        (2 * (base - parts["projector"]) + 16 * parts["projector"]) / 1e9, abs=0.01
    )
    lora_trained = parts["lora_adapters"] + parts["projector"]
    assert memory["lora"]["total"] == pytest.approx((2 * base + 16 * lora_trained) / 1e9, abs=0.01)
    assert memory["full"]["optimizer"] == pytest.approx(
        8 * (parts["language_model"] + parts["projector"]) / 1e9, abs=0.01
    )
    assert memory["full, pure bf16"]["total"] < 0.51 * memory["full"]["total"]
