"""Caption metrics for train/'s evaluation: the official COCO scores of `mqwen.evaluation.coco_metrics`.

`caption_scores(predictions, references)` (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D and exact match by pycocoevalcap
with its Java PTB tokenizer; `tokenizer="simple"` for Java-free scores that are not comparable) is defined
there and kept importable here, where train/, the demo and users have imported it from.
"""

from ..evaluation.coco_metrics import caption_scores, normalize_caption, tokenize_caption

__all__ = ["caption_scores", "normalize_caption", "tokenize_caption"]
