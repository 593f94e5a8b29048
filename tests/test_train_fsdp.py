"""train/ under FSDP2: 2 CPU processes (gloo, torchrun) give the model one process gives for the same global batch.

Each run is a subprocess: `python WORKER` (one process) or `torchrun --nproc_per_node=2 WORKER` (FSDP), or the
README's command lines (`torchrun ... -m mqwen.train --fsdp`, `accelerate launch --config_file
train/configs/fsdp_cpu.yaml -m mqwen.train`); 4 examples per optimizer step either way (2 per process, or 4 in
one), 4 steps, a checkpoint every 2.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mqwen import MQwenForCausalLM, MQwenProcessor
from mqwen.train import load_trained

GLOBAL_BATCH = 4
STEPS = 4
CONFIGS = Path(__file__).resolve().parents[1] / "train" / "configs"
FSDP_CPU_CONFIG = CONFIGS / "fsdp_cpu.yaml"
# The WORKER's settings as command-line flags.
COMMON_FLAGS = dict(
    max_steps=STEPS,
    save_steps=2,
    logging_steps=1,
    learning_rate=1e-3,
    warmup_ratio=0.0,
    seed=0,
    disable_tqdm=True,
    max_shard_size="20KB",
)

# `python WORKER MODEL DATA OUT STAGE SETTINGS_JSON`: one training run through the public `train()`. With
# STOP_AT_STEP set, every process dies (no cleanup, like a killed job) once that step ends.
WORKER = (
    textwrap.dedent(
        """
    import json, os, sys
    from transformers import TrainerCallback
    from mqwen.train import TrainConfig, train

    model_dir, data, out, stage, settings = sys.argv[1:6]
    world = int(os.environ.get("WORLD_SIZE", "1"))

    class Die(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == int(os.environ["STOP_AT_STEP"]):
                os._exit(17)

    settings = json.loads(settings)
    config = TrainConfig(model=model_dir, data=data, output_dir=out, stage=stage,
                         fsdp=world > 1 and not settings.get("deepspeed"),
                         per_device_train_batch_size=GLOBAL_BATCH // world, max_steps=STEPS, save_steps=2,
                         save_total_limit=None, logging_steps=1, learning_rate=1e-3, warmup_ratio=0.0, seed=0,
                         disable_tqdm=True, max_shard_size="20KB", **settings)
    train(config, callbacks=[Die()] if "STOP_AT_STEP" in os.environ else None)
    """
    )
    .replace("GLOBAL_BATCH", str(GLOBAL_BATCH))
    .replace("STEPS", str(STEPS))
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_dir):
    """(run, tmp): `run(name, stage, processes, **settings)` trains into tmp/name and returns that folder."""
    from tests.conftest import random_image

    tmp = tmp_path_factory.mktemp("fsdp")
    (tmp / "images").mkdir()
    rows = []
    for seed in range(16):
        random_image(seed, size=(56, 56)).save(tmp / "images" / f"{seed}.png")
        rows.append(
            {"image": f"images/{seed}.png", "caption": f"shape number {seed} is {'red' if seed % 2 else 'blue'}"}
        )
    data = tmp / "train.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows))
    worker = tmp / "worker.py"
    worker.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    # DeepSpeed compiles its CPU communication op on first use; a cache per environment keeps each venv's build
    # (the build depends on where deepspeed is installed, so a shared cache would be rebuilt on every switch).
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))

    def run(name, stage, processes, launcher="worker", stop_at_step=None, expect_failure=False, **settings):
        """launcher: "worker" (WORKER, under torchrun when processes > 1), or the command line as the README
        gives it: "torchrun" (`torchrun -m mqwen.train --fsdp`) or "accelerate" (fsdp_cpu.yaml)."""
        out = tmp / name
        if launcher == "worker":
            script = [str(worker), str(tiny_dir), str(data), str(out), stage, json.dumps(settings)]
        else:
            flags = dict(
                COMMON_FLAGS,
                model=tiny_dir,
                data=data,
                output_dir=out,
                stage=stage,
                per_device_train_batch_size=GLOBAL_BATCH // processes,
                **settings,
            )
            script = ["-m", "mqwen.train"] + [
                part
                for key, value in flags.items()
                for part in (["--" + key.replace("_", "-")] + ([] if value is True else [str(value)]))
            ]
        if launcher == "accelerate":
            command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CPU_CONFIG)]
        elif processes > 1:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        else:
            command = [sys.executable]
        if launcher == "torchrun":
            script.append("--fsdp")
        run_env = dict(env, STOP_AT_STEP=str(stop_at_step)) if stop_at_step else env
        completed = subprocess.run(command + script, env=run_env, capture_output=True, text=True, timeout=900)
        if expect_failure:
            assert completed.returncode != 0
        else:
            assert completed.returncode == 0, completed.stderr[-4000:]
        return out

    return run, tmp


def _weights(folder):
    """Every tensor of a saved model, from one file or from sharded safetensors (index + shards)."""
    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    weights = {}
    for name in files:
        weights.update(load_file(folder / name))
    return weights


def _assert_same_weights(got, want, atol=1e-6):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=1e-5, msg=name)


def _captions(model_dir, images):
    model, processor = load_trained(model_dir)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    inputs = processor(images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False).tolist()


@pytest.fixture(scope="module")
def full_runs(setup):
    """The full stage, vision tower trained too: one process, and FSDP over two."""
    run, _ = setup
    settings = dict(stage="full", train_vision_tower=True)
    return run("full-1", processes=1, **settings), run("full-fsdp", processes=2, **settings)


def test_fsdp_full_stage_equals_one_process(full_runs, tiny_dir, make_image):
    single, fsdp = full_runs
    want, got = _weights(single / "final"), _weights(fsdp / "final")
    _assert_same_weights(got, want)
    initial = load_file(tiny_dir / "model.safetensors")
    for part in ("vision_tower.conv1.weight", "multi_modal_projector.linear_1.weight", "language_model.lm_head.weight"):
        assert not torch.allclose(got[part], initial[part], atol=1e-5), f"{part} did not train"
    images = [make_image(100 + i, size=(56, 56)) for i in range(2)]
    assert _captions(fsdp / "final", images) == _captions(single / "final", images)

    # Checkpoints are sharded: one piece of the model and of the optimizer per process.
    checkpoint = fsdp / "checkpoint-2"
    assert sorted(p.name for p in (checkpoint / "pytorch_model_fsdp_0").glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    assert sorted(p.name for p in (checkpoint / "optimizer_0").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


def test_fsdp_final_model_is_ordinary_sharded_safetensors(full_runs):
    _, fsdp = full_runs
    final = fsdp / "final"
    shards = sorted(p.name for p in final.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    # Written by one process, under the model's own class (not FSDP's subclass), with no torch files copied.
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == ["MQwenForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_mqwen.MQwenForCausalLM"
    assert sorted(p.name for p in final.glob("*.py")) == [
        "configuration_mqwen.py",
        "modeling_mqwen.py",
        "processing_mqwen.py",
    ]
    assert not list(fsdp.glob(".final*"))
    model = MQwenForCausalLM.from_pretrained(final)  # one process, no torch.distributed
    state = model.state_dict()
    weights = _weights(final)
    assert weights.keys() == state.keys()
    assert all(torch.equal(state[name], weights[name]) for name in weights)
    MQwenProcessor.from_pretrained(final)


def test_fsdp_run_killed_midway_resumes_to_the_same_model(setup, full_runs):
    run, _ = setup
    _, uninterrupted = full_runs
    settings = dict(stage="full", train_vision_tower=True)
    killed = run("full-fsdp-killed", processes=2, stop_at_step=3, expect_failure=True, **settings)
    assert (killed / "checkpoint-2").is_dir() and not (killed / "final").exists()
    run("full-fsdp-killed", processes=2, resume_from_checkpoint="last", **settings)
    state = json.loads((killed / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS
    _assert_same_weights(_weights(killed / "final"), _weights(uninterrupted / "final"))


def test_fsdp_align_stage_equals_one_process(setup, tiny_dir):
    run, _ = setup
    single = run("align-1", "align", 1)
    fsdp = run("align-fsdp", "align", 2, launcher="accelerate")  # accelerate launch, fsdp_cpu.yaml, the CLI
    want, got = _weights(single / "final"), _weights(fsdp / "final")
    _assert_same_weights(got, want)
    initial = load_file(tiny_dir / "model.safetensors")
    for name, tensor in got.items():
        assert torch.equal(tensor, initial[name]) != name.startswith("multi_modal_projector"), name


def test_fsdp_lora_saves_adapter_and_projector_and_merges(setup, tiny_dir, make_image):
    run, _ = setup
    settings = dict(lora_dropout=0.0)  # dropout masks depend on how the batch is split
    single = run("lora-1", "lora", 1, keep_adapter=True, **settings)
    adapter = run("lora-fsdp-adapter", "lora", 2, keep_adapter=True, **settings)
    # torchrun -m mqwen.train --fsdp, with activation checkpointing (the same numbers, recomputed)
    merged = run("lora-fsdp-merged", "lora", 2, launcher="torchrun", gradient_checkpointing=True, **settings)

    want, got = (
        load_file(single / "final" / "adapter_model.safetensors"),
        load_file(adapter / "final" / "adapter_model.safetensors"),
    )
    _assert_same_weights(got, want)
    assert any("lora_A" in name for name in got)
    assert any("multi_modal_projector" in name for name in got)  # the trained projector travels with the adapter
    assert json.loads((adapter / "final" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_dir
    )

    # The merged FSDP model equals the one-process adapter merged into the base.
    reference, _ = load_trained(single / "final")
    reference = reference.merge_and_unload().state_dict()
    _assert_same_weights(_weights(merged / "final"), {k: v for k, v in reference.items()})
    images = [make_image(200 + i, size=(56, 56)) for i in range(2)]
    assert _captions(merged / "final", images) == _captions(single / "final", images)


def test_deepspeed_zero3_full_stage_equals_one_process(setup, full_runs):
    """DeepSpeed's CPU accelerator (gloo) runs ZeRO-3 here: `torchrun -m mqwen.train --deepspeed
    train/configs/deepspeed_zero3.json`. The first run on a machine compiles DeepSpeed's shared-memory
    communication op (cached in the environment's folder, see `setup`)."""
    if importlib.util.find_spec("deepspeed") is None:
        if os.environ.get("MQWEN_REQUIRE_DEEPSPEED"):
            pytest.fail("MQWEN_REQUIRE_DEEPSPEED is set but deepspeed is not installed")
        pytest.skip("deepspeed is not installed (pip install deepspeed; CI installs it)")
    run, _ = setup
    single, _ = full_runs
    zero3 = run("full-zero3", "full", 2, train_vision_tower=True, deepspeed=str(CONFIGS / "deepspeed_zero3.json"))
    _assert_same_weights(_weights(zero3 / "final"), _weights(single / "final"))
