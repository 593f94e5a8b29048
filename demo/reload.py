"""`python -m mqwen.demo.reload MODEL_DIR IMAGES_DIR OUT_JSON`: caption images with a saved model, as a user would.

The main job runs this in a fresh Python process, so nothing of the training process (imported classes,
registered auto classes, in-memory weights) can leak into the check: the model is loaded from its folder
alone, through `pipeline("image-to-text", model=MODEL_DIR, trust_remote_code=True)`, i.e. from the code
files saved next to the weights. (This is the one tool that does not load through `mqwen.runtime`: checking
transformers' own `pipeline` path is its job.)
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm
from transformers import pipeline

from ..common.atomic_files import write_atomically


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mqwen.demo.reload",
        description="Caption the images listed in IMAGES_DIR/captions.jsonl with a saved MQwen model (pipeline).",
        epilog="example:\n  python -m mqwen.demo.reload out/model out/data/test out/reloaded.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model_dir")
    parser.add_argument("images_dir", help="a folder with captions.jsonl ({'file', 'caption'} per line)")
    parser.add_argument("out_json")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder needs no network; never try it

    images_dir = Path(args.images_dir)
    rows = [json.loads(line) for line in (images_dir / "captions.jsonl").read_text().splitlines() if line.strip()]
    start = time.perf_counter()
    captioner = pipeline("image-to-text", model=args.model_dir, trust_remote_code=True)
    load_seconds = time.perf_counter() - start
    captions = {}
    start = time.perf_counter()
    for row in tqdm(rows, desc="captioning (reloaded)", unit="img", disable=args.no_progress):
        with Image.open(images_dir / row["file"]) as image:
            output = captioner(image.convert("RGB"), max_new_tokens=args.max_new_tokens)
        captions[row["file"]] = output[0]["generated_text"]
    result = {
        "model_dir": str(args.model_dir),
        "pipeline_class": type(captioner).__name__,
        "model_class": f"{type(captioner.model).__module__}.{type(captioner.model).__name__}",
        "load_seconds": round(load_seconds, 2),
        "caption_seconds": round(time.perf_counter() - start, 2),
        "captions": captions,
    }
    write_atomically(args.out_json, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
