"""Caption metrics: BLEU-4 and CIDEr-D from pycocoevalcap (the COCO caption evaluation code), exact match.

pycocoevalcap's `Bleu` and `Cider` scorers are pure Python; only its PTB tokenizer needs Java. Captions are
tokenized here the way that tokenizer ends up (lower case, punctuation removed), in Python, so scores are
comparable with published COCO numbers though not guaranteed identical to the last decimal. pycocoevalcap's
`Cider` is CIDEr-D (clipped n-gram counts, Gaussian length penalty with sigma 6, x10), with document
frequencies taken from the references of the evaluated set, as in the COCO evaluation server.
"""

import re

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize_caption(text: str) -> str:
    """Lower-cased words without punctuation, space-separated (what the COCO scorers expect)."""
    return " ".join(_WORD.findall(text.lower()))


def normalize_caption(text: str) -> str:
    """Canonical form for exact match: lower case, single spaces, no trailing full stop."""
    return " ".join(text.lower().split()).rstrip(" .!?")


def caption_scores(predictions: dict, references: dict) -> tuple:
    """Corpus and per-image scores.

    Args:
        predictions: `{id: caption}`.
        references: `{id: [reference captions]}` with the same ids.

    Returns:
        `(corpus, per_image)`: `corpus` = `{"bleu4", "cider", "exact_match", "images"}`; `per_image` =
        `{id: {"bleu4", "cider", "exact_match"}}`. BLEU-4 is corpus-level (as COCO reports it), so it is
        not the mean of the per-image values; CIDEr-D and exact match are means.
    """
    from pycocoevalcap.bleu.bleu import Bleu  # optional: the train extra
    from pycocoevalcap.cider.cider import Cider  # optional: the train extra

    if set(predictions) != set(references):
        raise ValueError("predictions and references must have the same ids.")
    ids = list(predictions)
    if not ids:
        return {"bleu4": 0.0, "cider": 0.0, "exact_match": 0.0, "images": 0}, {}
    empty = [i for i in ids if not references[i]]
    if empty:
        raise ValueError(f"{len(empty)} images have no reference caption (first: {empty[0]!r}).")
    res = {i: [tokenize_caption(predictions[i])] for i in ids}
    gts = {i: [tokenize_caption(r) for r in references[i]] for i in ids}
    bleu, bleu_per_image = Bleu(4).compute_score(gts, res, verbose=0)
    cider, cider_per_image = Cider().compute_score(gts, res)
    exact = {i: float(normalize_caption(predictions[i]) in {normalize_caption(r) for r in references[i]}) for i in ids}
    per_image = {
        i: {"bleu4": float(bleu_per_image[3][k]), "cider": float(cider_per_image[k]), "exact_match": exact[i]}
        for k, i in enumerate(ids)
    }
    corpus = {
        "bleu4": float(bleu[3]),
        "cider": float(cider),
        "exact_match": sum(exact.values()) / len(ids),
        "images": len(ids),
    }
    return corpus, per_image
