"""The splice model against references: the bare language model, single-sample runs, uncached runs."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import TextStreamer

from mqwen.common.tiny_model import build_tiny

NEW = 8  # new tokens per generation; min_new_tokens keeps every run the same length


def greedy(model, inputs, **kwargs):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, **kwargs)
    return out if isinstance(out, torch.Tensor) else out.sequences


def new_tokens(generated, inputs):
    return generated[:, inputs["input_ids"].shape[1] :]


def capture_lm_inputs_embeds(model):
    """Record the inputs_embeds the language model receives (after the splice)."""
    seen = []
    handle = model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"].detach().clone()), with_kwargs=True
    )
    return seen, handle


def test_text_only_logits_equal_the_language_models(tiny):
    model, processor = tiny
    ids = processor.tokenizer(["a red circle and a blue square"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        reference = model.language_model(input_ids=ids).logits
    assert torch.equal(ours, reference)


def test_features_land_on_their_placeholders_in_order(tiny, make_image):
    model, processor = tiny
    images = [make_image(1), make_image(2)]
    inputs = processor(images=images, text=["first <image> then <image> done"])
    seen, handle = capture_lm_inputs_embeds(model)
    with torch.no_grad():
        model(**inputs)
        features = model.get_image_features(inputs["pixel_values"])
    handle.remove()
    mask = inputs["input_ids"][0] == model.config.image_token_id
    spliced = seen[0][0][mask].view(2, model.config.image_seq_length, -1)
    assert torch.equal(spliced, features)
    token_embeds = model.get_input_embeddings()(inputs["input_ids"])[0]
    assert torch.equal(seen[0][0][~mask], token_embeds[~mask])


def test_changing_an_image_changes_logits_from_its_placeholders_on_only(tiny, make_image):
    model, processor = tiny
    text = ["look: <image> and also <image> now describe"]
    a = processor(images=[make_image(1), make_image(2)], text=text)
    b = processor(images=[make_image(1), make_image(3)], text=text)
    with torch.no_grad():
        logits_a, logits_b = model(**a).logits[0], model(**b).logits[0]
    positions = (a["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    second_start = int(positions[model.config.image_seq_length])
    torch.testing.assert_close(logits_a[:second_start], logits_b[:second_start], atol=1e-6, rtol=0)
    per_position = (logits_a[second_start:] - logits_b[second_start:]).abs().amax(-1)
    assert bool((per_position > 1e-5).all()), "every position from the changed image on must see it"


def test_loss_ignores_image_positions(tiny, make_image):
    model, processor = tiny
    inputs = processor(images=[make_image(4)], text=["caption: <image> a red circle"])
    labels = inputs["input_ids"].clone()
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    expected_labels = labels.masked_fill(labels == model.config.image_token_id, -100)
    reference = F.cross_entropy(out.logits[0, :-1].float(), expected_labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, reference)


def _captioned_batch(processor, make_image):
    """Two right-padded caption samples of different lengths; labels only on the caption tokens."""
    prompt = processor.caption_prompt()
    texts = [prompt + "a red circle<|im_end|>", prompt + "a blue square and a green triangle<|im_end|>"]
    batch = processor(images=[make_image(20), make_image(21)], text=texts, padding_side="right")
    prompt_length = len(processor(images=[make_image(20)], text=[prompt])["input_ids"][0])
    labels = batch["input_ids"].clone()
    labels[:, :prompt_length] = -100
    labels[batch["attention_mask"] == 0] = -100
    batch["labels"] = labels
    return batch


def test_loss_from_scored_positions_equals_the_full_loss_with_the_same_gradients(make_image):
    from mqwen.modeling_mqwen import scored_positions

    model, processor = build_tiny(seed=2)
    model.train()
    batch = _captioned_batch(processor, make_image)
    kept = scored_positions(batch["labels"])
    # exactly the positions whose next token some sample labels, far fewer than all of them
    shifted = batch["labels"][:, 1:] != -100
    assert kept.tolist() == shifted.any(0).nonzero().squeeze(-1).tolist()
    assert 0 < len(kept) < batch["input_ids"].shape[1] // 2

    def run(**kwargs):
        model.zero_grad()
        out = model(**batch, **kwargs)
        out.loss.backward()
        return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    full, full_grads = run()
    part, part_grads = run(logits_to_keep=kept)
    torch.testing.assert_close(part.loss, full.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(part.logits, full.logits[:, kept])
    assert part_grads.keys() == full_grads.keys()
    for name in full_grads:
        torch.testing.assert_close(part_grads[name], full_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    # num_items_in_batch (what Trainer passes under gradient accumulation) divides the same sum
    with torch.no_grad():
        n = torch.tensor(7)
        torch.testing.assert_close(
            model(**batch, logits_to_keep=kept, num_items_in_batch=n).loss,
            model(**batch, num_items_in_batch=n).loss,
        )


def test_kept_positions_that_drop_a_labelled_token_are_an_error(tiny, make_image):
    from mqwen.modeling_mqwen import scored_positions

    model, processor = tiny
    batch = _captioned_batch(processor, make_image)
    kept = scored_positions(batch["labels"])
    with pytest.raises(ValueError, match=rf"leaves out position\(s\) \[{kept[-1].item()}\].*scored_positions"):
        model(**batch, logits_to_keep=kept[:-1])


def test_cached_generation_equals_uncached(tiny, make_image):
    model, processor = tiny
    inputs = processor(images=[make_image(5)])
    assert torch.equal(greedy(model, inputs), greedy(model, inputs, use_cache=False))


def test_batched_left_padded_generation_equals_each_sample_alone(tiny, make_image):
    model, processor = tiny
    images = [make_image(6), make_image(7, size=(40, 90)), make_image(8)]
    prompts = [
        processor.caption_prompt(),
        processor.caption_prompt("Write one short caption for this picture, please, with the colours."),
        "<image> shapes:",
    ]
    batch = processor(images=images, text=prompts)
    assert batch["attention_mask"][:, 0].tolist().count(0) >= 1, "prompts of different lengths are left-padded"
    batched = new_tokens(greedy(model, batch), batch)
    for row, (image, prompt) in enumerate(zip(images, prompts)):
        single = processor(images=[image], text=[prompt])
        assert torch.equal(batched[row], new_tokens(greedy(model, single), single)[0]), f"sample {row}"


def test_images_are_encoded_once_per_generate_call(tiny, make_image):
    model, processor = tiny
    calls = []
    handle = model.vision_tower.conv1.register_forward_hook(lambda *args: calls.append(1))
    greedy(model, processor(images=[make_image(9), make_image(10)]))
    handle.remove()
    assert len(calls) == 1


def test_beam_search_keeps_each_samples_images_together(tiny, make_image):
    """Two images in sample 0, one in sample 1: beams must expand images per sample, not per image."""
    model, processor = tiny
    images = [make_image(11), make_image(12), make_image(13)]
    prompts = ["<image> vs <image> which?", "<image> describe"]
    batch = processor(images=images, text=prompts)
    batched = new_tokens(greedy(model, batch, num_beams=3), batch)
    singles = [processor(images=images[:2], text=prompts[:1]), processor(images=images[2:], text=prompts[1:])]
    for row, single in enumerate(singles):
        assert torch.equal(batched[row], new_tokens(greedy(model, single, num_beams=3), single)[0])


def test_sampling_is_reproducible_under_a_seed(tiny, make_image):
    model, processor = tiny
    inputs = processor(images=[make_image(14)])
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        with torch.no_grad():
            outs.append(model.generate(**inputs, do_sample=True, top_k=50, max_new_tokens=NEW, min_new_tokens=NEW))
    assert torch.equal(outs[0], outs[1])
    assert outs[0].shape[1] == inputs["input_ids"].shape[1] + NEW


def test_streamer_and_return_dict_in_generate(tiny, make_image):
    model, processor = tiny
    inputs = processor(images=[make_image(15)])

    class Collect(TextStreamer):
        def __init__(self, tokenizer):
            super().__init__(tokenizer, skip_prompt=True)
            self.text = ""

        def on_finalized_text(self, text, stream_end=False):
            self.text += text

    streamer = Collect(processor.tokenizer)
    out = greedy(model, inputs, streamer=streamer)
    assert streamer.text == processor.tokenizer.decode(new_tokens(out, inputs)[0])

    with torch.no_grad():
        rich = model.generate(
            **inputs,
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            do_sample=False,
            return_dict_in_generate=True,
            output_scores=True,
        )
    assert torch.equal(rich.sequences, out)
    assert len(rich.scores) == NEW


def test_gradient_checkpointing_gives_the_same_gradients(make_image):
    model, processor = build_tiny(seed=1)
    inputs = processor(images=[make_image(16)], text=["<image> a blue square"], padding_side="right")

    def grads(m):
        m.train()
        m.zero_grad()
        m(**inputs, labels=inputs["input_ids"]).loss.backward()
        return {name: p.grad.clone() for name, p in m.named_parameters() if p.grad is not None}

    reference = grads(model)
    checkpointed = copy.deepcopy(model)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = {"vision": 0, "text": 0}

    def count_forward(module, key):  # torch runs no hooks during the recompute, so wrap forward itself
        forward = module.forward

        def counted(*args, **kwargs):
            calls[key] += 1
            return forward(*args, **kwargs)

        module.forward = counted

    count_forward(checkpointed.vision_tower.transformer.resblocks[0].mlp, "vision")
    count_forward(checkpointed.language_model.model.layers[0].mlp, "text")
    got = grads(checkpointed)
    assert calls == {"vision": 2, "text": 2}, "both towers recompute their blocks in backward"
    checkpointed.gradient_checkpointing_disable()
    calls.update(vision=0, text=0)
    grads(checkpointed)
    assert calls == {"vision": 1, "text": 1}
    assert got.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_and_stays_close(tiny, make_image, dtype):
    model, processor = tiny
    half = copy.deepcopy(model).to(dtype)
    inputs = processor(images=[make_image(17)])  # float32 pixels: the tower casts them
    with torch.no_grad():
        logits = half(**inputs).logits
        reference = model(**inputs).logits
    assert logits.dtype == dtype
    torch.testing.assert_close(logits.float(), reference, atol=0.05, rtol=0.05)
    assert half.generate(**inputs, max_new_tokens=2).shape[1] == inputs["input_ids"].shape[1] + 2


def test_tied_embeddings_follow_the_language_models_config(tmp_path, make_image):
    from mqwen import MQwenForCausalLM

    model, processor = build_tiny(seed=2, text={"tie_word_embeddings": True})
    lm = model.language_model
    assert lm.lm_head.weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()
    model.save_pretrained(tmp_path)
    loaded = MQwenForCausalLM.from_pretrained(tmp_path)
    assert loaded.language_model.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    inputs = processor(images=[make_image(18)])
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)

    untied, _ = build_tiny(seed=2)
    assert untied.language_model.lm_head.weight.data_ptr() != untied.get_input_embeddings().weight.data_ptr()


def test_resize_token_embeddings(tmp_path, make_image):
    from mqwen import MQwenForCausalLM

    model, processor = build_tiny(seed=3)
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(old + 64)
    assert model.get_input_embeddings().weight.shape[0] == old + 64
    assert model.get_output_embeddings().weight.shape[0] == old + 64
    assert model.config.text_config.vocab_size == old + 64
    inputs = processor(images=[make_image(19)])
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[-1] == old + 64
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(MQwenForCausalLM.from_pretrained(tmp_path)(**inputs).logits, logits)


def test_no_split_modules_cover_both_towers(tiny):
    model, _ = tiny
    names = model._get_no_split_modules("auto") if hasattr(model, "_get_no_split_modules") else model._no_split_modules
    assert {"MQwenVisionBlock", "Qwen2DecoderLayer"} <= set(names)


def test_pooled_tokens_with_class_token(make_image):
    model, processor = build_tiny(seed=4, image_token_pooling=2, keep_class_token=True)
    assert model.config.image_seq_length == processor.image_seq_length == 5  # 4x4 grid pooled 2x2, + class
    pixels = processor(images=[make_image(20)])["pixel_values"]
    with torch.no_grad():
        features = model.get_image_features(pixels)
        hidden = model.vision_tower(pixels, output_hidden_states=True)[1][-2]
        patches = hidden[:, 1:].reshape(1, 4, 4, -1)
        pooled = patches.view(1, 2, 2, 2, 2, -1).mean(dim=(2, 4)).reshape(1, 4, -1)
        expected = model.multi_modal_projector(torch.cat([hidden[:, :1], pooled], dim=1))
    torch.testing.assert_close(features, expected, atol=1e-6, rtol=1e-5)
    out = greedy(model, processor(images=[make_image(20)]))
    assert out.shape[1] > NEW


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_other_language_models(model_type, make_image):
    model, processor = build_tiny(seed=5, text={"model_type": model_type, "head_dim": 8})
    assert type(model.language_model).__name__.lower().startswith(model_type)
    ids = processor.tokenizer(["a green triangle"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, model.language_model(input_ids=ids).logits)
    inputs = processor(images=[make_image(21)])
    assert torch.equal(greedy(model, inputs), greedy(model, inputs, use_cache=False))


def test_linear_projector(make_image):
    model, processor = build_tiny(seed=6, projector_type="linear")
    assert not hasattr(model.multi_modal_projector, "linear_2")
    out = greedy(model, processor(images=[make_image(22)]))
    assert out.shape[0] == 1


# -- errors ------------------------------------------------------------------------------------------------


def test_more_images_than_placeholders_names_both_counts(tiny, make_image):
    model, processor = tiny
    inputs = processor(images=[make_image(1)])
    two = processor(images=[make_image(1), make_image(2)], text=["<image><image>"])["pixel_values"]
    with pytest.raises(ValueError, match=r"holds 16 `<image>` tokens \(1 images.*but 2 images were given"):
        model(input_ids=inputs["input_ids"], pixel_values=two)


def test_truncated_placeholders_are_named_as_the_likely_cause(tiny, make_image):
    model, processor = tiny
    inputs = processor(images=[make_image(1)])
    cut = inputs["input_ids"][:, :-40]  # the tail of the prompt, including some image tokens, is gone
    with pytest.raises(ValueError, match=r"do not match.*truncation cut placeholder tokens"):
        model(input_ids=cut, pixel_values=inputs["pixel_values"])


def test_weights_missing_from_a_checkpoint_are_initialised_not_garbage(tiny, tmp_path):
    """A checkpoint without projector weights (a fresh projector) loads with finite, freshly drawn values,
    and the weights that are present load exactly (meta-device loading must not re-initialise them)."""
    from safetensors.torch import load_file, save_file

    from mqwen import MQwenForCausalLM

    model, _ = tiny
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    kept = {k: v for k, v in weights.items() if not k.startswith("multi_modal_projector.")}
    assert len(kept) < len(weights)
    save_file(kept, tmp_path / "model.safetensors", metadata={"format": "pt"})

    loaded = MQwenForCausalLM.from_pretrained(tmp_path)
    projector = loaded.multi_modal_projector
    for param in projector.parameters():
        assert torch.isfinite(param).all()
    assert 0.005 < projector.linear_1.weight.std().item() < 0.05  # normal(0, initializer_range=0.02)
    assert torch.equal(projector.linear_1.bias, torch.zeros_like(projector.linear_1.bias))
    state = loaded.state_dict()
    for name, value in kept.items():
        assert torch.equal(state[name], value), name
