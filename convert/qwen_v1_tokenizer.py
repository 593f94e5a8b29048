"""Qwen v1's tiktoken tokenizer (`qwen.tiktoken` + `tokenization_qwen.py`) as a transformers fast tokenizer.

v1 encodes with `tiktoken`: NFC-normalised text, split by v1's regex (the one Qwen2 kept, with single digits),
byte-level BPE over the ranks in `qwen.tiktoken`, and 208 special tokens numbered after the ranks
(`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<|extra_0|>` ... `<|extra_204|>`), recognised inside text.
transformers' `TikTokenConverter` turns the ranks into a BPE vocabulary with merges and appends the special
tokens in v1's order; with v1's NFC normaliser added, every id equals v1's. Requires the `tiktoken` package.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from transformers.convert_slow_tokenizer import TikTokenConverter

from ..common.small_tokenizer import QWEN_PRETOKENIZE_REGEX, forget_load_location, wrap_as_transformers_tokenizer
from ..processing_mqwen import CHAT_TEMPLATE
from .errors import ConvertError

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

TIKTOKEN_FILE = "qwen.tiktoken"
QWEN_V1_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]


@contextmanager
def _no_tiktoken_cache():
    """tiktoken caches every file it reads under a key made from its path alone, so a later, different file at
    the same path would be read stale; an empty TIKTOKEN_CACHE_DIR turns the cache off (tiktoken's switch)."""
    previous = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR", None)
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = previous


def qwen_v1_backend_tokenizer(tiktoken_file: str | os.PathLike) -> Tokenizer:
    """A `tokenizers.Tokenizer` that encodes exactly as v1's tiktoken encoding over `tiktoken_file`."""
    from tokenizers import normalizers  # optional: the convert extra

    try:
        import tiktoken  # noqa: F401  (TikTokenConverter reads the ranks with it)
    except ImportError:
        raise ConvertError(
            "Converting Qwen v1's qwen.tiktoken needs the `tiktoken` package: pip install tiktoken"
        ) from None
    # compat(transformers<5): `additional_special_tokens` is 4.x's keyword, `extra_special_tokens` 5.x's
    specials = dict(  # the converter adds them, in order, after the ranks (the keyword is 4.x's or 5.x's)
        additional_special_tokens=QWEN_V1_SPECIAL_TOKENS, extra_special_tokens=QWEN_V1_SPECIAL_TOKENS
    )
    try:
        with _no_tiktoken_cache():
            converter = TikTokenConverter(vocab_file=str(tiktoken_file), pattern=QWEN_PRETOKENIZE_REGEX, **specials)
            tokenizer = converter.converted()
    except Exception as error:
        raise ConvertError(f"Could not read {tiktoken_file} as tiktoken BPE ranks: {error}") from error
    tokenizer.normalizer = normalizers.NFC()
    ranks = tokenizer.get_vocab_size(with_added_tokens=False)
    first = tokenizer.token_to_id(QWEN_V1_SPECIAL_TOKENS[0])
    if first != ranks or tokenizer.get_vocab_size() != ranks + len(QWEN_V1_SPECIAL_TOKENS):
        raise ConvertError(
            f"{tiktoken_file}: its {ranks} ranks are not numbered 0..{ranks - 1}, so v1's special "
            "token ids (which follow the ranks) cannot be reproduced."
        )
    return tokenizer


def convert_qwen_v1_tokenizer(folder: str | os.PathLike) -> PreTrainedTokenizerFast:
    """The transformers tokenizer (Qwen2's class, MQwen's chat template, `<image>` added) of a v1 folder."""

    tiktoken_file = Path(folder) / TIKTOKEN_FILE
    if not tiktoken_file.is_file():
        raise ConvertError(
            f"Qwen v1 folder {folder} has no {TIKTOKEN_FILE}: copy it from the original checkpoint "
            "(it holds v1's vocabulary)."
        )
    # MQwen's template is v1's chat format: ChatML, "You are a helpful assistant." unless a system turn is given.
    return forget_load_location(
        wrap_as_transformers_tokenizer(qwen_v1_backend_tokenizer(tiktoken_file), chat_template=CHAT_TEMPLATE)
    )
