"""A small Qwen-style tokenizer trained locally, for tiny checkpoints and the shapes demo.

It has Qwen2's exact pipeline (NFC, the Qwen split regex, byte-level BPE) and its special tokens, so it
loads as `Qwen2Tokenizer` on every transformers version, but a vocabulary of a few hundred tokens learnt
from the text it is given. Nothing is downloaded.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import AddedToken, AutoTokenizer, PreTrainedTokenizerFast

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
IMAGE_TOKEN = "<image>"

DEFAULT_CORPUS = [
    "You are a helpful assistant.",
    "Describe this image.",
    "What is in this picture? Write a short caption.",
    "a red circle, a blue square and a green triangle",
    "a yellow square and a red triangle",
    "A photo of a cat sitting on a wooden table next to a cup of coffee.",
    "Two people walk along the beach at sunset while waves roll in.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "system user assistant image caption photo picture shows there is are the of and with in on",
]


def train_qwen_style_tokenizer(texts: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 400) -> Tokenizer:
    """Train a byte-level BPE with Qwen2's normalizer, pre-tokenizer, decoder and special tokens."""
    tokenizer = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    return tokenizer


def wrap_as_transformers_tokenizer(tokenizer: Tokenizer, chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A `Qwen2Tokenizer` (as AutoTokenizer loads it) with Qwen2.5-Instruct's special-token roles and `<image>`.

    Saved once and reloaded so that the object, and every folder it is saved to, is the real Qwen2 class.
    """
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    wrapped.add_tokens([AddedToken(token, special=True, normalized=False) for token in QWEN_SPECIAL_TOKENS])
    add_image_token(wrapped)
    if chat_template is not None:
        wrapped.chat_template = chat_template
    with tempfile.TemporaryDirectory() as tmp:
        wrapped.save_pretrained(tmp)
        config_file = Path(tmp) / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config["tokenizer_class"] = "Qwen2Tokenizer"
        config_file.write_text(json.dumps(config, indent=2))
        return forget_load_location(AutoTokenizer.from_pretrained(tmp))


LOAD_TIME_KWARGS = ("is_local", "local_files_only", "name_or_path", "_commit_hash")


# compat(transformers>=5): 5.x records the load location in `init_kwargs`; 4.x does not (nothing to drop there)
def forget_load_location(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Drop what transformers 5 records about where a tokenizer was loaded from (`is_local`,
    `local_files_only`, the temporary path), so a published tokenizer_config.json does not carry it."""
    for key in LOAD_TIME_KWARGS:
        tokenizer.init_kwargs.pop(key, None)
    return tokenizer


def add_image_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Add `<image>` as a special token (once) and return its id."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
