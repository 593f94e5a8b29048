"""The language-model GGUF: MQwen's causal LM (Qwen2 or Llama) with its tokenizer and an mtmd chat template.

Tensor names come from the gguf package's `TensorNameMap` (transformers names -> llama.cpp names); merges and
special-token ids from its `SpecialVocab`. The chat template is the processor's, with the image placeholder
replaced by libmtmd's media marker `<__media__>`, so llama.cpp tools that render it (llama-mtmd-cli --jinja,
llama-server) place the image where MQwen's processor puts `<image>`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from ..errors import ConvertError
from .writer import PlannedTensor

if TYPE_CHECKING:
    import gguf
    from transformers import PretrainedConfig

    from ...configuration_mqwen import MQwenConfig
    from .source import MQwenFolder

MTMD_MEDIA_MARKER = "<__media__>"  # tools/mtmd/mtmd.cpp mtmd_default_marker()
ARCHITECTURES = {"qwen2": "QWEN2", "llama": "LLAMA"}

# tokenizer.json pre-tokenizer split patterns -> llama.cpp's "tokenizer.ggml.pre" names (src/llama-vocab.cpp)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {QWEN2_REGEX: "qwen2", LLAMA3_REGEX: "llama-bpe"}


def check_text(config: MQwenConfig) -> None:
    text = config.text_config
    if text.model_type not in ARCHITECTURES:
        raise ConvertError(
            f"text_config.model_type {text.model_type!r} cannot be exported yet; supported language "
            f"models: {', '.join(ARCHITECTURES)}."
        )
    scaling = getattr(text, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type", "default")) if isinstance(scaling, dict) else "default"
    parameters = getattr(text, "rope_parameters", None) or {}
    kind = parameters.get("rope_type", kind) if isinstance(parameters, dict) else kind
    if kind not in (None, "default"):
        raise ConvertError(f"text_config rope scaling {kind!r} is not exported; only plain RoPE is supported.")
    if getattr(text, "use_sliding_window", False):
        raise ConvertError("text_config.use_sliding_window=True is not exported; only full attention is supported.")


def _rope_theta(text):
    theta = getattr(text, "rope_theta", None)
    if theta is None:
        theta = (getattr(text, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


def head_dim(text: PretrainedConfig) -> int:
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def arch_of(config: MQwenConfig) -> str:
    import gguf  # optional: the gguf extra

    return gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, ARCHITECTURES[config.text_config.model_type])]


def add_text_metadata(writer: gguf.GGUFWriter, config: MQwenConfig, name: str, file_type: int) -> None:
    import gguf  # optional: the gguf extra

    text = config.text_config
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_context_length(text.max_position_embeddings)
    writer.add_embedding_length(text.hidden_size)
    writer.add_block_count(text.num_hidden_layers)
    writer.add_feed_forward_length(text.intermediate_size)
    writer.add_head_count(text.num_attention_heads)
    writer.add_head_count_kv(text.num_key_value_heads or text.num_attention_heads)
    writer.add_key_length(head_dim(text))
    writer.add_value_length(head_dim(text))
    writer.add_rope_dimension_count(head_dim(text))
    writer.add_rope_freq_base(_rope_theta(text))
    writer.add_layer_norm_rms_eps(text.rms_norm_eps)
    writer.add_vocab_size(text.vocab_size)


def pre_tokenizer_name(source: MQwenFolder) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization regex; refuses the ones it would split differently."""
    file = source.path / "tokenizer.json"
    if not file.is_file():
        raise ConvertError(f"{source.path} has no tokenizer.json; export needs the fast (byte-level BPE) tokenizer.")
    data = json.loads(file.read_text())
    if data["model"]["type"] != "BPE" or (data.get("decoder") or {}).get("type") != "ByteLevel":
        raise ConvertError(
            "Only byte-level BPE tokenizers (Qwen2, Llama 3 style) can be exported; this one is "
            f"{data['model']['type']} with decoder {(data.get('decoder') or {}).get('type')}."
        )
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    regexes = [step["pattern"].get("Regex") for step in steps if step.get("type") == "Split"]
    for regex in regexes:
        if regex in PRE_TOKENIZERS:
            return PRE_TOKENIZERS[regex]
    if not regexes and any(step.get("type") == "ByteLevel" and step.get("use_regex", True) for step in steps):
        return "gpt2"
    raise ConvertError(
        f"The tokenizer's pre-tokenizer ({regexes or pre.get('type')}) is not one llama.cpp names "
        "(Qwen2's, Llama 3's or GPT-2's); export cannot guarantee the same tokens."
    )


def add_tokenizer(
    writer: gguf.GGUFWriter, source: MQwenFolder, config: MQwenConfig, chat_template: str, image_token: str
) -> None:
    """Vocabulary (padded to the embedding rows), token types, merges, special ids and the chat template."""
    import gguf  # optional: the gguf extra

    tokenizer = source.tokenizer()
    n_vocab = config.text_config.vocab_size
    reverse = {index: token for token, index in tokenizer.get_vocab().items()}
    if max(reverse) >= n_vocab:
        raise ConvertError(f"The tokenizer has id {max(reverse)} but the language model only {n_vocab} embedding rows.")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(n_vocab):
        if index not in reverse:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(added[index].content)
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[index])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(source))
    writer.add_token_list(tokens)
    writer.add_token_types(types)

    special = gguf.SpecialVocab(source.path, load_merges=True, n_vocab=n_vocab)
    if not special.merges:
        raise ConvertError(f"{source.path / 'tokenizer.json'} holds no BPE merges; the tokenizer cannot be exported.")
    eos = source.generation_config().get("eos_token_id", tokenizer.eos_token_id)
    eos = eos if isinstance(eos, list) else [eos]
    if eos and eos[0] is not None:
        special.special_token_ids["eos"] = eos[0]
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id and end_of_turn is not None:
        special.special_token_ids["eot"] = end_of_turn
    special.add_special_token["bos"] = bool(
        tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id] and tokenizer.bos_token_id is not None
    )
    special.chat_template = chat_template.replace(image_token, MTMD_MEDIA_MARKER)
    special.add_to_gguf(writer, quiet=True)


def _permute_for_llama(weights, heads):
    """transformers' Llama q/k rows -> llama.cpp's rotary layout (pairs interleaved instead of split in halves)."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def plan_text_tensors(source: MQwenFolder, config: MQwenConfig) -> list[PlannedTensor]:
    import gguf  # optional: the gguf extra

    text = config.text_config
    arch = getattr(gguf.MODEL_ARCH, ARCHITECTURES[text.model_type])
    names = gguf.get_tensor_name_map(arch, text.num_hidden_layers)
    prefix = "language_model."
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads or text.num_attention_heads
    tied = getattr(config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False)
    plan = []
    shapes = {name: source.shape(name) for name in source.names() if name.startswith(prefix)}
    for name, shape in shapes.items():
        hf_name = name[len(prefix) :]
        if tied and hf_name == "lm_head.weight":
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConvertError(f"The language model weight {hf_name!r} has no llama.cpp counterpart; cannot export.")
        load = lambda name=name: source.tensor(name)
        if text.model_type == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
            n = heads if ".q_proj." in hf_name else kv_heads
            load = lambda name=name, n=n: _permute_for_llama(source.tensor(name), n)
        kind = "matrix" if len(shape) == 2 and "norm" not in hf_name else "keep_f32"
        plan.append(PlannedTensor(gguf_name, shape, load, kind))
    return plan
