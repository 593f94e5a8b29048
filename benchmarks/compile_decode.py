"""`python -m mqwen.benchmarks.compile_decode`: MQwen's decode speed with a static cache and a torch.compile'd forward.

Four contenders, interleaved as in figure 1 (batch 1, the caption prompt with its image, greedy, no EOS):
MQwen with the default dynamic cache; MQwen with `cache_implementation="static"`; the same with transformers'
own compiled decode step (`compile_config`, which compiles `model.__call__`, so MQwen's forward with the
language model inside it); and the bare language model compiled the same way, as the reference. Prints a
markdown table of decode tokens/s (min / median / max) and each row's ratio to the first. The model is
compiled once, in the untimed warm-up round.
"""

import argparse
import sys

import torch
from transformers import CompileConfig

from .contenders import add_cpu_decode_arguments, cpu_decode_setup, greedy_config
from .speed_figures import _generate
from .timing import interleave

EXAMPLES = """examples:
  python -m mqwen.benchmarks.compile_decode --quick                  # tiny shapes (figure 1's --quick model)
  python -m mqwen.benchmarks.compile_decode --reps 20 --clock cpu    # mid-size shapes on a shared machine
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mqwen.benchmarks.compile_decode",
        description="Decode tokens/s of MQwen: dynamic cache, static cache, static cache + torch.compile.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_cpu_decode_arguments(parser)
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions per contender (default 10)")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"--reps must be at least 1, got {args.reps}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    setup = cpu_decode_setup(args.quick, args.threads, args.clock)
    shapes, tokenizer, model = setup.shapes, setup.tokenizer, setup.model
    inputs, text_only = setup.inputs, setup.text_only
    new = args.new_tokens or max(shapes.decode_tokens, 16)
    dynamic = greedy_config(tokenizer, new)
    static = greedy_config(tokenizer, new)
    static.cache_implementation = "static"
    compiled = greedy_config(tokenizer, new)
    compiled.cache_implementation = "static"
    compiled.compile_config = CompileConfig(fullgraph=False)
    compiled.compile_config._compile_all_devices = True  # transformers compiles on GPUs only unless asked

    outputs = {}

    def run(name, target, target_inputs, config):
        def once():
            out, _, step = _generate(target, target_inputs, config, torch.device("cpu"))
            outputs[name] = out
            return {"decode tokens/s": 1.0 / step}

        return once

    runs = {
        "MQwen, dynamic cache": run("dynamic", model, inputs, dynamic),
        "MQwen, static cache": run("static", model, inputs, static),
        "MQwen, static cache + torch.compile": run("compiled", model, inputs, compiled),
        "bare LM, static cache + torch.compile": run("bare", model.language_model, text_only, compiled),
    }
    with torch.inference_mode():
        stats = interleave(runs, reps=args.reps, warmup=1, desc="compile decode")
    for name in ("static", "compiled"):
        if not torch.equal(outputs[name], outputs["dynamic"]):
            sys.exit(f"{name} generated different tokens from the dynamic cache: a bug, not a speed-up")
    first = stats["MQwen, dynamic cache"]["decode tokens/s"].median
    print(f"| contender ({shapes.name} shapes, {new} new tokens) | decode tokens/s min / **median** / max | ratio |")
    print("|---|---|---|")
    for name, metrics in stats.items():
        s = metrics["decode tokens/s"]
        print(f"| {name} | {s.min:.0f} / **{s.median:.0f}** / {s.max:.0f} | {s.median / first:.3f} |")


if __name__ == "__main__":
    main()
