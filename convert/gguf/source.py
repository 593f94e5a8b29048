"""Read a saved MQwen folder for export: its config, tokenizer, chat template and weights, one tensor at a time."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from ...configuration_mqwen import MQwenConfig
from ...processing_mqwen import CHAT_TEMPLATE, DEFAULT_CAPTION_INSTRUCTION
from ..errors import ConvertError

if TYPE_CHECKING:
    import numpy as np
    from transformers import PreTrainedTokenizerBase


class MQwenFolder:
    """A saved MQwen model (`save_pretrained` output): config.json with `model_type: "mqwen"`, safetensors
    weights (one file or an index of shards), and the processor's tokenizer and chat template.

    `tensor(name)` reads one tensor as float32 numpy, so an export never holds more than the tensor it writes.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise ConvertError(
                f"{self.path} is not an MQwen model folder: it has no config.json. Pass the folder "
                "that `save_pretrained` (or `mqwen-convert build`) wrote."
            )
        model_type = json.loads(config_file.read_text()).get("model_type")
        if model_type != "mqwen":
            raise ConvertError(
                f"{config_file} has model_type {model_type!r}, not 'mqwen': only MQwen models "
                "(an LM + OpenCLIP ViT + projector saved by this package) can be exported here."
            )
        self.config = MQwenConfig.from_pretrained(self.path)
        self._files = self._weight_files()
        self._handles = {}

    def _weight_files(self):
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {name: self.path / file for name, file in weight_map.items()}
        single = self.path / "model.safetensors"
        if not single.is_file():
            raise ConvertError(
                f"{self.path} has no model.safetensors or model.safetensors.index.json; export reads "
                "safetensors weights only (re-save the model with save_pretrained)."
            )

        with safe_open(single, "np") as f:
            return {name: single for name in f.keys()}

    def names(self) -> list[str]:
        return list(self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        """A weight's shape, read from the safetensors header (no data is loaded)."""
        return tuple(self._handle(name).get_slice(name).get_shape())

    def _handle(self, name):
        if name not in self._files:
            raise ConvertError(f"{self.path} has no weight {name!r}; is the checkpoint complete?")
        file = self._files[name]
        if file not in self._handles:
            self._handles[file] = safe_open(file, "pt")
        return self._handles[file]

    def tensor(self, name: str) -> np.ndarray:
        """One weight as a float32 numpy array (bf16 and fp16 are widened)."""
        return self._handle(name).get_tensor(name).to(torch.float32).numpy()

    def tokenizer(self) -> PreTrainedTokenizerBase:
        return AutoTokenizer.from_pretrained(self.path)

    def processor_settings(self) -> tuple[str, str, str]:
        """(chat template, image token string, caption instruction) as the processor saved them."""
        template, settings = None, {}
        if (self.path / "chat_template.jinja").is_file():
            template = (self.path / "chat_template.jinja").read_text()
        for name in ("processor_config.json", "chat_template.json"):
            file = self.path / name
            if file.is_file():
                data = json.loads(file.read_text())
                settings.update(data)
                template = template or data.get("chat_template")
        return (
            template or CHAT_TEMPLATE,
            settings.get("image_token", "<image>"),
            settings.get("caption_instruction", DEFAULT_CAPTION_INSTRUCTION),
        )

    def generation_config(self) -> dict:
        file = self.path / "generation_config.json"
        return json.loads(file.read_text()) if file.is_file() else {}
