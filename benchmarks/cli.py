"""`mqwen-bench` (or `python -m mqwen.benchmarks`): MQwen against the bare LM and transformers' LLaVA, side by side.

Prints one markdown table (min / median / max of every contender and the ratio of medians against each
figure's target) and writes it, with the machine it came from, to benchmarks/RESULTS.md. `main` runs four
steps: check the settings (`Plan`), build the contenders and check they agree (`build_contenders`), time the
figures (`run_figures`), write the report (`write_report`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXAMPLES = """examples:
  mqwen-bench --quick                    # tiny shapes, seconds: checks that everything runs
  mqwen-bench                            # mid-size shapes on CPU (~15 min on 2 cores)
  mqwen-bench --figures decode caption   # only figures 1 and 2
  mqwen-bench --clock cpu                # on a busy shared machine: CPU time, not wall time
  mqwen-bench --device cuda --dtype bf16 # Qwen2.5-7B + ViT-L/14 shapes on a GPU, adds figure 5
  python -m mqwen.benchmarks --quick              # the same as mqwen-bench --quick

figures: decode (1: tokens/s vs the bare LM), caption (2: latency vs LLaVA-HF, pooled prefill),
train (3: samples/s vs LLaVA-HF), memory (4: peak RSS of from_pretrained and of `convert build`),
bandwidth (5, GPU only: decode tokens/s vs the memory-bandwidth bound).
"""

FIGURES = ("decode", "caption", "train", "memory", "bandwidth")
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "RESULTS.md"
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mqwen-bench",
        description="Speed and memory of MQwen against the bare language model and transformers' LLaVA.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the models run (default cpu)")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="weights and activations (default fp32 on cpu, bf16 on cuda)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few repetitions (a smoke test)")
    parser.add_argument("--figures", nargs="+", choices=FIGURES, default=None, help="which figures (default all)")
    parser.add_argument(
        "--caption-batches", type=int, nargs="+", default=None, help="figure 2's batch sizes (default 1 8)"
    )
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per contender (default 5, quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 1)")
    parser.add_argument(
        "--optimizer",
        choices=["adamw", "sgd"],
        default=None,
        help="figure 3's optimizer (default adamw; sgd on cuda, where two 7B AdamW states do not fit)",
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: elapsed time (default); cpu: this process's CPU time, for machines shared with other jobs "
        "(sets OMP_WAIT_POLICY=PASSIVE so idle threads do not spin)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice, one per core)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"where to write the table, and every sample beside it as .json (default {DEFAULT_OUTPUT.name} "
        "next to this file; quick runs: none)",
    )
    args = parser.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        parser.error(f"--reps must be at least 1, got {args.reps}")
    if args.caption_batches and min(args.caption_batches) < 1:
        parser.error(f"--caption-batches must be positive, got {args.caption_batches}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.warmup is not None and args.warmup < 0:
        parser.error(f"--warmup must be 0 or more, got {args.warmup}")
    return args


@dataclass
class Plan:
    """What one benchmark run does, from its arguments: device, dtype, shapes, repetitions, figures."""

    args: argparse.Namespace
    device: Any
    dtype: Any
    shapes: Any
    reps: int
    warmup: int
    optimizer: str
    figures: list
    notes: list = field(default_factory=list)


def make_plan(args: argparse.Namespace) -> Plan:
    """The run's settings, defaults filled in; exits with a message for a combination that cannot run."""
    import torch

    from .shapes import pick
    from .timing import use_clock

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible to torch. Run on a GPU machine, or use --device cpu.")
    if args.clock == "cpu" and args.device == "cuda":
        sys.exit("--clock cpu measures host CPU time, which misses GPU work; use --clock wall with --device cuda.")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    use_clock(args.clock)
    device = torch.device(args.device)
    dtype = getattr(torch, DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")])
    shapes = pick(device.type, args.quick)
    figures = args.figures or [f for f in FIGURES if f != "bandwidth" or device.type == "cuda"]
    if "bandwidth" in figures and device.type != "cuda":
        sys.exit("Figure 5 (bandwidth) needs a GPU: run with --device cuda.")
    return Plan(
        args=args,
        device=device,
        dtype=dtype,
        shapes=shapes,
        reps=args.reps or shapes.reps,
        warmup=shapes.warmup if args.warmup is None else args.warmup,
        optimizer=args.optimizer or ("sgd" if device.type == "cuda" else "adamw"),
        figures=figures,
    )


def build_contenders(plan: Plan) -> Any:
    """MQwen, the bare LM and LLaVA-HF at the plan's shapes, checked to compute the same logits (a note says so)."""
    import torch

    from ..common.photos import random_photos
    from .contenders import build_all, check_same_logits

    print(f"building contenders at {plan.shapes.name} shapes on {plan.device} ({plan.dtype})...", file=sys.stderr)
    contenders = build_all(plan.shapes, device=plan.device, dtype=plan.dtype)
    # fp32 must agree to rounding. In half precision fused and split q/k/v round differently and random
    # 7B logits can drift further, while a wrong weight mapping gives differences of order 1.
    atol = 1e-4 if plan.dtype == torch.float32 else 0.5
    error = check_same_logits(contenders, random_photos(2, plan.shapes.image_size_in), atol=atol)
    plan.notes.append(
        f"MQwen and the LLaVA contender share weights and compute the same logits (max difference "
        f"{error:.1e} relative to the largest logit, {str(plan.dtype).replace('torch.', '')}); the bare LM is "
        "MQwen's own `language_model`."
    )
    if plan.args.quick:
        plan.notes.append("--quick: tiny shapes; the figures only show that everything runs, not how fast it is.")
    return contenders


def run_figures(plan: Plan, contenders: Any) -> list:
    """Every figure of the plan, timed; returns the table rows (notes and wall times go to `plan.notes`)."""
    from .memory import memory_figures
    from .speed_figures import bandwidth_figure, caption_figure, decode_figure, train_figure

    rows, durations = [], {}
    common = (contenders, plan.shapes, plan.device, plan.dtype)
    timing = dict(reps=plan.reps, warmup=plan.warmup)

    def timed(name, fn, *args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        durations[name] = time.perf_counter() - start
        return result

    if "decode" in plan.figures:
        rows += timed("1 decode", decode_figure, *common, **timing)
    if "caption" in plan.figures:
        for batch in plan.args.caption_batches or plan.shapes.caption_batches:
            rows += timed(f"2 caption b{batch}", caption_figure, *common, batch=batch, **timing)
    if "train" in plan.figures:
        rows += timed("3 train", train_figure, *common, optimizer=plan.optimizer, **timing)
    if "bandwidth" in plan.figures:
        rows += timed("5 bandwidth", bandwidth_figure, *common, **timing)
    if "memory" in plan.figures:
        memory_rows, memory_notes = timed("4 memory", memory_figures, contenders, plan.shapes)
        rows += memory_rows
        plan.notes.extend(memory_notes)
    plan.notes.append("Wall time per figure: " + ", ".join(f"{k} {v:.0f} s" for k, v in durations.items()) + ".")
    return rows


def write_report(plan: Plan, rows: list, output: Path, load_before: str, started: float) -> None:
    """The markdown report at `output` and every sample beside it as .json, each written atomically."""
    from ..common.atomic_files import write_atomically
    from ..common.machine import load_average, machine_description
    from .report import render

    settings = {
        "shapes": plan.shapes.name,
        "vision": plan.shapes.vision,
        "text": {k: v for k, v in plan.shapes.text.items() if k not in ("bos_token_id", "eos_token_id")},
        "device": plan.device,
        "clock": {"wall": "wall clock", "cpu": "CPU time of the benchmark process (OMP_WAIT_POLICY=PASSIVE)"}[
            plan.args.clock
        ],
        "dtype": str(plan.dtype).replace("torch.", ""),
        "repetitions": plan.reps,
        "warm-up rounds": plan.warmup,
    }
    machine = machine_description(plan.device)
    elapsed = time.perf_counter() - started
    text = render(rows, machine, settings, plan.notes, load_before, load_average(), elapsed)
    print(f"wrote {write_atomically(output, text)}", file=sys.stderr)
    raw = json.dumps({"machine": machine, "rows": [row.to_dict() for row in rows]}, indent=1, default=str)
    print(f"wrote {write_atomically(output.with_suffix('.json'), raw)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """`mqwen-bench`: plan, build the contenders, time the figures, print the table and write the report."""
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.clock == "cpu":
        # Must be set before OpenMP starts (the first parallel region), so before torch runs anything.
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    from ..common.machine import load_average
    from .report import markdown_table

    plan = make_plan(args)
    started, load_before = time.perf_counter(), load_average()
    contenders = build_contenders(plan)
    rows = run_figures(plan, contenders)
    print(markdown_table(rows))
    output = args.output or (None if args.quick else DEFAULT_OUTPUT)
    if output is not None:
        write_report(plan, rows, output, load_before, started)
    return 0
