"""What `convert build` reads from or gives an LLM's own tokenizer: its stop tokens and a pad token (`<image>` is
`common.small_tokenizer.add_image_token`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ConvertError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


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
