"""A checkpoint saved under one transformers version loads and generates identically under another.

    python scripts/cross_version_check.py save DIR     # writes a tiny checkpoint + its reference tokens
    python scripts/cross_version_check.py check DIR    # (other venv) reloads with trust_remote_code, compares

.ci/run does both directions between transformers 5.x and 4.57.x.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def images() -> list[Image.Image]:
    return [Image.fromarray((np.random.RandomState(s).rand(64, 80, 3) * 255).astype("uint8")) for s in (0, 1)]


def generate(model: "torch.nn.Module", processor: object) -> list[list[int]]:
    inputs = processor(images=images())
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False).tolist()


def main(mode: str, folder: str) -> int:
    import transformers

    folder = Path(folder)
    if mode == "save":
        from mqwen.common.tiny_model import build_tiny, save_checkpoint

        model, processor = build_tiny(seed=7)
        save_checkpoint(model, processor, folder)
        reference = {"tokens": generate(model, processor), "transformers": transformers.__version__}
        (folder / "reference.json").write_text(json.dumps(reference))
        return 0
    from transformers import AutoModelForCausalLM, AutoProcessor

    reference = json.loads((folder / "reference.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    same = generate(model, processor) == reference["tokens"]
    print(
        f"saved with transformers {reference['transformers']}, loaded with {transformers.__version__}: "
        f"{'identical generations' if same else 'DIFFERENT generations'}"
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
