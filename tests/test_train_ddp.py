"""train/: a 2-process DDP run on CPU (gloo) through torchrun."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

# Run by each torchrun process: the public `train()`, with the collator and loss wrapped to record which
# examples this rank trains on, and this rank's final weights dumped for comparison.
WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from safetensors.torch import save_file
    from mqwen.train import TrainConfig, train
    from mqwen.train.collator import CaptionCollator
    from mqwen.train.trainer import CaptionTrainer

    model_dir, data, out = sys.argv[1:4]
    rank = int(os.environ["RANK"])
    seen = []
    collate, compute_loss = CaptionCollator.__call__, CaptionTrainer.compute_loss

    def collate_with_indices(self, examples):
        return {**collate(self, examples), "_indices": [e["index"] for e in examples]}

    def recording_loss(self, model, inputs, *args, **kwargs):
        inputs = dict(inputs)
        seen.append(inputs.pop("_indices"))
        return compute_loss(self, model, inputs, *args, **kwargs)

    CaptionCollator.__call__, CaptionTrainer.compute_loss = collate_with_indices, recording_loss
    config = TrainConfig(model=model_dir, data=data, output_dir=out, stage="full", max_steps=3,
                         per_device_train_batch_size=2, num_train_epochs=1, logging_steps=1, save_steps=1000,
                         learning_rate=1e-3, disable_tqdm=True, seed=0)
    result = train(config)
    unwrapped = result.trainer.accelerator.unwrap_model(result.trainer.model)
    save_file({k: v.detach().contiguous() for k, v in unwrapped.state_dict().items()},
              os.path.join(out, f"rank{rank}.safetensors"))
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump({"seen": seen, "world": world, "backend": torch.distributed.get_backend()}, handle)
    """
)


@pytest.fixture
def jsonl_data(tmp_path, make_image):
    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for seed in range(12):
        make_image(seed, size=(56, 56)).save(folder / f"{seed}.png")
        rows.append(
            {"image": f"images/{seed}.png", "caption": f"shape number {seed} is {'red' if seed % 2 else 'blue'}"}
        )
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    return path


def test_two_process_ddp_on_cpu(tmp_path, tiny_dir, jsonl_data):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(worker),
        str(tiny_dir),
        str(jsonl_data),
        str(out),
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-4000:]

    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world"] == 2 and r["backend"] == "gloo" for r in ranks)
    seen = [sorted(i for batch in r["seen"] for i in batch) for r in ranks]
    assert len(ranks[0]["seen"]) == len(ranks[1]["seen"]) == 3  # 3 steps each
    assert all(len(batch) == 2 for r in ranks for batch in r["seen"])
    # 12 examples, 2 ranks x 2 per step x 3 steps: one epoch, each rank its own half.
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(12))

    weights = [load_file(out / f"rank{r}.safetensors") for r in range(2)]
    initial = load_file(tiny_dir / "model.safetensors")
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
    lm_head = "language_model.lm_head.weight"
    assert not torch.equal(weights[0][lm_head], initial[lm_head])  # it trained
    final = load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(final[name], weights[0][name]) for name in final)
    assert not list(out.glob(".final*"))  # no temporary folder left behind


def test_the_process_group_is_destroyed_at_exit(tmp_path):
    """`destroy_process_group_at_exit` (what `train` registers under several processes) tears the group down when
    the interpreter exits: an exit handler registered before it, and so run after it, sees no group left."""
    script = textwrap.dedent(
        """
        import atexit, os
        import torch.distributed as dist
        from mqwen.train.distributed import destroy_process_group_at_exit

        atexit.register(lambda: print("initialized at exit:", dist.is_initialized(), flush=True))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
        dist.init_process_group("gloo", rank=0, world_size=1)
        destroy_process_group_at_exit()
        print("initialized in the script:", dist.is_initialized(), flush=True)
        """
    )
    import socket

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=dict(os.environ, PORT=str(port)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == ["initialized in the script: True", "initialized at exit: False"]
