"""Caption a held-out set in batches and score it (BLEU-4, CIDEr-D, exact match): `evaluate_captions`.

The command line is `mqwen-eval` (or `python -m mqwen.train.eval`), defined in `cli.py`. Captions come from the
shared runtime (`mqwen.runtime.caption_images`: batched, left-padded, greedy unless generation settings say
otherwise); each image is captioned once and scored against all of its reference captions. Unreadable images
are skipped, counted and listed in the results.
"""

from __future__ import annotations

import sys
from typing import Any

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


if __name__ == "__main__":  # `python -m mqwen.train.eval`: the same as `mqwen-eval`
    from .cli import eval_main

    sys.exit(eval_main())
