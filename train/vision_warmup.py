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

A bag of words cannot tell which word belongs to which object: any patch may name every word of the caption,
and a vision tower warmed up that way on one-object images learns to spread each object's description over the
whole image. On images of several objects the captioner then takes the colours from the right object and the
shape from another (on the shapes demo, 190 of 201 wrong shapes on seed 2 were another object's shape). So
`vision_warmup_target="word_pairs"` names the caption's adjacent word pairs instead, each as a product: the
first word from the softmax over all (patch, word) pairs, the second from the same patch's own softmax, summed
over patches. "red circle" and "blue square" can then only score well if the red circle's patches say
"circle" and not "square": each object's patches must describe that object alone (as in Li et al., "Learning
Visual N-Grams from Web Data", 2017, here pooled over patches).

Pair it with the short-captions-first curriculum (`curriculum.py`): on one-object images every word of the
caption belongs to the one object, and the demo's ViT learns to tell its shapes apart within a few hundred
steps. It needs a trainable vision tower and one image per example (what
caption training has), in a single process.

After the warm-up the head can stay on (`vision_aux_weight`): the same loss, on the vision features the caption
pass computes anyway (`capturing_features`), is added to the caption loss at that weight. The warm-up teaches
each object's patches to name that object; the caption loss alone can then wear that away again, and on some seeds
of the shapes demo the captioner goes back to taking one object's shape for another's (demo/EXPERIMENTS.md).
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .recipe import VISION_WARMUP_TARGETS as TARGETS


class VisionWarmup:
    """The temporary head and the warm-up loss.

    Args:
        model: the (unwrapped, possibly PEFT-wrapped) MQwen model being trained.
        ignored_ids: token ids that are not words (special tokens such as the end of turn).
    """

    def __init__(self, model, ignored_ids=(), target: str = "words"):
        if target not in TARGETS:
            raise ValueError(f"vision_warmup_target must be one of {TARGETS}, got {target!r}.")
        self.vision_tower = next((m for name, m in model.named_modules() if name.endswith("vision_tower")), None)
        if self.vision_tower is None:
            raise ValueError("vision_warmup_steps needs an MQwen model (no vision_tower found).")
        self.feature_layer = model.config.vision_feature_layer
        self.target = target
        width = self.vision_tower.class_embedding.shape[-1]
        device = self.vision_tower.class_embedding.device
        self.vocab_size = model.config.text_config.vocab_size
        # word_pairs: one score per word for each half of a pair, side by side
        outputs = self.vocab_size * (2 if target == "word_pairs" else 1)
        self.head = nn.Linear(width, outputs).to(device)
        self.ignored = torch.tensor(sorted(set(ignored_ids)), dtype=torch.long)

    def _is_word(self, labels: torch.Tensor) -> torch.Tensor:
        """Where `labels` holds a caption word: trained on (not -100) and not an ignored special token."""
        return (labels >= 0) & ~torch.isin(labels, self.ignored.to(labels.device))

    def loss(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of each image's word (or word-pair) distribution against its caption's (uniform)."""
        return self.loss_from_features(self.vision_tower.hidden_state(pixel_values, self.feature_layer), labels)

    def loss_from_features(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """`loss` from the vision tower's hidden state at `vision_feature_layer` (class token first)."""
        if hidden.shape[0] != labels.shape[0]:
            raise ValueError(
                f"vision_warmup_steps needs one image per example; got {hidden.shape[0]} images "
                f"for {labels.shape[0]} examples."
            )
        hidden = hidden[:, 1:]
        if self.target == "word_pairs":
            return self._word_pairs_loss(hidden, labels)
        # Each patch scores every word; the image's word distribution is the mixture over its patches (a softmax
        # over all (patch, word) pairs, summed over patches), so a small object's patches can name it alone.
        scores = self.head(hidden.float())
        log_probs = torch.logsumexp(F.log_softmax(scores.flatten(1), dim=-1).view_as(scores), dim=1)
        is_word = self._is_word(labels)
        target = torch.zeros_like(log_probs).scatter_add_(1, labels.clamp(min=0), is_word.to(log_probs.dtype))
        target = (target > 0).to(log_probs.dtype)
        has_words = target.sum(-1) > 0
        if not bool(has_words.any()):
            return log_probs.sum() * 0.0
        target = target[has_words] / target[has_words].sum(-1, keepdim=True)
        return -(target * log_probs[has_words]).sum(-1).mean()

    @contextmanager
    def capturing_features(self) -> Iterator[list[torch.Tensor]]:
        """Inside the block, the hidden states at `vision_feature_layer` that forward passes compute are appended
        to the list it yields, so a caption pass's own vision features can feed `loss_from_features` without
        running the vision tower twice (`loss_from_caption_pass`).
        """
        blocks = self.vision_tower.transformer.resblocks
        index = self.feature_layer % (len(blocks) + 1)  # how many blocks `hidden_state` runs
        captured: list[torch.Tensor] = []
        if index == 0:
            yield captured
            return
        handle = blocks[index - 1].register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            yield captured
        finally:
            handle.remove()

    def loss_from_caption_pass(
        self, captured: list[torch.Tensor], pixel_values: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """`loss` on the features a caption pass computed, as `capturing_features` captured them. Where it captured
        nothing with a graph, the vision tower runs again: at layer 0 (the patch embedding, which no block outputs)
        and under reentrant gradient checkpointing (whose forward runs without one)."""
        if captured and captured[0].requires_grad:
            return self.loss_from_features(captured[0], labels)
        return self.loss(pixel_values, labels)

    def _word_pairs_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy against the caption's adjacent word pairs; each patch names a pair as a product.

        A pair's probability is the mixture over patches of (first word, patch) from one softmax over all
        (patch, word) pairs, times the second word from that patch's own softmax. A patch that mixes two objects'
        features names pairs no caption holds ("red square" beside a red circle and a blue square), so this
        loss, unlike the bag of words, asks each object's patches to describe that object alone.
        """
        scores = self.head(hidden.float())
        first, second = scores[..., : self.vocab_size], scores[..., self.vocab_size :]
        first = F.log_softmax(first.flatten(1), dim=-1).view_as(first)  # (batch, patch, word), over patch and word
        second = F.log_softmax(second, dim=-1)  # (batch, patch, word), over words at each patch
        is_word = self._is_word(labels)
        is_pair = is_word[:, :-1] & is_word[:, 1:]  # (batch, position): labels[t], labels[t + 1]
        words = labels.clamp(min=0)
        patches = hidden.shape[1]
        pick_first = first.gather(2, words[:, None, :-1].expand(-1, patches, -1))
        pick_second = second.gather(2, words[:, None, 1:].expand(-1, patches, -1))
        log_probs = torch.logsumexp(pick_first + pick_second, dim=1)  # (batch, position)
        has_pairs = is_pair.any(-1)
        if not bool(has_pairs.any()):
            return log_probs.sum() * 0.0
        weights = is_pair[has_pairs].to(log_probs.dtype)
        weights = weights / weights.sum(-1, keepdim=True)
        return -(weights * log_probs[has_pairs]).sum(-1).mean()
