"""train/'s vision warm-up: its loss against a hand computation, and what the Trainer trains during it."""

import pytest
import torch
from PIL import Image

from mqwen.convert.tiny import build_tiny
from mqwen.train.vision_warmup import VisionWarmup


def _pixels(processor, colours=("red", "blue")):
    return processor(images=[Image.new("RGB", (30, 30), c) for c in colours], return_tensors="pt")["pixel_values"]


def test_loss_equals_a_hand_computed_bag_of_words_cross_entropy():
    model, processor = build_tiny(seed=0)
    warmup = VisionWarmup(model, ignored_ids=[7])
    pixel_values = _pixels(processor)
    labels = torch.tensor([[-100, 5, 9, 5, 7], [-100, -100, 7, -100, -100]])  # row 2: only an ignored id
    loss = warmup.loss(pixel_values, labels)
    hidden = model.vision_tower.hidden_state(pixel_values, model.config.vision_feature_layer)[0, 1:]
    scores = warmup.head(hidden)  # (patches, vocabulary): every patch scores every word
    joint = torch.softmax(scores.flatten(), 0).view_as(scores)  # one distribution over (patch, word) pairs
    log_probs = joint.sum(0).log()  # the image's word distribution: the mixture over its patches
    expected = -(log_probs[5] + log_probs[9]) / 2  # words 5 and 9, each once however often they occur
    torch.testing.assert_close(loss, expected)
    assert warmup.head.out_features == model.config.text_config.vocab_size
    with pytest.raises(ValueError, match="one image per example"):
        warmup.loss(pixel_values[:1], labels)


def test_word_pairs_loss_equals_a_hand_computed_mixture_of_products():
    """Each adjacent pair of caption words (both words, neither ignored) once per occurrence: the first word from
    one softmax over (patch, word), the second from the same patch's own softmax, summed over patches."""
    model, processor = build_tiny(seed=0)
    warmup = VisionWarmup(model, ignored_ids=[7], target="word_pairs")
    pixel_values = _pixels(processor)
    labels = torch.tensor([[-100, 5, 9, 5, 7], [-100, -100, 7, -100, -100]])  # pairs (5, 9), (9, 5); row 2: none
    loss = warmup.loss(pixel_values, labels)
    vocab = model.config.text_config.vocab_size
    hidden = model.vision_tower.hidden_state(pixel_values, model.config.vision_feature_layer)[0, 1:]
    scores = warmup.head(hidden)
    first = torch.softmax(scores[:, :vocab].flatten(), 0).view(-1, vocab)
    second = torch.softmax(scores[:, vocab:], -1)

    def pair(a, b):
        return (first[:, a] * second[:, b]).sum()

    expected = -(pair(5, 9).log() + pair(9, 5).log()) / 2
    torch.testing.assert_close(loss, expected)
    assert warmup.head.out_features == 2 * vocab
    with pytest.raises(ValueError, match="word_pairs"):
        VisionWarmup(model, target="bigrams")


def test_config_needs_a_trainable_vision_tower():
    from mqwen.train import TrainConfig

    with pytest.raises(ValueError, match="train_vision_tower=True"):
        TrainConfig(stage="full", vision_warmup_steps=3)
    with pytest.raises(ValueError, match=">= 0"):
        TrainConfig(stage="full", train_vision_tower=True, vision_warmup_steps=-1)
    with pytest.raises(ValueError, match="'words' or 'word_pairs'"):
        TrainConfig(stage="full", train_vision_tower=True, vision_warmup_steps=3, vision_warmup_target="pairs")
    TrainConfig(stage="full", train_vision_tower=True, vision_warmup_steps=3)


@pytest.mark.parametrize("target", ["words", "word_pairs"])
def test_trainer_trains_only_the_vision_tower_during_the_warmup(tmp_path, target):
    """Steps 1-2: the vision tower moves, nothing else; step 3 on: the caption loss trains everything. The saved
    model has exactly the model's weights (the warm-up head is not among them)."""
    from transformers import TrainerCallback

    from mqwen.train import TrainConfig, train

    model, processor = build_tiny(seed=0)
    snapshots = []

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    data = [(Image.new("RGB", (32, 32), c), f"a {c} image") for c in ("red", "green", "blue", "white")] * 2
    config = TrainConfig(
        model=model,
        data=data,
        output_dir=str(tmp_path),
        stage="full",
        train_vision_tower=True,
        max_steps=4,
        per_device_train_batch_size=2,
        logging_steps=1,
        vision_warmup_steps=2,
        vision_warmup_target=target,
        learning_rate=1e-3,
        warmup_ratio=0.0,
        seed=0,
        training_args={"save_strategy": "no"},
    )
    result = train(config, model=model, processor=processor, callbacks=[Snapshot()])

    def moved(before, after, prefix):
        return any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix))

    after_warmup = snapshots[1]
    assert moved(start, after_warmup, "vision_tower.")
    assert not moved(start, after_warmup, "language_model.") and not moved(
        start, after_warmup, "multi_modal_projector."
    )
    assert moved(after_warmup, snapshots[-1], "language_model.") and moved(
        after_warmup, snapshots[-1], "multi_modal_projector."
    )
    logged = [e for e in result.log_history if "loss" in e]
    assert [bool(e.get("vision_warmup")) for e in logged] == [True, True, False, False]
    from safetensors.torch import load_file

    untouched, _ = build_tiny(seed=0)
    untouched.save_pretrained(tmp_path / "untouched")
    saved = load_file(str(result.model_dir / "model.safetensors"))
    assert set(saved) == set(load_file(str(tmp_path / "untouched" / "model.safetensors")))
