"""train/'s vision warm-up: its loss against a hand computation, and what the Trainer trains during it."""

import pytest
import torch
from PIL import Image

from mqwen.common.tiny_model import build_tiny
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


def _vision_training_config(model, output_dir, copies=1, **overrides):
    """A `full`-stage TrainConfig with a trainable vision tower on four one-colour images (`copies` times)."""
    from mqwen.train import TrainConfig

    data = [(Image.new("RGB", (32, 32), c), f"a {c} image") for c in ("red", "green", "blue", "white")] * copies
    settings = dict(
        model=model,
        data=data,
        output_dir=str(output_dir),
        stage="full",
        train_vision_tower=True,
        learning_rate=1e-3,
        warmup_ratio=0.0,
        seed=0,
        training_args={"save_strategy": "no", "report_to": []},
    )
    return TrainConfig(**{**settings, **overrides})


@pytest.mark.parametrize("target", ["words", "word_pairs"])
def test_trainer_trains_only_the_vision_tower_during_the_warmup(tmp_path, target):
    """Steps 1-2: the vision tower moves, nothing else; step 3 on: the caption loss trains everything. The saved
    model has exactly the model's weights (the warm-up head is not among them)."""
    from transformers import TrainerCallback

    from mqwen.train import train

    model, processor = build_tiny(seed=0)
    snapshots = []

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config = _vision_training_config(
        model,
        tmp_path,
        copies=2,
        max_steps=4,
        per_device_train_batch_size=2,
        logging_steps=1,
        vision_warmup_steps=2,
        vision_warmup_target=target,
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


def _aux_trainer(tmp_path, weight):
    from mqwen.train import build_trainer

    model, processor = build_tiny(seed=0)
    config = _vision_training_config(
        model,
        tmp_path,
        max_steps=2,
        per_device_train_batch_size=4,
        vision_warmup_target="word_pairs",
        vision_aux_weight=weight,
    )
    trainer = build_trainer(config, model=model, processor=processor)
    trainer.create_optimizer()
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    return trainer, model, {k: v for k, v in batch.items() if k != "skipped"}


def _loss_and_vision_grads(trainer, model, batch, loss_fn):
    model.zero_grad(set_to_none=True)
    trainer.vision_warmup.head.zero_grad(set_to_none=True)
    loss = loss_fn(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.vision_tower.named_parameters() if p.grad is not None}
    return loss.detach(), grads, trainer.vision_warmup.head.weight.grad.clone()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_aux_loss_is_the_caption_loss_plus_the_weighted_warmup_loss_of_a_second_vision_pass(tmp_path, checkpointing):
    """With vision_aux_weight, the loss (and every gradient it gives the vision tower and the head) equals the
    caption loss plus weight x VisionWarmup.loss computed on its own, by a second run of the vision tower. With
    reentrant gradient checkpointing the caption pass's features carry no graph, and the fallback must agree."""
    from mqwen.train.trainer import CaptionTrainer

    trainer, model, batch = _aux_trainer(tmp_path, 0.5)
    if checkpointing:
        reentrant = {"use_reentrant": True}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=reentrant)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=reentrant)
        model.enable_input_require_grads()
    loss, grads, head_grad = _loss_and_vision_grads(trainer, model, batch, lambda b: trainer.compute_loss(model, b))

    def reference(b):
        caption = super(CaptionTrainer, trainer).compute_loss(model, dict(b))
        return caption + 0.5 * trainer.vision_warmup.loss(b["pixel_values"], b["labels"])

    expected, expected_grads, expected_head_grad = _loss_and_vision_grads(trainer, model, batch, reference)
    torch.testing.assert_close(loss, expected)
    assert grads.keys() == expected_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], msg=name)
    torch.testing.assert_close(head_grad, expected_head_grad)
    assert head_grad.abs().sum() > 0
    assert trainer._vision_aux_count == 1  # one per caption pass; cleared by log


def test_aux_loss_is_off_at_weight_zero_and_in_evaluation(tmp_path):
    from mqwen.train.trainer import CaptionTrainer

    trainer, model, batch = _aux_trainer(tmp_path, 0.5)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            trainer.compute_loss(model, dict(batch)),
            super(CaptionTrainer, trainer).compute_loss(model, dict(batch)),
        )
    assert trainer._vision_aux_count == 0


def test_logged_loss_stays_the_caption_loss_and_the_aux_loss_is_logged_beside_it(tmp_path):
    """`loss` in the log is the caption loss alone (the plateau-exit step of the demo reads it), the auxiliary
    loss, averaged over the steps since the last log, is `vision_aux_loss`."""
    trainer, _, _ = _aux_trainer(tmp_path, 0.25)
    trainer._vision_aux_sum, trainer._vision_aux_count = torch.tensor(2.0 + 4.0), 2
    trainer.log({"loss": 3.0})
    logged = trainer.state.log_history[-1]
    assert logged["loss"] == pytest.approx(3.0 - 0.25 * 3.0) and logged["vision_aux_loss"] == pytest.approx(3.0)
    assert trainer._vision_aux_count == 0 and float(trainer._vision_aux_sum) == 0.0


def test_aux_head_keeps_training_after_the_warmup(tmp_path):
    """A warm-up of one step, then caption steps: with vision_aux_weight the head still moves, without it not (its
    gradients are cleared after each step, though the Trainer's `model.zero_grad()` does not reach it)."""
    from transformers import TrainerCallback

    from mqwen.train import build_trainer

    class HeadSnapshots(TrainerCallback):
        def __init__(self):
            self.trainer, self.heads = None, []

        def on_step_end(self, args, state, control, **kwargs):
            self.heads.append(self.trainer.vision_warmup.head.weight.detach().clone())

    heads = {}
    for weight in (0.0, 0.5):
        model, processor = build_tiny(seed=0)
        config = _vision_training_config(
            model,
            tmp_path / str(weight),
            max_steps=3,
            per_device_train_batch_size=2,
            logging_steps=1,
            vision_warmup_steps=1,
            vision_warmup_target="word_pairs",
            vision_aux_weight=weight,
        )
        snapshots = HeadSnapshots()
        snapshots.trainer = trainer = build_trainer(config, model=model, processor=processor, callbacks=[snapshots])
        trainer.train()
        heads[weight] = snapshots.heads
        logged = [e for e in trainer.state.log_history if "loss" in e]
        assert [("vision_aux_loss" in e) for e in logged] == [False, weight > 0, weight > 0]
    assert torch.equal(heads[0.0][0], heads[0.0][-1])  # the warm-up's head, untouched by caption steps
    assert not torch.equal(heads[0.5][0], heads[0.5][-1])


def test_config_checks_the_aux_weight():
    from mqwen.train import TrainConfig

    with pytest.raises(ValueError, match="train_vision_tower=True"):
        TrainConfig(stage="full", vision_aux_weight=0.1)
    with pytest.raises(ValueError, match=">= 0"):
        TrainConfig(stage="full", train_vision_tower=True, vision_aux_weight=-0.1)


def test_aux_loss_is_scaled_for_gradient_accumulation_like_the_caption_loss(tmp_path):
    """One SGD step on four examples, as one batch of 4 or as 2 accumulated batches of 2: the same weights. SGD,
    not Adam, so that an auxiliary gradient off by the accumulation factor would show in the step."""
    from mqwen.train import build_trainer

    weights = []
    for batch, accumulation in ((4, 1), (2, 2)):
        model, processor = build_tiny(seed=0)
        config = _vision_training_config(
            model,
            tmp_path / f"ga{accumulation}",
            max_steps=1,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            vision_warmup_target="word_pairs",
            vision_aux_weight=1.0,
            learning_rate=0.5,
            training_args={"save_strategy": "no", "report_to": [], "optim": "sgd"},
        )
        build_trainer(config, model=model, processor=processor).train()
        weights.append({k: v.detach().clone() for k, v in model.vision_tower.state_dict().items()})
    untouched, _ = build_tiny(seed=0)
    start = untouched.vision_tower.state_dict()
    assert any(not torch.equal(weights[0][k], start[k]) for k in start)
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], msg=name)
