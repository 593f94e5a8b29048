"""The built folder's chat template: the LLM's own, made to take image parts.

transformers keeps one chat template per folder, shared by the tokenizer and the processor. MQwen's processor
needs one that renders `{"type": "image"}` content parts as the `<image>` placeholder; the LLM's users expect
their conversations rendered exactly as the LLM was trained. Both hold when the LLM's own template is kept
and a Jinja preamble rewrites `messages` before it runs: every list content becomes one string (image parts
-> `<image>` + newline, text parts -> their text, concatenated in order), every other message is passed on
untouched. So conversations without images reach the LLM's template unchanged (byte-identical output, tools,
tool calls and template variables such as Qwen3's `enable_thinking` included), and image parts reach it as
text at their place. Nothing in the LLM's template is parsed or patched, so this works for any template that
renders string contents (Qwen2/2.5/3, Llama 3, SmolLM2, ...).

A template that still cannot render an image part (it raises, or drops the text) is replaced by MQwen's
ChatML, with a warning that says what changes; so is a missing one.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>\n"

# Produces no output. It ends with a newline after its last tag: transformers renders with trim_blocks, which
# removes exactly that newline, so the LLM's template starts at the beginning of a line as it did on its own
# (its own leading whitespace and lstrip_blocks behave as before).
FLATTEN_IMAGE_PARTS = (
    "{%- set mqwen = namespace(messages=[], text='') -%}"
    "{%- for message in messages -%}"
    "{%- if message.content is defined and message.content is iterable"
    " and message.content is not string and message.content is not mapping -%}"
    "{%- set mqwen.text = '' -%}"
    "{%- for part in message.content -%}"
    "{%- if part.type == 'image' -%}{%- set mqwen.text = mqwen.text + '<image>\\n' -%}"
    "{%- elif part.type == 'text' -%}{%- set mqwen.text = mqwen.text + part.text -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set mqwen.messages = mqwen.messages + [dict(message, content=mqwen.text)] -%}"
    "{%- else -%}"
    "{%- set mqwen.messages = mqwen.messages + [message] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = mqwen.messages %}\n"
)

TEXT_PROBE = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi."},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Name a colour."},
]
IMAGE_PROBE = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]


def with_image_parts(template: str) -> str:
    """`template` preceded by the preamble that turns image/text content parts into string contents."""
    if template.startswith(FLATTEN_IMAGE_PARTS):
        return template
    return FLATTEN_IMAGE_PARTS + template


def image_aware_chat_template(tokenizer: PreTrainedTokenizerBase, fallback: str) -> str | dict[str, str]:
    """The chat template for the built folder (a string, or a dict of named templates if the LLM has several).

    The LLM's own template(s) wrapped by `with_image_parts`, checked on a text and an image conversation;
    `fallback` (MQwen's ChatML) with a warning where there is none or it cannot render an image part.
    """
    source = tokenizer.chat_template
    if not source:
        logger.warning(
            "The LLM has no chat template; the built folder uses MQwen's ChatML (<|im_start|>role\\n...<|im_end|>, "
            "default system prompt 'You are a helpful assistant.'). Check that this format suits the LLM."
        )
        return fallback
    named = source if isinstance(source, dict) else {None: source}
    wrapped = {}
    for name, template in named.items():
        problem = _probe(tokenizer, template, with_image_parts(template))
        if problem:
            logger.warning(
                "The LLM's chat template%s %s, so the built folder uses MQwen's ChatML instead. What changes: every "
                "conversation renders as <|im_start|>role\\n...<|im_end|> with the default system prompt 'You are "
                "a helpful assistant.', tool definitions and tool calls are not rendered, and template options "
                "(e.g. enable_thinking) are ignored.",
                f" {name!r}" if name else "",
                problem,
            )
            return fallback
        wrapped[name] = with_image_parts(template)
    return wrapped[None] if None in wrapped else wrapped


def _probe(tokenizer, source, wrapped):
    """Why `wrapped` is unusable (a sentence), or None: it must render text chats as `source` and an image part."""
    render = dict(tokenize=False, add_generation_prompt=True)
    try:
        theirs = tokenizer.apply_chat_template(TEXT_PROBE, chat_template=source, **render)
    except Exception:  # e.g. no system role: compare on the user/assistant turns only
        theirs = None
    if theirs is not None and tokenizer.apply_chat_template(TEXT_PROBE, chat_template=wrapped, **render) != theirs:
        return "renders text conversations differently once image parts are flattened"
    try:
        image_prompt = tokenizer.apply_chat_template(IMAGE_PROBE, chat_template=wrapped, **render)
    except Exception as error:
        return f"raises on a message with an image part ({type(error).__name__}: {error})"
    expected = IMAGE_PLACEHOLDER + IMAGE_PROBE[0]["content"][1]["text"]
    if expected not in image_prompt:
        return f"does not render an image part as {expected!r} (got {image_prompt!r})"
    return None
