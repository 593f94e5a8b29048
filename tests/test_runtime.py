"""mqwen.runtime, the one way every tool loads and captions: its device/dtype rule, loading (full checkpoints and
peft adapters), and batched captions equal to one-at-a-time ones and to the model's own generate + decode."""

import json

import pytest
import torch

from mqwen import runtime
from mqwen.runtime import caption_images, load_for_inference, resolve_device, resolve_dtype, stream_caption

# ----------------------------------------------------------------------------------------------------------
# The device / dtype rule
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def machine(monkeypatch):
    """Pretend torch sees the given accelerators: machine(cuda=True, bf16=False, mps=False)."""

    def pretend(cuda=False, bf16=False, mps=False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)

    return pretend


@pytest.mark.parametrize(
    "cuda, mps, expected", [(True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"), (False, False, "cpu")]
)
def test_auto_device_prefers_cuda_then_mps_then_cpu(machine, cuda, mps, expected):
    machine(cuda=cuda, mps=mps)
    assert resolve_device("auto") == torch.device(expected)


def test_an_unavailable_or_unknown_device_is_a_clear_error(machine):
    machine()
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda:1")
    with pytest.raises(ValueError, match="no MPS device"):
        resolve_device("mps")
    with pytest.raises(ValueError, match="not a device torch knows"):
        resolve_device("gpu")


@pytest.mark.parametrize(
    "device, bf16, expected",
    [
        ("cuda", True, torch.bfloat16),
        ("cuda:0", False, torch.float32),
        ("mps", False, torch.float32),
        ("cpu", True, torch.float32),
    ],
)
def test_auto_dtype_is_bf16_only_where_the_gpu_has_it(machine, device, bf16, expected):
    machine(cuda=True, bf16=bf16)
    assert resolve_dtype("auto", device) == expected


def test_every_dtype_spelling_means_one_torch_dtype():
    for names, dtype in (
        (("fp32", "float32"), torch.float32),
        (("bf16", "bfloat16"), torch.bfloat16),
        (("fp16", "float16"), torch.float16),
    ):
        for name in names:
            assert resolve_dtype(name, "cpu") == dtype
        assert resolve_dtype(dtype) == dtype
    assert set(runtime.DTYPE_CHOICES) == {"auto", *runtime.DTYPES}
    with pytest.raises(ValueError, match="not one of"):
        resolve_dtype("float8")


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------


def test_load_for_inference_reads_a_checkpoint_folder_in_the_asked_dtype(tiny, tiny_dir, make_image):
    model, processor = load_for_inference(tiny_dir, device="cpu")
    assert model.dtype == torch.float32 and model.device == torch.device("cpu") and not model.training
    assert type(model).__module__.startswith("transformers_modules.")  # the folder's own code, as a Hub user gets
    inputs = processor(images=[make_image(0)])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, tiny[0](**inputs).logits)
    half, _ = load_for_inference(str(tiny_dir), device="cpu", dtype="bf16")
    assert half.dtype == torch.bfloat16


def test_load_for_inference_wraps_an_adapter_folder_around_its_base(tiny_dir, tmp_path, make_image):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoProcessor

    base = AutoModelForCausalLM.from_pretrained(tiny_dir, trust_remote_code=True)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    AutoProcessor.from_pretrained(tiny_dir, trust_remote_code=True).save_pretrained(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_dir)

    model, processor = load_for_inference(adapter_dir, device="cpu")
    assert isinstance(model, PeftModel) and not model.training
    inputs = processor(images=[make_image(1)])
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, peft_model.eval()(**inputs).logits, atol=1e-6)

    config["base_model_name_or_path"] = None
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not name its base model"):
        load_for_inference(adapter_dir, device="cpu")


# ----------------------------------------------------------------------------------------------------------
# Captioning
# ----------------------------------------------------------------------------------------------------------


def reference_captions(model, processor, images, prompt=None, **generate_kwargs):
    """One image at a time, processor -> generate -> decode_captions: no runtime code involved."""
    captions = []
    for image in images:
        inputs = processor(images=[image], text=None if prompt is None else [prompt])
        with torch.no_grad():
            ids = model.generate(**inputs, **generate_kwargs)
        captions += processor.decode_captions(ids, inputs["input_ids"].shape[1])
    return captions


def test_batched_captions_equal_single_ones_and_the_models_own(tiny, make_image, one_thread):
    model, processor = tiny
    # Different sizes and a grey image: the batches mix shapes; prompts of one batch share a length.
    images = [make_image(seed, size=(40 + 8 * seed, 64)) for seed in range(5)] + [make_image(9).convert("L")]
    expected = reference_captions(model, processor, images, max_new_tokens=6)
    assert len(set(expected)) > 1  # different images, different captions: a mix-up between images would show
    assert list(caption_images(model, processor, images, batch_size=1, max_new_tokens=6)) == expected
    assert list(caption_images(model, processor, images, batch_size=4, max_new_tokens=6)) == expected
    prompt = "What is in it?"
    assert list(caption_images(model, processor, images[:3], batch_size=3, prompt=prompt, max_new_tokens=5)) == (
        reference_captions(model, processor, images[:3], prompt, max_new_tokens=5)
    )


def test_captions_stream_batch_by_batch_from_a_generator(tiny, make_image, one_thread):
    model, processor = tiny
    drawn = []

    def images():
        for seed in range(5):
            drawn.append(seed)
            yield make_image(seed)

    captions = caption_images(model, processor, images(), batch_size=2, max_new_tokens=3, progress=False)
    first = next(captions)
    assert drawn == [0, 1]  # only the first batch was read before its first caption came out
    rest = list(captions)
    assert drawn == [0, 1, 2, 3, 4] and len(rest) == 4
    assert [first, *rest] == reference_captions(model, processor, [make_image(s) for s in range(5)], max_new_tokens=3)
    with pytest.raises(ValueError, match="batch_size"):
        next(caption_images(model, processor, [make_image(0)], batch_size=0))


def test_progress_bar_on_long_runs_only(tiny, make_image, capsys, one_thread):
    model, processor = tiny
    images = [make_image(seed) for seed in range(3)]
    list(caption_images(model, processor, images, batch_size=4, max_new_tokens=1))
    assert "captioning" not in capsys.readouterr().err  # one batch: no bar
    list(caption_images(model, processor, images, batch_size=2, max_new_tokens=1))
    assert "3/3" in capsys.readouterr().err


def test_streamed_caption_ends_with_the_batched_one(tiny, make_image, one_thread):
    model, processor = tiny
    image = make_image(4)
    *partial, (caption, new_tokens) = stream_caption(model, processor, image, max_new_tokens=6)
    assert caption == next(caption_images(model, processor, [image], max_new_tokens=6))
    assert all(tokens is None for _, tokens in partial) and 1 <= new_tokens <= 6
