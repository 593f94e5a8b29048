"""Everything a Hub user does: load with trust_remote_code (folder, repo id offline), pipelines, publishing."""

import json

import pytest
import torch
from hub_utils import folder_files, generate_in_fresh_process, write_hub_cache
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, pipeline

SEEDS, NEW = [1, 2], 6


@pytest.fixture(scope="module")
def reference_tokens(tiny):
    """Greedy generations of the in-memory model that was saved to tiny_dir."""
    from conftest import random_image

    model, processor = tiny
    inputs = processor(images=[random_image(s) for s in SEEDS])
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False).tolist()


def test_saved_folder_has_the_hub_layout(tiny_dir):
    files = set(folder_files(tiny_dir))
    assert {"configuration_mqwen.py", "modeling_mqwen.py", "processing_mqwen.py"} <= files
    assert {
        "config.json",
        "model.safetensors",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_mqwen.MQwenForCausalLM"
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_mqwen.MQwenForCausalLM"
    assert config["auto_map"]["AutoModel"] == "modeling_mqwen.MQwenModel"
    assert config["auto_map"]["AutoConfig"] == "configuration_mqwen.MQwenConfig"
    assert "image-to-text" in config["custom_pipelines"]
    import transformers

    if hasattr(transformers, "AutoModelForVision2Seq"):  # 4.x; removed in 5
        assert config["auto_map"]["AutoModelForVision2Seq"] == "modeling_mqwen.MQwenForCausalLM"
    processor_config = json.loads((tiny_dir / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_mqwen.MQwenProcessor"


def test_fresh_process_load_from_folder(tiny_dir, reference_tokens):
    result = generate_in_fresh_process(tiny_dir, SEEDS, NEW)
    assert result["tokens"] == reference_tokens
    assert result["module"].startswith("transformers_modules."), "loaded as remote code, not the installed package"


def test_fresh_process_load_by_repo_id_offline(tiny_dir, reference_tokens, tmp_path):
    write_hub_cache(tmp_path / "hub", "mqwen-org/tiny", folder_files(tiny_dir))
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "home")}
    result = generate_in_fresh_process("mqwen-org/tiny", SEEDS, NEW, env=env)
    assert result["tokens"] == reference_tokens


def test_every_auto_class_loads(tiny_dir):
    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText, AutoModel):
        model = auto.from_pretrained(tiny_dir, trust_remote_code=True)
        expected = "MQwenModel" if auto is AutoModel else "MQwenForCausalLM"
        assert type(model).__name__ == expected
    processor = AutoProcessor.from_pretrained(tiny_dir, trust_remote_code=True)
    assert type(processor).__name__ == "MQwenProcessor"
    assert type(processor.tokenizer).__name__.startswith("Qwen2Tokenizer")


def test_base_model_returns_the_decoders_hidden_states(tiny, tiny_dir, make_image):
    model, processor = tiny
    base = AutoModel.from_pretrained(tiny_dir, trust_remote_code=True).eval()
    inputs = processor(images=[make_image(3)])
    with torch.no_grad():
        hidden = base(**inputs).last_hidden_state
        reference = model(**inputs, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(hidden, reference, atol=1e-6, rtol=1e-6)


def test_image_to_text_pipeline_needs_no_prompt(tiny, tiny_dir, make_image):
    model, processor = tiny
    captioner = pipeline("image-to-text", model=str(tiny_dir), trust_remote_code=True)
    image = make_image(4)
    result = captioner(image, max_new_tokens=NEW)
    inputs = processor(images=[image])
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=NEW, do_sample=False)
    caption = processor.decode_captions(generated, inputs["input_ids"].shape[1])[0]
    assert result == [{"generated_text": caption}]
    assert (
        captioner(image, prompt="Name the shapes.", max_new_tokens=NEW)[0]["generated_text"]
        == processor.decode_captions(
            model.generate(**processor(images=[image], text=["Name the shapes."]), max_new_tokens=NEW),
            processor(images=[image], text=["Name the shapes."])["input_ids"].shape[1],
        )[0]
    )


def test_image_text_to_text_pipeline_with_chat_messages(tiny, tiny_dir, make_image):
    model, processor = tiny
    chat = pipeline("image-text-to-text", model=str(tiny_dir), trust_remote_code=True)
    image = make_image(5)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe this image."}],
        }
    ]
    result = chat(text=messages, max_new_tokens=NEW, return_full_text=False)
    inputs = processor(images=[image])  # the default prompt is exactly this conversation
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=NEW, do_sample=False)
    assert result[0]["generated_text"].strip() == processor.decode_captions(generated, inputs["input_ids"].shape[1])[0]


def test_push_to_hub_publishes_model_and_processor_in_one_commit(
    tiny, tiny_dir, reference_tokens, tmp_path, monkeypatch
):
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import CommitInfo, RepoUrl

    model, processor = tiny
    commits = []

    def create_commit(self, repo_id, operations, **kwargs):
        files = {}
        for op in operations:
            source = op.path_or_fileobj
            files[op.path_in_repo] = source if isinstance(source, bytes) else open(source, "rb").read()
        commits.append((repo_id, files))
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/{'2' * 40}",
            commit_message="",
            commit_description="",
            oid="2" * 40,
        )

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_used")
    from mqwen.convert.push import push_to_hub

    push_to_hub(model, processor, "mqwen-org/published")

    assert len(commits) == 1
    repo_id, files = commits[0]
    assert repo_id == "mqwen-org/published"
    assert set(files) == set(folder_files(tiny_dir))
    assert sorted(n for n in files if n.endswith(".py")) == [
        "configuration_mqwen.py",
        "modeling_mqwen.py",
        "processing_mqwen.py",
    ]
    assert "model.safetensors" in files and not any(n.endswith(".bin") for n in files)
    assert "auto_map" in json.loads(files["config.json"])

    write_hub_cache(tmp_path / "hub", repo_id, files)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "home")}
    assert generate_in_fresh_process(repo_id, SEEDS, NEW, env=env)["tokens"] == reference_tokens


def test_the_hub_files_need_only_transformers_and_torch_and_carry_no_upload_code(tiny_dir):
    """A published checkpoint loads with transformers and torch alone (plus what transformers itself requires), and
    ships no publishing code: that lives in convert/push.py. Every import of the saved Hub files is the standard
    library, one of those packages, or a relative import of another Hub file; from huggingface_hub, only the
    local-cache lookup of the damaged-weights message."""
    import ast
    import sys

    hub_files = {"configuration_mqwen", "modeling_mqwen", "processing_mqwen"}
    allowed = set(sys.stdlib_module_names) | {"torch", "transformers", "safetensors", "huggingface_hub", "numpy", "PIL"}
    from_hub = set()
    for name in sorted(hub_files):
        for node in ast.walk(ast.parse((tiny_dir / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module in hub_files, f"{name}: from {'.' * node.level}{node.module}"
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert {m.split(".")[0] for m in modules} <= allowed, f"{name} imports {modules}"
                if isinstance(node, ast.ImportFrom) and node.module.split(".")[0] == "huggingface_hub":
                    from_hub |= {a.name for a in node.names}
    assert from_hub == {"snapshot_download"}
