"""`convert/chat_template.py`: the LLM's own template behind the image-part preamble, or ChatML with a warning.

Small local tokenizers, so these run in a second; `test_real_models.py` checks the same on real templates.
"""

import logging

import pytest

from mqwen.common.small_tokenizer import train_qwen_style_tokenizer
from mqwen.convert.chat_template import FLATTEN_IMAGE_PARTS, image_aware_chat_template, with_image_parts
from mqwen.convert.tokenizer import ensure_pad_token, stop_token_ids
from mqwen.processing_mqwen import CHAT_TEMPLATE

# A Llama-3-style template: BOS in the text, header tokens, no default system prompt, and a leading line break
# and indented tags that depend on trim_blocks/lstrip_blocks (the preamble must leave both as they were).
LLAMA_STYLE = (
    "\n  {{- bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
LEADING_NEWLINE = "\n{% for message in messages %}{{ message['content'] }}|{% endfor %}"
# Renders only list contents (a template written for parts): a flattened image part would vanish.
PARTS_ONLY = "{% for message in messages %}{% for part in message['content'] %}{{ part.text }}{% endfor %}{% endfor %}"


@pytest.fixture
def tokenizer():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=train_qwen_style_tokenizer(), bos_token="<|endoftext|>", eos_token="<|im_end|>"
    )


def render(tokenizer, messages, template, **kwargs):
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)


@pytest.mark.parametrize("template", [LLAMA_STYLE, LEADING_NEWLINE], ids=["llama-style", "leading-newline"])
def test_wrapped_template_renders_text_and_places_images(tokenizer, template):
    tokenizer.chat_template = template
    wrapped = image_aware_chat_template(tokenizer, CHAT_TEMPLATE)
    assert wrapped == FLATTEN_IMAGE_PARTS + template
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello."},
    ]
    assert render(tokenizer, chat, wrapped, add_generation_prompt=True) == render(
        tokenizer, chat, template, add_generation_prompt=True
    )
    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Look: "}, {"type": "image"}, {"type": "text", "text": "What is it?"}],
        }
    ]
    flat = [{"role": "user", "content": "Look: <image>\nWhat is it?"}]
    assert render(tokenizer, parts, wrapped) == render(tokenizer, flat, template)
    assert with_image_parts(wrapped) == wrapped  # wrapping twice changes nothing


def test_named_templates_are_each_wrapped(tokenizer):
    tokenizer.chat_template = {"default": LLAMA_STYLE, "tool_use": LEADING_NEWLINE}
    assert image_aware_chat_template(tokenizer, CHAT_TEMPLATE) == {
        "default": FLATTEN_IMAGE_PARTS + LLAMA_STYLE,
        "tool_use": FLATTEN_IMAGE_PARTS + LEADING_NEWLINE,
    }


def test_a_template_that_cannot_place_images_falls_back_to_chatml_with_a_warning(tokenizer, caplog):
    tokenizer.chat_template = PARTS_ONLY
    with caplog.at_level(logging.WARNING, logger="mqwen.convert.chat_template"):
        assert image_aware_chat_template(tokenizer, CHAT_TEMPLATE) == CHAT_TEMPLATE
    assert "does not render an image part" in caplog.text and "uses MQwen's ChatML instead" in caplog.text
    assert "tool definitions and tool calls are not rendered" in caplog.text


def test_a_missing_template_falls_back_to_chatml_with_a_warning(tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="mqwen.convert.chat_template"):
        assert image_aware_chat_template(tokenizer, CHAT_TEMPLATE) == CHAT_TEMPLATE
    assert "has no chat template" in caplog.text


def test_stop_and_pad_tokens(tokenizer):
    vocab = tokenizer.get_vocab()
    assert stop_token_ids(tokenizer) == [vocab["<|im_end|>"], vocab["<|endoftext|>"]]  # eos first, no repeat
    assert ensure_pad_token(tokenizer, vocab["<|endoftext|>"]).pad_token == "<|endoftext|>"  # the config's
    tokenizer.pad_token = None
    assert ensure_pad_token(tokenizer).pad_token == "<|im_end|>"  # else eos


def test_processor_adds_no_second_bos(tiny):
    """A template that writes the BOS, with a tokenizer that also adds one (Llama 3): the prompt keeps one."""
    import copy

    from tokenizers.processors import TemplateProcessing

    processor = copy.deepcopy(tiny[1])
    inner = processor.tokenizer
    bos = inner.convert_tokens_to_ids("<|endoftext|>")
    inner._tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    inner.bos_token = "<|endoftext|>"
    assert processor(text=["hi"])["input_ids"][0].tolist()[0] == bos  # plain text: the tokenizer's BOS
    ids = processor(text=["<|endoftext|>hi"])["input_ids"][0].tolist()
    assert ids == [bos] + inner("hi", add_special_tokens=False)["input_ids"]
