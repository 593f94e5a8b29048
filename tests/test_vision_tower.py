"""The vision tower is OpenCLIP's VisionTransformer: same weight names, same numbers."""

import open_clip
import pytest
import torch
from open_clip.model import CLIPVisionCfg, _build_vision_tower

from mqwen import MQwenVisionConfig, MQwenVisionTransformer


def open_clip_tower(image_size, quick_gelu, width=64, layers=3, heads=4, patch=8, output_dim=24):
    cfg = CLIPVisionCfg(layers=layers, width=width, head_width=width // heads, patch_size=patch, image_size=image_size)
    return _build_vision_tower(output_dim, cfg, quick_gelu=quick_gelu).eval()


def reference_hidden_states(visual, pixels):
    """ln_pre's output and every block's output, captured by hooks inside open_clip's own forward."""
    captured = []
    hooks = [visual.ln_pre.register_forward_hook(lambda m, i, o: captured.append(o))]
    hooks += [blk.register_forward_hook(lambda m, i, o: captured.append(o)) for blk in visual.transformer.resblocks]
    pooled = visual(pixels)
    for hook in hooks:
        hook.remove()
    return pooled, captured


@pytest.mark.parametrize("quick_gelu", [True, False], ids=["quick_gelu", "gelu"])
@pytest.mark.parametrize("image_size", [32, 48])
def test_matches_open_clip(quick_gelu, image_size):
    torch.manual_seed(0)
    visual = open_clip_tower(image_size, quick_gelu)
    # OpenCLIP initialises biases and LayerNorms to constants; randomise them so the comparison covers them.
    with torch.no_grad():
        for name, param in visual.named_parameters():
            if name.endswith("bias") or "ln" in name:
                param.add_(torch.randn_like(param) * 0.1)
    config = MQwenVisionConfig(
        image_size=image_size,
        patch_size=8,
        width=64,
        layers=3,
        heads=4,
        output_dim=24,
        hidden_act="quick_gelu" if quick_gelu else "gelu",
    )
    ours = MQwenVisionTransformer(config).eval()
    ours.load_state_dict(visual.state_dict(), strict=True)

    pixels = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        ref_pooled, ref_hidden = reference_hidden_states(visual, pixels)
        pooled, hidden = ours(pixels, output_hidden_states=True)
        last_but_one = ours.hidden_state(pixels, -2)

    assert len(hidden) == len(ref_hidden) == 4
    for got, want in zip(hidden, ref_hidden):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, ref_pooled, atol=1e-5, rtol=0)
    torch.testing.assert_close(last_but_one, ref_hidden[-2], atol=1e-5, rtol=0)


def test_state_dict_names_are_open_clips():
    visual = open_clip_tower(32, True)
    ours = MQwenVisionTransformer(
        MQwenVisionConfig(image_size=32, patch_size=8, width=64, layers=3, heads=4, output_dim=24)
    )
    assert set(ours.state_dict()) == set(visual.state_dict())
    assert "transformer.resblocks.2.attn.in_proj_weight" in ours.state_dict()


def test_wrong_pixel_shape_is_a_clear_error():
    ours = MQwenVisionTransformer(MQwenVisionConfig(image_size=32, patch_size=8, width=64, layers=1, heads=4))
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(num_images, 3, 32, 32\).*MQwenProcessor"):
        ours(torch.zeros(1, 3, 64, 64))


def test_open_clip_imports():
    assert hasattr(open_clip, "create_model")
