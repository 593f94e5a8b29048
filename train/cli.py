"""The command lines of train/: `mqwen-train` (`main`: `train(TrainConfig(...))`, its flags generated from
`TrainConfig`'s fields) and `mqwen-eval` (`eval_main`: `evaluate_captions` on a saved model)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing
from pathlib import Path

from .config import VISION_WARMUP_TARGETS, TrainConfig

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

The final model (Hub format, with its processor) is written to OUTPUT_DIR/final; a summary with the
skipped-image count goes to OUTPUT_DIR/train_summary.json. Evaluate it with `mqwen-eval`.
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


EVAL_EXAMPLES = """examples:
  mqwen-eval --model out/final --data data/val.jsonl --out results.json
  mqwen-eval --model out/final --data annotations/captions_val2017.json --image-root val2017 \\
      --batch-size 32 --limit 500
  mqwen-eval --model out/final --data hf://owner/captions --split validation
  mqwen-eval --model out/final --data data/val.jsonl --clipscore-model ViT-L-14:openai   # + CLIPScore
  mqwen-eval --model out/final --data data/val.jsonl --tokenizer simple   # no Java: scores not comparable
  python -m mqwen.train.eval --model out/final --data data/val.jsonl      # the same
"""


def build_eval_parser() -> argparse.ArgumentParser:
    from ..runtime import add_device_arguments

    parser = argparse.ArgumentParser(
        prog="mqwen-eval",
        description="Caption a held-out set with an MQwen model and score it: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D "
        "(and SPICE when its models are present) by pycocoevalcap with its Java PTB tokenizer, exact match, and "
        "optionally CLIPScore / RefCLIPScore.",
        epilog=EVAL_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="trained model folder (merged, or a --keep-adapter folder)")
    parser.add_argument("--data", required=True, help="held-out data (same forms as `mqwen-train --data`)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per generate call (default 8)")
    parser.add_argument("--out", help="write metrics, per-image captions and scores to this JSON file")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--instruction", help="caption instruction (default: the processor's)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N images")
    parser.add_argument("--image-root", help="folder relative image paths are resolved against")
    parser.add_argument("--image-column")
    parser.add_argument("--caption-column")
    parser.add_argument("--split")
    parser.add_argument(
        "--tokenizer",
        choices=("ptb", "simple"),
        default="ptb",
        help="ptb: pycocoevalcap's PTB tokenizer and METEOR, the published numbers (needs Java: Debian's "
        "openjdk-17-jre-headless); simple: Java-free, no METEOR, scores labelled not comparable",
    )
    parser.add_argument(
        "--clipscore-model",
        help="also report CLIPScore and RefCLIPScore with this OpenCLIP model: ARCH:TAG (ViT-L-14:openai), "
        "ARCH:/path/to/weights, or hf-hub:org/repo",
    )
    add_device_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def eval_main(argv: list[str] | None = None) -> int:
    """`mqwen-eval`: load a saved model (`runtime.load_for_inference`), caption and score, print the metrics."""
    from ..convert.staging import write_atomically
    from ..evaluation.coco_metrics import JavaNotFoundError, require_java
    from ..runtime import load_for_inference
    from .eval import evaluate_captions

    args = build_eval_parser().parse_args(argv)
    if args.batch_size < 1:
        raise SystemExit("--batch-size must be at least 1")
    if args.tokenizer == "ptb":
        try:
            require_java()
        except JavaNotFoundError as error:
            raise SystemExit(f"error: {error}") from None
    if args.clipscore_model:
        from ..evaluation.clipscore import parse_clip_model  # imports open_clip (about 2 s): only when asked

        try:
            parse_clip_model(args.clipscore_model)
        except ValueError as error:
            raise SystemExit(f"error: --clipscore-model: {error}") from None
    model, processor = load_for_inference(args.model, device=args.device, dtype=args.dtype)
    results = evaluate_captions(
        model,
        processor,
        args.data,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        instruction=args.instruction,
        limit=args.limit,
        progress=not args.no_progress,
        generate_kwargs={"num_beams": args.num_beams} if args.num_beams > 1 else None,
        image_root=args.image_root,
        image_column=args.image_column,
        caption_column=args.caption_column,
        split=args.split,
        tokenizer=args.tokenizer,
        clipscore_model=args.clipscore_model,
    )
    results["model"] = str(args.model)
    results["data"] = str(args.data)
    if args.out:
        write_atomically(Path(args.out), json.dumps(results, indent=2))
    print(json.dumps({**results["metrics"], "out": args.out}, indent=2))
    for note in results["metrics"]["notes"]:
        print(f"note: {note}", file=sys.stderr)
    skipped = results["skipped"]
    if skipped["missing"] or skipped["corrupt"]:
        print(
            f"Skipped {skipped['missing']} missing and {skipped['corrupt']} corrupt images (listed under "
            "'skipped' in the results).",
            file=sys.stderr,
        )
    return 0
