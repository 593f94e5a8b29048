"""The small trained MQwen the GGUF export is checked on (shared by tests/test_gguf.py and benchmarks/gguf.py).

The shapes demo's model (`mqwen.demo.model`), sized for llama.cpp: every matrix row a multiple of 32 (q8_0
quantizes in blocks of 32), no patch pooling (llama.cpp's MLP projector reads every patch), 64 px images in
8 px patches (64 image tokens). 1,200 steps of 16 on one CPU thread (134 s beside two other training runs on
this 2-core machine): colours and counts mostly right, shapes often not (12 % exact match on the 50 images), so
captions depend on the image, which is what agreement between runtimes needs.
"""

import json
import time
from dataclasses import replace
from pathlib import Path

SIZE_OVERRIDES = dict(
    vision_width=32,
    vision_layers=2,
    vision_heads=2,
    hidden_size=64,
    intermediate_size=128,
    text_layers=1,
    attention_heads=2,
    kv_heads=1,
    image_token_pooling=1,
)
# The recipe is pinned here, not taken from the demo's defaults: the demo's vision warm-up alone (2,000 steps)
# is longer than this whole run, and would leave a language model that never saw a caption.
TRAIN = dict(
    train_size=20000,
    max_steps=1200,
    batch_size=16,
    learning_rate=2e-3,
    seed=0,
    threads=1,
    curriculum_steps=0,
    vision_warmup_steps=0,
    vision_aux_weight=0.0,
    augment=False,
    lr_scheduler="cosine",
)
N_IMAGES = 50


def cached_gguf_test_model(tmp_path_factory):
    """(model_dir, test_dir) of the model trained once per machine and cached under MQWEN_CI_CACHE (the tests'
    fixture: tests/test_gguf.py, tests/test_gguf_kquants.py and tests/test_quantized.py share it)."""
    import hashlib
    import os
    import shutil
    from dataclasses import asdict

    from mqwen.demo.settings import DemoSettings

    cache = Path(os.environ.get("MQWEN_CI_CACHE", Path.home() / ".cache" / "mqwen-ci"))
    # Keyed on every training setting, defaults included: a cached model trained under other defaults is stale.
    settings = {k: v for k, v in asdict(DemoSettings(**TRAIN)).items() if k not in ("out_dir", "progress")}
    key = hashlib.sha256(json.dumps([SIZE_OVERRIDES, settings, N_IMAGES], sort_keys=True).encode()).hexdigest()[:12]
    folder = cache / f"gguf-test-model-{key}"
    if not (folder / "model" / "config.json").is_file():
        staging = tmp_path_factory.mktemp("gguf-train")
        train_gguf_test_model(staging)
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(staging, folder, ignore=shutil.ignore_patterns("train"))
    return folder / "model", folder / "data" / "test"


def train_gguf_test_model(out_dir, progress=False, **train):
    """Train the model; returns (model_dir, test_dir). `out_dir/model` and `out_dir/data/test` (PNGs + captions)."""
    import torch

    from mqwen.demo.model import PRESETS, build_shapes_model
    from mqwen.demo.run import train_model
    from mqwen.demo.settings import DemoSettings
    from mqwen.demo.shapes import lazy_split, make_split, write_split

    settings = DemoSettings(out_dir=str(out_dir), progress=progress, loader_workers=0, **{**TRAIN, **train})
    size = replace(PRESETS["full"], **SIZE_OVERRIDES)
    out_dir = Path(out_dir)
    torch.manual_seed(settings.seed)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    # The validation split (arrangements seen in training, 1 to 3 shapes): a model this small and this briefly
    # trained gets some of them right, so exact-match accuracy is a number worth comparing across runtimes.
    images = make_split("validation", N_IMAGES, settings.seed, size.image_size)
    test_dir = write_split(images, out_dir / "data" / "test")
    train_pairs = [
        (example, example.caption)
        for example in lazy_split("train", settings.train_size, settings.seed, size.image_size)
    ]
    model, processor = build_shapes_model(size, seed=settings.seed)
    start = time.perf_counter()
    _, model_dir, _ = train_model(settings, model, processor, train_pairs, out_dir)
    (out_dir / "train_seconds.json").write_text(json.dumps({"seconds": time.perf_counter() - start}))
    return Path(model_dir), Path(test_dir)


if __name__ == "__main__":
    import sys

    print(train_gguf_test_model(sys.argv[1], progress=True))
