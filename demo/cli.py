"""`mqwen-demo` (`python -m mqwen.demo`): build, train, save, reload and evaluate the shapes captioner (`run.py`)."""

import argparse
import sys
from dataclasses import fields

from ..train.recipe import VISION_WARMUP_TARGETS
from .settings import QUICK, DemoSettings

EXAMPLES = """examples:
  mqwen-demo                                  # the full run: 18-24 minutes of training on 2 CPU cores (README)
  mqwen-demo --out /tmp/shapes --max-steps 500  # shorter training, lower accuracy
  mqwen-demo --quick                          # smoke test: a very small model, a few steps (~30 s)
  mqwen-caption mqwen-shapes-demo/data/test --model mqwen-shapes-demo/model   # use the trained model afterwards

outputs (in --out):
  model/                      the trained model in the Hub format (config, safetensors, processor, code files)
  data/test, data/validation  PNG images + captions.jsonl
  captions.png, loss.png      test images with predicted/true captions; the training loss curve
  results.json                settings, timings, test exact match / BLEU-4 / CIDEr-D, every test caption
"""

DEFAULTS = DemoSettings()


def parse_args(argv: list[str] | None = None) -> DemoSettings:
    parser = argparse.ArgumentParser(
        prog="mqwen-demo",
        description="Train a small MQwen to caption synthetic shapes on CPU, save it in the Hub format, reload it "
        "with pipeline(trust_remote_code=True) in a fresh process and report its test accuracy.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", dest="out_dir", default=DEFAULTS.out_dir, help=f"output folder (default: {DEFAULTS.out_dir})"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"tiny model, tiny data, {QUICK['max_steps']} steps: checks the pipeline, not the accuracy",
    )
    parser.add_argument("--max-steps", type=int, help=f"optimizer steps (default: {DEFAULTS.max_steps})")
    parser.add_argument("--batch-size", type=int, help=f"training batch size (default: {DEFAULTS.batch_size})")
    parser.add_argument("--learning-rate", type=float, help=f"peak learning rate (default: {DEFAULTS.learning_rate})")
    parser.add_argument("--train-size", type=int, help=f"training images (default: {DEFAULTS.train_size})")
    parser.add_argument("--test-size", type=int, help=f"test images (default: {DEFAULTS.test_size})")
    parser.add_argument("--validation-size", type=int, help=f"validation images (default: {DEFAULTS.validation_size})")
    parser.add_argument("--seed", type=int, help=f"data and initialisation seed (default: {DEFAULTS.seed})")
    parser.add_argument(
        "--curriculum-steps",
        type=int,
        help=f"train only on single-shape images for the first N steps (default: {DEFAULTS.curriculum_steps}; 0: off)",
    )
    parser.add_argument(
        "--vision-warmup-steps",
        type=int,
        help=f"train the vision tower alone for the first N steps (default: {DEFAULTS.vision_warmup_steps}; 0: off)",
    )
    parser.add_argument(
        "--vision-warmup-target",
        choices=list(VISION_WARMUP_TARGETS),
        help=f"what the vision warm-up names: the caption's words or its adjacent word pairs "
        f"(default: {DEFAULTS.vision_warmup_target})",
    )
    parser.add_argument(
        "--vision-aux-weight",
        type=float,
        help=f"after the vision warm-up, keep its loss on at this weight beside the caption loss "
        f"(default: {DEFAULTS.vision_aux_weight}; 0: off)",
    )
    parser.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"draw training images at other sizes, with noise, on tinted backgrounds (default: {DEFAULTS.augment})",
    )
    parser.add_argument(
        "--small-shapes-from-step",
        type=int,
        help=f"from this step on, augmented training images draw their shapes smaller, at --small-shapes-scale to 1 "
        f"of their side (default: {DEFAULTS.small_shapes_from_step}; 0: never)",
    )
    parser.add_argument(
        "--small-shapes-scale",
        type=float,
        help=f"the smallest fraction of its side a late shape is drawn at (default: {DEFAULTS.small_shapes_scale})",
    )
    parser.add_argument(
        "--curriculum-grow",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"grow the curriculum from single shapes to all images over its steps, two-shape images before "
        f"three (default: {DEFAULTS.curriculum_grow}); --no-curriculum-grow keeps it at single shapes",
    )
    parser.add_argument(
        "--lr-scheduler",
        choices=["cosine", "warmup_stable_decay"],
        help=f"learning-rate schedule after warmup (default: {DEFAULTS.lr_scheduler}); warmup_stable_decay keeps "
        "the peak rate until the last --decay-ratio of the steps",
    )
    parser.add_argument("--decay-ratio", type=float, help=f"(default: {DEFAULTS.decay_ratio})")
    parser.add_argument(
        "--max-train-minutes",
        type=float,
        help="stop training after this many minutes even if --max-steps is not reached (default: no limit)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--loader-workers",
        type=int,
        help=f"processes drawing training images (default: {DEFAULTS.loader_workers}; 0: in the training process)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    settings = dict(QUICK) if args.quick else {}
    for f in fields(DemoSettings):
        value = getattr(args, f.name, None)
        if value is not None:
            settings[f.name] = value
    settings["progress"] = not args.no_progress
    for name in ("max_steps", "batch_size", "train_size", "test_size", "validation_size"):
        if settings.get(name, 1) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < settings.get("small_shapes_scale", 1) <= 1:
        parser.error("--small-shapes-scale must be above 0 and at most 1")
    return DemoSettings(**settings)


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    from .run import run  # after parsing: `--help` and a wrong flag answer without importing the Trainer

    run(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
