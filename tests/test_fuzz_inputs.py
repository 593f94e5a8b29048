"""Property-based fuzz of the processor and of the model's input checks (hypothesis, seeded).

The generators build valid and invalid inputs and know which is which. The property: a valid input works and
its result matches an oracle written from the documented rules (not from the code under test); an invalid
one raises TypeError, ValueError or FileNotFoundError from MQwen's own files. A valid input that raises is a
crash; an invalid one that passes is a silent wrong result.

MQWEN_FUZZ_EXAMPLES sets the number of processor examples (default 1500); the model gets a fifth of them.
The run for issue 15 used MQWEN_FUZZ_EXAMPLES=5000.
"""

import os
import traceback
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mqwen.processing_mqwen import to_rgb_image  # noqa: E402

EXAMPLES = int(os.environ.get("MQWEN_FUZZ_EXAMPLES", "1500"))
CLEAR_ERRORS = (TypeError, ValueError, FileNotFoundError)
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,  # seeded: the same examples on every run
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
MODEL_FUZZ = settings(FUZZ, max_examples=max(EXAMPLES // 5, 50))
INVALID = None


def raised_by_mqwen(error):
    """Whether the error was raised in MQwen's own code (a clear message), not deep inside a dependency."""
    where = traceback.extract_tb(error.__traceback__)[-1].filename
    return Path(where).name in ("processing_mqwen.py", "modeling_mqwen.py")


# ----------------------------------------------------------------------------------------------------------
# Images and the oracle: the RGB pixels the documented rules give, or INVALID
# ----------------------------------------------------------------------------------------------------------


def documented_rgb(array):
    """(H, W, 3) uint8 by the rules in `to_rgb_image`'s docs, or INVALID. Written from the docs, not the code."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4) or a.shape[0] == 0 or a.shape[1] == 0:
        return INVALID
    if a.dtype == np.bool_:
        values = a * 255.0
    elif a.dtype == np.uint8:
        values = a.astype(np.float64)
    elif a.dtype == np.uint16:
        values = a * (255 / 65535)
    elif np.issubdtype(a.dtype, np.integer):
        if a.min() < 0 or a.max() > 255:
            return INVALID
        values = a.astype(np.float64)
    elif np.issubdtype(a.dtype, np.floating):
        values = a.astype(np.float64)
        if not np.isfinite(values).all() or values.min() < 0 or values.max() > 255:
            return INVALID
        if values.max() <= 1:
            values = values * 255
    else:
        return INVALID
    if a.shape[-1] == 1:
        values = np.repeat(values, 3, axis=-1)
    elif a.shape[-1] == 4:  # composited on white
        alpha = np.round(values[..., 3:]) / 255
        values = values[..., :3] * alpha + 255 * (1 - alpha)
    return values  # floats: compared to 8-bit results within one step


DTYPES = ["uint8", "bool", "uint16", "int8", "int16", "int32", "int64", "float16", "float32", "float64", "complex64"]
PIL_MODES = [
    "1",
    "L",
    "P",
    "RGB",
    "RGBA",
    "CMYK",
    "YCbCr",
    "LAB",
    "HSV",
    "RGBX",
    "PA",
    "LA",
    "La",
    "RGBa",
    "I",
    "I;16",
    "F",
]


def fill(rng, dtype, shape, regime, constant):
    """Values for an image array of `dtype`: in range, or with one value out of range / not finite."""
    size = (1,) * len(shape) if constant else shape
    if dtype == "bool":
        values = rng.random(size) < 0.5
    elif dtype == "uint8":
        values = rng.integers(0, 256, size)
    elif dtype == "uint16":
        values = rng.integers(0, 65536, size)
    elif dtype.startswith("int"):
        values = rng.integers(0, 128, size)
    elif dtype.startswith("float"):
        values = rng.random(size) if regime in ("in", "unit") else rng.uniform(2, 250, size)
    else:
        values = rng.random(size) + 1j
    values = np.broadcast_to(values, shape).astype(dtype).copy()
    if values.size and regime not in ("in", "unit", "byte"):
        index = tuple(int(rng.integers(0, n)) for n in shape)
        if regime == "negative" and dtype.startswith(("int", "float")):
            values[index] = -1
        elif regime == "big" and dtype in ("int16", "int32", "int64", "float16", "float32", "float64"):
            values[index] = 300
        elif regime in ("nan", "inf") and dtype.startswith("float"):
            values[index] = np.nan if regime == "nan" else np.inf
    return values


SIDE = st.sampled_from([0] + list(range(1, 10)) * 3)  # an empty image now and then


@st.composite
def image_arrays(draw):
    dtype = draw(st.sampled_from(DTYPES))
    height, width = draw(SIDE), draw(SIDE)
    layout = draw(st.sampled_from(["HW"] * 3 + ["HWC"] * 4 + ["CHW"] * 4 + ["odd"]))
    channels = draw(st.sampled_from([1, 3, 4]))
    shape = {"HW": (height, width), "HWC": (height, width, channels), "CHW": (channels, height, width)}.get(layout)
    if shape is None:
        shape = draw(st.sampled_from([(), (width,), (height, width, 2), (height, width, 5), (1, height, width, 3)]))
    regime = draw(st.sampled_from(["in", "unit", "byte"] * 4 + ["negative", "big", "nan", "inf"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return fill(rng, dtype, shape, regime, constant=draw(st.booleans()))


def pil_image(mode, array, rng):
    """A PIL image of `mode` holding (or converted from) `array`'s (H, W) or (H, W, 4) values."""
    height, width = array.shape[:2]
    if 0 in (height, width):
        return Image.new(mode, (width, height))
    if mode in ("I", "I;16", "F"):
        dtype = {"I": np.int32, "I;16": np.uint16, "F": np.float32}[mode]
        values = array[..., 0].astype(dtype)
        if mode == "I" and rng.random() < 0.3:
            values[0, 0] = 300  # beyond 8 bits: an error, not clipping
        if mode == "F" and rng.random() < 0.5:
            values = values / 255  # floats in [0, 1]
        return Image.fromarray(values)  # uint16 -> "I;16", int32 -> "I", float32 -> "F"
    rgba = Image.fromarray(array.astype(np.uint8), mode="RGBA")
    if mode == "La":
        return rgba.convert("LA").convert("La")
    return rgba.convert(mode)


def documented_pil_rgb(image):
    """The documented result for a PIL image: PIL's own conversion, transparency on white, wide modes by value."""
    if 0 in image.size:
        return INVALID
    if image.mode in ("I", "I;16", "F"):
        return documented_rgb(np.asarray(image))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        straight = image.convert("LA") if image.mode == "La" else image
        return documented_rgb(np.asarray(straight.convert("RGBA")))
    return np.asarray(image.convert("RGB")).astype(np.float64)


@st.composite
def images(draw):
    """(image, oracle): an image in any form `to_rgb_image` is given, and its documented RGB or INVALID."""
    kind = draw(st.sampled_from(["array"] * 4 + ["tensor"] * 2 + ["pil"] * 4 + ["path", "other"]))
    if kind in ("array", "tensor"):
        array = draw(image_arrays())
        expected = documented_rgb(array)
        if kind == "tensor":
            if array.dtype == np.uint16:
                return torch.from_numpy(array.astype(np.int32)), documented_rgb(array.astype(np.int32))
            return torch.from_numpy(array), expected
        return array, expected
    if kind == "pil":
        mode = draw(st.sampled_from(PIL_MODES))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        height, width = draw(SIDE), draw(SIDE)
        array = rng.integers(0, 256, (height, width, 4))
        if draw(st.booleans()):
            array[...] = array.reshape(-1, 4)[0] if array.size else 0  # a uniform colour
        image = pil_image(mode, array, rng)
        return image, documented_pil_rgb(image)
    if kind == "path":
        return draw(st.sampled_from(["no/such/image.png", Path("missing.jpg")])), INVALID
    return draw(st.sampled_from([None, 3, 2.5, {"image": "x"}, b"\x89PNG\r\n", object()])), INVALID


# ----------------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------------

SURROGATE = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
PIECE = st.one_of(st.text(max_size=6), st.just("<image>"), st.just("<|im_end|>"), st.just(" <image>\n"))


@st.composite
def prompts(draw):
    """(prompt, valid)."""
    pieces = draw(st.lists(st.one_of(PIECE, SURROGATE) if draw(st.integers(0, 9)) == 0 else PIECE, max_size=5))
    prompt = "".join(pieces)
    try:
        prompt.encode("utf-8")
        return prompt, True
    except UnicodeEncodeError:
        return prompt, False


@st.composite
def text_arguments(draw):
    """(text argument, list of prompts or None, valid)."""
    form = draw(st.sampled_from(["none", "one", "list", "list", "bad item", "bad type"]))
    if form == "none":
        return None, None, True
    if form == "one":
        prompt, valid = draw(prompts())
        return prompt, [prompt], valid
    if form == "list":
        drawn = draw(st.lists(prompts(), max_size=3))
        texts = [p for p, _ in drawn]
        return texts, texts or None, all(v for _, v in drawn)
    if form == "bad item":
        good = [p for p, _ in draw(st.lists(prompts(), max_size=2))]
        bad = draw(st.sampled_from([None, b"bytes", 7, ["nested"], ("tuple",)]))
        return good + [bad], None, False
    return draw(st.sampled_from([b"bytes", 7, 1.5, {"text": "x"}])), None, False


@st.composite
def image_arguments(draw):
    """(images argument, flat list of (image, oracle) or None, structure valid)."""
    form = draw(st.sampled_from(["none", "one", "list", "list", "per prompt", "too deep"]))
    if form == "none":
        return None, None, True
    if form == "one":
        image, expected = draw(images())
        if image is None:  # images=None means "no images"
            return None, None, True
        return image, [(image, expected)], True
    if form == "list":
        drawn = draw(st.lists(images(), max_size=3))
        return [i for i, _ in drawn], drawn or None, True
    if form == "per prompt":
        groups = draw(st.lists(st.lists(images(), max_size=2), max_size=2))
        flat = [pair for group in groups for pair in group]
        return [[i for i, _ in group] for group in groups], flat or None, True
    image, _ = draw(images())
    return [[[image]]], None, False


@st.composite
def matched_arguments(draw, processor):
    """(image argument, text argument), with as many images as the prompts ask for (mostly valid calls)."""
    text_arg, texts, text_valid = draw(text_arguments())
    if texts is None or not text_valid:
        n_images = draw(st.integers(1, 3))
    elif any(processor.image_token in t for t in texts):
        n_images = sum(t.count(processor.image_token) for t in texts)
    else:
        n_images = len(texts) if len(texts) > 1 else draw(st.integers(1, 3))
    drawn = [draw(images()) for _ in range(n_images)]
    if len(drawn) > 1 and draw(st.booleans()):  # as per-prompt lists
        cut = draw(st.integers(0, len(drawn)))
        image_arg = [[i for i, _ in drawn[:cut]], [i for i, _ in drawn[cut:]]]
    else:
        image_arg = [i for i, _ in drawn]
    return (image_arg, drawn or None, True), (text_arg, texts, text_valid)


def documented_prompts(processor, texts, n_images):
    """The prompts the processor documents for `texts` and `n_images` images, or INVALID on a count mismatch."""
    if n_images:
        if texts is None:
            texts = [processor.caption_prompt() for _ in range(n_images)]
        elif not any(processor.image_token in t for t in texts):
            texts = [processor.caption_prompt(t) for t in (texts * n_images if len(texts) == 1 else texts)]
    if sum(t.count(processor.image_token) for t in texts) != n_images:
        return INVALID
    return texts


# ----------------------------------------------------------------------------------------------------------
# The processor property
# ----------------------------------------------------------------------------------------------------------

PROCESSOR_OUTCOMES = Counter()


@FUZZ
@given(data=st.data())
def test_processor_inputs_work_or_raise_a_clear_error(tiny, data):
    _, processor = tiny
    if data.draw(st.booleans(), label="matched"):
        image_argument, text_argument = data.draw(matched_arguments(processor))
    else:
        image_argument, text_argument = data.draw(image_arguments()), data.draw(text_arguments())
    images_arg, flat, images_valid = image_argument
    text_arg, texts, text_valid = text_argument
    valid = images_valid and text_valid and (flat is not None or texts is not None)
    if valid:
        valid = all(expected is not INVALID for _, expected in flat or ())
    if valid:
        expected_prompts = documented_prompts(processor, texts, len(flat or ()))
        valid = expected_prompts is not INVALID
    try:
        output = processor(images=images_arg, text=text_arg)
    except CLEAR_ERRORS as error:
        assert not valid, f"a valid input raised {type(error).__name__}: {error}"
        assert raised_by_mqwen(error), "".join(traceback.format_exception(error))
        PROCESSOR_OUTCOMES["clear error"] += 1
        return
    assert valid, "an invalid input was accepted"
    PROCESSOR_OUTCOMES["worked"] += 1
    PROCESSOR_OUTCOMES["worked with images"] += bool(flat)

    # Text: every row decodes to its documented prompt, each `<image>` expanded to image_seq_length tokens.
    tokenizer = processor.tokenizer
    assert output["input_ids"].shape[0] == len(expected_prompts)
    for row, prompt in zip(range(len(expected_prompts)), expected_prompts):
        ids = output["input_ids"][row][output["attention_mask"][row] == 1]
        expanded = prompt.replace(processor.image_token, processor.image_token * processor.image_seq_length)
        decoded = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        assert decoded == unicodedata.normalize("NFC", expanded)
        assert (
            int((ids == processor.image_token_id).sum())
            == prompt.count(processor.image_token) * processor.image_seq_length
        )
    # Pixels: one normalised image per input image, each from the documented RGB values.
    if not flat:
        assert "pixel_values" not in output
        return
    pixels = output["pixel_values"]
    size = processor.image_processor.crop_size["height"]
    assert pixels.shape == (len(flat), 3, size, size) and torch.isfinite(pixels).all()
    mean = torch.tensor(processor.image_processor.image_mean)[:, None, None]
    std = torch.tensor(processor.image_processor.image_std)[:, None, None]
    for index, (image, expected) in enumerate(flat):
        rgb = to_rgb_image(image)
        assert rgb.mode == "RGB" and rgb.size == (expected.shape[1], expected.shape[0])
        assert np.abs(np.asarray(rgb) - expected).max() <= 1.0, (index, expected.shape)
        if np.ptp(expected.reshape(-1, 3), axis=0).max() == 0:  # a uniform image stays that colour, exactly placed
            colour = torch.tensor(np.asarray(rgb)[0, 0], dtype=torch.float32)[:, None, None]
            assert torch.allclose(pixels[index], (colour / 255 - mean) / std, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# The model property
# ----------------------------------------------------------------------------------------------------------

MODEL_OUTCOMES = Counter()
MUTATIONS = [
    "none",
    "none",
    "none",
    "embeds",
    "ids float",
    "ids int16",
    "ids list",
    "ids numpy",
    "ids 1d",
    "ids 3d",
    "empty batch",
    "empty sequence",
    "id too big",
    "id negative",
    "both ids and embeds",
    "embeds width",
    "embeds with pixels",
    "pixels numpy",
    "pixels list",
    "pixels uint8",
    "pixels float64",
    "pixels bfloat16",
    "pixels 3d",
    "pixels size",
    "pixels empty",
    "pixels extra image",
    "pixels nan",
    "pixels inf",
    "pixels raw",
    "mask long",
    "mask short",
    "mask batch",
    "mask 1d",
    "mask list",
    "labels",
    "labels shape",
    "labels int32",
    "labels too big",
    "labels list",
]
VALID_MUTATIONS = {"none", "embeds", "pixels float64", "pixels bfloat16", "labels"}


@st.composite
def model_inputs(draw, model):
    """(forward kwargs, mutation): valid inputs for the tiny model, then one mutation from MUTATIONS."""
    config = model.config
    vocab, per_image = model.get_input_embeddings().num_embeddings, config.image_seq_length
    batch, length = draw(st.integers(1, 3)), draw(st.integers(2, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    ids = torch.from_numpy(rng.integers(0, vocab - 1, (batch, length)))
    ids[ids == config.image_token_id] = 0
    with_image = draw(st.booleans())
    kwargs = {"attention_mask": torch.ones(batch, length + per_image * with_image, dtype=torch.long)}
    if with_image:
        ids = torch.cat([torch.full((batch, per_image), config.image_token_id), ids], dim=1)
        size = config.vision_config.image_size
        kwargs["pixel_values"] = torch.from_numpy(rng.standard_normal((batch, 3, size, size)).astype(np.float32))
    kwargs["input_ids"] = ids
    mutation = draw(st.sampled_from(MUTATIONS))
    mutate(kwargs, mutation, model, rng)
    return kwargs, mutation


def mutate(kwargs, mutation, model, rng):
    ids, pixels = kwargs["input_ids"], kwargs.get("pixel_values")
    vocab, hidden = model.get_input_embeddings().num_embeddings, model.config.text_config.hidden_size
    size = model.config.vision_config.image_size
    if mutation.startswith("pixels") and pixels is None and mutation != "pixels extra image":
        mutation = "none"
    changes = {
        "embeds": lambda: kwargs.update(
            input_ids=None, inputs_embeds=torch.randn(*ids.shape, hidden), pixel_values=None
        ),
        "ids float": lambda: kwargs.update(input_ids=ids.float()),
        "ids int16": lambda: kwargs.update(input_ids=ids.short()),
        "ids list": lambda: kwargs.update(input_ids=ids.tolist()),
        "ids numpy": lambda: kwargs.update(input_ids=ids.numpy()),
        "ids 1d": lambda: kwargs.update(input_ids=ids[0]),
        "ids 3d": lambda: kwargs.update(input_ids=ids[None]),
        "empty batch": lambda: kwargs.update(input_ids=ids[:0], attention_mask=None, pixel_values=None),
        "empty sequence": lambda: kwargs.update(input_ids=ids[:, :0], attention_mask=None, pixel_values=None),
        "id too big": lambda: ids.__setitem__((0, -1), vocab + int(rng.integers(0, 10**6))),
        "id negative": lambda: ids.__setitem__((0, -1), -int(rng.integers(1, 10**6))),
        "both ids and embeds": lambda: kwargs.update(inputs_embeds=torch.randn(*ids.shape, hidden)),
        "embeds width": lambda: kwargs.update(
            input_ids=None, pixel_values=None, inputs_embeds=torch.randn(*ids.shape, hidden + 1)
        ),
        "embeds with pixels": lambda: kwargs.update(
            input_ids=None, inputs_embeds=torch.randn(*ids.shape, hidden), pixel_values=torch.zeros(1, 3, size, size)
        ),
        "pixels numpy": lambda: kwargs.update(pixel_values=pixels.numpy()),
        "pixels list": lambda: kwargs.update(pixel_values=pixels.tolist()),
        "pixels uint8": lambda: kwargs.update(pixel_values=pixels.to(torch.uint8)),
        "pixels float64": lambda: kwargs.update(pixel_values=pixels.double()),
        "pixels bfloat16": lambda: kwargs.update(pixel_values=pixels.bfloat16()),
        "pixels 3d": lambda: kwargs.update(pixel_values=pixels[0]),
        "pixels size": lambda: kwargs.update(pixel_values=pixels[..., :-14, :-14]),
        "pixels empty": lambda: kwargs.update(pixel_values=pixels[:0]),
        "pixels extra image": lambda: kwargs.update(
            pixel_values=torch.zeros((0 if pixels is None else len(pixels)) + 1, 3, size, size)
        ),
        "pixels nan": lambda: pixels.view(-1).__setitem__(int(rng.integers(0, pixels.numel())), float("nan")),
        "pixels inf": lambda: pixels.view(-1).__setitem__(int(rng.integers(0, pixels.numel())), -float("inf")),
        "pixels raw": lambda: kwargs.update(pixel_values=pixels.abs() * 100 + 30),
        "mask long": lambda: kwargs.update(attention_mask=torch.ones(ids.shape[0], ids.shape[1] + 1)),
        "mask short": lambda: kwargs.update(attention_mask=torch.ones(ids.shape[0], ids.shape[1] - 1)),
        "mask batch": lambda: kwargs.update(attention_mask=torch.ones(ids.shape[0] + 1, ids.shape[1])),
        "mask 1d": lambda: kwargs.update(attention_mask=torch.ones(ids.shape[1])),
        "mask list": lambda: kwargs.update(attention_mask=[[1] * ids.shape[1]] * ids.shape[0]),
        "labels": lambda: kwargs.update(labels=ids.clone()),
        "labels shape": lambda: kwargs.update(labels=ids[:1].clone() if len(ids) > 1 else ids[:, 1:].clone()),
        "labels int32": lambda: kwargs.update(labels=ids.int()),
        "labels too big": lambda: kwargs.update(labels=ids.clone().index_fill_(1, torch.tensor([0]), vocab)),
        "labels list": lambda: kwargs.update(labels=ids.tolist()),
    }
    if mutation in changes:
        changes[mutation]()


@pytest.fixture(scope="module")
def model(tiny):
    return tiny[0]


@MODEL_FUZZ
@given(data=st.data())
def test_model_inputs_work_or_raise_a_clear_error(model, data):
    kwargs, mutation = data.draw(model_inputs(model))
    if isinstance(kwargs.get("labels"), torch.Tensor) and mutation == "labels":
        kwargs["labels"][:, :-2] = -100  # a few scored tokens, the rest ignored
    valid = mutation in VALID_MUTATIONS or (mutation.startswith("pixels") and "pixel_values" not in kwargs)
    try:
        with torch.no_grad():
            output = model(**kwargs)
    except CLEAR_ERRORS as error:
        assert not valid, f"{mutation}: a valid input raised {type(error).__name__}: {error}"
        assert raised_by_mqwen(error), "".join(traceback.format_exception(error))
        MODEL_OUTCOMES["clear error"] += 1
        return
    assert valid, f"{mutation}: an invalid input was accepted"
    MODEL_OUTCOMES["worked"] += 1
    tokens = (kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]).shape[:2]
    assert output.logits.shape == (*tokens, model.config.text_config.vocab_size)
    assert torch.isfinite(output.logits).all()
    if mutation == "labels":
        assert torch.isfinite(output.loss)


def test_the_fuzz_runs_covered_both_outcomes():
    """Guards against a generator that only ever builds one kind of input (run after the fuzz tests)."""
    if not PROCESSOR_OUTCOMES or not MODEL_OUTCOMES:
        pytest.skip("the fuzz tests did not run in this session")
    print(f"\nprocessor: {dict(PROCESSOR_OUTCOMES)}; model: {dict(MODEL_OUTCOMES)}")
    for outcomes in (PROCESSOR_OUTCOMES, MODEL_OUTCOMES):
        total = outcomes["worked"] + outcomes["clear error"]
        assert outcomes["worked"] > total / 10 and outcomes["clear error"] > total / 10, dict(outcomes)
    assert PROCESSOR_OUTCOMES["worked with images"] > PROCESSOR_OUTCOMES["worked"] / 10
