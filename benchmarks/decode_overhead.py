"""`python -m mqwen.benchmarks.decode_overhead`: where MQwen's decode step spends what the bare LM's does not.

Figure 1 divides MQwen's decode tokens/s by the bare language model's. This tool splits the difference in two:

1. **Python bytecodes per decode step, per function** (`sys.settrace` with opcode events, counted between the
   first and the last token `generate` streams): deterministic, so it shows exactly which functions MQwen's
   step runs that the bare LM's does not (MQwen's forward layer, transformers' remote-code signature check)
   whatever the load on the machine.
2. **Decode tokens/s of three contenders, interleaved as in figure 1**: the bare LM; the bare LM with the vision
   tower run on the image right after its first token, before its first timed decode step (the same work
   MQwen's prefill does just before its decode steps, so a control for the caches that work leaves cold);
   and MQwen. The second row's ratio is the part of figure 1's gap that is not decode-step work.
"""

import argparse
import collections
import sys
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from .contenders import add_cpu_decode_arguments, cpu_decode_setup, greedy_config
from .timing import StepClock, interleave

EXAMPLES = """examples:
  python -m mqwen.benchmarks.decode_overhead --quick --reps 300 --clock cpu --threads 1   # figure 1's --quick shapes
  python -m mqwen.benchmarks.decode_overhead --quick --new-tokens 48 --reps 100          # longer decodes
  python -m mqwen.benchmarks.decode_overhead --quick --reps 0 --top 40                   # bytecode counts only
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mqwen.benchmarks.decode_overhead",
        description="Bytecodes per decode step (per function) and decode tokens/s: MQwen against the bare LM.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_cpu_decode_arguments(parser)
    parser.add_argument("--reps", type=int, default=100, help="timed rounds (default 100; 0: bytecodes only)")
    parser.add_argument("--top", type=int, default=25, help="functions listed by bytecode difference (default 25)")
    args = parser.parse_args(argv)
    if args.reps < 0:
        parser.error(f"--reps must be at least 0, got {args.reps}")
    return args


def bytecodes_per_step(model: Any, inputs: dict, config: Any) -> dict:
    """{function: bytecodes per decode step} of one `generate` (after an untimed one), counted with settrace."""

    class Window(BaseStreamer):
        """On from the first generated token (the end of the prefill) to the last."""

        def __init__(self):
            self.puts, self.on = 0, False

        def put(self, value):
            self.puts += 1
            self.on = self.puts >= 2

        def end(self):
            self.on = False

    counts, window = collections.Counter(), Window()

    def trace(frame, event, arg):
        frame.f_trace_opcodes = True
        if event == "opcode" and window.on:
            code = frame.f_code
            counts[f"{code.co_filename.split('site-packages/')[-1]}:{code.co_firstlineno} {code.co_qualname}"] += 1
        return trace

    with torch.inference_mode():
        model.generate(**inputs, generation_config=config)
        sys.settrace(trace)
        try:
            model.generate(**inputs, generation_config=config, streamer=window)
        finally:
            sys.settrace(None)
    steps = config.max_new_tokens - 1
    return {name: count / steps for name, count in counts.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    setup = cpu_decode_setup(args.quick, args.threads, args.clock)
    shapes, tokenizer, model = setup.shapes, setup.tokenizer, setup.model
    inputs, text_only = setup.inputs, setup.text_only
    bare = model.language_model
    new = args.new_tokens or shapes.decode_tokens
    config = greedy_config(tokenizer, new)

    ours, theirs = bytecodes_per_step(model, inputs, config), bytecodes_per_step(bare, text_only, config)
    total_ours, total_theirs = sum(ours.values()), sum(theirs.values())
    print(
        f"Python bytecodes per decode step ({new} new tokens): MQwen {total_ours:.0f}, bare LM {total_theirs:.0f}, "
        f"difference {total_ours - total_theirs:+.0f} ({total_ours / total_theirs - 1:+.1%})\n"
    )
    print("| difference | MQwen | bare LM | function |\n|---|---|---|---|")
    names = sorted(set(ours) | set(theirs), key=lambda name: -abs(ours.get(name, 0) - theirs.get(name, 0)))
    for name in names[: args.top]:
        a, b = ours.get(name, 0), theirs.get(name, 0)
        if round(a - b) == 0:
            break
        print(f"| {a - b:+.0f} | {a:.0f} | {b:.0f} | `{name}` |")
    if not args.reps:
        return 0

    class AfterVisionTower(StepClock):
        """Runs the vision tower on the image when the first token arrives, before that token's timestamp."""

        def put(self, value):
            if len(self.stamps) == 1:
                model.get_image_features(inputs["pixel_values"])
            super().put(value)

    def run(target, target_inputs, clock_class=StepClock):
        def once():
            clock = clock_class()
            target.generate(**target_inputs, generation_config=config, streamer=clock)
            return {"decode tokens/s": 1.0 / clock.decode_seconds_per_step()}

        return once

    with torch.inference_mode():
        stats = interleave(
            {
                "bare LM": run(bare, text_only),
                "bare LM, vision tower run before its decode steps": run(bare, text_only, AfterVisionTower),
                "MQwen (with the image)": run(model, inputs),
            },
            reps=args.reps,
            warmup=1,
            desc="decode overhead",
        )
    reference = stats["bare LM"]["decode tokens/s"].median
    print(f"\ndecode tokens/s, batch 1, {new} new tokens, {args.reps} rounds, clock {args.clock}\n")
    print("| contender | min / **median** / max | ratio to the bare LM |\n|---|---|---|")
    for name, metrics in stats.items():
        s = metrics["decode tokens/s"]
        print(f"| {name} | {s.min:.0f} / **{s.median:.0f}** / {s.max:.0f} | {s.median / reference:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
