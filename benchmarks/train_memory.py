"""Peak memory, step time and checkpoint bytes of an align and a LoRA step at real shapes: float32 loading (what
train/ did before issue 50) against the new default (frozen weights in the checkpoint's bf16, trained ones in
float32), in one run (`python -m mqwen.benchmarks.train_memory`).

Shapes: a Qwen2.5-0.5B-shaped language model (hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864, vocabulary
151936, tied embeddings) and a ViT-L/14 tower at 224 px (width 1024, 24 layers), random weights, saved once as a
bf16 checkpoint (the parent process builds it in a child, so the parent stays small). Each of the four runs is a
fresh process: it imports, records its resident memory (the baseline), builds the trainer from the checkpoint,
trains `--steps` optimizer steps of batch `--batch` and writes one checkpoint; the figure is its peak resident
memory (`VmHWM`, see `rss.py`) above the baseline. "float32 loading" is the code before this change exactly:
`from_pretrained(dtype=torch.float32)` and the stock Trainer checkpoint of the whole model.

Also computes, from the byte counts each run logs (`train/memory_report.py`), what a 7B MQwen (Qwen2.5-7B + the
same ViT-L/14) needs for align / LoRA / full: weights, gradients and AdamW states per part, by dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from ..common.atomic_files import write_atomically

REAL_TEXT = dict(
    model_type="qwen2",
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
)
REAL_VISION = dict(image_size=224, patch_size=14, width=1024, layers=24, heads=16, output_dim=768)
QUICK_TEXT = dict(REAL_TEXT, vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
QUICK_VISION = dict(REAL_VISION, width=64, layers=2, heads=2, output_dim=32)
CAPTIONS = ("a red circle on a white table", "two blue squares", "a green triangle beside a cat", "a dog")
RUNS = (("align", "float32"), ("align", "default"), ("lora", "float32"), ("lora", "default"))
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "RESULTS-train-memory.md"


def build_checkpoint(out_dir: str, quick: bool) -> None:
    """The random bf16 checkpoint at the benchmark's shapes."""
    import torch

    from ..common.tiny_model import build_tiny, save_checkpoint

    text, vision = (QUICK_TEXT, QUICK_VISION) if quick else (REAL_TEXT, REAL_VISION)
    model, processor = build_tiny(seed=0, vision=vision, text=text)
    save_checkpoint(model.to(torch.bfloat16), processor, out_dir)


def one_run(checkpoint: str, stage: str, loading: str, steps: int, batch: int, work: str, bf16: bool) -> dict:
    """One training run in this (fresh) process; returns its figures."""
    import gc

    import numpy as np
    import psutil
    import torch
    from PIL import Image
    from transformers import TrainerCallback

    from ..modeling_mqwen import MQwenForCausalLM
    from ..processing_mqwen import MQwenProcessor
    from ..train import TrainConfig, build_trainer
    from ..train.memory_report import memory_figures
    from .rss import vm_hwm

    gc.collect()
    baseline = psutil.Process().memory_info().rss
    rng = np.random.RandomState(0)
    pairs = [
        (Image.fromarray((rng.rand(224, 224, 3) * 255).astype("uint8")), caption)
        for caption in CAPTIONS * max(1, -(-steps * batch // len(CAPTIONS)))
    ]
    figures, times = {}, []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            figures.update(memory_figures(model, optimizer))
            for part, trains in (("frozen_parameters", False), ("trainable_parameters", True)):
                figures[part] = sum(p.numel() for p in model.parameters() if p.requires_grad == trains)
            figures["rss_before_first_step"] = psutil.Process().memory_info().rss - baseline

        def on_step_begin(self, *args, **kwargs):
            times.append(time.perf_counter())

        def on_step_end(self, *args, **kwargs):
            times[-1] = time.perf_counter() - times[-1]

    config = TrainConfig(
        model=checkpoint,
        data=pairs,
        output_dir=work,
        stage=stage,
        max_steps=steps,
        save_steps=steps,
        per_device_train_batch_size=batch,
        logging_steps=1,
        disable_tqdm=True,
        report_to="none",
        seed=0,
        warmup_ratio=0.0,
        bf16=bf16,  # autocast, both loadings alike
    )
    model = processor = None
    if loading == "float32":  # train/run.py before this change: the whole model in float32
        processor = MQwenProcessor.from_pretrained(checkpoint)
        model = MQwenForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    trainer = build_trainer(config, model=model, processor=processor, callbacks=[Clock()])
    if loading == "float32":
        trainer.trainable_only_checkpoints = False  # and the stock checkpoint of the whole model
    trainer.train()
    peak = vm_hwm() - baseline
    folder = Path(work) / f"checkpoint-{steps}"
    checkpoint_bytes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    weights_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return {
        "stage": stage,
        "loading": loading,
        "peak_rss": peak,
        "step_seconds": times,
        "checkpoint_bytes": checkpoint_bytes,
        "checkpoint_weights_bytes": weights_bytes,
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        **figures,
    }


def _child(args: list[str]) -> dict:
    """`python -m mqwen.benchmarks.train_memory --child ...` in a fresh interpreter; its JSON report."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    result = subprocess.run(
        [sys.executable, "-m", "mqwen.benchmarks.train_memory", "--child", *args],
        capture_output=True,
        text=True,
        env=env,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"child {args} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------------------------------------
# 7B from the measured byte counts
# ----------------------------------------------------------------------------------------------------------


def parameters_7b(lora_r: int = 16) -> dict[str, int]:
    """Parameter counts of a 7B MQwen (Qwen2.5-7B + ViT-L/14 at 224 px) per part, and LoRA's at `lora_r` on every
    linear layer of the LM (train/'s default targets): counted on the meta device, nothing allocated."""
    import torch
    from peft import LoraConfig, get_peft_model

    from ..common.tiny_model import build_tiny
    from ..configuration_mqwen import QWEN25_7B_INSTRUCT
    from ..train.config import DEFAULT_LORA_TARGETS
    from ..train.stages import PROJECTOR, lora_target_regex

    with torch.device("meta"):
        model, _ = build_tiny(vision=REAL_VISION, text=dict(QWEN25_7B_INSTRUCT, model_type="qwen2"))
        parts = {
            "vision_tower": sum(p.numel() for p in model.vision_tower.parameters()),
            "projector": sum(p.numel() for p in model.multi_modal_projector.parameters()),
            "language_model": sum(p.numel() for p in model.language_model.parameters()),
        }
        lora = get_peft_model(
            model, LoraConfig(r=lora_r, target_modules=lora_target_regex(DEFAULT_LORA_TARGETS), bias="none")
        )
        parts["lora_adapters"] = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
        assert not any(PROJECTOR in n for n, p in lora.named_parameters() if "lora_" in n)
    return parts


def memory_7b(parts: dict[str, int], bytes_per: dict[str, float]) -> dict[str, dict[str, float]]:
    """GB of weights, gradients and optimizer states for each stage (frozen bf16; trained float32 + its float32
    gradient + AdamW's two float32 states), and for full fine-tuning in pure bf16."""
    frozen, master = bytes_per["frozen"], bytes_per["trainable"]
    optimizer = bytes_per["optimizer"]
    everything = parts["vision_tower"] + parts["projector"] + parts["language_model"]
    stages = {
        "align": parts["projector"],
        "lora": parts["lora_adapters"] + parts["projector"],
        "full": parts["projector"] + parts["language_model"],
    }
    out = {}
    for stage, trained in stages.items():
        # LoRA's adapters and the projector's trained copy come beside the base, which stays whole and frozen
        frozen_count = everything if stage == "lora" else everything - trained
        out[stage] = _gb_split(
            frozen_weights=frozen_count * frozen,
            trained_weights=trained * master,
            gradients=trained * master,
            optimizer=trained * optimizer,
        )
    trained = stages["full"]  # --trainable-dtype bf16: weights, gradients and AdamW states in bf16
    out["full, pure bf16"] = _gb_split(
        frozen_weights=(everything - trained) * frozen,
        trained_weights=trained * frozen,
        gradients=trained * frozen,
        optimizer=trained * optimizer * frozen / master,
    )
    out["full, float32 (before)"] = _gb_split(
        frozen_weights=(everything - trained) * master,
        trained_weights=trained * master,
        gradients=trained * master,
        optimizer=trained * optimizer,
    )
    return out


def _gb_split(**parts: float) -> dict[str, float]:
    split = {name: round(value / 1e9, 2) for name, value in parts.items()}
    split["total"] = round(sum(parts.values()) / 1e9, 2)
    return split


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------


def _gb(value: float) -> str:
    return f"{value / 1e9:.2f} GB" if value >= 1e8 else f"{value / 1e6:.1f} MB"


def render(results: list[dict], meta: dict, estimate: dict | None) -> str:
    by = {(r["stage"], r["loading"]): r for r in results}
    lines = [
        "# Training memory at real shapes: float32 loading against frozen bf16 + float32 trained weights",
        "",
        f"`python -m mqwen.benchmarks.train_memory{' --quick' if meta['quick'] else ''}"
        f"{' --bf16' if meta.get('bf16') else ''}`, {meta['date']}, "
        f"{meta['minutes']:.1f} min.",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in meta["machine"].items()) + ".",
        f"Load average (1 / 5 / 15 min) before: {meta['load_before']}; after: {meta['load_after']}.",
        f"Shapes: {meta['shapes']}; checkpoint {_gb(meta['checkpoint_bytes'])} (bf16, random weights); batch "
        f"{meta['batch']}, {meta['steps']} optimizer steps per run (AdamW), one checkpoint written at the end; "
        "each run a fresh process; compute "
        + ("bf16 autocast (`--bf16`) in both." if meta.get("bf16") else "without autocast (no `--bf16`) in both."),
        "",
        "| stage | loading | peak RSS above imports | step time, s (steps 2..) | checkpoint | its weights file(s) "
        "| frozen weights | trained weights | optimizer states |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        later = r["step_seconds"][1:] or r["step_seconds"]
        lines.append(
            f"| {r['stage']} | {r['loading']} | {_gb(r['peak_rss'])} | {statistics.mean(later):.1f} "
            f"({', '.join(f'{t:.1f}' for t in r['step_seconds'])}) | {_gb(r['checkpoint_bytes'])} | "
            f"{_gb(r['checkpoint_weights_bytes'])} | {_gb(sum(r['frozen'].values()))} "
            f"({'/'.join(sorted(r['frozen']))}) | {_gb(sum(r['trainable'].values()))} "
            f"({'/'.join(sorted(r['trainable']))}) | {_gb(r['optimizer'] or 0)} |"
        )
    lines += ["", "| ratio, new default ÷ float32 loading | align | lora | goal |", "|---|---|---|---|"]
    for label, key, goal in (
        ("peak RSS", "peak_rss", "<= 0.5"),
        ("checkpoint bytes", "checkpoint_bytes", "<= 0.02 (align)"),
        ("step time (steps 2..)", "step", ""),
    ):
        cells = []
        for stage in ("align", "lora"):
            new, old = by[(stage, "default")], by[(stage, "float32")]
            if key == "step":
                ratio = statistics.mean(new["step_seconds"][1:] or new["step_seconds"]) / statistics.mean(
                    old["step_seconds"][1:] or old["step_seconds"]
                )
            else:
                ratio = new[key] / old[key]
            cells.append(f"{ratio:.3f}")
        lines.append(f"| {label} | {' | '.join(cells)} | {goal} |")
    lines += [
        "",
        "Losses of the runs (the same data and seed; float32 vs the new default): "
        + "; ".join(f"{r['stage']} {r['loading']}: {', '.join(f'{x:.4f}' for x in r['losses'])}" for r in results),
        "",
    ]
    if estimate:
        lines += [
            "## What a 7B MQwen needs (Qwen2.5-7B + ViT-L/14), from the byte counts above",
            "",
            "Parameters (meta device): "
            + ", ".join(f"{k} {v / 1e6:,.1f} M" for k, v in estimate["parameters"].items())
            + f". Bytes per parameter as the runs above logged them: {estimate['bytes_per']}. Gradients: one per "
            "trained value, in its dtype. Activations come on top (batch, tokens, `--gradient-checkpointing`).",
            "",
            "| stage | frozen weights | trained weights | gradients | optimizer | total, GB |",
            "|---|---|---|---|---|---|",
        ]
        for stage, split in estimate["memory"].items():
            lines.append(
                f"| {stage} | {split['frozen_weights']} | {split['trained_weights']} | {split['gradients']} | "
                f"{split['optimizer']} | **{split['total']}** |"
            )
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mqwen.benchmarks.train_memory",
        description=__doc__.split("\n\n")[0],
        epilog="examples:\n  python -m mqwen.benchmarks.train_memory --quick     # tiny shapes, seconds\n"
        "  python -m mqwen.benchmarks.train_memory             # real shapes (~10 min and ~8 GB on 2 cores)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test)")
    parser.add_argument("--batch", type=int, default=2, help="examples per step (default 2)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run (default 3)")
    parser.add_argument("--bf16", action="store_true", help="both loadings with --bf16 (autocast) compute")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="markdown report (and .json beside)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "build":
            build_checkpoint(rest[0], rest[1] == "quick")
            print("{}")
        elif kind == "estimate":
            print(json.dumps(parameters_7b()))
        else:
            checkpoint, stage, loading, steps, batch, work, compute = rest
            print(json.dumps(one_run(checkpoint, stage, loading, int(steps), int(batch), work, compute == "bf16")))
        return 0

    from ..common.machine import load_average, machine_description

    start = time.perf_counter()
    load_before = load_average()
    root = Path(tempfile.mkdtemp(prefix="mqwen-train-memory-"))
    compute = "bf16" if args.bf16 else "fp32"
    try:
        checkpoint = root / "checkpoint"
        _child(["build", str(checkpoint), "quick" if args.quick else "real"])
        results = []
        for stage, loading in RUNS:
            work = root / f"{stage}-{loading}"
            print(f"{stage}, {loading} loading ...", file=sys.stderr, flush=True)
            results.append(
                _child(["run", str(checkpoint), stage, loading, str(args.steps), str(args.batch), str(work), compute])
            )
            shutil.rmtree(work, ignore_errors=True)
            print(json.dumps({k: v for k, v in results[-1].items() if k != "losses"}), file=sys.stderr, flush=True)
        checkpoint_bytes = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    default = {r["stage"]: r for r in results if r["loading"] == "default"}
    align = default["align"]
    bytes_per = {  # as the new default's align run logged them
        "frozen": sum(align["frozen"].values()) / align["frozen_parameters"],
        "trainable": sum(align["trainable"].values()) / align["trainable_parameters"],
        "optimizer": align["optimizer"] / align["trainable_parameters"],
    }
    parameters = _child(["estimate"])
    estimate = {"parameters": parameters, "bytes_per": bytes_per, "memory": memory_7b(parameters, bytes_per)}
    meta = {
        "quick": args.quick,
        "bf16": args.bf16,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "minutes": (time.perf_counter() - start) / 60,
        "machine": machine_description("cpu"),
        "load_before": load_before,
        "load_after": load_average(),
        "shapes": {
            "text": QUICK_TEXT if args.quick else REAL_TEXT,
            "vision": QUICK_VISION if args.quick else REAL_VISION,
        },
        "checkpoint_bytes": checkpoint_bytes,
        "batch": args.batch,
        "steps": args.steps,
    }
    report = render(results, meta, estimate)
    write_atomically(args.output, report)
    write_atomically(
        args.output.with_suffix(".json"), json.dumps({"meta": meta, "runs": results, "7b": estimate}, indent=2)
    )
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
