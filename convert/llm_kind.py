"""What kind of language model a source folder holds, behind one interface that `build()` uses for every kind.

- `TransformersLLM` (the default): any transformers causal LM; its config, tokenizer and generation config are
  read as transformers reads them, its weights are used under their own names.
- `QwenV1` (`qwen_v1.py`): the original Qwen, converted to Qwen2 on the way (config, tokenizer, tensor names).

Each kind answers the same five questions: a line to print before the build (or None), the weight readers under
Qwen2/transformers names, the text config and tokenizer, the generation config, and what to add to the model card.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from ..common.small_tokenizer import forget_load_location
from .errors import ConvertError
from .qwen_v1 import QwenV1
from .tokenizer import stop_token_ids


class TransformersLLM:
    """A transformers causal LM folder, taken as it is."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def notice(self) -> str | None:
        return None

    def wrap_readers(self, readers: list) -> list:
        return readers

    def text_side(self) -> tuple[Any, Any]:
        """(text config, tokenizer) as transformers loads them from the folder."""
        try:
            config = AutoConfig.from_pretrained(self.folder)
            tokenizer = forget_load_location(AutoTokenizer.from_pretrained(self.folder))
        except Exception as error:
            raise ConvertError(
                f"transformers could not load the LLM's config or tokenizer from {self.folder}: {error}"
            ) from error
        return config, tokenizer

    def generation_config(self, tokenizer: Any) -> GenerationConfig:
        """The LLM's own generation config (an instruct model's stop tokens and sampling defaults), kept as is.

        An LLM that ships none stops on its tokenizer's end-of-sequence token and on every end-of-turn /
        end-of-text token its tokenizer has (`stop_token_ids`), and pads with its pad token.
        """
        try:
            return GenerationConfig.from_pretrained(self.folder)
        except OSError:
            return GenerationConfig(eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)

    def add_card_section(self, readme: str | os.PathLike) -> None:
        """Nothing to add: the card's provenance section already names the LLM."""


def llm_kind(folder: str | os.PathLike) -> TransformersLLM | QwenV1:
    """The kind of LLM in `folder`: `QwenV1` for an original Qwen checkpoint (raising ConvertError if it cannot
    convert exactly), else `TransformersLLM`."""
    return QwenV1.detect(folder) or TransformersLLM(folder)
