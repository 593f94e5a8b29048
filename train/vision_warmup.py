"""Vision warm-up: a vision tower trained from scratch first learns, on its own, which words its caption holds.

Trained from scratch, a captioner's vision tower gets its signal only through the projector and the language
model: a long way round while neither has learnt anything. The caption loss then sits on a plateau (with the
shapes demo: the right number of objects in the right colours, the objects themselves guessed) until vision
features and the language model's reading of them happen to agree, and how long that takes depends on the
seed. Measured on the demo's ViT, the same ViT taught directly (a linear head on its averaged features)
tells single shapes apart within about 200 steps; through the projector and the language model's output head
it had not started to after 800.

So for the first `vision_warmup_steps` optimizer steps the Trainer trains the vision tower alone on that
short path: a temporary linear head scores every word of the vocabulary at every patch (features at
`vision_feature_layer`); the image's word distribution is the mixture over its patches (one softmax over all
(patch, word) pairs, summed over patches), scored by cross-entropy against the caption's words, each
weighted equally. That is a bag of words, as in Joulin et al., "Learning Visual Features from Large Weakly
Supervised Data" (2016), pooled so that a small object's own patches can name it rather than an average
over the whole image (on the demo's mixed 1-3-shape images both poolings were measured at the same warm-up
loss after 800 steps, 1.97 and 1.96: there, the ambiguity of which shape is which is the harder part). The
language model and projector do not run in those steps, which are therefore cheap. The head is not part of
the model: nothing of it is saved.

Pair it with the short-captions-first curriculum (`curriculum.py`): on one-object images every word of the
caption belongs to the one object, and the demo's ViT learns to tell its shapes apart within a few hundred
steps. It needs a trainable vision tower and one image per example (what
caption training has), in a single process.
"""

import torch
import torch.nn.functional as F
from torch import nn


class VisionWarmup:
    """The temporary head and the warm-up loss.

    Args:
        model: the (unwrapped, possibly PEFT-wrapped) MQwen model being trained.
        ignored_ids: token ids that are not words (special tokens such as the end of turn).
    """

    def __init__(self, model, ignored_ids=()):
        self.vision_tower = next((m for name, m in model.named_modules() if name.endswith("vision_tower")), None)
        if self.vision_tower is None:
            raise ValueError("vision_warmup_steps needs an MQwen model (no vision_tower found).")
        self.feature_layer = model.config.vision_feature_layer
        width = self.vision_tower.class_embedding.shape[-1]
        device = self.vision_tower.class_embedding.device
        self.head = nn.Linear(width, model.config.text_config.vocab_size).to(device)
        self.ignored = torch.tensor(sorted(set(ignored_ids)), dtype=torch.long)

    def loss(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of each image's word distribution against its caption's words (uniform over them)."""
        if pixel_values.shape[0] != labels.shape[0]:
            raise ValueError(
                f"vision_warmup_steps needs one image per example; got {pixel_values.shape[0]} images "
                f"for {labels.shape[0]} examples."
            )
        hidden = self.vision_tower.hidden_state(pixel_values, self.feature_layer)[:, 1:]
        # Each patch scores every word; the image's word distribution is the mixture over its patches (a softmax
        # over all (patch, word) pairs, summed over patches), so a small object's patches can name it alone.
        scores = self.head(hidden.float())
        log_probs = torch.logsumexp(F.log_softmax(scores.flatten(1), dim=-1).view_as(scores), dim=1)
        is_word = (labels >= 0) & ~torch.isin(labels, self.ignored.to(labels.device))
        target = torch.zeros_like(log_probs).scatter_add_(1, labels.clamp(min=0), is_word.to(log_probs.dtype))
        target = (target > 0).to(log_probs.dtype)
        has_words = target.sum(-1) > 0
        if not bool(has_words.any()):
            return log_probs.sum() * 0.0
        target = target[has_words] / target[has_words].sum(-1, keepdim=True)
        return -(target * log_probs[has_words]).sum(-1).mean()
