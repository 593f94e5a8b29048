"""train/ at the precision of the run: a bf16 checkpoint keeps its frozen parts in bf16 and trains float32 master
weights; checkpoints hold what was trained and resume exactly; OUTPUT_DIR/final comes out in the source's dtype;
align's projector.safetensors builds the fine-tuning model; memory is stated before the first step."""

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_convert_build import make_hf_clip, make_llm
from test_train_run import _losses
from test_train_run import config as run_config

from mqwen.common.tiny_model import build_tiny, save_checkpoint
from mqwen.convert.cli import main as convert_main
from mqwen.train import build_trainer, load_trained, train
from mqwen.train.memory_report import memory_figures
from mqwen.train.stages import PROJECTOR
from mqwen.train.trainable_checkpoints import TRAINABLE_WEIGHTS

pytestmark = pytest.mark.usefixtures("one_thread")

# The captions the tolerances below were measured on.
CAPTIONS = ["a red circle", "a blue square", "a green triangle", "two blue circles", "a green square", "a cat"]


# Measured on this code (2-core AMD EPYC VM, torch 2.14.1, 2026-12-08): the largest difference between the losses
# of 8 steps with frozen weights in bf16 (float32 projector / adapters) and with everything in float32 (today's
# loading of the same bf16 checkpoint), on losses near 6.1 nats. transformers 5.25: align 1.2e-4 (1.5e-4 with --bf16
# autocast), lora 8.1e-4 (1.0e-3 with --bf16); 4.57 (which logs losses rounded to 1e-4): align 2e-4 (2e-4), lora
# 2.6e-3 (2.6e-3). The tolerance is about twice the worst, and an order below what the losses fall over these
# steps (align 0.05, lora 0.22): a cast that changes the model (weights re-initialised or truncated when cast,
# the wrong part frozen) fails it; the bf16-vs-float32 master weights difference at 8 steps is within it.
MIXED_PRECISION_TOLERANCE = 5e-3


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    """The tiny MQwen saved in bf16, as a real bf16 checkpoint would be."""
    model, processor = build_tiny(seed=0)
    return save_checkpoint(model.to(torch.bfloat16), processor, tmp_path_factory.mktemp("tiny-bf16"))


@pytest.fixture
def pairs(make_image):
    return [(make_image(seed, size=(56, 56)), caption) for seed, caption in enumerate(CAPTIONS)]


def config(tmp_path, model, data, **overrides):
    """test_train_run's settings, 4 steps unless told."""
    return run_config(tmp_path, model, data, **{"max_steps": 4, **overrides})


def _dtypes(model, trainable):
    return {str(p.dtype) for p in model.parameters() if p.requires_grad == trainable}


def _file_dtypes(folder):
    """{tensor name: safetensors dtype} of every *.safetensors file of a folder."""
    found = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(path, "pt") as handle:
            found.update({name: handle.get_slice(name).get_dtype() for name in handle.keys()})
    return found


def _tensors(path):
    with safe_open(path, "pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


# ----------------------------------------------------------------------------------------------------------
# Dtypes in memory and in the final folder
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["align", "lora", "full"])
def test_bf16_checkpoint_trains_float32_weights_beside_bf16_frozen_ones_and_saves_bf16(
    tmp_path, bf16_dir, pairs, stage
):
    result = train(config(tmp_path, bf16_dir, pairs, stage=stage, learning_rate=5e-3))
    model = result.trainer.model
    assert _dtypes(model, trainable=True) == {"torch.float32"}
    assert _dtypes(model, trainable=False) == {"torch.bfloat16"}
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any("vision_tower" in n for n in frozen)  # the frozen tower in every stage
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}

    final = _file_dtypes(result.model_dir)
    assert final and set(final.values()) == {"BF16"}
    assert json.loads((result.model_dir / "config.json").read_text())["dtype"] == "bfloat16"
    base = _tensors(bf16_dir / "model.safetensors")
    saved = _tensors(result.model_dir / "model.safetensors")
    assert saved.keys() == base.keys()
    trained = {n for n in base if not torch.equal(base[n], saved[n])}
    assert any(n.startswith(PROJECTOR) for n in trained) and not any(n.startswith("vision_tower") for n in trained)
    if stage != "lora":  # merged LoRA weights are bf16 sums, not a parameter of the model in memory
        params = dict(model.named_parameters())
        for name in trained:
            assert torch.equal(saved[name], params[name].detach().bfloat16()), name


def test_final_dtype_and_shards_are_as_asked(tmp_path, bf16_dir, pairs):
    result = train(config(tmp_path, bf16_dir, pairs, stage="align", final_dtype="fp32", max_shard_size="100KB"))
    assert len(list(result.model_dir.glob("model-*.safetensors"))) >= 2
    assert (result.model_dir / "model.safetensors.index.json").is_file()
    assert set(_file_dtypes(result.model_dir).values()) == {"F32"}
    assert json.loads((result.model_dir / "config.json").read_text())["dtype"] == "float32"
    assert set(_file_dtypes(result.projector_file.parent).values()) == {"F32"}  # projector.safetensors too


def test_model_dtype_and_pure_bf16(tmp_path, bf16_dir, pairs):
    upcast = build_trainer(config(tmp_path, bf16_dir, pairs, stage="align", model_dtype="fp32"))
    assert _dtypes(upcast.model, trainable=False) == _dtypes(upcast.model, trainable=True) == {"torch.float32"}
    assert upcast.dtypes.final == torch.bfloat16  # still the base checkpoint's

    pure = train(config(tmp_path, bf16_dir, pairs, stage="lora", trainable_dtype="bf16"))
    assert {str(p.dtype) for p in pure.trainer.model.parameters()} == {"torch.bfloat16"}
    assert sum(p.requires_grad for p in pure.trainer.model.parameters()) > 0
    assert set(_file_dtypes(pure.model_dir).values()) == {"BF16"}

    with pytest.raises(ValueError, match="trainable_dtype must be one of fp32, bf16"):
        config(tmp_path, bf16_dir, pairs, trainable_dtype="fp16")


def test_a_lora_adapter_folder_comes_out_in_the_source_dtype_and_loads(tmp_path, bf16_dir, pairs):
    result = train(config(tmp_path, bf16_dir, pairs, stage="lora", keep_adapter=True, learning_rate=5e-3))
    folder = result.model_dir
    assert (folder / "adapter_config.json").is_file() and not (folder / "config.json").exists()
    assert set(_file_dtypes(folder).values()) == {"BF16"}
    model, processor = load_trained(folder)
    inputs = processor(images=[pairs[0][0]], text=["Describe this image."])
    trained = result.trainer.model.eval()
    # Measured: 2.5e-3 apart (the adapters rounded to bf16), against 0.57 between the base and the trained model
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits.float(), trained(**inputs).logits.float(), atol=0.02, rtol=0)


def test_a_float32_checkpoint_trains_as_before(tmp_path, tiny_dir, pairs):
    trainer = build_trainer(config(tmp_path, tiny_dir, pairs, stage="lora"))
    assert {str(p.dtype) for p in trainer.model.parameters()} == {"torch.float32"}
    assert trainer.dtypes.final == torch.float32


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32-compute", "bf16-autocast"])
@pytest.mark.parametrize("stage", ["align", "lora"])
def test_mixed_precision_losses_equal_float32_losses_within_the_measured_tolerance(
    tmp_path, bf16_dir, pairs, stage, autocast
):
    settings = dict(stage=stage, max_steps=8, learning_rate=1e-2)
    today = train(config(tmp_path / "fp32", bf16_dir, pairs, model_dtype="fp32", **settings), save=False)
    mixed = train(config(tmp_path / "mixed", bf16_dir, pairs, bf16=autocast, **settings), save=False)
    a, b = _losses(today.log_history), _losses(mixed.log_history)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    worst = max(abs(a[step] - b[step]) for step in a)
    assert worst <= MIXED_PRECISION_TOLERANCE, (worst, a, b)
    assert a[8] < a[1] and b[8] < b[1]  # both learn


# ----------------------------------------------------------------------------------------------------------
# Checkpoints that hold what was trained, and resuming from them
# ----------------------------------------------------------------------------------------------------------


class _Interrupt(Exception):
    pass


def _run(tmp_path, model_dir, pairs, output, stage, resume=None, stop_at=None):
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == stop_at:
                raise _Interrupt  # nothing after the checkpoint runs, as if the process died

    cfg = config(
        tmp_path,
        model_dir,
        pairs,
        stage=stage,
        output_dir=str(tmp_path / output),
        max_steps=8,
        save_steps=4,
        learning_rate=5e-3,
        warmup_ratio=0.1,
    )
    trainer = build_trainer(cfg, callbacks=[Kill()] if stop_at else None)
    try:
        trainer.train(resume_from_checkpoint=resume)
    except _Interrupt:
        pass
    return trainer


@pytest.mark.parametrize("stage", ["align", "lora"])
def test_checkpoints_hold_only_trained_tensors_and_a_killed_run_resumes_exactly(tmp_path, bf16_dir, pairs, stage):
    reference = _run(tmp_path, bf16_dir, pairs, "reference", stage)
    killed = _run(tmp_path, bf16_dir, pairs, "killed", stage, stop_at=4)
    assert killed.state.global_step == 4
    checkpoint = tmp_path / "killed" / "checkpoint-4"

    trained = {n for n, p in killed.model.named_parameters() if p.requires_grad}
    weights = {p.name: _tensors(p) for p in checkpoint.glob("*.safetensors")}
    assert not (checkpoint / "model.safetensors").exists()
    (only,) = weights.values()  # one weights file, of the trained tensors alone
    if stage == "align":
        assert list(weights) == [TRAINABLE_WEIGHTS]
        assert set(only) == trained and len(only) == 4  # the projector's two weights and two biases
        assert {t.dtype for t in only.values()} == {torch.float32}
    else:  # peft's adapter file: LoRA's A and B of every wrapped layer, and the projector's trained copy
        assert list(weights) == ["adapter_model.safetensors"]
        assert all(".lora_A." in n or ".lora_B." in n or PROJECTOR in n for n in only)
        assert len(only) == len(trained)
    model_bytes = sum(p.numel() * p.element_size() for p in killed.model.parameters())
    assert sum(t.numel() * t.element_size() for t in only.values()) < 0.5 * model_bytes

    torch.manual_seed(1234)  # a new process would start from other random states
    resumed = _run(tmp_path, bf16_dir, pairs, "killed", stage, resume=str(checkpoint))
    assert resumed.state.global_step == 8
    expected, got = _losses(reference.state.log_history), _losses(resumed.state.log_history)
    assert sorted(got) == list(range(1, 9))
    assert [got[step] for step in range(1, 9)] == [expected[step] for step in range(1, 9)]
    for (name, a), b in zip(reference.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name


def test_resuming_a_checkpoint_of_another_stage_is_refused(tmp_path, bf16_dir, pairs):
    _run(tmp_path, bf16_dir, pairs, "align", "align", stop_at=4)
    with pytest.raises(ValueError, match="holds other parameters than this run trains"):
        _run(tmp_path, bf16_dir, pairs, "lora", "lora", resume=str(tmp_path / "align" / "checkpoint-4"))


# ----------------------------------------------------------------------------------------------------------
# LLaVA's two stages: align, then build the fine-tuning model from a fresh base with the projector
# ----------------------------------------------------------------------------------------------------------


def test_align_projector_file_builds_the_fine_tuning_model(tmp_path, pairs):
    make_llm(tmp_path / "qwen", rows=448)
    make_hf_clip(tmp_path / "clip")
    build = ["build", "--llm", str(tmp_path / "qwen"), "--vision", str(tmp_path / "clip"), "--dtype", "bf16"]
    assert convert_main([*build, str(tmp_path / "base")]) == 0

    result = train(config(tmp_path, tmp_path / "base", pairs, stage="align", learning_rate=1e-2))
    assert result.projector_file == tmp_path / "run" / "projector.safetensors"
    projector = _tensors(result.projector_file)
    final = _tensors(result.model_dir / "model.safetensors")
    assert set(projector) == {n for n in final if n.startswith(PROJECTOR)}
    for name, tensor in projector.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, final[name]), name

    assert convert_main([*build, "--projector", str(result.projector_file), str(tmp_path / "stage2")]) == 0
    base = _tensors(tmp_path / "base" / "model.safetensors")
    stage2 = _tensors(tmp_path / "stage2" / "model.safetensors")
    assert stage2.keys() == base.keys()
    for name in base:
        expected = projector[name] if name.startswith(PROJECTOR) else base[name]
        assert torch.equal(stage2[name], expected), name
    assert any(not torch.equal(base[n], projector[n]) for n in projector)  # the projector did train


# ----------------------------------------------------------------------------------------------------------
# Memory stated before the first step
# ----------------------------------------------------------------------------------------------------------


def test_memory_of_weights_and_optimizer_is_logged_before_the_first_step(tmp_path, bf16_dir, pairs, caplog):
    trainer = build_trainer(config(tmp_path, bf16_dir, pairs, stage="align", max_steps=1))
    params = list(trainer.model.parameters())
    frozen = sum(p.numel() for p in params if not p.requires_grad)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    figures = memory_figures(trainer.model, trainer.create_optimizer())
    assert figures["frozen"] == {"bfloat16": 2 * frozen}
    assert figures["trainable"] == {"float32": 4 * trainable}
    assert figures["optimizer"] == 2 * 4 * trainable  # AdamW: exp_avg and exp_avg_sq, in float32

    with caplog.at_level(logging.INFO, logger="mqwen.train.memory_report"):
        trainer.train()
    (message,) = [r.getMessage() for r in caplog.records if r.name == "mqwen.train.memory_report"]
    assert f"trainable weights {4 * trainable / 1e6:.3f} MB" in message
    assert f"optimizer states {8 * trainable / 1e6:.3f} MB" in message
    # after the step, the optimizer's real state has exactly the size announced
    assert memory_figures(trainer.model, trainer.optimizer)["optimizer"] == figures["optimizer"]
