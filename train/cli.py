"""`mqwen-train` (`main`: `train(TrainConfig(...))`, its flags generated from `TrainConfig`'s fields).

`mqwen-eval`, the command line of evaluation, lives beside it in `eval.py`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing

from .config import TrainConfig
from .recipe import VISION_WARMUP_TARGETS

EXAMPLES = """examples:
  # stage 1: align the projector on COCO captions (vision tower and language model frozen)
  mqwen-train --model mqwen-7b --data coco/annotations/captions_train2017.json --image-root coco/train2017 \\
      --stage align --output-dir runs/align --per-device-train-batch-size 32 --bf16

  # stage 2: LoRA on the language model (+ projector) from the aligned model, merged at the end
  mqwen-train --model runs/align/final --data llava_captions.json --stage lora --lora-r 64 \\
      --output-dir runs/lora --bf16 --gradient-checkpointing

  # a JSONL/CSV of (image, caption) rows; keep LoRA as an adapter; resume the newest checkpoint
  mqwen-train --model runs/align/final --data captions.jsonl --stage lora --keep-adapter \\
      --output-dir runs/lora --resume-from-checkpoint last

  # several GPUs: DDP, or FSDP2 with --fsdp (`python -m mqwen.train.configs` lists the launcher configs;
  # the README says what is tested)
  torchrun --nproc_per_node=8 -m mqwen.train --model ... --data ... --stage full --output-dir runs/full --bf16
  torchrun --nproc_per_node=8 -m mqwen.train --fsdp --model ... --data ... --stage full --output-dir runs/full --bf16
  accelerate launch --config_file "$(python -m mqwen.train.configs fsdp.yaml)" -m mqwen.train --model ... --stage full

The final model (Hub format, with its processor) is written to OUTPUT_DIR/final, in the base checkpoint's dtype
(--final-dtype); align also writes OUTPUT_DIR/projector.safetensors, which `mqwen-convert build --projector` takes.
Frozen weights stay in the checkpoint's dtype (--model-dtype), trained ones in float32 (--trainable-dtype); align
checkpoints hold the projector alone. A summary with the skipped-image count goes to
OUTPUT_DIR/train_summary.json. Evaluate it with `mqwen-eval`.
"""


def _flag(name):
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mqwen-train",
        description="Fine-tune MQwen for image captioning: align (projector), lora, or full.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    hints = typing.get_type_hints(TrainConfig)
    required = {"model", "data", "output_dir"}
    for field in dataclasses.fields(TrainConfig):
        kind = hints[field.name]
        args = typing.get_args(kind)
        if typing.get_origin(kind) is typing.Union and type(None) in args:
            kind = next(a for a in args if a is not type(None))
        help_text = field.metadata.get("help", "")
        default = field.default if field.default is not dataclasses.MISSING else None
        options = {"dest": field.name, "help": help_text}
        if field.name in required:
            options.update(required=True)
        elif kind is bool:
            options.update(action=argparse.BooleanOptionalAction, default=default)
        elif kind is tuple:
            options.update(nargs="+", default=default, help=f"{help_text} (default: {' | '.join(default)})")
        elif kind is dict:
            options.update(type=json.loads, default={}, help=f"{help_text}; on the command line a JSON object")
        else:
            options.update(type=kind if kind in (int, float) else str, default=default)
            if default is not None:
                options["help"] += f" (default: {default})"
        if field.name == "stage":
            options["choices"] = ["align", "lora", "full"]
        if field.name == "vision_warmup_target":
            options["choices"] = list(VISION_WARMUP_TARGETS)
        parser.add_argument(_flag(field.name), **options)
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    values = vars(build_parser().parse_args(argv))
    if isinstance(values.get("lora_target_modules"), list):  # accept "q_proj,v_proj" as well as "q_proj v_proj"
        values["lora_target_modules"] = [t for item in values["lora_target_modules"] for t in item.split(",") if t]
    try:
        return TrainConfig(**values)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    from .run import train  # after parsing: `--help` and a wrong flag answer without importing the Trainer

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    result = train(config)
    if result.trainer.is_world_process_zero():
        print(
            json.dumps(
                {
                    "model_dir": str(result.model_dir),
                    **({"projector": str(result.projector_file)} if result.projector_file else {}),
                    "train_loss": result.metrics.get("train_loss"),
                    "steps": result.trainer.state.global_step,
                    "skipped_images": {"missing": result.skipped.missing, "corrupt": result.skipped.corrupt},
                },
                indent=2,
            )
        )
        if len(result.skipped):
            print(result.skipped.summary(), file=sys.stderr)
    return 0
