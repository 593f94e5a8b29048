"""`python -m benchmarks`: MQwen against the bare LM and transformers' LLaVA, side by side.

Prints one markdown table (min / median / max of every contender and the ratio of medians against each
figure's target) and writes it, with the machine it came from, to benchmarks/RESULTS.md.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

EXAMPLES = """examples:
  python -m benchmarks --quick                    # tiny shapes, seconds: checks that everything runs
  python -m benchmarks                            # mid-size shapes on CPU (~15 min on 2 cores)
  python -m benchmarks --figures decode caption   # only figures 1 and 2
  python -m benchmarks --clock cpu                # on a busy shared machine: CPU time, not wall time
  python -m benchmarks --device cuda --dtype bf16 # Qwen2.5-7B + ViT-L/14 shapes on a GPU, adds figure 5

figures: decode (1: tokens/s vs the bare LM), caption (2: latency vs LLaVA-HF, pooled prefill),
train (3: samples/s vs LLaVA-HF), memory (4: peak RSS of from_pretrained and of `convert build`),
bandwidth (5, GPU only: decode tokens/s vs the memory-bandwidth bound).
"""

FIGURES = ("decode", "caption", "train", "memory", "bandwidth")
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "RESULTS.md"
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Speed and memory of MQwen against the bare language model and transformers' LLaVA.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the models run (default cpu)")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="weights and activations (default fp32 on cpu, bf16 on cuda)"
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


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.clock == "cpu":
        # Must be set before OpenMP starts (the first parallel region), so before torch runs anything.
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    import torch

    from .contenders import build_all, check_same_logits
    from .figures import bandwidth_figure, caption_figure, decode_figure, random_photos, train_figure
    from .memory import memory_figures
    from ..convert.staging import write_atomically
    from .report import load_average, machine_description, markdown_table, render
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
    reps = args.reps or shapes.reps
    warmup = shapes.warmup if args.warmup is None else args.warmup
    optimizer = args.optimizer or ("sgd" if device.type == "cuda" else "adamw")
    figures = args.figures or [f for f in FIGURES if f != "bandwidth" or device.type == "cuda"]
    if "bandwidth" in figures and device.type != "cuda":
        sys.exit("Figure 5 (bandwidth) needs a GPU: run with --device cuda.")

    started, load_before = time.perf_counter(), load_average()
    print(f"building contenders at {shapes.name} shapes on {device} ({dtype})...", file=sys.stderr)
    contenders = build_all(shapes, device=device, dtype=dtype)
    # fp32 must agree to rounding. In half precision fused and split q/k/v round differently and random
    # 7B logits can drift further, while a wrong weight mapping gives differences of order 1.
    atol = 1e-4 if dtype == torch.float32 else 0.5
    error = check_same_logits(contenders, random_photos(2, shapes.image_size_in), atol=atol)
    notes = [
        f"MQwen and the LLaVA contender share weights and compute the same logits (max difference "
        f"{error:.1e} relative to the largest logit, {str(dtype).replace('torch.', '')}); the bare LM is "
        "MQwen's own `language_model`.",
    ]
    if args.quick:
        notes.append("--quick: tiny shapes; the figures only show that everything runs, not how fast it is.")

    rows, durations = [], {}
    timing = dict(reps=reps, warmup=warmup)

    def timed(name, fn, *args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        durations[name] = time.perf_counter() - start
        return result

    if "decode" in figures:
        rows += timed("1 decode", decode_figure, contenders, shapes, device, dtype, **timing)
    if "caption" in figures:
        for batch in args.caption_batches or shapes.caption_batches:
            rows += timed(f"2 caption b{batch}", caption_figure, contenders, shapes, device, dtype, batch=batch, **timing)
    if "train" in figures:
        rows += timed(
            "3 train",
            train_figure, contenders, shapes, device, dtype, optimizer=optimizer, **timing
        )
    if "bandwidth" in figures:
        rows += timed("5 bandwidth", bandwidth_figure, contenders, shapes, device, dtype, **timing)
    if "memory" in figures:
        memory_rows, memory_notes = timed("4 memory", memory_figures, contenders, shapes)
        rows += memory_rows
        notes += memory_notes
    notes.append("Wall time per figure: " + ", ".join(f"{k} {v:.0f} s" for k, v in durations.items()) + ".")

    print(markdown_table(rows))
    output = args.output or (None if args.quick else DEFAULT_OUTPUT)
    if output is not None:
        settings = {
            "shapes": shapes.name,
            "vision": shapes.vision,
            "text": {k: v for k, v in shapes.text.items() if k not in ("bos_token_id", "eos_token_id")},
            "device": device,
            "clock": {"wall": "wall clock", "cpu": "CPU time of the benchmark process (OMP_WAIT_POLICY=PASSIVE)"}[
                args.clock
            ],
            "dtype": str(dtype).replace("torch.", ""),
            "repetitions": reps,
            "warm-up rounds": warmup,
        }
        text = render(
            rows,
            machine_description(device),
            settings,
            notes,
            load_before,
            load_average(),
            time.perf_counter() - started,
        )
        print(f"wrote {write_atomically(output, text)}", file=sys.stderr)
        raw = {"machine": machine_description(device), "rows": [row.to_dict() for row in rows]}
        print(f"wrote {write_atomically(output.with_suffix('.json'), json.dumps(raw, indent=1, default=str))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
