"""Bad input never crashes: every example of issue 15 gives a clear error or the correct result.

Processor, model inputs, configs, damaged checkpoints and resumed training. The generated counterpart of
these hand-made cases is tests/test_fuzz_inputs.py.
"""

import logging
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mqwen import MQwenConfig, MQwenForCausalLM
from mqwen.processing_mqwen import to_rgb_image


def is_uniform(pixels, processor, rgb):
    """Whether `pixels` are what a uniform image of colour `rgb` must become, ((rgb / 255) - mean) / std per
    channel (to float rounding: one step of 8-bit colour is about 0.015 here)."""
    ip = processor.image_processor
    values = [(c / 255 - m) / s for c, m, s in zip(rgb, ip.image_mean, ip.image_std)]
    size = ip.crop_size["height"]
    expected = torch.tensor(values, dtype=torch.float32)[:, None, None].expand(3, size, size)
    return pixels.shape == expected.shape and torch.allclose(pixels, expected, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Processor
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((5, 0)),
        np.zeros((0, 4, 3), dtype=np.uint8),
        np.zeros((3, 4, 0)),
        torch.zeros(3, 0, 7),
        Image.new("RGB", (0, 4)),
    ],
    ids=["hw", "hwc", "chw-array", "chw-tensor", "pil"],
)
def test_an_empty_image_is_a_clear_error(tiny, image):
    _, processor = tiny
    with pytest.raises(ValueError, match="The image is empty"):
        processor(images=[image])


@pytest.mark.parametrize(
    "text, error, message",
    [
        ([None], TypeError, r"text\[0\] must be a str, got NoneType"),
        (["fine", 3], TypeError, r"text\[1\] must be a str, got int"),
        ([["nested"]], TypeError, r"text\[0\] must be a str, got list"),
        (b"a caption", TypeError, r"got bytes \(decode it first"),
        ([b"a caption"], TypeError, r"text\[0\] must be a str, got bytes \(decode it first"),
        (42, TypeError, "text must be a str or a list of str, got int"),
        ("half a pair \ud800 here", ValueError, r"text\[0\] is not valid Unicode: '\\ud800' at position 12"),
        ([], ValueError, r"Pass images, text, or both \(got images=None, text=\[\]\)"),
    ],
)
def test_bad_text_is_a_clear_error(tiny, text, error, message):
    _, processor = tiny
    with pytest.raises(error, match=message):
        processor(text=text)


def test_empty_lists_count_as_not_given(tiny, make_image):
    _, processor = tiny
    image = make_image(3)
    with pytest.raises(ValueError, match=r"Pass images, text, or both \(got images=\[\], text=None\)"):
        processor(images=[])
    for key, expected in processor(images=[image]).items():  # text=[]: the default caption prompt
        assert torch.equal(processor(images=[image], text=[])[key], expected), key
    text_only = processor(text=["a prompt"])
    assert set(processor(images=[], text=["a prompt"])) == set(text_only) == {"input_ids", "attention_mask"}
    assert torch.equal(processor(images=[], text=["a prompt"])["input_ids"], text_only["input_ids"])


def test_images_nested_deeper_than_one_list_per_prompt_are_an_error(tiny, make_image):
    _, processor = tiny
    image = make_image(4)
    per_prompt = processor(images=[[image], [image, image]], text=["<image>", "<image><image>"])
    assert per_prompt["pixel_values"].shape[0] == 3
    with pytest.raises(TypeError, match=r"images\[0\]\[1\] is a list: pass one image, a list of images"):
        processor(images=[[image, [image]]], text="<image><image>")


def test_premultiplied_la_image_equals_its_la_image(tiny):
    _, processor = tiny
    la = Image.new("LA", (6, 4), (141, 255))
    la.putpixel((0, 0), (10, 0))  # fully transparent: composited on white
    premultiplied = la.convert("La")
    assert premultiplied.mode == "La"
    assert torch.equal(processor(images=premultiplied)["pixel_values"], processor(images=la)["pixel_values"])
    assert np.array(to_rgb_image(premultiplied))[0, 0].tolist() == [255, 255, 255]
    assert np.array(to_rgb_image(premultiplied))[1, 1].tolist() == [141, 141, 141]


def test_boolean_images_are_black_and_white_like_pil_mode_1(tiny):
    _, processor = tiny
    white = np.ones((9, 7), dtype=bool)
    for same in (white, torch.from_numpy(white), white[..., None]):
        assert is_uniform(processor(images=same)["pixel_values"][0], processor, (255, 255, 255))
    checkerboard = (np.indices((8, 10)).sum(0) % 2).astype(bool)
    as_mode_1 = Image.fromarray(checkerboard)
    assert as_mode_1.mode == "1"
    assert np.array_equal(np.array(to_rgb_image(checkerboard)), np.array(as_mode_1.convert("RGB")))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_float_image_with_one_non_finite_pixel_is_an_error(tiny, bad):
    _, processor = tiny
    image = np.full((6, 6, 3), 0.5, dtype=np.float32)
    image[2, 3, 1] = bad
    with pytest.raises(ValueError, match=r"holds 1 NaN or infinite value"):
        processor(images=image)
    with pytest.raises(ValueError, match=r"holds 1 NaN or infinite value"):
        processor(images=torch.from_numpy(image).permute(2, 0, 1))


@pytest.mark.parametrize(
    "image, message",
    [
        (np.full((4, 4), -0.5, dtype=np.float32), r"values in \[0, 1\] or \[0, 255\], but this one holds -0.5..-0.5"),
        (np.full((4, 4), 300.0), r"this one holds 300..300"),
        (np.full((4, 4), 256, dtype=np.int32), r"values in 0..255 .* this int32 array holds 256..256"),
        (np.full((4, 4), -1, dtype=np.int8), r"this int8 array holds -1..-1"),
    ],
)
def test_pixel_values_outside_the_documented_ranges_are_errors_not_clipped(tiny, image, message):
    _, processor = tiny
    with pytest.raises(ValueError, match=message):
        processor(images=image)


def test_non_image_dtypes_are_type_errors(tiny):
    _, processor = tiny
    with pytest.raises(TypeError, match="bool, integer or float values, got dtype complex64"):
        processor(images=np.zeros((4, 4), dtype=np.complex64))
    with pytest.raises(TypeError, match="got dtype <U1"):
        processor(images=np.full((4, 4), "a"))


def test_16_bit_images_use_their_full_range(tiny, tmp_path):
    _, processor = tiny
    sixteen = np.full((5, 6), 60000, dtype=np.uint16)  # 60000 * 255 / 65535 = 233.46 -> 233
    assert is_uniform(processor(images=sixteen)["pixel_values"][0], processor, (233, 233, 233))
    path = tmp_path / "sixteen.png"
    Image.fromarray(sixteen).save(path)  # PIL opens it as mode "I;16" and would clip it to white
    assert Image.open(path).mode == "I;16"
    assert is_uniform(processor(images=str(path))["pixel_values"][0], processor, (233, 233, 233))
    float_mode = Image.fromarray(np.full((5, 6), 0.5, dtype=np.float32))  # mode "F" in [0, 1]
    assert is_uniform(processor(images=float_mode)["pixel_values"][0], processor, (128, 128, 128))


@pytest.mark.parametrize("shape", [(3, 5, 3), (1, 7, 3), (3, 3, 3), (3, 1, 3)])
def test_images_a_few_pixels_high_are_not_read_as_channels_first(tiny, shape):
    _, processor = tiny
    image = np.empty(shape, dtype=np.uint8)
    image[...] = (10, 200, 30)
    assert is_uniform(processor(images=image)["pixel_values"][0], processor, (10, 200, 30))


# ----------------------------------------------------------------------------------------------------------
# Model inputs
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def captioned(tiny, make_image):
    _, processor = tiny
    return dict(processor(images=[make_image(5), make_image(6)], text=["<image> one", "two <image>"]))


def test_pixel_values_of_the_wrong_shape_name_the_shape_not_truncation(tiny, captioned):
    model, _ = tiny
    for pixels in (captioned["pixel_values"][0], captioned["pixel_values"][:, :, :28], captioned["pixel_values"][:0]):
        with pytest.raises(ValueError, match=r"pixel_values must have shape \(num_images, 3, 56, 56\)") as error:
            model(input_ids=captioned["input_ids"], pixel_values=pixels)
        assert "truncation" not in str(error.value)


@pytest.mark.parametrize("convert", [lambda p: p.numpy(), lambda p: p.tolist()], ids=["numpy", "list"])
def test_pixel_values_that_are_not_tensors_are_type_errors(tiny, captioned, convert):
    model, _ = tiny
    with pytest.raises(
        TypeError, match=r"pixel_values must be a float tensor .* got (ndarray|list) \(torch.from_numpy"
    ):
        model(input_ids=captioned["input_ids"], pixel_values=convert(captioned["pixel_values"]))


def test_raw_or_non_finite_pixels_are_errors(tiny, captioned):
    model, _ = tiny
    ids, pixels = captioned["input_ids"], captioned["pixel_values"]
    with pytest.raises(TypeError, match="pixel_values must be a float tensor of normalised pixels, got torch.uint8"):
        model(input_ids=ids, pixel_values=pixels.to(torch.uint8))
    for bad in (float("nan"), float("inf")):
        broken = pixels.clone()
        broken[1, 2, 3, 4] = bad
        with pytest.raises(ValueError, match="pixel_values hold NaN or infinite values"):
            model(input_ids=ids, pixel_values=broken)
    raw = torch.full_like(pixels, 200.0)
    with pytest.raises(ValueError, match=r"range over 200..200, but normalised images lie within about \+-2.15"):
        model(input_ids=ids, pixel_values=raw)


def test_image_features_without_a_forward_check_the_pixels_too(tiny, captioned):
    """The one pixel check is the vision tower's, so callers of `get_image_features` alone (vLLM's Transformers
    backend) get the same clear errors as a forward."""
    model, _ = tiny
    pixels = captioned["pixel_values"]
    with pytest.raises(ValueError, match=r"range over 200..200, but normalised images lie within about \+-2.15"):
        model.get_image_features(torch.full_like(pixels, 200.0))
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(num_images, 3, 56, 56\)"):
        model.get_image_features(pixels[:0])


@pytest.mark.parametrize("bad_id", [448, 10**6, -1])
def test_token_ids_outside_the_vocabulary_are_named(tiny, bad_id):
    model, _ = tiny
    assert model.get_input_embeddings().num_embeddings == 448
    ids = torch.tensor([[1, 2, bad_id, 3]])
    with pytest.raises(ValueError, match=rf"input_ids holds id\(s\) \[{bad_id}\] outside the vocabulary \(0..447\)"):
        model(input_ids=ids)


@pytest.mark.parametrize(
    "ids, error, message",
    [
        (torch.zeros((0, 5), dtype=torch.long), ValueError, r"at least one sample and one position, got \(0, 5\)\.$"),
        (torch.zeros((2, 0), dtype=torch.long), ValueError, r"got \(2, 0\)"),
        (torch.tensor([1, 2, 3]), ValueError, r"got \(3,\); add the batch dimension: input_ids\[None\]"),
        (torch.tensor([[1.0, 2.0]]), TypeError, "input_ids must hold int64 .* got torch.float32"),
        ([[1, 2, 3]], TypeError, "input_ids must be a LongTensor .* got list"),
    ],
)
def test_malformed_input_ids_are_clear_errors(tiny, ids, error, message):
    model, _ = tiny
    with pytest.raises(error, match=message):
        model(input_ids=ids)


def test_attention_mask_of_the_wrong_shape_is_an_error(tiny, captioned):
    model, _ = tiny
    ids, pixels = captioned["input_ids"], captioned["pixel_values"]
    for mask in (torch.ones(2, ids.shape[1] + 2), torch.ones(1, ids.shape[1]), torch.ones(ids.shape[1])):
        with pytest.raises(
            ValueError, match=rf"attention_mask must have the shape of the input tokens, \(2, {ids.shape[1]}\)"
        ):
            model(input_ids=ids, pixel_values=pixels, attention_mask=mask)


def test_labels_of_the_wrong_shape_dtype_or_vocabulary_are_errors(tiny, captioned):
    model, _ = tiny
    ids, pixels = captioned["input_ids"], captioned["pixel_values"]
    with pytest.raises(
        ValueError, match=r"labels must have the shape of the input tokens.*broadcast into a wrong loss"
    ):
        model(input_ids=ids, pixel_values=pixels, labels=ids[:1])  # would broadcast over the batch
    with pytest.raises(TypeError, match="labels must hold int64"):
        model(input_ids=ids, pixel_values=pixels, labels=ids.int())
    bad = ids.clone()
    bad[0, -1] = 1000
    with pytest.raises(ValueError, match=r"labels holds id\(s\) \[1000\] outside the vocabulary \(0..447, or -100"):
        model(input_ids=ids, pixel_values=pixels, labels=bad)
    ignored = ids.masked_fill(torch.arange(ids.shape[1]) < 3, -100)  # -100 is fine
    with torch.no_grad():
        loss = model(input_ids=ids, pixel_values=pixels, labels=ignored).loss
    assert torch.isfinite(loss)


def test_inputs_embeds_of_the_wrong_width_is_an_error(tiny):
    model, _ = tiny
    hidden = model.config.text_config.hidden_size
    with pytest.raises(
        ValueError, match=rf"inputs_embeds must be a float tensor of shape \(batch, sequence, {hidden}\)"
    ):
        model(inputs_embeds=torch.zeros(1, 4, hidden + 1))


def test_valid_inputs_give_the_same_outputs_as_without_the_checks(tiny, captioned, monkeypatch):
    """The checks only read: valid inputs give bit-identical outputs with and without them."""
    model, _ = tiny
    ignored = captioned["input_ids"].masked_fill(captioned["attention_mask"] == 0, -100)
    with torch.no_grad():
        checked = model(**captioned, labels=ignored)
        module, skipped = sys.modules[type(model).__module__], []
        monkeypatch.setattr(module, "_check_inputs", lambda *args, **kwargs: skipped.append("inputs"))
        monkeypatch.setattr(module, "_check_pixel_values", lambda *args, **kwargs: skipped.append("pixels"))
        unchecked = model(**captioned, labels=ignored)
    assert skipped == ["inputs", "pixels"], "both checks were skipped in the unchecked run"
    assert torch.equal(checked.logits, unchecked.logits) and torch.equal(checked.loss, unchecked.loss)


# ----------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (
            {"text_config": "qwen2"},
            TypeError,
            r"text_config must be a dict or a transformers config .* got str 'qwen2'",
        ),
        ({"text_config": {"model_type": ["qwen2"]}}, ValueError, "not a model type transformers knows"),
        ({"text_config": {"model_type": "qwen2", "hidden_size": "big"}}, TypeError, "hidden_size.* (must be an )?int"),
        ({"vision_config": {"width": "wide"}}, TypeError, r"vision_config.width must be an int, got str 'wide'"),
        ({"vision_config": {"heads": 0}}, ValueError, "vision_config.heads must be at least 1, got 0"),
        ({"vision_config": {"layers": 2.5}}, TypeError, "vision_config.layers must be an int, got float"),
        ({"vision_config": {"mlp_ratio": "4"}}, TypeError, "vision_config.mlp_ratio must be a number"),
        (
            {"vision_config": {"image_std": [0.2, 0.0, 0.2]}},
            ValueError,
            "vision_config.image_std must be a finite number > 0",
        ),
        ({"vision_config": {"image_mean": 0.5}}, TypeError, "vision_config.image_mean must be a list of 3 numbers"),
        ({"vision_config": "ViT-L-14"}, TypeError, "vision_config must be a dict or an MQwenVisionConfig, got str"),
        ({"vision_feature_layer": "-2"}, TypeError, "vision_feature_layer must be an int, got str"),
        ({"image_token_pooling": 2.0}, TypeError, "image_token_pooling must be an int"),
        ({"image_token_id": -1}, ValueError, "image_token_id must be at least 0"),
        ({"keep_class_token": "yes"}, TypeError, "keep_class_token must be True or False"),
    ],
)
def test_config_values_of_the_wrong_type_are_clear_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        MQwenConfig(**kwargs)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_damaged_weight_file_is_named(tiny_dir, tmp_path, damage):
    folder = tmp_path / "damaged"
    shutil.copytree(tiny_dir, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    size = weights.stat().st_size
    pattern = rf"Could not load the weights of .*{weights.name} \({size} bytes: .*\)\. The file is empty or truncated"
    with pytest.raises(ValueError, match=pattern) as error:
        MQwenForCausalLM.from_pretrained(folder)
    assert str(weights.resolve()) in str(error.value)

    from transformers import AutoModelForCausalLM  # the checkpoint's own copy of the code says the same

    with pytest.raises(ValueError, match=pattern):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)


def test_the_caption_cli_names_a_damaged_weight_file(tiny_dir, tmp_path, make_image, capsys):
    from mqwen.caption.cli import main

    folder = tmp_path / "damaged"
    shutil.copytree(tiny_dir, folder)
    (folder / "model.safetensors").write_bytes(b"")
    make_image(7).save(tmp_path / "photo.png")
    assert main(["--model", str(folder), str(tmp_path / "photo.png")]) != 0
    assert "model.safetensors (0 bytes" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# Resumed training
# ----------------------------------------------------------------------------------------------------------


def _train_config(tmp_path, tiny_dir, make_image, **overrides):
    """test_train_run's tiny run: the align stage, 4 steps, a checkpoint every 2."""
    from test_train_run import config

    pairs = [(make_image(seed, size=(56, 56)), f"caption {seed}") for seed in range(4)]
    return config(tmp_path, tiny_dir, pairs, stage="align", max_steps=4, save_steps=2, **overrides)


@pytest.mark.usefixtures("one_thread")
def test_resume_last_skips_an_incomplete_checkpoint(tiny_dir, tmp_path, make_image, monkeypatch, caplog):
    from mqwen.train import train
    from mqwen.train.trainable_checkpoints import TRAINABLE_WEIGHTS
    from mqwen.train.trainer import STAGING_DIR, CaptionTrainer

    class Killed(Exception):
        pass

    save_rng_state = CaptionTrainer._save_rng_state

    def killed_at_step_4(self, output_dir):  # model and optimizer written, trainer state not yet
        if self.state.global_step == 4:
            raise Killed
        return save_rng_state(self, output_dir)

    monkeypatch.setattr(CaptionTrainer, "_save_rng_state", killed_at_step_4)
    with pytest.raises(Killed):
        train(_train_config(tmp_path, tiny_dir, make_image))
    monkeypatch.undo()
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2"]
    # the half-written save (an align checkpoint holds the trained weights alone)
    assert (run / STAGING_DIR / "checkpoint-4" / TRAINABLE_WEIGHTS).is_file()
    assert (run / "checkpoint-2" / "trainer_state.json").is_file()

    # A checkpoint cut short some other way (older code, a full disk): its folder exists without the state.
    shutil.copytree(run / "checkpoint-2", run / "checkpoint-3")
    (run / "checkpoint-3" / "trainer_state.json").unlink()
    shutil.copytree(run / "checkpoint-2", run / "checkpoint-5")
    (run / "checkpoint-5" / "trainer_state.json").write_text('{"global_step": 5, "log_hi')

    from transformers import TrainerCallback

    class RecordSteps(TrainerCallback):
        steps = []

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)

    with caplog.at_level(logging.WARNING):
        result = train(
            _train_config(tmp_path, tiny_dir, make_image, resume_from_checkpoint="last"), callbacks=[RecordSteps()]
        )
    assert (
        "skipped incomplete checkpoint-5 (trainer_state.json is truncated); checkpoint-3 (no "
        "trainer_state.json); resuming from checkpoint-2"
    ) in caplog.text
    assert result.trainer.state.global_step == 4
    assert RecordSteps.steps == [3, 4]  # steps 1 and 2 came from checkpoint-2
    assert (run / "checkpoint-4" / "trainer_state.json").is_file()
    assert not (run / STAGING_DIR / "checkpoint-4").exists()


def test_resume_with_no_complete_checkpoint_is_a_clear_error(tiny_dir, tmp_path, make_image):
    from mqwen.train import train

    run = tmp_path / "run"
    (run / "checkpoint-7").mkdir(parents=True)
    with pytest.raises(
        FileNotFoundError,
        match=r"no complete checkpoint-\* folder in .*\(incomplete: checkpoint-7 \(no trainer_state.json\)\)",
    ):
        train(_train_config(tmp_path, tiny_dir, make_image, resume_from_checkpoint="last"))
    with pytest.raises(FileNotFoundError, match=r"--resume-from-checkpoint .*checkpoint-7: no trainer_state.json"):
        train(_train_config(tmp_path, tiny_dir, make_image, resume_from_checkpoint=str(run / "checkpoint-7")))
