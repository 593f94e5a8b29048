"""The transformers conventions that vLLM's Transformers backend relies on, checked without vLLM (both versions).

tests/test_vllm_serving.py runs vLLM itself; these run in the main suite on transformers 5.x and 4.57.
"""

import pytest
import torch
from conftest import random_image


def test_num_multimodal_tokens_is_what_the_processor_inserts(tiny):
    _, processor = tiny
    sizes = [(40, 60), (300, 200), (56, 56)]
    data = processor._get_num_multimodal_tokens(image_sizes=sizes)
    inputs = processor(images=[random_image(i, size) for i, size in enumerate(sizes)], text=["<image>"] * 3)
    inserted = (inputs["input_ids"] == processor.image_token_id).sum(-1).tolist()
    assert list(data["num_image_tokens"]) == inserted == [processor.image_seq_length] * 3
    assert list(data["num_image_patches"]) == [1, 1, 1]
    assert "num_image_tokens" not in processor._get_num_multimodal_tokens()


def test_text_replacement_offsets_locate_each_expanded_placeholder(tiny):
    _, processor = tiny
    if not hasattr(processor, "get_text_with_replacements"):
        pytest.skip("transformers 4.x has no text_replacement_offsets (vLLM needs transformers 5)")
    texts = ["a <image> b <image> c", "<image>"]
    images = [random_image(i) for i in range(3)]
    plain = processor(images=images, text=texts)
    asked = processor(images=images, text=texts, return_text_replacement_offsets=True)
    offsets = asked.pop("text_replacement_offsets")
    assert all(torch.equal(plain[key], asked[key]) for key in plain)  # asking changes nothing else
    assert [len(row) for row in offsets] == [2, 1]
    expansion = processor.image_token * processor.image_seq_length
    for text, row in zip(texts, offsets):
        expanded = text.replace(processor.image_token, expansion)
        for entry in row:
            assert entry["type"] == "image" and entry["replacement"] == expansion
            assert text[slice(*entry["span"])] == processor.image_token
            assert expanded[slice(*entry["new_span"])] == expansion
    assert processor.replace_image_token({}, image_idx=0) == expansion


def test_get_image_features_return_dict(tiny):
    model, processor = tiny
    pixel_values = processor(images=[random_image(0), random_image(1)])["pixel_values"]
    with torch.no_grad():
        plain = model.get_image_features(pixel_values)
        output = model.get_image_features(pixel_values, return_dict=True)
    assert plain.shape == (2, model.config.image_seq_length, model.config.text_config.hidden_size)
    assert torch.equal(output.pooler_output, plain) and torch.equal(output.last_hidden_state, plain)


def test_base_model_forward_return_dict_false_is_the_tuple(tiny):
    from mqwen import MQwenModel

    model, processor = tiny
    base = MQwenModel(model.config).eval()
    base.load_state_dict(model.state_dict())
    inputs = processor(images=[random_image(0)])
    with torch.no_grad():
        as_dict = base(**inputs)
        as_tuple = base(**inputs, return_dict=False, use_cache=False)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], as_dict.last_hidden_state)
    # The same hidden states the causal LM's head reads.
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.allclose(model.language_model.lm_head(as_tuple[0]), logits, atol=1e-5)
