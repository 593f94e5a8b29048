"""Caption a held-out set in batches and score it (the COCO metrics, exact match, CLIPScore): `evaluate_captions`.

The command line is `mqwen-eval` (or `python -m mqwen.train.eval`), defined in `cli.py`. Captions come from the
shared runtime (`mqwen.runtime.caption_images`: batched, left-padded, greedy unless generation settings say
otherwise); each image is captioned once and scored against all of its reference captions. Unreadable images
are skipped, counted and listed in the results.
"""

from __future__ import annotations

import sys
from typing import Any

from ..evaluation.coco_metrics import require_java
from ..runtime import caption_images
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
    tokenizer: str = "ptb",
    clipscore_model: Any = None,
    **data_kwargs: Any,
) -> dict:
    """Caption every image of `data` and score the captions against its references.

    Args:
        model, processor: an MQwen model (or a peft model around one) and its processor.
        data: anything `load_caption_dataset` reads (a spec, a list of (image, caption) pairs, a dataset).
        batch_size: images per `generate` call.
        instruction: caption instruction (default: the processor's).
        limit: evaluate only the first `limit` images.
        tokenizer: "ptb" (the official COCO scores; needs Java) or "simple" (Java-free, not comparable).
        clipscore_model: an OpenCLIP spec ("ViT-L-14:openai", "ARCH:/path/weights") or a
            `mqwen.evaluation.clipscore.CLIPScorer`: adds CLIPScore and RefCLIPScore.
        data_kwargs: `image_root`, `image_column`, `caption_column`, `split` for `load_caption_dataset`.

    Returns:
        `{"metrics": {"bleu1".."bleu4", "meteor", "rouge_l", "cider", "exact_match", "images", "tokenizer",
        "notes", "skipped_images"[, "clipscore", "refclipscore", "clipscore_model"]}, "per_image": [{"id",
        "caption", "references", the same scores}, ...], "skipped": {...}}` (see `caption_scores`).
    """
    if tokenizer == "ptb":
        require_java()  # before captioning anything
    scorer = _clip_scorer(clipscore_model)
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
    corpus, per_image = caption_scores(predictions, references, tokenizer=tokenizer)
    corpus["skipped_images"] = len(skipped)
    if scorer is not None:
        keys = list(predictions)
        images = (load_image(record.image) for record in readable)  # each loaded once already: all readable
        clip_corpus, clip_scores = scorer.score(images, [predictions[k] for k in keys], [references[k] for k in keys])
        corpus.update(clip_corpus)
        for key, score in zip(keys, clip_scores):
            per_image[key].update(score)
    return {
        "metrics": corpus,
        "per_image": [
            {"id": key, "caption": predictions[key], "references": references[key], **per_image[key]}
            for key in predictions
        ],
        "skipped": skipped.to_dict(),
    }


def _clip_scorer(clipscore_model):
    if clipscore_model is None or not isinstance(clipscore_model, str):
        return clipscore_model
    # open_clip is imported here, only when asked for: it adds about 2 s to the import (python -X importtime)
    from ..evaluation.clipscore import CLIPScorer

    return CLIPScorer.load(clipscore_model)


def _unique(key, taken):
    if key not in taken:
        return key
    n = 1
    while f"{key}#{n}" in taken:
        n += 1
    return f"{key}#{n}"


if __name__ == "__main__":  # `python -m mqwen.train.eval`: the same as `mqwen-eval`
    from .cli import eval_main

    sys.exit(eval_main())
