"""MQwen on the paths transformers' own model and generation test mixins exercise, each against a reference.

One test (or parametrized group) per item of issue 13: tuple outputs, generation with a cache object and its
variants (assisted, prompt lookup, continuation, static cache), placeholders without pixels, inputs_embeds with
pixels, rope scaling and attention implementations under padding, and decode steps free of image work.
"""

import copy
import inspect
import types

import pytest
import torch
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import logging as hf_logging

from mqwen.common.tiny_model import build_tiny
from mqwen.modeling_mqwen import CACHE_KWARG, MQwenModel

NEW = 6  # new tokens per generation


def greedy(model, inputs, **kwargs):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, **kwargs)
    return out if isinstance(out, torch.Tensor) else out.sequences


@pytest.fixture(scope="module")
def prompt(tiny):
    """One image in a short prompt, and the greedy continuation every generation path must reproduce."""
    from conftest import random_image

    model, processor = tiny
    inputs = processor(images=[random_image(30)], text=["<image> describe the shapes and colours"])
    return inputs, greedy(model, inputs)


# -- 1. return_dict=False ----------------------------------------------------------------------------------


def test_return_dict_false_gives_the_same_values_as_a_tuple_loss_first(tiny, prompt):
    model, _ = tiny
    inputs, _ = prompt
    labels = inputs["input_ids"]
    with torch.no_grad():
        rich = model(**inputs, labels=labels)
        plain = model(**inputs, labels=labels, return_dict=False)
    assert isinstance(plain, tuple)
    assert torch.equal(plain[0], rich.loss) and torch.equal(plain[1], rich.logits)
    assert len(plain) == len(rich.to_tuple())

    with torch.no_grad():
        assert torch.equal(model(**inputs, return_dict=False)[0], rich.logits)  # no labels: logits first


def test_config_return_dict_false_and_the_base_model_vllm_calls(tiny, prompt):
    model, _ = tiny
    inputs, _ = prompt
    base = MQwenModel(copy.deepcopy(model.config)).eval()
    base.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        rich = base(**inputs)
        plain = base(**inputs, return_dict=False)
        base.config.return_dict = False
        from_config = base(**inputs)
    assert isinstance(plain, tuple) and isinstance(from_config, tuple)
    assert torch.equal(plain[0], rich.last_hidden_state) and torch.equal(from_config[0], rich.last_hidden_state)
    # the hidden states are the language model's own on the spliced embeddings: the head gives the logits
    with torch.no_grad():
        assert torch.equal(model.language_model.lm_head(plain[0]), model(**inputs).logits)


def test_get_image_features_return_dict(tiny, prompt):
    model, _ = tiny
    pixels = prompt[0]["pixel_values"]
    with torch.no_grad():
        tensor = model.get_image_features(pixels)
        also_tensor = model.get_image_features(pixels, return_dict=False)
        rich = model.get_image_features(pixels, return_dict=True)
    assert isinstance(tensor, torch.Tensor) and torch.equal(tensor, also_tensor)
    assert isinstance(rich, BaseModelOutputWithPooling)
    assert torch.equal(rich.pooler_output, tensor) and torch.equal(rich.last_hidden_state, tensor)


# -- 2. generate with a cache object, and the decoding strategies built on it ------------------------------


def test_generate_with_a_cache_object_under_this_versions_keyword(tiny, prompt):
    model, _ = tiny
    inputs, reference = prompt
    cache = DynamicCache()
    assert torch.equal(greedy(model, inputs, **{CACHE_KWARG: cache}), reference)
    assert cache.get_seq_length() == reference.shape[1] - 1  # generate filled the cache it was given


def test_forward_accepts_the_cache_under_either_name(tiny, prompt):
    model, _ = tiny
    inputs, _ = prompt
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    with torch.no_grad():
        full = model(input_ids=ids, pixel_values=pixels).logits[:, -1]
        for name in ("cache", "past_key_values"):
            cache = DynamicCache()
            model(input_ids=ids[:, :-1], pixel_values=pixels, **{name: cache}, use_cache=True)
            step = model(input_ids=ids[:, -1:], **{name: cache}, use_cache=True).logits[:, -1]
            torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("assistant", ["same", "text-only"])
def test_assisted_decoding_equals_greedy(tiny, prompt, assistant):
    model, _ = tiny
    inputs, reference = prompt
    helper = model if assistant == "same" else copy.deepcopy(model.language_model)  # a plain causal LM
    assert torch.equal(greedy(model, inputs, assistant_model=helper), reference)


def test_prompt_lookup_decoding_equals_greedy(tiny, prompt):
    model, _ = tiny
    inputs, reference = prompt
    assert torch.equal(greedy(model, inputs, prompt_lookup_num_tokens=3), reference)


def test_continuing_from_a_returned_cache_equals_one_generation(tiny, prompt):
    model, _ = tiny
    inputs, reference = prompt
    with torch.no_grad():
        first = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        cache = first[CACHE_KWARG]
        assert cache.get_seq_length() > inputs["input_ids"].shape[1]
        rest = model.generate(
            input_ids=first.sequences,
            attention_mask=torch.ones_like(first.sequences),
            pixel_values=inputs["pixel_values"],  # as a user re-sends them: their placeholders are in the cache
            **{CACHE_KWARG: cache},
            max_new_tokens=NEW - 3,
            do_sample=False,
        )
    assert torch.equal(rest, reference)


def test_continuing_with_a_new_image_after_the_cache(tiny, make_image):
    """A second turn brings a second image: only that image is encoded, after the cached first turn."""
    model, processor = tiny
    images = [make_image(31), make_image(32)]
    both = processor(images=images, text=["<image> first picture. now the second <image> compare"])
    cut = int((both["input_ids"][0] == model.config.image_token_id).nonzero()[model.config.image_seq_length])
    reference = greedy(model, both)
    with torch.no_grad():
        cache = DynamicCache()
        model(input_ids=both["input_ids"][:, :cut], pixel_values=both["pixel_values"][:1], **{CACHE_KWARG: cache})
        calls = []
        handle = model.vision_tower.conv1.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
        out = greedy(model, both, **{CACHE_KWARG: cache})
        handle.remove()
    assert torch.equal(out, reference)
    assert calls == [1], "only the image after the cached prefix is encoded"


def test_static_cache_generation_equals_dynamic(tiny, prompt):
    model, _ = tiny
    inputs, reference = prompt
    assert torch.equal(greedy(model, inputs, cache_implementation="static"), reference)


def test_beam_search_from_inputs_embeds_with_images(tiny, make_image):
    model, processor = tiny
    batch = processor(images=[make_image(33), make_image(34), make_image(35)], text=["<image><image> a", "<image> b"])
    embeds = model.get_input_embeddings()(batch["input_ids"])
    from_ids = greedy(model, batch, num_beams=2)
    with torch.no_grad():
        from_embeds = model.generate(
            inputs_embeds=embeds,
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            max_new_tokens=NEW,
            do_sample=False,
            num_beams=2,
        )
    assert torch.equal(from_embeds, from_ids[:, batch["input_ids"].shape[1] :])


# -- 3. placeholders without pixels ------------------------------------------------------------------------


def test_placeholders_without_pixels_are_ordinary_tokens_with_one_warning(tiny, prompt, caplog):
    model, _ = tiny
    ids = prompt[0]["input_ids"]
    hf_logging.warning_once.cache_clear()
    with caplog.at_level("WARNING"), torch.no_grad():
        ours = [model(input_ids=ids).logits for _ in range(2)]
        reference = model.language_model(input_ids=ids).logits
    assert torch.equal(ours[0], reference) and torch.equal(ours[1], reference)
    warnings = [r for r in caplog.records if "no pixel_values" in r.getMessage()]
    assert len(warnings) == 1 and "pass the processor's pixel_values" in warnings[0].getMessage()


def test_pixels_without_enough_placeholders_is_still_an_error(tiny, prompt):
    model, processor = tiny
    pixels = prompt[0]["pixel_values"]
    text_only = processor.tokenizer(["no image here at all"], return_tensors="pt")["input_ids"]
    with pytest.raises(ValueError, match=r"holds 0 `<image>` tokens .* but 1 images were given"):
        model(input_ids=text_only, pixel_values=pixels)


# -- 4. inputs_embeds with pixel_values --------------------------------------------------------------------


def test_inputs_embeds_with_pixels_equals_input_ids(tiny, prompt):
    model, _ = tiny
    inputs, reference = prompt
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with torch.no_grad():
        from_ids = model(**inputs).logits
        from_embeds = model(inputs_embeds=embeds, pixel_values=inputs["pixel_values"]).logits
        generated = model.generate(
            inputs_embeds=embeds,
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs["pixel_values"],
            max_new_tokens=NEW,
            do_sample=False,
        )
    assert torch.equal(from_embeds, from_ids)
    assert torch.equal(generated, reference[:, inputs["input_ids"].shape[1] :])  # generate returns new tokens only

    with pytest.raises(ValueError, match="do not match"):  # the count check holds for embeddings too
        model(inputs_embeds=embeds[:, 3:], pixel_values=inputs["pixel_values"])


# -- 5. rope scaling and attention implementations under padding ------------------------------------------

ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32},
}


@pytest.mark.parametrize("rope", list(ROPES))
def test_rope_scaling_and_attention_are_padding_invariant_and_agree(rope, make_image):
    text = {"max_position_embeddings": 64}
    if ROPES[rope]:
        text["rope_scaling"] = ROPES[rope]
    model, processor = build_tiny(seed=7, text=text)
    assert model.language_model.model.rotary_emb.rope_type == ROPES[rope]["rope_type"] if ROPES[rope] else True
    images = [make_image(40), make_image(41)]
    prompts = ["<image> short", "a much longer prompt with more words before <image> it"]
    singles = [processor(images=[im], text=[p]) for im, p in zip(images, prompts)]
    results = {}
    for impl in ("eager", "sdpa"):
        model.language_model.set_attn_implementation(impl)
        assert model.config.text_config._attn_implementation == impl
        for dtype in (torch.float32, torch.bfloat16):
            typed = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
            with torch.no_grad():
                alone = [typed(**{**s, "pixel_values": s["pixel_values"].to(dtype)}).logits.float() for s in singles]
                for side in ("left", "right"):
                    batch = processor(images=images, text=prompts, padding_side=side)
                    batch["pixel_values"] = batch["pixel_values"].to(dtype)
                    logits = typed(**batch).logits.float()
                    for row, single in enumerate(alone):
                        real = batch["attention_mask"][row].bool()
                        tol = 1e-5 if dtype == torch.float32 else 0.05  # bf16 on CPU: batch shapes round differently
                        torch.testing.assert_close(logits[row][real], single[0], atol=tol, rtol=tol)
            results[impl, dtype] = alone
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 0.05)):
        for a, b in zip(results["eager", dtype], results["sdpa", dtype]):
            torch.testing.assert_close(a, b, atol=tol, rtol=tol)


# -- 6. decode steps do no image work ----------------------------------------------------------------------


class HostSyncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts reads of a tensor's value on the host (`int(t)`, `bool(t)`, `.item()`, `.tolist()`)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_a_decode_step_syncs_no_more_than_the_bare_language_models(tiny, prompt):
    model, _ = tiny
    inputs, _ = prompt
    ids = inputs["input_ids"]
    counts = {}
    for name, module in (("mqwen", model), ("bare", model.language_model)):
        cache = DynamicCache()
        with torch.no_grad():
            model(**inputs, **{CACHE_KWARG: cache}, use_cache=True)  # prefill with the image
            step = {"input_ids": ids[:, -1:], CACHE_KWARG: cache, "use_cache": True}
            with HostSyncs() as mode:
                module(**step)
        counts[name] = mode.count
    assert counts["mqwen"] == counts["bare"]


def test_generate_gives_pixels_to_the_prefill_only(tiny, prompt):
    model, _ = tiny
    inputs, reference = prompt
    seen = []

    def record(module, args, kwargs):
        seen.append((kwargs["input_ids"].shape[1], kwargs.get("pixel_values") is not None))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    scans, encodes = [], []
    find, encode = model.get_placeholder_mask, model.get_image_features
    model.get_placeholder_mask = lambda *a: scans.append(1) or find(*a)
    model.get_image_features = lambda *a, **k: encodes.append(len(a[0])) or encode(*a, **k)
    try:
        out = greedy(model, inputs)
    finally:
        handle.remove()
        del model.get_placeholder_mask, model.get_image_features
    assert torch.equal(out, reference)
    assert seen[0] == (inputs["input_ids"].shape[1], True)
    assert seen[1:] == [(1, False)] * (NEW - 1)
    assert scans == [1], "placeholders are looked up once, at the prefill"
    assert encodes == [len(inputs["pixel_values"])], "the vision tower runs once, at the prefill"


def test_the_forward_signature_computed_once_is_inspects_own_with_or_without_hooks(tiny, prompt):
    """transformers 5 rebuilds `inspect.signature(model.forward)` on every decode step of remote code, so MQwen
    stores it on the function under `can_return_tuple` (`signature_computed_once`). It must be exactly what inspect
    computes from the code, also through accelerate's hook, which wraps the bound method and copies the outer
    function's attributes (a signature stored there would show `self`)."""
    hooks = pytest.importorskip("accelerate.hooks")
    model, _ = tiny
    inputs, reference = prompt
    function = inspect.unwrap(type(model).forward)
    assert "__signature__" in vars(function) and "__signature__" not in vars(type(model).forward)
    uncached = types.FunctionType(
        function.__code__, function.__globals__, function.__name__, function.__defaults__, function.__closure__
    )
    uncached.__annotations__ = function.__annotations__  # the code object does not carry them
    unbound = inspect.signature(uncached)
    expected = unbound.replace(parameters=list(unbound.parameters.values())[1:])  # without `self`
    assert inspect.signature(model.forward) == expected
    assert inspect.signature(type(model).forward) == unbound

    hooked = copy.deepcopy(model)
    hooks.add_hook_to_module(hooked, hooks.ModelHook())
    assert inspect.signature(hooked.forward) == expected
    assert torch.equal(greedy(hooked, inputs), reference)


def test_the_bound_forward_signature_is_made_once_and_other_replacements_are_inspects(tiny):
    """The stored signature also holds the bound method's (without `self`), so a decode step's
    `inspect.signature(model.forward)` builds no new Signature; any other `replace` must still build a new,
    validated one, as inspect's own does."""
    model, _ = tiny
    bound = inspect.signature(model.forward)
    assert inspect.signature(model.forward) is bound, "the bound signature is made once"
    assert "self" not in bound.parameters and list(bound.parameters)[0] == "input_ids"

    stored = inspect.signature(type(model).forward)
    params = list(stored.parameters.values())
    assert stored.replace(parameters=params[1:]) == bound  # a list, not the stored tuple: built anew, equal
    assert stored.replace(return_annotation=int).return_annotation is int
    assert list(stored.replace(return_annotation=int).parameters) == list(stored.parameters)
    with pytest.raises(ValueError, match="duplicate parameter name"):
        stored.replace(parameters=[params[1], params[1]])
