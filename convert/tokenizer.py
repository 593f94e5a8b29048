"""What `convert build` does to an LLM's own tokenizer: add `<image>`, find its stop tokens, give it a pad token."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..common.small_tokenizer import IMAGE_TOKEN
from .errors import ConvertError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def add_image_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Add `<image>` as a special token (once) and return its id."""
    from transformers import AddedToken

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


# End-of-turn / end-of-text tokens of the common instruct formats (ChatML, Llama 3). An instruct model may emit
# either at the end of an answer (Qwen's stop on `<|im_end|>` and `<|endoftext|>`), so generation stops on each
# one the tokenizer has.
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>")


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokenizer's eos id, then the id of every `END_TOKENS` entry it has, without repeats."""
    vocab = tokenizer.get_vocab()
    ids = [tokenizer.eos_token_id] + [vocab[token] for token in END_TOKENS if token in vocab]
    return list(dict.fromkeys(i for i in ids if i is not None))


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, pad_token_id: int | None = None) -> PreTrainedTokenizerBase:
    """Give a tokenizer without a pad token one (batches need one; padding is masked out): `pad_token_id`, the
    LLM config's, if given, else the eos token."""
    if tokenizer.pad_token is None and pad_token_id is not None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_token_id)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConvertError(
                "The LLM's tokenizer has neither a pad nor an eos token; set one in its tokenizer_config.json."
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
