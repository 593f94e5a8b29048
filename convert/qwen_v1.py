"""The original Qwen (v1: Qwen-7B-Chat, Qwen-1.8B, ... with `modeling_qwen.py` remote code) as an MQwen language model.

A v1 checkpoint is recognised by `model_type: "qwen"` in its config.json. Its transformer is, up to names and
two fused/split tensors, exactly transformers' Qwen2: RMSNorm, rotary embeddings with the rotate-half
convention over the whole head, a causal softmax attention with q/k/v biases and no output bias, and a SiLU-gated
MLP. The build therefore writes a `Qwen2ForCausalLM` (no remote code for the language model) with:

| v1 tensor                               | Qwen2 tensor                                   |
|-----------------------------------------|------------------------------------------------|
| `transformer.wte`                       | `model.embed_tokens`                           |
| `transformer.h.N.ln_1`, `ln_2`          | `model.layers.N.input_layernorm`, `post_attention_layernorm` |
| `transformer.h.N.attn.c_attn` (q;k;v)   | `model.layers.N.self_attn.{q,k,v}_proj` (rows in thirds, bias too) |
| `transformer.h.N.attn.c_proj`           | `model.layers.N.self_attn.o_proj`              |
| `transformer.h.N.mlp.w2`                | `model.layers.N.mlp.gate_proj` (v1: `c_proj(w1(x) * silu(w2(x)))`) |
| `transformer.h.N.mlp.w1`                | `model.layers.N.mlp.up_proj`                   |
| `transformer.h.N.mlp.c_proj`            | `model.layers.N.mlp.down_proj`                 |
| `transformer.ln_f`, `lm_head`           | `model.norm`, `lm_head`                        |

and a Qwen2 config with v1's `layer_norm_epsilon`, `rotary_emb_base`, `seq_length` (as max_position_embeddings)
and half of v1's `intermediate_size` (v1 states the two input projections' widths together).

What cannot be reproduced: `use_logn_attn` and `use_dynamic_ntk` change v1's attention only once a sequence is
longer than `seq_length`; within it the converted model's outputs equal v1's, and the model card says so.
Features that change outputs at every length (partial rotary, scaled positions, biases outside q/k/v, a
quantised KV cache, heads whose width is not hidden_size / heads) are refused with an error naming the field.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import GenerationConfig, Qwen2Config

from .errors import ConvertError
from .qwen_v1_tokenizer import convert_qwen_v1_tokenizer

if TYPE_CHECKING:
    import torch
    from transformers import GenerationConfig, PreTrainedTokenizerBase, Qwen2Config

    from .shards import PickleFile, SafetensorsFile

QWEN_V1_MODEL_TYPE = "qwen"

# v1 tensors that are buffers of the v1 code, not weights (some checkpoints saved them).
_BUFFERS = re.compile(r"(^|\.)(rotary_emb\.inv_freq|attn\.masked_bias|attn\.bias|registered_causal_mask)$")
_LAYER = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")
_RENAMES = {
    "ln_1.weight": "input_layernorm.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "mlp.w2.weight": "mlp.gate_proj.weight",
    "mlp.w1.weight": "mlp.up_proj.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}
# The first v1 releases (Aug 2023) wrote GPT-2 names, which their QWenConfig mapped through attribute_map.
_FIRST_RELEASE_NAMES = {
    "hidden_size": "n_embd",
    "num_attention_heads": "n_head",
    "num_hidden_layers": "n_layer",
    "max_position_embeddings": "n_positions",
}
_TOP_LEVEL = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def read_qwen_v1_config(folder: str | os.PathLike) -> dict | None:
    """config.json of `folder` as a dict if it is a Qwen v1 checkpoint, else None."""
    config_file = Path(folder) / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None
    return config if config.get("model_type") == QWEN_V1_MODEL_TYPE else None


class QwenV1:
    """A Qwen v1 checkpoint folder: its config checked for what maps exactly, and what the build needs from it."""

    def __init__(self, folder: str | os.PathLike, config: dict):
        self.folder = Path(folder)
        self.config = dict(config)
        for name, first_release_name in _FIRST_RELEASE_NAMES.items():
            if name not in self.config and first_release_name in config:
                self.config[name] = config[first_release_name]
        if config.get("padded_vocab_size"):  # the first releases' embedding rows; vocab_size counted tokens
            self.config["vocab_size"] = config["padded_vocab_size"]
        self._check()

    @classmethod
    def detect(cls, folder: str | os.PathLike) -> QwenV1 | None:
        """A `QwenV1` for a v1 folder (raising ConvertError if it cannot convert exactly), else None."""
        config = read_qwen_v1_config(folder)
        return None if config is None else cls(folder, config)

    # --- config --------------------------------------------------------------------------------------------

    def _get(self, key, default=None):
        return self.config.get(key, default)

    @property
    def seq_length(self) -> int:
        return int(self._get("seq_length") or self._get("max_position_embeddings") or 2048)

    @property
    def intermediate_size(self) -> int:
        """The width of each of w1, w2 (v1's config holds their sum; the oldest configs call it ffn_hidden_size)."""
        total = self._get("intermediate_size") or self._get("ffn_hidden_size")
        if not total:
            raise ConvertError(f"Qwen v1 config {self.folder / 'config.json'} has no intermediate_size.")
        return int(total) // 2

    def _check(self):
        where = self.folder / "config.json"
        needed = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
        missing = [key for key in needed if key not in self.config]
        if missing:
            raise ConvertError(f"Qwen v1 config {where} lacks {', '.join(missing)}.")
        hidden, heads = self._get("hidden_size"), self._get("num_attention_heads")
        refusals = []
        if hidden % heads:
            refusals.append(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
        elif self._get("kv_channels", hidden // heads) != hidden // heads:
            refusals.append(
                f"kv_channels={self._get('kv_channels')} differs from hidden_size / num_attention_heads = "
                f"{hidden // heads} (v1's own attention splits heads by hidden_size / num_attention_heads)"
            )
        if float(self._get("rotary_pct", 1.0)) != 1.0:
            refusals.append(f"rotary_pct={self._get('rotary_pct')} (Qwen2 rotates the whole head)")
        if float(self._get("seq_length_expansion", 1) or 1) != 1:
            refusals.append(f"seq_length_expansion={self._get('seq_length_expansion')} (scaled rotary positions)")
        if not self._get("no_bias", True):
            refusals.append("no_bias=false (Qwen2 has no bias on the attention output and MLP projections)")
        if self._get("use_cache_quantization", False):
            refusals.append(
                "use_cache_quantization=true (an 8-bit KV cache: set it to false; the converted "
                "model then equals v1 with a full-precision cache)"
            )
        if self._get("pos_emb", "rotary") != "rotary":
            refusals.append(f"pos_emb={self._get('pos_emb')!r}")
        if self._get("apply_residual_connection_post_layernorm", False):
            refusals.append("apply_residual_connection_post_layernorm=true")
        if refusals:
            raise ConvertError(
                f"This Qwen v1 checkpoint ({where}) uses features that transformers' Qwen2 cannot reproduce exactly: "
                + "; ".join(refusals)
                + "."
            )

    def text_config(self) -> Qwen2Config:
        """The Qwen2Config whose model computes what v1's code computes (within `seq_length` tokens)."""
        config = self.config
        return Qwen2Config(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=self.intermediate_size,
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=config["num_attention_heads"],
            num_key_value_heads=config["num_attention_heads"],
            hidden_act="silu",
            max_position_embeddings=self.seq_length,
            rms_norm_eps=float(config.get("layer_norm_epsilon", 1e-6)),
            rope_theta=float(config.get("rotary_emb_base", 10000)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            initializer_range=float(config.get("initializer_range", 0.02)),
            use_sliding_window=False,
            attention_dropout=0.0,
            bos_token_id=None,
        )

    # --- what the build asks for -----------------------------------------------------------------------

    def text_side(self) -> tuple[Qwen2Config, PreTrainedTokenizerBase]:
        """(Qwen2Config, tokenizer): the build's `_load_text_side` for a v1 folder."""
        print("Tokenizer: converting qwen.tiktoken (151,643 BPE ranks; this takes up to a minute)")
        tokenizer = convert_qwen_v1_tokenizer(self.folder)
        text_config = self.text_config()
        text_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        text_config.pad_token_id = tokenizer.pad_token_id
        return text_config, tokenizer

    def wrap_readers(self, readers: list[SafetensorsFile | PickleFile]) -> list[QwenV1Reader]:
        """The weight readers, presenting v1 tensors under Qwen2ForCausalLM's names (split lazily)."""
        return [QwenV1Reader(reader, self.config["hidden_size"]) for reader in readers]

    def generation_config(self, tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
        """v1's sampling defaults, stopping where v1's chat stops: `<|im_end|>`, `<|im_start|>`, `<|endoftext|>`.

        v1's `chat()` adds `<|im_end|>` and `<|im_start|>` as stop words to the `<|endoftext|>` of its
        generation_config.json; v1-only fields (chat_format, max_window_size, stop_words_ids) are dropped.
        """
        stop = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|im_start|>", "<|endoftext|>")]
        source = {}
        source_file = self.folder / "generation_config.json"
        if source_file.is_file():
            source = json.loads(source_file.read_text())
        kept = {
            key: source[key]
            for key in ("do_sample", "top_k", "top_p", "temperature", "repetition_penalty", "max_new_tokens")
            if key in source
        }
        if kept.get("top_k") == 0:  # v1 writes 0 for "no top-k"; transformers spells that None
            kept["top_k"] = None
        kept.setdefault("do_sample", False)
        return GenerationConfig(eos_token_id=stop, pad_token_id=tokenizer.pad_token_id, **kept)

    def card_section(self) -> str:
        """Model-card text stating where the converted model's outputs equal v1's."""
        changes = [name for name in ("use_logn_attn", "use_dynamic_ntk") if self._get(name, False)]
        beyond = (
            f"Beyond that, v1 switches on {' and '.join(f'`{n}`' for n in changes)}, which this Qwen2 model does\n"
            "not reproduce: longer sequences give different outputs from the original."
            if changes
            else "v1 has no length-dependent attention switched on in this checkpoint."
        )
        return f"""
## Converted from the original Qwen (v1)

The language model was converted from a Qwen v1 checkpoint (`QWenLMHeadModel`, `modeling_qwen.py`) into
transformers' `Qwen2ForCausalLM`; weights are mapped exactly (fused `c_attn` split into q/k/v, `w2`/`w1` as
gate/up) and the tokenizer was converted from `qwen.tiktoken` with v1's pre-tokenizer and special tokens
(identical ids). **For sequences of up to {self.seq_length} tokens (v1's `seq_length`) its outputs equal the
original model's.**
{beyond}
"""

    def add_card_section(self, readme: str | os.PathLike) -> None:
        readme = Path(readme)
        readme.write_text(readme.read_text().rstrip("\n") + "\n" + self.card_section())

    def notice(self) -> str:
        return (
            f"Qwen v1 checkpoint: converting to Qwen2 (outputs equal v1's up to {self.seq_length} tokens; "
            "see the model card)"
        )


class QwenV1Reader:
    """A weight reader (`shards.SafetensorsFile` / `PickleFile`) seen through Qwen2ForCausalLM's names.

    `c_attn` appears as three tensors, each loaded from the fused one and sliced when it is written, so peak
    memory stays at one fused tensor. v1 buffers saved in old checkpoints are hidden; anything unknown keeps
    its v1 name, so the build's name check reports it instead of dropping it.
    """

    def __init__(self, reader: SafetensorsFile | PickleFile, hidden_size: int):
        self.reader = reader
        self.hidden_size = hidden_size
        self._sources = {}  # Qwen2 name -> (v1 name, slice index or None)
        for key in reader.keys():
            if _BUFFERS.search(key):
                continue
            for name, part in self._names(key):
                self._sources[name] = (key, part)

    def _names(self, key):
        if key in _TOP_LEVEL:
            return [(_TOP_LEVEL[key], None)]
        match = _LAYER.match(key)
        if match:
            layer, rest = match.groups()
            prefix = f"model.layers.{layer}."
            if rest in _RENAMES:
                return [(prefix + _RENAMES[rest], None)]
            fused = re.fullmatch(r"attn\.c_attn\.(weight|bias)", rest)
            if fused:
                kind = fused.group(1)
                return [(f"{prefix}self_attn.{p}_proj.{kind}", index) for index, p in enumerate("qkv")]
        return [(key, None)]

    def keys(self) -> list[str]:
        return list(self._sources)

    def info(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        source, part = self._sources[key]
        dtype, shape = self.reader.info(source)
        if part is None:
            return dtype, shape
        if shape[0] != 3 * self.hidden_size:
            raise ConvertError(
                f"Qwen v1 {source} has shape {tuple(shape)}; expected 3 * hidden_size = "
                f"{3 * self.hidden_size} rows (q, k, v)."
            )
        return dtype, (self.hidden_size, *shape[1:])

    def get(self, key: str) -> torch.Tensor:
        source, part = self._sources[key]
        tensor = self.reader.get(source)
        if part is None:
            return tensor
        return tensor[part * self.hidden_size : (part + 1) * self.hidden_size]

    def close(self) -> None:
        self.reader.close()
