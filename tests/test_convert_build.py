"""`mqwen-convert build` and `push`: a small sharded Qwen2 + small CLIP towers, written by their libraries.

The built folder must load with trust_remote_code and agree with the sources: text-only logits equal
Qwen2ForCausalLM's, the vision tower equals CLIP's, the tokenizer gains exactly `<image>`.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from clip_checkpoints import MEAN, STD, clip_vision_config, save_clip_image_processor
from conftest import randomize

from mqwen.common.small_tokenizer import QWEN_SPECIAL_TOKENS, train_qwen_style_tokenizer
from mqwen.convert.cli import main
from mqwen.convert.errors import ConvertError

SOURCE_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEXT = "A photo of a cat sitting on a wooden table. 0123456789"


# ---------------------------------------------------------------------------------------------------------
# Sources, written the way their libraries write them
# ---------------------------------------------------------------------------------------------------------


def save_source_tokenizer(folder):
    """A Qwen2Tokenizer with Qwen's special tokens and no `<image>`, like a stock Qwen checkpoint."""
    from transformers import AddedToken, AutoTokenizer, PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=train_qwen_style_tokenizer(),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    wrapped.add_tokens([AddedToken(token, special=True, normalized=False) for token in QWEN_SPECIAL_TOKENS])
    wrapped.chat_template = SOURCE_TEMPLATE
    wrapped.save_pretrained(folder)
    config_file = Path(folder) / "tokenizer_config.json"
    config_file.write_text(json.dumps(dict(json.loads(config_file.read_text()), tokenizer_class="Qwen2Tokenizer")))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert "<image>" not in tokenizer.get_vocab()
    return tokenizer


def make_llm(folder, rows, tie=False, seed=0):
    """A small Qwen2ForCausalLM saved as >= 3 safetensors shards, with tokenizer, generation config and card."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = save_source_tokenizer(folder)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=rows,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config).eval()
    model.save_pretrained(folder, max_shard_size=40_000)
    stop = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    GenerationConfig(
        eos_token_id=stop, pad_token_id=tokenizer.pad_token_id, do_sample=True, temperature=0.7, top_p=0.8
    ).save_pretrained(folder)
    (Path(folder) / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny qwen\n")
    assert len(list(Path(folder).glob("model-*.safetensors"))) >= 3
    return model, tokenizer


def make_hf_clip(folder, image_size=28):
    from transformers import CLIPVisionModelWithProjection

    model = randomize(CLIPVisionModelWithProjection(clip_vision_config(image_size)), 1).eval()
    model.save_pretrained(folder)
    save_clip_image_processor(folder, image_size)
    return model


def make_openclip(folder, image_size=42):
    open_clip = pytest.importorskip("open_clip")
    from open_clip.push_to_hf_hub import save_for_hf
    from open_clip.transform import PreprocessCfg

    cfg = {
        "embed_dim": 16,
        "quick_gelu": False,
        "vision_cfg": {"image_size": image_size, "layers": 2, "width": 32, "head_width": 16, "patch_size": 14},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    }
    model = randomize(open_clip.CLIP(**cfg), 2).eval()
    open_clip.set_model_preprocess_cfg(model, asdict(PreprocessCfg(mean=MEAN, std=STD, size=image_size)))

    class NoTokenizer:
        def save_pretrained(self, folder):
            pass

    save_for_hf(model, NoTokenizer(), cfg, folder, safe_serialization=True)
    return model


def load_built(folder):
    from transformers import AutoModelForCausalLM, AutoProcessor

    model, info = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval(), AutoProcessor.from_pretrained(folder, trust_remote_code=True)


def text_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def tree_digest(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    llm, tokenizer = make_llm(root / "qwen", rows=448)  # 400 tokens, rows padded to 448: <image> fits
    clip = make_hf_clip(root / "clip")
    return dict(root=root, llm=llm, tokenizer=tokenizer, clip=clip)


def build_argv(sources, out):
    """`mqwen-convert build` of the test LLM and CLIP into `out`, in 60 KB shards (so there are several)."""
    root = sources["root"]
    return ["build", "--llm", str(root / "qwen"), "--vision", str(root / "clip"), str(out), "--max-shard-size", "60KB"]


@pytest.fixture(scope="module")
def built(sources, tmp_path_factory):
    """The main build, through the CLI: padded vocabulary, transformers CLIP, fp32."""
    out = tmp_path_factory.mktemp("built") / "mqwen"
    assert main([*build_argv(sources, out), "--dtype", "fp32"]) == 0
    model, processor = load_built(out)
    return dict(out=out, model=model, processor=processor)


# ---------------------------------------------------------------------------------------------------------
# The main build
# ---------------------------------------------------------------------------------------------------------


def test_built_folder_layout(built):
    out = built["out"]
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "README.md",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors.index.json",
        "configuration_mqwen.py",
        "modeling_mqwen.py",
        "processing_mqwen.py",
    } <= names
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(n for n in names if n.startswith("model-"))
    assert len(shards) >= 2 and set(index["weight_map"].values()) == set(shards)
    from safetensors import safe_open

    stored = {}
    for shard in shards:
        with safe_open(out / shard, "pt") as handle:
            stored.update({key: handle.get_tensor(key) for key in handle.keys()})
    assert set(stored) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())
    assert not list(out.parent.glob(".mqwen.partial-*"))  # the staging folder was renamed, not left behind


def test_text_logits_equal_the_source_llm(built, sources):
    model, llm, tokenizer = built["model"], sources["llm"], sources["tokenizer"]
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    torch.testing.assert_close(text_logits(model, ids), text_logits(llm, ids), atol=1e-5, rtol=0)
    assert model.config.text_config.vocab_size == 448  # <image> (id 400) fits the padding: no resize
    assert model.config.image_token_id == 400


def test_vision_tower_equals_the_clip_source(built, sources):
    clip, model = sources["clip"], built["model"]
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        reference = clip(pixel_values=pixels, output_hidden_states=True)
        pooled, states = model.vision_tower(pixels, output_hidden_states=True)
    torch.testing.assert_close(pooled, reference.image_embeds, atol=1e-5, rtol=0)
    for ours, theirs in zip(states, reference.hidden_states, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert model.config.vision_config.hidden_act == "quick_gelu"


def test_tokenizer_gains_exactly_image_and_decodes_the_source_text_identically(built, sources):
    source, tokenizer = sources["tokenizer"], built["processor"].tokenizer
    assert len(tokenizer) == len(source) + 1
    assert tokenizer.convert_tokens_to_ids("<image>") == len(source)
    ids = source(TEXT)["input_ids"]
    assert tokenizer(TEXT)["input_ids"] == ids
    assert tokenizer.decode(ids) == source.decode(ids) == TEXT
    # One template per folder (shared with the processor): the source's own behind the image-part preamble,
    # which renders text-only conversations exactly as the source template does.
    from mqwen.convert.chat_template import FLATTEN_IMAGE_PARTS

    assert tokenizer.chat_template == built["processor"].chat_template == FLATTEN_IMAGE_PARTS + SOURCE_TEMPLATE
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye."},
    ]
    render = dict(tokenize=False, add_generation_prompt=True)
    assert tokenizer.apply_chat_template(chat, **render) == source.apply_chat_template(chat, **render)


def test_generation_config_and_processor_come_from_the_sources(built, sources):
    from transformers import GenerationConfig

    generation = GenerationConfig.from_pretrained(built["out"])
    source = GenerationConfig.from_pretrained(sources["root"] / "qwen")
    assert generation.eos_token_id == source.eos_token_id and generation.temperature == source.temperature
    image_processor = built["processor"].image_processor
    assert list(image_processor.image_mean) == list(MEAN) and list(image_processor.image_std) == list(STD)
    assert built["processor"].image_seq_length == built["model"].config.image_seq_length == 4


def test_built_model_generates_from_an_image(built, make_image):
    model, processor = built["model"], built["processor"]
    inputs = processor(images=[make_image(0), make_image(1)], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)
    assert len(processor.decode_captions(out, inputs["input_ids"].shape[1])) == 2


def test_model_card(built):
    from huggingface_hub import ModelCard

    card = ModelCard.load(built["out"] / "README.md")
    data = card.data.to_dict()
    assert data["pipeline_tag"] == "image-to-text" and data["library_name"] == "transformers"
    assert "mqwen" in data["tags"]
    assert data["license"] == "other" and "apache-2.0" in data["license_name"]  # the CLIP's license is unknown
    assert "trust_remote_code=True" in card.text and 'pipeline("image-to-text"' in card.text
    assert "AutoProcessor" in card.text and "freshly initialised" in card.text


# ---------------------------------------------------------------------------------------------------------
# Resizing, dtypes, projectors, pickle
# ---------------------------------------------------------------------------------------------------------


def test_resize_when_image_falls_outside_the_embeddings_tied_openclip(tmp_path):
    """400 tokens in 400 rows: `<image>` needs a new row; rows grow to the padding multiple, filled with the mean."""
    from safetensors.torch import load_file

    llm, tokenizer = make_llm(tmp_path / "qwen", rows=400, tie=True, seed=3)
    clip = make_openclip(tmp_path / "oc")
    out = tmp_path / "out"
    from mqwen.convert.build import build

    build(tmp_path / "qwen", tmp_path / "oc", out, max_shard_size="10MB")
    model, processor = load_built(out)
    assert model.config.text_config.vocab_size == 416 and model.config.tie_word_embeddings
    stored = load_file(out / "model.safetensors")
    assert "language_model.lm_head.weight" not in stored  # tied, as in the source
    embed = stored["language_model.model.embed_tokens.weight"]
    source_embed = llm.get_input_embeddings().weight.detach()
    torch.testing.assert_close(embed[:400], source_embed, atol=0, rtol=0)
    torch.testing.assert_close(embed[400:], source_embed.mean(0, keepdim=True).expand(16, -1), atol=1e-6, rtol=0)
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    torch.testing.assert_close(text_logits(model, ids)[..., :400], text_logits(llm, ids), atol=1e-5, rtol=0)
    pixels = torch.randn(1, 3, 42, 42)
    with torch.no_grad():
        torch.testing.assert_close(model.vision_tower(pixels), clip.visual(pixels), atol=1e-5, rtol=0)
    assert model.config.vision_config.hidden_act == "gelu"


def test_bf16_build_with_a_projector_file(tmp_path, sources):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from mqwen.convert.build import build

    projector = {
        "model.mm_projector.0.weight": torch.randn(32, 32),
        "model.mm_projector.0.bias": torch.randn(32),
        "model.mm_projector.2.weight": torch.randn(32, 32),
        "model.mm_projector.2.bias": torch.randn(32),
    }
    save_file(projector, tmp_path / "mm_projector.safetensors")  # the original LLaVA names
    out = build(
        sources["root"] / "qwen",
        sources["root"] / "clip",
        tmp_path / "out",
        dtype="bf16",
        projector=tmp_path / "mm_projector.safetensors",
    )
    with safe_open(out / "model.safetensors", "pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"BF16"}
        torch.testing.assert_close(
            handle.get_tensor("multi_modal_projector.linear_2.weight"),
            projector["model.mm_projector.2.weight"].bfloat16(),
            atol=0,
            rtol=0,
        )
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert "loaded from" in (out / "README.md").read_text()


def test_projector_of_the_wrong_shape_is_refused(tmp_path, sources):
    from safetensors.torch import save_file

    save_file({"linear_1.weight": torch.randn(64, 48), "linear_1.bias": torch.randn(64)}, tmp_path / "proj.safetensors")
    with pytest.raises(ConvertError, match=r"linear_1.weight has shape \(64, 48\) but this build needs \(32, 32\)"):
        from mqwen.convert.build import build

        build(
            sources["root"] / "qwen",
            sources["root"] / "clip",
            tmp_path / "out",
            projector=tmp_path / "proj.safetensors",
        )
    assert not (tmp_path / "out").exists()


def test_pickle_llm_needs_allow_pickle(tmp_path, sources):
    import shutil

    from mqwen.convert.build import build

    folder = tmp_path / "qwen-bin"
    shutil.copytree(sources["root"] / "qwen", folder, ignore=shutil.ignore_patterns("model*.safetensors*"))
    torch.save(sources["llm"].state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ConvertError, match="--allow-pickle"):
        build(folder, sources["root"] / "clip", tmp_path / "out")
    out = build(folder, sources["root"] / "clip", tmp_path / "out", allow_pickle=True)
    model, _ = load_built(out)
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(text_logits(model, ids), text_logits(sources["llm"], ids), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# Clear errors and never a half-written OUT_DIR
# ---------------------------------------------------------------------------------------------------------


def test_llm_folder_without_weights(tmp_path, sources, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((sources["root"] / "qwen" / "config.json").read_text())
    code = main(
        ["build", "--llm", str(tmp_path / "empty"), "--vision", str(sources["root"] / "clip"), str(tmp_path / "out")]
    )
    assert code == 2 and "has no weights" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unknown_vision_name_from_the_cli(tmp_path, sources, capsys):
    pytest.importorskip("open_clip")
    code = main(
        ["build", "--llm", str(sources["root"] / "qwen"), "--vision", "ViT-L-14:no_such_tag", str(tmp_path / "out")]
    )
    assert code == 2 and "no pretrained tag 'no_such_tag'" in capsys.readouterr().err


def test_existing_out_dir_needs_overwrite(tmp_path, sources):
    from mqwen.convert.build import build

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(ConvertError, match="--overwrite"):
        build(sources["root"] / "qwen", sources["root"] / "clip", out)
    assert (out / "keep.txt").read_text() == "old"
    build(sources["root"] / "qwen", sources["root"] / "clip", out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_build_leaves_nothing(tmp_path, sources, monkeypatch, failure):
    import mqwen.convert.shards as shards

    original, calls = shards.write_safetensors, []

    def fail_on_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise failure
        return original(*args, **kwargs)

    monkeypatch.setattr(shards, "write_safetensors", fail_on_second_shard)
    from mqwen.convert.build import build

    with pytest.raises(type(failure)):
        build(sources["root"] / "qwen", sources["root"] / "clip", tmp_path / "out", max_shard_size="60KB")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_build_leaves_no_out_dir(tmp_path, sources, how):
    """Killed in the middle of writing: OUT_DIR never appears. SIGTERM cleans up at once; after SIGKILL the
    next build next to it removes the leftovers."""
    marker, out = tmp_path / "first-shard-written", tmp_path / "out"
    script = (
        "import sys, time\n"
        "import mqwen.convert.shards as shards\n"
        "original = shards.write_safetensors\n"
        "def slow(*args, **kwargs):\n"
        "    original(*args, **kwargs)\n"
        f"    open({str(marker)!r}, 'w').close()\n"
        "    time.sleep(600)\n"
        "shards.write_safetensors = slow\n"
        "from mqwen.convert.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    argv = build_argv(sources, out)
    process = subprocess.Popen(
        [sys.executable, "-c", script, *argv],
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert process.poll() is None, "the build exited before it was killed"
            assert time.time() < deadline, "the build never wrote its first shard"
            time.sleep(0.1)
        leftovers = list(tmp_path.glob(".out.partial-*"))
        assert len(leftovers) == 1 and any(leftovers[0].glob("model-*.safetensors"))
        os.kill(process.pid, how)
        assert process.wait(30) != 0
    finally:
        if process.poll() is None:
            process.kill()
    assert not out.exists()
    left = list(tmp_path.glob(".out.partial-*"))
    assert len(left) == (1 if how == signal.SIGKILL else 0)
    if left:
        from mqwen.convert.build import build

        build(sources["root"] / "qwen", sources["root"] / "clip", out)
        assert (out / "config.json").is_file() and not list(tmp_path.glob(".out.partial-*"))


# ---------------------------------------------------------------------------------------------------------
# push
# ---------------------------------------------------------------------------------------------------------


class FakeHub:
    """Stands in for the Hub at the HfApi boundary: records what would be committed."""

    def __init__(self, monkeypatch, fail=None):
        from huggingface_hub import HfApi, RepoUrl

        self.commits, self.repos, self.fail = [], [], fail
        monkeypatch.setattr(
            HfApi,
            "create_repo",
            lambda api, repo_id, **kw: self.repos.append((repo_id, kw)) or RepoUrl(f"https://huggingface.co/{repo_id}"),
        )
        monkeypatch.setattr(HfApi, "create_branch", lambda api, repo_id, **kw: None)
        monkeypatch.setattr(HfApi, "create_commit", self.create_commit)

    def create_commit(self, repo_id, operations, commit_message=None, revision=None, **kwargs):
        from types import SimpleNamespace

        if self.fail:
            raise self.fail
        self.commits.append(dict(repo_id=repo_id, operations=operations, message=commit_message, revision=revision))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/abc123")


def test_push_uploads_exactly_the_folder_in_one_commit(built, monkeypatch, capsys):
    hub = FakeHub(monkeypatch)
    before = tree_digest(built["out"])
    assert main(["push", str(built["out"]), "me/mqwen-tiny", "--private", "--commit-message", "first"]) == 0
    assert capsys.readouterr().out.strip().endswith("https://huggingface.co/me/mqwen-tiny/commit/abc123")
    (commit,) = hub.commits
    uploaded = {op.path_in_repo: op.path_or_fileobj for op in commit["operations"]}
    assert set(uploaded) == set(before)
    assert all(Path(path) == built["out"] / name for name, path in uploaded.items())
    assert commit["message"] == "first" and hub.repos[0][1]["private"] is True
    assert tree_digest(built["out"]) == before


def test_push_network_failure_leaves_the_folder_untouched_and_can_be_rerun(built, monkeypatch, capsys):
    before = tree_digest(built["out"])
    FakeHub(monkeypatch, fail=ConnectionError("connection reset by peer"))
    assert main(["push", str(built["out"]), "me/mqwen-tiny"]) == 2
    err = capsys.readouterr().err
    assert "connection reset by peer" in err and "run the same command again" in err
    assert tree_digest(built["out"]) == before
    hub = FakeHub(monkeypatch)
    assert main(["push", str(built["out"]), "me/mqwen-tiny"]) == 0 and len(hub.commits) == 1


def test_push_refuses_a_folder_that_is_not_a_build(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert main(["push", str(tmp_path), "me/x"]) == 2
    assert "not a complete MQwen build" in capsys.readouterr().err


def test_build_with_push_to_hub(tmp_path, sources, monkeypatch):
    hub = FakeHub(monkeypatch)
    from mqwen.convert.build import build

    out = build(sources["root"] / "qwen", sources["root"] / "clip", tmp_path / "out", push_to_hub="me/built")
    (commit,) = hub.commits
    assert {op.path_in_repo for op in commit["operations"]} == set(tree_digest(out))
    assert 'repo = "me/built"' in (out / "README.md").read_text()


def test_help_has_examples():
    import contextlib
    import io

    for command in (["--help"], ["build", "--help"], ["push", "--help"]):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer), pytest.raises(SystemExit):
            main(command)
        assert "examples:" in buffer.getvalue()


def test_llm_hub_id_fetches_configs_tokenizer_and_only_the_safetensors_shards(sources, tmp_path, monkeypatch):
    """A Hub id goes through the same weight choice as a folder; the download is served from the local source."""
    import fnmatch
    import shutil

    import huggingface_hub

    from mqwen.convert.build import resolve_llm

    repo = tmp_path / "repo"
    shutil.copytree(sources["root"] / "qwen", repo)
    torch.save({}, repo / "pytorch_model.bin")  # a pickle copy next to the safetensors must not be fetched
    cache = tmp_path / "hub-cache" / "models--Org--tiny-qwen" / "snapshots" / "abc"
    patterns = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        patterns.extend(allow_patterns)
        for path in repo.iterdir():
            if any(fnmatch.fnmatch(path.name, pattern) for pattern in allow_patterns):
                cache.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, cache / path.name)
        return str(cache)

    monkeypatch.setattr(
        huggingface_hub.HfApi,
        "list_repo_files",
        lambda api, repo_id, revision=None, **kw: sorted(p.name for p in repo.iterdir()),
    )
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, name, **kw: str(repo / name))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    source = resolve_llm("Org/tiny-qwen")
    assert source.hub_id == "Org/tiny-qwen" and source.folder == cache
    fetched = {p.name for p in cache.iterdir()}
    assert {p.name for p in source.files} == {p.name for p in repo.glob("model-*.safetensors")} <= fetched
    assert {"config.json", "tokenizer.json", "generation_config.json", "README.md"} <= fetched
    assert "pytorch_model.bin" not in fetched
