"""MQwenConfig: defaults, derived image_seq_length, and clear errors for inconsistent settings."""

import pytest

from mqwen import MQwenConfig, MQwenVisionConfig


def test_defaults_are_qwen25_7b_and_vit_l14_224():
    config = MQwenConfig()
    text = config.text_config
    assert (text.model_type, text.hidden_size, text.num_hidden_layers, text.vocab_size) == ("qwen2", 3584, 28, 152064)
    assert (text.num_attention_heads, text.num_key_value_heads, text.intermediate_size) == (28, 4, 18944)
    vision = config.vision_config
    assert (vision.image_size, vision.patch_size, vision.width, vision.layers, vision.heads) == (224, 14, 1024, 24, 16)
    assert vision.hidden_act == "quick_gelu"
    assert config.image_seq_length == 256
    assert config.vision_feature_layer == -2 and config.projector_type == "mlp2x_gelu"
    assert config.image_token_id == 151665 < text.vocab_size
    assert config.custom_pipelines["image-to-text"]["impl"] == "processing_mqwen.MQwenImageToTextPipeline"


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({}, 256),
        ({"image_token_pooling": 2}, 64),
        ({"keep_class_token": True}, 257),
        ({"image_token_pooling": 4, "keep_class_token": True}, 17),
        ({"vision_config": {"image_size": 336}}, 576),
    ],
)
def test_image_seq_length_is_derived(kwargs, expected):
    assert MQwenConfig(**kwargs).image_seq_length == expected
    assert MQwenConfig(image_seq_length=expected, **kwargs).image_seq_length == expected


def test_inconsistent_image_seq_length_is_an_error():
    with pytest.raises(ValueError, match=r"image_seq_length=576 disagrees.*give 256 tokens"):
        MQwenConfig(image_seq_length=576)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_token_pooling": 3}, "positive divisor of the 16x16 patch grid"),
        ({"projector_type": "qformer"}, "projector_type must be one of"),
        ({"vision_feature_layer": 30}, "outside the vision tower's 25 hidden states"),
        ({"vision_config": {"hidden_act": "relu"}}, "must be 'gelu' or 'quick_gelu'"),
        ({"vision_config": {"image_size": 225}}, "multiple of patch_size"),
        ({"text_config": {"model_type": "not-a-model"}}, "not a model type transformers knows"),
    ],
)
def test_bad_settings_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MQwenConfig(**kwargs)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "llama"])
def test_round_trip(tmp_path, model_type):
    config = MQwenConfig(
        text_config={
            "model_type": model_type,
            "hidden_size": 64,
            "num_hidden_layers": 1,
            "vocab_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 96,
        },
        vision_config=MQwenVisionConfig(image_size=56, patch_size=14, width=32, layers=2, heads=2),
        image_token_pooling=2,
        image_token_id=100,
    )
    config.save_pretrained(tmp_path)
    loaded = MQwenConfig.from_pretrained(tmp_path)
    assert loaded.text_config.model_type == model_type
    assert loaded.text_config.hidden_size == 64
    assert loaded.vision_config.width == 32 and isinstance(loaded.vision_config, MQwenVisionConfig)
    assert (loaded.image_seq_length, loaded.image_token_pooling, loaded.image_token_id) == (4, 2, 100)
