"""`python -m train.eval`: caption a held-out set in batches and score it (BLEU-4, CIDEr-D, exact match).

Generation is batched with left padding (the processor's default) and greedy unless generation settings
say otherwise; each image is captioned once and scored against all of its reference captions. Unreadable
images are skipped, counted and listed in the results.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import CaptionDataset, ImageLoadError, SkipReport, load_caption_dataset, load_image
from .metrics import caption_scores

EXAMPLES = """examples:
  python -m train.eval --model out/final --data data/val.jsonl --out results.json
  python -m train.eval --model out/final --data annotations/captions_val2017.json --image-root val2017 \\
      --batch-size 32 --limit 500
  python -m train.eval --model out/final --data hf://owner/captions --split validation
"""


@torch.no_grad()
def generate_captions(model, processor, images, instruction=None, max_new_tokens=32, **generate_kwargs):
    """Captions for a batch of images (any form the processor accepts), one string per image."""
    text = None if instruction is None else [instruction] * len(images)
    inputs = processor(images=list(images), text=text, return_tensors="pt")  # left-padded
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    generated = model.generate(**inputs, max_new_tokens=max_new_tokens, **generate_kwargs)
    return processor.decode_captions(generated, inputs["input_ids"].shape[1])


def evaluate_captions(model, processor, data, batch_size=8, max_new_tokens=32, instruction=None, limit=None,
                      progress=True, generate_kwargs=None, **data_kwargs):
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
    dataset = data if isinstance(data, CaptionDataset) else load_caption_dataset(data, resample_bad=False,
                                                                                 **data_kwargs)
    records = dataset.records[:limit] if limit else dataset.records
    was_training = model.training
    model.eval()
    skipped = SkipReport()
    predictions, references = {}, {}
    bar = tqdm(total=len(records), desc="captioning", unit="img", disable=not progress)
    try:
        for start in range(0, len(records), batch_size):
            batch, images = [], []
            for record in records[start:start + batch_size]:
                try:
                    images.append(load_image(record.image))
                    batch.append(record)
                except ImageLoadError as error:
                    skipped.add(error.kind, record.id, str(error))
            if batch:
                captions = generate_captions(model, processor, images, instruction, max_new_tokens,
                                             **(generate_kwargs or {}))
                for record, caption in zip(batch, captions):
                    key = _unique(record.id, predictions)
                    predictions[key] = caption
                    references[key] = list(record.captions)
            bar.update(len(records[start:start + batch_size]))
    finally:
        bar.close()
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m train.eval",
        description="Caption a held-out set with an MQwen model and score it (BLEU-4, CIDEr-D, exact match).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="trained model folder (merged, or a --keep-adapter folder)")
    parser.add_argument("--data", required=True, help="held-out data (same forms as `python -m train --data`)")
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
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv=None):
    from .run import load_trained

    args = parse_args(argv)
    if args.batch_size < 1:
        raise SystemExit("--batch-size must be at least 1")
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    model, processor = load_trained(args.model, dtype=dtype, device=args.device)
    results = evaluate_captions(
        model, processor, args.data, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        instruction=args.instruction, limit=args.limit, progress=not args.no_progress,
        generate_kwargs={"num_beams": args.num_beams} if args.num_beams > 1 else None,
        image_root=args.image_root, image_column=args.image_column, caption_column=args.caption_column,
        split=args.split,
    )
    results["model"] = str(args.model)
    results["data"] = str(args.data)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(results, indent=2))
        os.replace(tmp, out)
    print(json.dumps({**results["metrics"], "out": args.out}, indent=2))
    skipped = results["skipped"]
    if skipped["missing"] or skipped["corrupt"]:
        print(f"Skipped {skipped['missing']} missing and {skipped['corrupt']} corrupt images (listed under "
              "'skipped' in the results).", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
