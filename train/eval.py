"""Caption a held-out set in batches and score it (BLEU-4, CIDEr-D, exact match): `evaluate_captions`.

The command line is `mqwen-eval` (or `python -m mqwen.train.eval`), `eval_main` at the end of this file. Captions
come from the shared runtime (`mqwen.runtime.caption_images`: batched, left-padded, greedy unless generation
settings say otherwise); each image is captioned once and scored against all of its reference captions. Unreadable
images are skipped, counted and listed in the results.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..common.atomic_files import write_atomically
from ..runtime import add_device_arguments, caption_images, load_for_inference
from .data import CaptionDataset, ImageLoadError, SkipReport, load_caption_dataset, load_image
from .metrics import caption_scores


def evaluate_captions(
    model: Any,
    processor: Any,
    data: Any,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    instruction: str | None = None,
    limit: int | None = None,
    progress: bool = True,
    generate_kwargs: dict | None = None,
    **data_kwargs: Any,
) -> dict:
    """Caption every image of `data` and score the captions against its references.

    Args:
        model, processor: an MQwen model (or a peft model around one) and its processor.
        data: anything `load_caption_dataset` reads (a spec, a list of (image, caption) pairs, a dataset).
        batch_size: images per `generate` call.
        instruction: caption instruction (default: the processor's).
        limit: evaluate only the first `limit` images.
        data_kwargs: `image_root`, `image_column`, `caption_column`, `split` for `load_caption_dataset`.

    Returns:
        `{"metrics": {"bleu4", "cider", "exact_match", "images", "skipped_images"}, "per_image": [{"id",
        "caption", "references", "bleu4", "cider", "exact_match"}, ...], "skipped": {...}}`.
    """
    if isinstance(data, CaptionDataset):
        dataset = data
    else:
        dataset = load_caption_dataset(data, resample_bad=False, **data_kwargs)
    records = dataset.records[:limit] if limit else dataset.records
    skipped = SkipReport()
    readable = []  # the records whose image loaded, in the order their captions come back

    def images():
        for record in records:
            try:
                image = load_image(record.image)
            except ImageLoadError as error:
                skipped.add(error.kind, record.id, str(error))
                continue
            readable.append(record)
            yield image

    was_training = model.training
    model.eval()
    predictions, references = {}, {}
    try:
        captions = caption_images(
            model,
            processor,
            images(),
            batch_size,
            prompt=instruction,
            max_new_tokens=max_new_tokens,
            progress=progress,
            total=len(records),
            **(generate_kwargs or {}),
        )
        for index, caption in enumerate(captions):
            record = readable[index]
            key = _unique(record.id, predictions)
            predictions[key] = caption
            references[key] = list(record.captions)
    finally:
        model.train(was_training)
    corpus, per_image = caption_scores(predictions, references)
    corpus["skipped_images"] = len(skipped)
    return {
        "metrics": corpus,
        "per_image": [
            {"id": key, "caption": predictions[key], "references": references[key], **per_image[key]}
            for key in predictions
        ],
        "skipped": skipped.to_dict(),
    }


def _unique(key, taken):
    if key not in taken:
        return key
    n = 1
    while f"{key}#{n}" in taken:
        n += 1
    return f"{key}#{n}"


EVAL_EXAMPLES = """examples:
  mqwen-eval --model out/final --data data/val.jsonl --out results.json
  mqwen-eval --model out/final --data annotations/captions_val2017.json --image-root val2017 \\
      --batch-size 32 --limit 500
  mqwen-eval --model out/final --data hf://owner/captions --split validation
  python -m mqwen.train.eval --model out/final --data data/val.jsonl      # the same
"""


def build_eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mqwen-eval",
        description="Caption a held-out set with an MQwen model and score it (BLEU-4, CIDEr-D, exact match).",
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
    add_device_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def eval_main(argv: list[str] | None = None) -> int:
    """`mqwen-eval`: load a saved model (`runtime.load_for_inference`), caption and score, print the metrics."""
    args = build_eval_parser().parse_args(argv)
    if args.batch_size < 1:
        raise SystemExit("--batch-size must be at least 1")
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
    )
    results["model"] = str(args.model)
    results["data"] = str(args.data)
    if args.out:
        write_atomically(Path(args.out), json.dumps(results, indent=2))
    print(json.dumps({**results["metrics"], "out": args.out}, indent=2))
    skipped = results["skipped"]
    if skipped["missing"] or skipped["corrupt"]:
        print(
            f"Skipped {skipped['missing']} missing and {skipped['corrupt']} corrupt images (listed under "
            "'skipped' in the results).",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":  # `python -m mqwen.train.eval`: the same as `mqwen-eval`
    sys.exit(eval_main())
