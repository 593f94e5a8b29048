"""MQwenProcessor: image inputs of every kind, placeholder expansion, default prompts, padding, errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from mqwen.processing_mqwen import to_rgb_image


def pixels(processor, image):
    return processor.image_processor([to_rgb_image(image)], return_tensors="pt")["pixel_values"]


def test_image_modes_become_rgb(tiny, make_image):
    _, processor = tiny
    rgb = make_image(1)
    assert torch.equal(
        processor(images=[rgb.convert("L")])["pixel_values"], pixels(processor, rgb.convert("L").convert("RGB"))
    )
    assert torch.equal(
        processor(images=[rgb.convert("CMYK")])["pixel_values"], pixels(processor, rgb.convert("CMYK").convert("RGB"))
    )
    palette = rgb.convert("P")
    assert torch.equal(processor(images=[palette])["pixel_values"], pixels(processor, palette.convert("RGB")))
    transparent = Image.new("RGBA", rgb.size, (10, 200, 30, 0))
    white = Image.new("RGB", rgb.size, (255, 255, 255))
    assert torch.equal(processor(images=[transparent])["pixel_values"], pixels(processor, white))
    opaque = rgb.convert("RGBA")
    assert torch.equal(processor(images=[opaque])["pixel_values"], pixels(processor, rgb))


def test_arrays_tensors_and_paths_equal_the_pil_image(tiny, make_image, tmp_path):
    _, processor = tiny
    image = make_image(2)
    expected = processor(images=[image])["pixel_values"]
    array = np.array(image)
    path = tmp_path / "image.png"
    image.save(path)
    for same in (
        array,
        array.astype(np.float32) / 255.0,
        torch.from_numpy(array).permute(2, 0, 1),
        torch.from_numpy(array),
        str(path),
        path,
    ):
        assert torch.equal(processor(images=[same])["pixel_values"], expected), type(same)


def test_default_caption_prompt(tiny, make_image):
    _, processor = tiny
    inputs = processor(images=make_image(3))
    expected = processor.caption_prompt().replace("<image>", "<image>" * processor.image_seq_length)
    assert processor.tokenizer.decode(inputs["input_ids"][0]) == expected
    assert expected.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>")
    assert expected.endswith("Describe this image.<|im_end|>\n<|im_start|>assistant\n")
    assert inputs["pixel_values"].shape == (1, 3, 56, 56)


def test_text_without_placeholder_is_the_instruction(tiny, make_image):
    _, processor = tiny
    inputs = processor(images=[make_image(4)], text="Name the shapes.")
    assert processor.tokenizer.decode(inputs["input_ids"][0]) == processor.caption_prompt("Name the shapes.").replace(
        "<image>", "<image>" * processor.image_seq_length
    )


def test_chat_template_renders_qwen_chatml(tiny):
    _, processor = tiny
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "a red circle"},
    ]
    rendered = processor.apply_chat_template(messages, tokenize=False)
    rendered = rendered[0] if isinstance(rendered, list) else rendered
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n"
        "<|im_start|>assistant\na red circle<|im_end|>\n"
    )


def test_chat_template_tokenized_with_images_equals_direct_call(tiny, make_image):
    _, processor = tiny
    image = make_image(5)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe this image."}],
        }
    ]
    via_chat = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    direct = processor(images=[image])
    assert torch.equal(via_chat["input_ids"], direct["input_ids"])
    assert torch.equal(via_chat["pixel_values"], direct["pixel_values"])


def test_batches_are_left_padded_by_default(tiny, make_image):
    _, processor = tiny
    images = [make_image(6), make_image(7)]
    texts = ["<image> hi", "<image> a much longer prompt with many more words in it"]
    left = processor(images=images, text=texts)
    right = processor(images=images, text=texts, padding_side="right")
    pad = processor.tokenizer.pad_token_id
    assert left["attention_mask"][0, 0] == 0 and left["input_ids"][0, 0] == pad
    assert right["attention_mask"][0, -1] == 0 and right["attention_mask"][0, 0] == 1
    assert left["attention_mask"][1].all()


def test_several_images_per_prompt_keep_their_order(tiny, make_image):
    _, processor = tiny
    images = [make_image(8), make_image(9), make_image(10)]
    inputs = processor(images=images, text=["<image><image> pair", "<image> single"])
    assert inputs["pixel_values"].shape[0] == 3
    for got, image in zip(inputs["pixel_values"], images):
        assert torch.equal(got, pixels(processor, image)[0])
    counts = (inputs["input_ids"] == processor.image_token_id).sum(-1).tolist()
    assert counts == [2 * processor.image_seq_length, processor.image_seq_length]


def test_decode_captions_returns_only_the_new_text(tiny):
    _, processor = tiny
    prompt = processor.tokenizer(["<|im_start|>assistant\n"], return_tensors="pt")["input_ids"]
    answer = processor.tokenizer(["a red circle<|im_end|>"], return_tensors="pt")["input_ids"]
    assert processor.decode_captions(torch.cat([prompt, answer], 1), prompt.shape[1]) == ["a red circle"]


def test_save_and_reload_keeps_settings(tiny, tmp_path):
    from mqwen import MQwenProcessor

    _, processor = tiny
    processor.caption_instruction = "Name the shapes."
    try:
        processor.save_pretrained(tmp_path)
    finally:
        processor.caption_instruction = "Describe this image."
    loaded = MQwenProcessor.from_pretrained(tmp_path)
    assert (loaded.image_seq_length, loaded.caption_instruction, loaded.image_token) == (
        16,
        "Name the shapes.",
        "<image>",
    )
    assert loaded.chat_template == processor.chat_template


# -- errors ------------------------------------------------------------------------------------------------


def test_image_count_mismatch_names_both_counts(tiny, make_image):
    _, processor = tiny
    with pytest.raises(ValueError, match=r"hold 2 `<image>` placeholders but 1 images"):
        processor(images=[make_image(1)], text=["<image> and <image>"])
    with pytest.raises(ValueError, match=r"hold 1 `<image>` placeholders but 0 images"):
        processor(text=["<image> where is the image?"])


def test_truncation_that_cuts_placeholders_is_an_error(tiny, make_image):
    _, processor = tiny
    with pytest.raises(ValueError, match="truncation cut the image placeholders"):
        processor(images=[make_image(1)], truncation=True, max_length=20)


def test_unreadable_inputs_are_clear_errors(tiny, tmp_path):
    _, processor = tiny
    with pytest.raises(FileNotFoundError, match="Image file not found"):
        processor(images=[str(tmp_path / "missing.png")])
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="Could not read .*notes.txt.* as an image"):
        processor(images=[tmp_path / "notes.txt"])
    with pytest.raises(TypeError, match="Unsupported image type dict"):
        processor(images=[{"an": "image"}])
    with pytest.raises(ValueError, match="HW, HWC or CHW"):
        processor(images=[np.zeros((4, 4, 4, 4), dtype=np.uint8)])


def test_tokenizer_without_image_token_is_refused(tiny):

    from transformers import PreTrainedTokenizerFast

    from mqwen import MQwenProcessor
    from mqwen.common.small_tokenizer import train_qwen_style_tokenizer

    _, processor = tiny
    bare = PreTrainedTokenizerFast(tokenizer_object=train_qwen_style_tokenizer(), eos_token="<|im_end|>")
    with pytest.raises(ValueError, match="has no '<image>' token. Add it first"):
        MQwenProcessor(image_processor=processor.image_processor, tokenizer=bare)


def test_named_chat_templates_use_the_default_one(tiny, make_image):
    """A folder may carry several named templates (e.g. the LLM's own as "llm"); prompts use "default"."""
    from mqwen import MQwenProcessor

    _, processor = tiny
    named = MQwenProcessor(
        image_processor=processor.image_processor,
        tokenizer=processor.tokenizer,
        chat_template={"default": processor.chat_template, "llm": "{{ messages }}"},
        image_seq_length=processor.image_seq_length,
    )
    assert named.caption_prompt() == processor.caption_prompt()
    assert torch.equal(named(images=[make_image(1)])["input_ids"], processor(images=[make_image(1)])["input_ids"])


def test_published_tokenizer_config_has_no_load_location(tiny_dir):
    import json

    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert not {"is_local", "local_files_only"} & set(config)
