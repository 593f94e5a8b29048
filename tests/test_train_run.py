"""train/: stages, optimizer groups, training runs, resuming, LoRA saving, skipped images, the CLI."""

import json

import pytest
import torch
from safetensors.torch import load_file

from mqwen.train import TrainConfig, build_trainer, load_trained, save_final_model, train
from mqwen.train.cli import main as cli_main
from mqwen.train.stages import PROJECTOR

CAPTIONS = [
    "a red circle",
    "a blue square",
    "a green triangle",
    "a yellow square and a red circle",
    "two blue circles",
    "a green square",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def pairs(make_image):
    return [(make_image(seed, size=(56, 56)), caption) for seed, caption in enumerate(CAPTIONS)]


def config(tmp_path, model, data, **overrides):
    values = dict(
        model=str(model),
        data=data,
        output_dir=str(tmp_path / "run"),
        max_steps=8,
        per_device_train_batch_size=2,
        logging_steps=1,
        save_steps=1000,
        disable_tqdm=True,
        seed=0,
        warmup_ratio=0.0,
    )
    values.update(overrides)
    return TrainConfig(**values)


def _split(state_dict):
    parts = {"vision_tower": {}, PROJECTOR: {}, "language_model": {}}
    for name, tensor in state_dict.items():
        parts[next(p for p in parts if name.startswith(p))][name] = tensor
    return parts


def _losses(log_history):
    return {entry["step"]: entry["loss"] for entry in log_history if "loss" in entry}


# ----------------------------------------------------------------------------------------------------------
# Stages and the optimizer
# ----------------------------------------------------------------------------------------------------------


def test_align_optimizer_holds_only_the_projector(tmp_path, tiny_dir, pairs):
    trainer = build_trainer(config(tmp_path, tiny_dir, pairs, stage="align", projector_lr=5e-3))
    optimizer = trainer.create_optimizer()
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    projector = {id(p) for p in trainer.model.multi_modal_projector.parameters()}
    assert in_optimizer == projector
    assert {group["lr"] for group in optimizer.param_groups} == {5e-3}
    frozen = [n for n, p in trainer.model.named_parameters() if not p.requires_grad]
    assert frozen and all(not n.startswith(PROJECTOR) for n in frozen)
    assert all(not p.requires_grad for p in trainer.model.vision_tower.parameters())
    assert all(not p.requires_grad for p in trainer.model.language_model.parameters())


def test_full_stage_gives_the_projector_its_own_learning_rate(tmp_path, tiny_dir, pairs):
    trainer = build_trainer(
        config(tmp_path, tiny_dir, pairs, stage="full", learning_rate=1e-5, projector_lr=1e-3, weight_decay=0.1)
    )
    optimizer = trainer.create_optimizer()
    lr_of = {id(p): (group["lr"], group["weight_decay"]) for group in optimizer.param_groups for p in group["params"]}
    model = trainer.model
    assert lr_of[id(model.multi_modal_projector.linear_1.weight)] == (1e-3, 0.1)
    assert lr_of[id(model.multi_modal_projector.linear_1.bias)] == (1e-3, 0.0)
    assert lr_of[id(model.language_model.lm_head.weight)] == (1e-5, 0.1)
    assert lr_of[id(model.language_model.model.norm.weight)] == (1e-5, 0.0)
    assert not any(id(p) in lr_of for p in model.vision_tower.parameters())


def test_vision_tower_gets_its_own_learning_rate(tmp_path, tiny_dir, pairs):
    trainer = build_trainer(
        config(
            tmp_path,
            tiny_dir,
            pairs,
            stage="full",
            learning_rate=1e-5,
            vision_lr=3e-4,
            train_vision_tower=True,
            weight_decay=0.1,
        )
    )
    lr_of = {
        id(p): (group["lr"], group["weight_decay"])
        for group in trainer.create_optimizer().param_groups
        for p in group["params"]
    }
    model = trainer.model
    tower = dict(model.vision_tower.named_parameters())
    trained = {n for n, p in tower.items() if p.requires_grad}
    # Only what captioning runs trains: not the last block (vision_feature_layer=-2) nor the pooled head.
    last = len(model.vision_tower.transformer.resblocks) - 1
    assert trained == {n for n in tower if not n.startswith(("ln_post", "proj", f"transformer.resblocks.{last}."))}
    assert all(lr_of[id(tower[n])][0] == 3e-4 for n in trained)
    assert lr_of[id(model.vision_tower.conv1.weight)] == (3e-4, 0.1)
    assert lr_of[id(model.multi_modal_projector.linear_1.weight)] == (1e-5, 0.1)  # projector_lr unset: the LM's
    assert lr_of[id(model.language_model.lm_head.weight)] == (1e-5, 0.1)
    assert len(lr_of) == sum(p.requires_grad for p in model.parameters())

    lora = build_trainer(config(tmp_path, tiny_dir, pairs, stage="lora", vision_lr=3e-4, train_vision_tower=True))
    name_of = {id(p): n for n, p in lora.model.named_parameters()}
    rates = {name_of[id(p)]: g["lr"] for g in lora.create_optimizer().param_groups for p in g["params"]}
    assert any("vision_tower" in n for n in rates)
    assert all((rate == 3e-4) == ("vision_tower" in n) for n, rate in rates.items())

    with pytest.raises(ValueError, match="vision tower is frozen"):
        config(tmp_path, tiny_dir, pairs, stage="full", vision_lr=3e-4)


def test_lora_wraps_only_language_model_modules(tmp_path, tiny_dir, pairs):
    trainer = build_trainer(config(tmp_path, tiny_dir, pairs, stage="lora", lora_target_modules="q_proj,v_proj"))
    names = [n for n, _ in trainer.model.named_modules()]
    wrapped = sorted({n.rsplit(".lora_A", 1)[0] for n in names if ".lora_A" in n})
    assert wrapped and all("language_model" in n and n.endswith(("q_proj", "v_proj")) for n in wrapped)
    assert len(wrapped) == 2 * 2  # two layers x (q_proj, v_proj)
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert any(PROJECTOR in n for n in trainable) and not any("vision_tower" in n for n in trainable)
    assert all("lora_" in n or PROJECTOR in n for n in trainable)

    with_vision = build_trainer(config(tmp_path, tiny_dir, pairs, stage="lora", train_vision_tower=True))
    assert any("vision_tower" in n and ".lora_A" in n for n, _ in with_vision.model.named_modules())
    with pytest.raises(ValueError, match="No language-model module"):
        build_trainer(config(tmp_path, tiny_dir, pairs, stage="lora", lora_target_modules=("c_fc",)))


@pytest.mark.parametrize("stage", ["full", "lora"])
def test_training_runs_the_lm_head_only_where_a_caption_token_is_scored(tmp_path, tiny_dir, pairs, stage):
    trainer = build_trainer(config(tmp_path, tiny_dir, pairs, stage=stage, per_device_train_batch_size=3))
    batch = next(iter(trainer.get_train_dataloader()))
    batch = {k: v for k, v in batch.items() if k != "skipped"}
    lm_head = next(m for n, m in trainer.model.named_modules() if n.endswith("lm_head"))
    positions = []
    handle = lm_head.register_forward_hook(lambda module, args, out: positions.append(out.shape[1]))
    trainer.model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
        full = trainer.model(**batch).loss
    handle.remove()
    scored = (batch["labels"][:, 1:] != -100).any(0).sum().item()
    assert positions == [scored, batch["input_ids"].shape[1]]
    assert scored < batch["input_ids"].shape[1] / 2  # most of a caption sample is image and prompt
    torch.testing.assert_close(loss, full)
    # evaluation keeps every position's logits (a compute_metrics may read them)
    trainer.model.eval()
    with torch.no_grad():
        _, outputs = trainer.compute_loss(trainer.model, dict(batch), return_outputs=True)
    assert outputs.logits.shape[1] == batch["input_ids"].shape[1]


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def test_align_learns_and_leaves_vision_tower_and_language_model_bit_identical(tmp_path, tiny_dir, pairs):
    before = _split(load_file(tiny_dir / "model.safetensors"))
    result = train(config(tmp_path, tiny_dir, pairs, stage="align", max_steps=24, learning_rate=1e-2))
    losses = _losses(result.log_history)
    assert len(losses) == 24
    first, last = sum(list(losses.values())[:3]) / 3, sum(list(losses.values())[-3:]) / 3
    assert last < first
    after = _split(load_file(result.model_dir / "model.safetensors"))
    for part in ("vision_tower", "language_model"):
        assert before[part].keys() == after[part].keys()
        for name in before[part]:
            assert torch.equal(before[part][name], after[part][name]), name
    assert any(not torch.equal(before[PROJECTOR][n], after[PROJECTOR][n]) for n in before[PROJECTOR])
    # The final folder is a complete Hub-format model with its processor.
    model, processor = load_trained(result.model_dir)
    assert processor.image_seq_length == model.config.image_seq_length
    assert (result.model_dir / "modeling_mqwen.py").is_file()


def test_full_stage_reduces_the_loss(tmp_path, tiny_dir, pairs):
    result = train(
        config(
            tmp_path,
            tiny_dir,
            pairs,
            stage="full",
            max_steps=30,
            learning_rate=3e-3,
            gradient_accumulation_steps=2,
            gradient_checkpointing=True,
        ),
        save=False,
    )
    losses = list(_losses(result.log_history).values())
    assert len(losses) == 30
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0, losses  # more than 1 nat lower


class _Interrupt(Exception):
    pass


def test_resume_after_a_kill_continues_at_the_same_step_with_the_same_data(tmp_path, tiny_dir, pairs):
    # 6 examples, batch 2: 3 steps per epoch; the checkpoint at step 4 is mid-epoch.
    def run(output, resume=None, stop_at=None):
        from transformers import TrainerCallback

        class Kill(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                if state.global_step == stop_at:
                    raise _Interrupt  # nothing after the checkpoint runs, as if the process died

        cfg = config(
            tmp_path,
            tiny_dir,
            pairs,
            stage="full",
            output_dir=str(tmp_path / output),
            max_steps=8,
            save_steps=4,
            learning_rate=1e-3,
            warmup_ratio=0.1,
        )
        trainer = build_trainer(cfg, callbacks=[Kill()] if stop_at else None)
        # Record the examples of every batch the model trains on (the loader prefetches one batch ahead,
        # so the collator alone would over-count).
        seen, collate, compute_loss = [], trainer.data_collator, trainer.compute_loss

        def collate_with_indices(examples):
            return {**collate(examples), "_indices": [example["index"] for example in examples]}

        def recording_loss(model, inputs, *args, **kwargs):
            inputs = dict(inputs)
            seen.append(inputs.pop("_indices"))
            return compute_loss(model, inputs, *args, **kwargs)

        trainer.data_collator, trainer.compute_loss = collate_with_indices, recording_loss
        try:
            trainer.train(resume_from_checkpoint=resume)
        except _Interrupt:
            pass
        return trainer, seen

    reference, reference_batches = run("reference")
    killed, killed_batches = run("killed", stop_at=4)
    assert killed.state.global_step == 4 and len(killed_batches) == 4
    torch.manual_seed(1234)  # a new process would start from other random states
    resumed, resumed_batches = run("killed", resume=str(tmp_path / "killed" / "checkpoint-4"))
    assert resumed.state.global_step == 8
    assert killed_batches + resumed_batches == reference_batches
    reference_losses, resumed_losses = _losses(reference.state.log_history), _losses(resumed.state.log_history)
    assert sorted(resumed_losses) == list(range(1, 9))
    for step in range(1, 9):
        assert resumed_losses[step] == pytest.approx(reference_losses[step], rel=1e-4, abs=1e-5), step
    for (name, a), b in zip(reference.model.named_parameters(), resumed.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_lora_merged_and_adapter_give_the_same_logits(tmp_path, tiny_dir, pairs):
    cfg = config(tmp_path, tiny_dir, pairs, stage="lora", max_steps=6, learning_rate=5e-3)
    trainer = build_trainer(cfg)
    trainer.train()
    adapter_dir = save_final_model(trainer, TrainConfig(**{**vars(cfg), "keep_adapter": True}), tmp_path / "adapter")
    merged_dir = save_final_model(trainer, cfg, tmp_path / "merged")
    assert (adapter_dir / "adapter_config.json").is_file() and not (merged_dir / "adapter_config.json").exists()

    base = load_file(tiny_dir / "model.safetensors")
    merged_weights = load_file(merged_dir / "model.safetensors")
    assert merged_weights.keys() == base.keys()  # a plain MQwen checkpoint, no LoRA names
    changed = {n for n in base if not torch.equal(base[n], merged_weights[n])}
    assert any("q_proj" in n for n in changed) and any(PROJECTOR in n for n in changed)
    assert not any("vision_tower" in n for n in changed)

    adapter_model, processor = load_trained(adapter_dir)
    merged_model, _ = load_trained(merged_dir)
    inputs = processor(images=[pairs[0][0], pairs[1][0]], text=["Describe this image.", "Caption it, please."])
    with torch.no_grad():
        a = adapter_model(**inputs).logits
        b = merged_model(**inputs).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_cli_run_skips_and_counts_missing_and_corrupt_images(tmp_path, tiny_dir, make_image):
    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for seed, caption in enumerate(CAPTIONS):
        make_image(seed, size=(56, 56)).save(folder / f"{seed}.png")
        rows.append({"image": f"images/{seed}.png", "caption": caption})
    (folder / "bad.png").write_bytes(b"not an image at all")
    rows[2:2] = [{"image": "images/missing.png", "caption": "x"}, {"image": "images/bad.png", "caption": "y"}]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows))
    out = tmp_path / "cli"
    assert (
        cli_main(
            [
                "--model",
                str(tiny_dir),
                "--data",
                str(data),
                "--output-dir",
                str(out),
                "--stage",
                "align",
                "--max-steps",
                "8",
                "--per-device-train-batch-size",
                "2",
                "--save-steps",
                "4",
                "--disable-tqdm",
                "--logging-steps",
                "2",
            ]
        )
        == 0
    )
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["skipped_images"]["missing"] == 1 and summary["skipped_images"]["corrupt"] == 1
    assert summary["metrics"]["train_loss"] > 0
    assert (out / "final" / "model.safetensors").is_file() and (out / "checkpoint-8").is_dir()
