"""Caption fine-tuning of MQwen (align, LoRA, full), evaluation, and distributed runs.

Programmatic API (stable; the `mqwen-train` and `mqwen-eval` commands wrap it)::

    from mqwen.train import TrainConfig, train, load_caption_dataset
    from mqwen.train.eval import evaluate_captions

    data = load_caption_dataset([(pil_image_or_path, "a red circle"), ...])    # or a path / datasets object
    result = train(TrainConfig(model="tiny-dir", data=data, output_dir="runs/x", stage="align", max_steps=50))
    result.model_dir          # OUTPUT_DIR/final: Hub-format model + processor (LoRA merged unless keep_adapter)
    result.skipped            # SkipReport: missing / corrupt images that were skipped
    model, processor = load_trained(result.model_dir)
    scores = evaluate_captions(model, processor, held_out, batch_size=16)
    scores["metrics"]         # {"bleu4", "cider", "exact_match", "images", "skipped_images"}
    scores["per_image"]       # [{"id", "caption", "references", "bleu4", "cider", "exact_match"}, ...]

Names:
- `TrainConfig`: every setting (the CLI flags are its fields); `CaptionRecipe` (`config.recipe()`): what
  `CaptionTrainer` does beyond the stock Trainer, shared with the shapes demo. `train(config, model=None,
  processor=None, train_dataset=None, eval_dataset=None, callbacks=None)` -> `TrainResult(model_dir, metrics,
  skipped, log_history, trainer)`; `build_trainer(...)` returns the `CaptionTrainer` without training.
- `load_caption_dataset(spec, ...)` -> `CaptionDataset`; `CaptionRecord`; `CaptionCollator`.
- `load_trained(path)` -> (model, processor) for merged models and `--keep-adapter` folders (the shared
  runtime's `mqwen.runtime.load_for_inference`; captions: `mqwen.runtime.caption_images`).
- `evaluate_captions` (`mqwen.train.eval`), `caption_scores` (`mqwen.train.metrics`).

Modules: config (TrainConfig), recipe (CaptionRecipe), data (sources, lazy images, skip counting), collator (chat
template, labels), stages (freezing, LoRA, optimizer groups), trainer (CaptionTrainer), run (train, saving),
distributed (FSDP for `--fsdp` and on CPU), eval (and `mqwen-eval`), metrics, cli (`mqwen-train`). Accelerate
configs for DDP, DeepSpeed ZeRO-2/ZeRO-3 and FSDP (and FSDP on CPU, what the tests run) are in `train/configs/`.
"""

import importlib

_EXPORTS = {
    "TrainConfig": "config",
    "CAPTION_INSTRUCTIONS": "config",
    "STAGES": "config",
    "load_caption_dataset": "data",
    "CaptionDataset": "data",
    "CaptionRecord": "data",
    "SkipReport": "data",
    "load_image": "data",
    "CaptionCollator": "collator",
    "prepare_model_for_stage": "stages",
    "CaptionTrainer": "trainer",
    "CaptionRecipe": "recipe",
    "train": "run",
    "build_trainer": "run",
    "TrainResult": "run",
    "load_trained": "run",
    "save_final_model": "run",
    "evaluate_captions": "eval",
    "caption_scores": "metrics",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    # Lazy, so `python -m mqwen.train.eval` does not import train.eval twice and `import mqwen.train` stays cheap.
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
