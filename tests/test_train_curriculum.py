"""train/'s short-captions-first curriculum: the order it draws, and that the Trainer uses it."""

import pytest
import torch

from mqwen.train.curriculum import ShortCaptionsFirstSampler


def _words():
    # 30 one-word captions among 90 examples of 3, 5 and 9 words, interleaved.
    return [(1, 3, 5, 9)[i % 4] if i % 3 else 1 for i in range(90)]


def test_first_draws_come_from_the_shortest_captions_then_everything_once():
    words = _words()
    sampler = ShortCaptionsFirstSampler(words, first_examples=20, shortest_fraction=1 / 3, seed=0)
    order = list(sampler)
    assert sorted(order) == list(range(len(words))), "every example exactly once per epoch"
    pool = sorted(range(len(words)), key=lambda i: words[i])[:30]
    assert max(words[i] for i in pool) == 1
    assert all(words[i] == 1 for i in order[:20])
    assert any(words[i] > 1 for i in order[20:30]), "after the curriculum, the rest is mixed"
    assert len(set(order[:20])) == 20


def test_deterministic_per_seed_and_a_plain_shuffle_after_the_first_epoch():
    words = _words()
    first = list(ShortCaptionsFirstSampler(words, 20, 1 / 3, seed=1))
    assert first == list(ShortCaptionsFirstSampler(words, 20, 1 / 3, seed=1))
    assert first != list(ShortCaptionsFirstSampler(words, 20, 1 / 3, seed=2))
    sampler = ShortCaptionsFirstSampler(words, 20, 1 / 3, seed=1)
    sampler.set_epoch(1)
    later = list(sampler)
    assert sorted(later) == list(range(90)) and later != first
    generator = torch.Generator().manual_seed(1 * 1_000_003 + 1)
    assert later == torch.randperm(90, generator=generator).tolist()


def test_no_curriculum_is_a_shuffle_and_the_pool_caps_the_first_draws():
    words = _words()
    plain = list(ShortCaptionsFirstSampler(words, 0, 0.5, seed=3))
    assert plain == torch.randperm(90, generator=torch.Generator().manual_seed(3 * 1_000_003)).tolist()
    capped = ShortCaptionsFirstSampler(words, 1000, 0.1, seed=3)
    assert capped.first_examples == 9
    with pytest.raises(ValueError, match="shortest_fraction"):
        ShortCaptionsFirstSampler(words, 5, 0)


def test_config_validates_curriculum_settings():
    from mqwen.train import TrainConfig

    with pytest.raises(ValueError, match="curriculum_steps"):
        TrainConfig(curriculum_steps=-1)
    with pytest.raises(ValueError, match="curriculum_fraction"):
        TrainConfig(curriculum_fraction=1.5)


def test_trainer_draws_its_first_batches_from_the_shortest_captions(tmp_path):
    """Through build_trainer: the training data loader's first batches hold only one-word captions."""
    from PIL import Image

    from mqwen.common.tiny_model import build_tiny
    from mqwen.train import TrainConfig, build_trainer

    model, processor = build_tiny(seed=0)
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    captions = [("red" if i % 3 == 0 else "a red square on a light background") for i in range(48)]
    config = TrainConfig(
        model=model,
        data=[(image, c) for c in captions],
        output_dir=str(tmp_path),
        stage="full",
        per_device_train_batch_size=4,
        max_steps=6,
        curriculum_steps=3,
        curriculum_fraction=1 / 3,
        seed=0,
        training_args={"save_strategy": "no"},
    )
    trainer = build_trainer(config, model=model, processor=processor)
    assert isinstance(trainer._get_train_sampler(), ShortCaptionsFirstSampler)
    tokenizer = processor.tokenizer
    taught = []
    for batch in trainer.get_train_dataloader():  # what the model is taught: the labelled tokens of each example
        for labels in batch["labels"]:
            taught.append(tokenizer.decode(labels[labels != -100], skip_special_tokens=True).strip())
    assert len(taught) == 48
    assert taught[:12] == ["red"] * 12, "the first 3 steps of 4: one-word captions only"
    assert sorted(taught) == sorted(captions), "each example once per epoch"


def test_growing_pool_brings_middle_lengths_in_before_the_longest():
    """grow=True: early draws are short captions, middle lengths come next, the longest last; still a permutation."""
    words = [3, 7, 11] * 300
    order = list(ShortCaptionsFirstSampler(words, first_examples=600, shortest_fraction=1 / 3, seed=0, grow=True))
    assert sorted(order) == list(range(len(words)))
    lengths = [words[i] for i in order[:600]]
    assert set(lengths[:60]) == {3, 7} and lengths[:60].count(3) > 40  # the pool starts at the shortest third
    first_long = lengths.index(11)
    assert 300 <= first_long <= 330, "the longest captions enter once the pool passes two thirds (draw 300)"
    assert 7 in lengths[:first_long] and lengths[first_long:].count(11) > 50
    again = list(ShortCaptionsFirstSampler(words, 600, 1 / 3, seed=0, grow=True))
    assert again == order
