"""Quantized loading: only the language model's linear layers are quantized, whoever asks and however.

- A bare `quantization_config` (bitsandbytes 4-bit NF4/FP4 and 8-bit, torchao int8 weight-only, as an object or a
  dict) given to `from_pretrained` leaves every vision-tower and projector module, the embeddings and `lm_head` a
  plain `nn.Linear` / `nn.Embedding` in the compute dtype, and quantizes every decoder linear layer: the model
  class declares what is left alone (`_not_quantized_modules`); the caller's config object is not changed.
- On the trained GGUF test model (tests/gguf_model.py, 50 shapes images), against fp32 (measured on 2 CPU cores,
  transformers 5.25 and 4.57, December 2026): 8-bit logits differ by at most 0.11 (mean 0.007; logits span
  +-11.4), greedy captions agree on 100 % of images; 4-bit NF4: at most 0.81 (mean 0.039), 92 %; FP4: at most
  1.50 (mean 0.064), 84 %; torchao int8: at most 0.063 (mean 0.002), 100 %. The bounds below leave about 2x room
  on the logits and a few images on the captions.
- `load_for_inference(quantization=...)`, the pipeline, `mqwen-caption --quantize` and the web page's handler give
  the captions `generate` gives on the same quantized model.
- bitsandbytes checkpoints save, reload quantized (same logits, bit for bit) and publish; torchao ones save on
  transformers 5 and are refused with a clear error on 4.57; bad input gets errors that say what to install.
"""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from packaging.version import Version
from PIL import Image
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from mqwen import runtime
from mqwen.common.tiny_model import build_tiny, save_checkpoint
from mqwen.convert.errors import ConvertError
from mqwen.modeling_mqwen import MQwenPreTrainedModel
from mqwen.runtime import caption_images, load_for_inference

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed: pip install -e '.[quant]'")
from gguf_model import cached_gguf_test_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Every matrix at least 64 wide, bitsandbytes' block: a quantized vision tower would load and run, so only the
# module checks below can tell (with 32-wide layers bitsandbytes crashes instead, the symptom of issue 46).
WIDE = dict(vision=dict(width=64, heads=2, output_dim=64), text=dict(hidden_size=64, intermediate_size=128))
TRANSFORMERS_5 = Version(transformers.__version__) >= Version("5")
N_CAPTION_TOKENS = 24


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    model, processor = build_tiny(seed=0, **WIDE)
    return save_checkpoint(model, processor, tmp_path_factory.mktemp("mqwen-wide"))


@pytest.fixture(scope="module")
def images():
    rng = np.random.RandomState(0)
    return [Image.fromarray((rng.rand(60, 70, 3) * 255).astype("uint8")) for _ in range(3)]


@pytest.fixture(scope="module")
def image_dir(images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for i, image in enumerate(images):
        image.save(folder / f"img{i}.png")
    return folder


def is_quantized(module):
    weight = module.weight
    return type(module) is not nn.Linear or type(weight) not in (nn.Parameter, torch.Tensor)


def assert_only_the_language_model_is_quantized(model, dtype):
    kept = MQwenPreTrainedModel._not_quantized_modules
    checked = quantized = 0
    for name, module in model.named_modules():
        if any(name == k or name.startswith(k + ".") for k in kept):
            for parameter_name, parameter in module.named_parameters(recurse=False):
                assert type(parameter) is nn.Parameter, f"{name}.{parameter_name} is {type(parameter).__name__}"
                assert parameter.dtype == dtype, f"{name}.{parameter_name} is {parameter.dtype}, not {dtype}"
            if isinstance(module, nn.Linear):
                assert type(module) is nn.Linear, f"{name} became {type(module).__name__}"
                checked += 1
        elif name.startswith("language_model.model.layers.") and isinstance(module, nn.Linear):
            assert is_quantized(module), f"{name} was not quantized"
            quantized += 1
    embeddings = model.get_input_embeddings()
    assert type(embeddings) is nn.Embedding and embeddings.weight.dtype == dtype
    # 2 ViT blocks x 3 linears, 2 projector linears, lm_head; 2 decoder layers x 7 linears
    assert (checked, quantized) == (9, 14)


def bare_configs():
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return {
        "bnb-nf4": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        ),
        "bnb-fp4": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.bfloat16
        ),
        "bnb-8bit": BitsAndBytesConfig(load_in_8bit=True),
        "bnb-dict": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_compute_dtype": "bfloat16"},
        "torchao-int8": TorchAoConfig(Int8WeightOnlyConfig()),
    }


@pytest.mark.parametrize("kind", ["bnb-nf4", "bnb-fp4", "bnb-8bit", "bnb-dict", "torchao-int8"])
def test_a_bare_quantization_config_leaves_vision_projector_and_lm_head_alone(wide_dir, images, kind):
    config = bare_configs()[kind]
    before = json.dumps(config if isinstance(config, dict) else config.to_dict(), default=str, sort_keys=True)
    model = AutoModelForCausalLM.from_pretrained(
        wide_dir, trust_remote_code=True, quantization_config=config, dtype=torch.bfloat16
    ).eval()
    assert_only_the_language_model_is_quantized(model, torch.bfloat16)
    after = json.dumps(config if isinstance(config, dict) else config.to_dict(), default=str, sort_keys=True)
    assert after == before, "the caller's quantization config was changed"
    processor = load_for_inference(wide_dir, "cpu")[1]
    (caption,) = caption_images(model, processor, images[:1], max_new_tokens=4)
    assert isinstance(caption, str)


def test_a_skip_list_the_caller_gives_is_kept(wide_dir):
    skip = [*MQwenPreTrainedModel._not_quantized_modules, "language_model.model.layers.0.mlp"]
    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    model = AutoModelForCausalLM.from_pretrained(wide_dir, trust_remote_code=True, quantization_config=config)
    layers = model.language_model.model.layers
    assert type(layers[0].mlp.up_proj) is nn.Linear and is_quantized(layers[0].self_attn.q_proj)
    assert is_quantized(layers[1].mlp.up_proj)


def test_the_runtime_names_the_models_declaration():
    assert runtime.NOT_QUANTIZED_MODULES == MQwenPreTrainedModel._not_quantized_modules


@pytest.mark.parametrize("name", ["4bit", "fp4", "8bit", "torchao-int8"])
def test_load_for_inference_quantizes_only_the_language_model(wide_dir, name):
    model, _ = load_for_inference(wide_dir, "cpu", "fp32", quantization=name)
    assert_only_the_language_model_is_quantized(model, torch.float32)
    assert not model.training and model.device.type == "cpu"


# -------------------------------------------------------------------------------------------------------------
# Numbers: the trained GGUF test model, quantized against fp32
# -------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(model_dir, test_dir) of the trained GGUF test model (tests/gguf_model.py; cached once per machine)."""
    return cached_gguf_test_model(tmp_path_factory)


@pytest.fixture(scope="module")
def test_images(trained):
    test_dir = trained[1]
    records = [json.loads(line) for line in (test_dir / "captions.jsonl").read_text().splitlines()]
    return [Image.open(test_dir / r["file"]).convert("RGB") for r in records]


@pytest.fixture(scope="module")
def fp32_reference(trained, test_images):
    model, processor = load_for_inference(trained[0], "cpu", "fp32")
    batch = processor(images=test_images[:8], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    captions = list(caption_images(model, processor, test_images, batch_size=1, max_new_tokens=N_CAPTION_TOKENS))
    return processor, batch, logits, captions


@pytest.mark.parametrize(
    "name, max_diff, mean_diff, agreement",
    [("8bit", 0.25, 0.02, 0.9), ("4bit", 1.6, 0.08, 0.84), ("fp4", 3.0, 0.13, 0.7), ("torchao-int8", 0.15, 0.01, 0.9)],
)
def test_logits_and_greedy_captions_stay_close_to_fp32(
    trained, test_images, fp32_reference, name, max_diff, mean_diff, agreement
):
    processor, batch, reference_logits, reference_captions = fp32_reference
    model, _ = load_for_inference(trained[0], "cpu", "fp32", quantization=name)
    with torch.no_grad():
        logits = model(**batch).logits
    real = batch["attention_mask"].bool()
    difference = (logits - reference_logits).abs()[real]
    captions = list(caption_images(model, processor, test_images, batch_size=1, max_new_tokens=N_CAPTION_TOKENS))
    same = np.mean([a == b for a, b in zip(captions, reference_captions)])
    print(f"{name}: logits max |diff| {difference.max():.4f}, mean {difference.mean():.4f}; captions equal {same:.0%}")
    assert difference.max() <= max_diff and difference.mean() <= mean_diff
    assert difference.max() > 0, "nothing was quantized"
    assert same >= agreement, list(zip(captions, reference_captions))[:5]


# -------------------------------------------------------------------------------------------------------------
# Every way in: generate, the pipeline, mqwen-caption, the web page
# -------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized_8bit(wide_dir):
    return load_for_inference(wide_dir, "cpu", "fp32", quantization="8bit")


def test_the_pipeline_on_a_quantized_model_gives_generates_captions(wide_dir, images):
    from transformers import pipeline

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model, processor = load_for_inference(wide_dir, "cpu", "fp32", quantization=config)
    expected = list(caption_images(model, processor, images, max_new_tokens=6))
    captioner = pipeline(
        "image-to-text", model=str(wide_dir), trust_remote_code=True, model_kwargs={"quantization_config": config}
    )
    assert_only_the_language_model_is_quantized(captioner.model, torch.float32)
    results = captioner(images, max_new_tokens=6)
    assert [r[0]["generated_text"].strip() for r in results] == expected


def test_caption_cli_quantize(wide_dir, images, image_dir, quantized_8bit, capsys):
    from mqwen.caption.cli import main

    model, processor = quantized_8bit
    expected = list(caption_images(model, processor, images, max_new_tokens=5))
    argv = [str(image_dir), "--model", str(wide_dir), "--device", "cpu", "--dtype", "fp32", "--quantize", "8bit"]
    assert main([*argv, "--jsonl", "--max-new-tokens", "5", "--no-progress"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["caption"] for line in lines] == expected
    assert [Path(line["image"]).name for line in lines] == ["img0.png", "img1.png", "img2.png"]


def test_web_page_on_a_quantized_model(wide_dir, images, quantized_8bit, tmp_path):
    pytest.importorskip("gradio", reason="gradio is not installed: pip install -e '.[app]'")
    spec = importlib.util.spec_from_file_location("mqwen_web_app_quantized", REPO / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    assert app.parse_args(["--quantize", "4bit"]).quantize == "4bit"
    captioner = app.Captioner.load(str(wide_dir), device="cpu", dtype="fp32", quantization="8bit")
    assert_only_the_language_model_is_quantized(captioner.model, torch.float32)
    model, processor = quantized_8bit
    (expected,) = caption_images(model, processor, images[:1], max_new_tokens=8, do_sample=False)
    images[0].save(tmp_path / "one.png")
    handler = app.caption_handler(captioner)
    outputs = list(handler([str(tmp_path / "one.png")], captioner.default_instruction, 8, False, 1.0, 1.0))
    assert outputs[-1][0] == expected


# -------------------------------------------------------------------------------------------------------------
# Save, reload, publish
# -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["4bit", "8bit"])
def test_bitsandbytes_checkpoints_save_reload_and_publish(wide_dir, images, tmp_path, monkeypatch, name):
    model, processor = load_for_inference(wide_dir, "cpu", "fp32", quantization=name)
    # Saved before the first forward: bitsandbytes 0.50.2 repacks 4-bit weights for its CPU kernel on the first
    # forward and saves them back through a lossy inverse (max logit change measured: 0.003 NF4, 0.04 FP4).
    saved = save_checkpoint(model, processor, tmp_path / "saved")
    settings = json.loads((saved / "config.json").read_text())["quantization_config"]
    assert settings["llm_int8_skip_modules"] == list(MQwenPreTrainedModel._not_quantized_modules)

    from mqwen.convert import push

    published = tmp_path / "published"

    def publish_folder(folder, repo_id, **kwargs):  # what would be uploaded, kept
        import shutil

        shutil.copytree(folder, published)

    monkeypatch.setattr(push, "publish_folder", publish_folder)
    push.push_to_hub(model, processor, "me/mqwen-quantized")

    batch = processor(images=images, return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).logits
    for folder in (saved, published):
        reloaded, _ = load_for_inference(folder, "cpu", "fp32")  # no quantization asked: the config carries it
        assert_only_the_language_model_is_quantized(reloaded, torch.float32)
        with torch.no_grad():
            assert torch.equal(reloaded(**batch).logits, expected)


def test_torchao_checkpoints_save_on_transformers_5_and_are_refused_clearly_on_4(
    wide_dir, images, tmp_path, monkeypatch
):
    model, processor = load_for_inference(wide_dir, "cpu", "fp32", quantization="torchao-int8")
    from mqwen.convert import push

    monkeypatch.setattr(push, "publish_folder", lambda folder, repo_id, **kwargs: None)
    if not TRANSFORMERS_5:
        with pytest.raises(ConvertError, match=r"cannot save.*torchao.*transformers 5.*--quantize"):
            push.push_to_hub(model, processor, "me/mqwen-torchao")
        return
    batch = processor(images=images, return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).logits
    saved = save_checkpoint(model, processor, tmp_path / "saved")
    reloaded, _ = load_for_inference(saved, "cpu", "fp32")
    assert_only_the_language_model_is_quantized(reloaded, torch.float32)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, expected)


# -------------------------------------------------------------------------------------------------------------
# Bad input
# -------------------------------------------------------------------------------------------------------------


def test_unknown_quantization_name(wide_dir):
    with pytest.raises(ValueError, match=r"quantization 'int3' is not one of 4bit, nf4, fp4, 8bit"):
        load_for_inference(wide_dir, "cpu", quantization="int3")


@pytest.mark.parametrize(
    "name, package", [("4bit", "bitsandbytes"), ("8bit", "bitsandbytes"), ("torchao-int8", "torchao")]
)
def test_a_missing_library_says_what_to_install(wide_dir, image_dir, monkeypatch, capsys, name, package):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now fails as if it were not installed
    with pytest.raises(ImportError, match=rf"needs the {package} package.*pip install {package}.*mqwen\[quant\]"):
        load_for_inference(wide_dir, "cpu", quantization=name)
    from mqwen.caption.cli import main

    assert main([str(image_dir), "--model", str(wide_dir), "--device", "cpu", "--quantize", name]) == 2
    err = capsys.readouterr().err
    assert f"pip install {package}" in err and "could not load the model" not in err


def test_settings_that_cannot_work_are_refused(wide_dir, image_dir, capsys):
    with pytest.raises(ValueError, match="torchao-int4 runs on CUDA only"):
        load_for_inference(wide_dir, "cpu", quantization="torchao-int4")
    from mqwen.caption.cli import main

    argv = [str(image_dir), "--model", str(wide_dir), "--quantize", "4bit", "--engine", "vllm"]
    assert main(argv) == 2
    assert "--quantize is for --engine transformers" in capsys.readouterr().err
