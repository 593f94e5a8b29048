"""Small transformers CLIP vision checkpoints in transformers' own format (shared by tests/test_convert_vision.py
and tests/test_convert_build.py): the config and the image processor saved next to the weights."""

from __future__ import annotations

import os

from transformers import CLIPImageProcessor, CLIPVisionConfig

# Not CLIP's statistics, so that a converter falling back to CLIP's defaults is caught.
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def clip_vision_config(image_size: int, act: str = "quick_gelu") -> CLIPVisionConfig:
    """Two layers of width 32 in 14 px patches, projected to 24 (`CLIPVisionModelWithProjection`)."""
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=14,
        projection_dim=24,
        hidden_act=act,
        layer_norm_eps=1e-5,
    )


def save_clip_image_processor(folder: str | os.PathLike, image_size: int) -> None:
    """The CLIPImageProcessor a CLIP checkpoint ships: resize + centre crop to `image_size`, MEAN and STD."""
    CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(MEAN),
        image_std=list(STD),
    ).save_pretrained(folder)
