"""CLIPScore and RefCLIPScore (Hessel et al., EMNLP 2021) with an OpenCLIP model the user names.

CLIPScore needs no reference caption: it rates how well a caption fits its image, so it scores captions of
unlabelled data. As in the paper and its code (jmhessel/clipscore):

- CLIP-S(c, v) = 2.5 * max(cos(E_image(v), E_text("A photo depicts " + c)), 0);
- RefCLIP-S(c, R, v) = harmonic mean of CLIP-S(c, v) and max(max over r in R of cos(E_text(c), E_text(r)), 0),
  references carrying the same prefix; 0 when both are 0.

The model is any OpenCLIP model: `ViT-L-14:openai` (architecture:pretrained tag), `ViT-L-14:/path/weights.pt`
(architecture:local file), or `hf-hub:org/repo`. The paper used OpenAI's ViT-B/32; scores from different models
are not comparable with each other, so results name the model. torchmetrics' `CLIPScore` is 100 * max(cos, 0),
another scale: not comparable either.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch

from ..processing_mqwen import to_rgb_image

WEIGHT = 2.5
PREFIX = "A photo depicts "


def clip_scores_from_embeddings(
    image: torch.Tensor, candidate: torch.Tensor, references: Sequence[torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Per-caption CLIP-S (and RefCLIP-S when `references` are given) from embeddings.

    Args:
        image: (N, D) image embeddings; candidate: (N, D) embeddings of the prefixed candidate captions.
        references: one (R_i, D) tensor per candidate, the embeddings of its prefixed references.

    Returns:
        `{"clipscore": (N,)}` plus `"refclipscore": (N,)` with references. Embeddings need not be normalised.
    """
    image = torch.nn.functional.normalize(image.float(), dim=-1)
    candidate = torch.nn.functional.normalize(candidate.float(), dim=-1)
    clip_s = WEIGHT * (image * candidate).sum(-1).clamp(min=0)
    scores = {"clipscore": clip_s}
    if references is not None:
        if len(references) != len(candidate):
            raise ValueError(f"{len(references)} reference sets for {len(candidate)} candidates")
        best = torch.stack(
            [
                (torch.nn.functional.normalize(r.float(), dim=-1) @ c).max().clamp(min=0)
                for c, r in zip(candidate, references)
            ]
        )
        total = clip_s + best
        scores["refclipscore"] = torch.where(
            total > 0, 2 * clip_s * best / total.clamp(min=1e-12), torch.zeros_like(total)
        )
    return scores


def parse_clip_model(spec: str) -> tuple[str, str | None]:
    """`"ViT-L-14:openai"` -> ("ViT-L-14", "openai"); `"ViT-L-14:/w.pt"` -> ("ViT-L-14", "/w.pt");
    `"hf-hub:org/repo"` -> ("hf-hub:org/repo", None). Checked: an unknown architecture, a tag OpenCLIP does not
    know for it, or a missing file is a ValueError that says what is known."""
    if spec.startswith("hf-hub:"):
        return spec, None
    name, _, weights = spec.partition(":")
    if name not in open_clip.list_models():
        raise ValueError(
            f"{name!r} is not an OpenCLIP architecture ({len(open_clip.list_models())} are known; "
            "`python -c 'import open_clip; print(open_clip.list_models())'` lists them), e.g. ViT-L-14:openai"
        )
    tags = open_clip.list_pretrained_tags_by_model(name)
    if not weights:
        raise ValueError(
            f"name the weights of {name}: {name}:TAG (one of {', '.join(tags) or 'none'}) or {name}:/path/to/weights; "
            "a CLIP model with random weights gives meaningless CLIPScores"
        )
    if weights not in tags and not Path(weights).is_file():
        raise ValueError(
            f"{weights!r} is neither a pretrained tag of {name} ({', '.join(tags) or 'none'}) nor a file that exists"
        )
    return name, weights


class CLIPScorer:
    """CLIP-S and RefCLIP-S of captions with one OpenCLIP model (`CLIPScorer.load("ViT-L-14:openai")`)."""

    def __init__(
        self,
        model: Any,
        preprocess: Any,
        tokenizer: Any,
        name: str,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
    ) -> None:
        self.model, self.preprocess, self.tokenizer, self.name = model.eval(), preprocess, tokenizer, name
        self.device, self.batch_size = torch.device(device), int(batch_size)

    @classmethod
    def load(cls, spec: str, device: str | torch.device = "cpu", batch_size: int = 32) -> CLIPScorer:
        """An OpenCLIP model by `spec` (see `parse_clip_model`), its evaluation transform and its tokenizer."""
        name, weights = parse_clip_model(spec)
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=weights, device=device)
        return cls(model, preprocess, open_clip.get_tokenizer(name), spec, device, batch_size)

    def encode_images(self, images: Iterable) -> torch.Tensor:
        """(N, D) image embeddings of images in any form `to_rgb_image` reads (PIL, path, array); `images` may be
        a generator, read `batch_size` at a time."""
        out, iterator = [], iter(images)
        while batch := list(itertools.islice(iterator, self.batch_size)):
            pixels = torch.stack([self.preprocess(to_rgb_image(image)) for image in batch])
            with torch.inference_mode():
                out.append(self.model.encode_image(pixels.to(self.device)).float().cpu())
        return torch.cat(out) if out else torch.empty(0)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) embeddings of "A photo depicts " + text (truncated to the model's context, as the paper's code)."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer([PREFIX + t for t in texts[start : start + self.batch_size]])
            with torch.inference_mode():
                out.append(self.model.encode_text(tokens.to(self.device)).float().cpu())
        return torch.cat(out) if out else torch.empty(0)

    def score(
        self, images: Iterable, candidates: Sequence[str], references: Sequence[Sequence[str]] | None = None
    ) -> tuple[dict, list[dict]]:
        """`(corpus, per_image)`: corpus `{"clipscore", ["refclipscore",] "clipscore_model"}` (means over
        images), per_image one `{"clipscore", ["refclipscore"]}` per candidate, in order. `images` (one per
        candidate) may be a generator."""
        if references is not None and len(references) != len(candidates):
            raise ValueError(f"{len(references)} reference lists for {len(candidates)} candidates")
        image_embeddings = self.encode_images(images)
        if len(image_embeddings) != len(candidates):
            raise ValueError(f"{len(image_embeddings)} images for {len(candidates)} candidates: give one per caption")
        if not candidates:
            return {"clipscore": 0.0, "clipscore_model": self.name}, []
        ref_embeddings = None
        if references is not None:
            flat = [r for refs in references for r in refs]
            if any(not refs for refs in references):
                raise ValueError("every candidate needs at least one reference for RefCLIPScore")
            embedded = self.encode_texts(flat)
            sizes = [len(refs) for refs in references]
            ref_embeddings = list(torch.split(embedded, sizes))
        scores = clip_scores_from_embeddings(image_embeddings, self.encode_texts(candidates), ref_embeddings)
        per_image = [{k: float(v[i]) for k, v in scores.items()} for i in range(len(candidates))]
        corpus = {k: float(v.mean()) for k, v in scores.items()}
        corpus["clipscore_model"] = self.name
        return corpus, per_image
