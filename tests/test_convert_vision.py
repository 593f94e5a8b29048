"""Vision conversion: OpenCLIP and transformers CLIP checkpoints -> MQwen's OpenCLIP-layout ViT.

Every source is a small random model written in its library's own file format; MQwen's hidden states and
pooled output must equal the source library's in fp32.
"""

import json
from dataclasses import asdict

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from clip_checkpoints import MEAN, STD, clip_vision_config, save_clip_image_processor  # noqa: E402
from conftest import randomize  # noqa: E402

from mqwen import MQwenVisionConfig  # noqa: E402
from mqwen.convert.errors import ConvertError  # noqa: E402
from mqwen.convert.vision import load_vision  # noqa: E402
from mqwen.modeling_mqwen import MQwenVisionTransformer  # noqa: E402

ATOL = 1e-5


def openclip_cfg(image_size, quick_gelu):
    return {
        "embed_dim": 16,
        "quick_gelu": quick_gelu,
        "vision_cfg": {"image_size": image_size, "layers": 2, "width": 32, "head_width": 16, "patch_size": 14},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    }


def make_openclip(cfg, seed=0):
    from open_clip.transform import PreprocessCfg

    model = randomize(open_clip.CLIP(**cfg), seed).eval()
    open_clip.set_model_preprocess_cfg(
        model, asdict(PreprocessCfg(mean=MEAN, std=STD, size=cfg["vision_cfg"]["image_size"]))
    )
    return model


def openclip_outputs(visual, pixels):
    """open_clip's own forward: ln_pre output, each block's output (via hooks), and the pooled embedding."""
    states = []
    hooks = [visual.ln_pre.register_forward_hook(lambda m, i, o: states.append(o))]
    hooks += [b.register_forward_hook(lambda m, i, o: states.append(o)) for b in visual.transformer.resblocks]
    with torch.no_grad():
        pooled = visual(pixels)
    for hook in hooks:
        hook.remove()
    return pooled, states


def mqwen_outputs(weights, pixels):
    tower = MQwenVisionTransformer(MQwenVisionConfig(**weights.config)).eval()
    tower.load_state_dict(weights.state_dict, strict=True)
    with torch.no_grad():
        return tower(pixels, output_hidden_states=True)


def assert_parity(reference, ours):
    (ref_pooled, ref_states), (pooled, states) = reference, ours
    assert len(states) == len(ref_states)
    for index, (a, b) in enumerate(zip(states, ref_states)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=f"hidden state {index}")
    torch.testing.assert_close(pooled, ref_pooled, atol=ATOL, rtol=0)


class _NoTokenizer:
    def save_pretrained(self, folder):
        pass


@pytest.fixture
def registered_openclip(monkeypatch):
    """Register a custom OpenCLIP architecture (and optionally a pretrained tag) the way open_clip stores them."""
    from open_clip import factory, pretrained

    def register(name, cfg, tag=None, tag_cfg=None):
        monkeypatch.setitem(factory._MODEL_CONFIGS, name, cfg)
        if tag:
            monkeypatch.setitem(pretrained._PRETRAINED, name, {tag: tag_cfg})
        return name

    return register


# ---------------------------------------------------------------------------------------------------------


def test_openclip_folder_quick_gelu_28px(tmp_path, make_image):
    """open_clip's own save format (save_for_hf: open_clip_config.json + safetensors + pickle), quick_gelu."""
    from open_clip.push_to_hf_hub import save_for_hf

    cfg = openclip_cfg(28, quick_gelu=True)
    model = make_openclip(cfg)
    save_for_hf(model, _NoTokenizer(), cfg, tmp_path / "oc", safe_serialization="both")
    weights = load_vision(tmp_path / "oc")  # picks the safetensors file, so no --allow-pickle needed
    assert weights.config["hidden_act"] == "quick_gelu"
    assert (weights.config["image_size"], weights.config["patch_size"], weights.config["output_dim"]) == (28, 14, 16)
    assert weights.config["image_mean"] == list(MEAN) and weights.config["image_std"] == list(STD)
    pixels = torch.randn(2, 3, 28, 28)
    assert_parity(openclip_outputs(model.visual, pixels), mqwen_outputs(weights, pixels))


def test_openclip_file_with_config_gelu_42px(tmp_path):
    from open_clip.push_to_hf_hub import save_for_hf

    cfg = openclip_cfg(42, quick_gelu=False)
    model = make_openclip(cfg, seed=1)
    save_for_hf(model, _NoTokenizer(), cfg, tmp_path / "oc", safe_serialization=True)
    weights = load_vision(tmp_path / "oc" / "open_clip_model.safetensors")
    assert weights.config["hidden_act"] == "gelu" and weights.config["image_size"] == 42
    pixels = torch.randn(2, 3, 42, 42)
    assert_parity(openclip_outputs(model.visual, pixels), mqwen_outputs(weights, pixels))


def test_openclip_name_and_tag_takes_quick_gelu_and_normalisation_from_the_tag(tmp_path, registered_openclip):
    """NAME:TAG: the tag's quick_gelu flag (as open_clip records it for OpenAI weights) and mean/std are used."""
    cfg = openclip_cfg(42, quick_gelu=True)
    model = make_openclip(cfg, seed=2)
    from safetensors.torch import save_file

    save_file(model.state_dict(), tmp_path / "weights.safetensors")
    arch = dict(cfg, quick_gelu=False)  # the architecture itself says GELU; the tag says QuickGELU
    tag_cfg = {
        "file": str(tmp_path / "weights.safetensors"),
        "quick_gelu": True,
        "mean": MEAN,
        "std": STD,
        "interpolation": "bilinear",
        "resize_mode": "shortest",
    }
    name = registered_openclip("MQwenTest-ViT-T", arch, "testtag", tag_cfg)
    weights = load_vision(f"{name}:testtag")
    assert weights.config["hidden_act"] == "quick_gelu"
    assert weights.config["image_mean"] == list(MEAN) and weights.resample == 2  # bilinear
    pixels = torch.randn(1, 3, 42, 42)
    assert_parity(openclip_outputs(model.visual, pixels), mqwen_outputs(weights, pixels))


def test_openclip_name_and_training_checkpoint_needs_allow_pickle(tmp_path, registered_openclip):
    """NAME:FILE with an open_clip training checkpoint ({'state_dict': {'module.…'}}), gelu, 28 px."""
    cfg = openclip_cfg(28, quick_gelu=False)
    model = make_openclip(cfg, seed=3)
    state = {"module." + key: value for key, value in model.state_dict().items()}
    torch.save({"epoch": 3, "name": "run", "state_dict": state}, tmp_path / "epoch_3.pt")
    name = registered_openclip("MQwenTest-ViT-T2", cfg)
    with pytest.raises(ConvertError, match="--allow-pickle"):
        load_vision(f"{name}:{tmp_path / 'epoch_3.pt'}")
    weights = load_vision(f"{name}:{tmp_path / 'epoch_3.pt'}", allow_pickle=True)
    assert weights.config["hidden_act"] == "gelu"
    pixels = torch.randn(2, 3, 28, 28)
    assert_parity(openclip_outputs(model.visual, pixels), mqwen_outputs(weights, pixels))


def test_unknown_openclip_name_or_tag_is_a_clear_error(registered_openclip):
    with pytest.raises(ConvertError, match=r"Unknown OpenCLIP model name 'ViT-L-15'.*Did you mean.*ViT-L-14"):
        load_vision("ViT-L-15:openai")
    with pytest.raises(ConvertError, match=r"no pretrained tag 'nosuchtag'.*openai"):
        load_vision("ViT-L-14:nosuchtag")
    with pytest.raises(ConvertError, match="not an existing file or folder"):
        load_vision("no-such-thing")
    with pytest.raises(ConvertError, match="does not exist"):
        load_vision("ViT-L-14:/no/such/file.pt")


def test_unsupported_openclip_tower_is_refused(tmp_path):
    from open_clip.push_to_hf_hub import save_for_hf

    cfg = openclip_cfg(28, quick_gelu=False)
    cfg["vision_cfg"]["ls_init_value"] = 0.1  # LayerScale: MQwen's blocks do not have it
    model = make_openclip(cfg)
    save_for_hf(model, _NoTokenizer(), cfg, tmp_path / "oc", safe_serialization=True)
    with pytest.raises(ConvertError, match="LayerScale"):
        load_vision(tmp_path / "oc")


# ---------------------------------------------------------------------------------------------------------
# transformers CLIP
# ---------------------------------------------------------------------------------------------------------


def _rename_on_disk(folder, add_prefix):
    """Rewrite the weights with / without the `vision_model.` prefix (the other transformers version's format)."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    state = load_file(path)
    if add_prefix:
        state = {
            ("vision_model." + k if not k.startswith(("vision_model.", "visual_projection")) else k): v
            for k, v in state.items()
        }
    else:
        state = {k.removeprefix("vision_model."): v for k, v in state.items()}
    save_file(state, path, metadata={"format": "pt"})


@pytest.mark.parametrize("act,image_size,prefix", [("quick_gelu", 28, True), ("gelu", 42, False)])
def test_transformers_clip_vision_model(tmp_path, act, image_size, prefix):
    """CLIPVisionModel (no projection): pooled output = pooler_output, with and without `vision_model.`."""
    from transformers import CLIPVisionModel

    reference = randomize(CLIPVisionModel(clip_vision_config(image_size, act)), 4).eval()
    reference.save_pretrained(tmp_path / "clip")
    save_clip_image_processor(tmp_path / "clip", image_size)
    _rename_on_disk(tmp_path / "clip", add_prefix=prefix)
    weights = load_vision(tmp_path / "clip")
    assert weights.config["hidden_act"] == act and weights.config["output_dim"] == 32
    assert weights.config["image_mean"] == list(MEAN) and weights.config["image_std"] == list(STD)
    pixels = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        out = reference(pixel_values=pixels, output_hidden_states=True)
    assert_parity((out.pooler_output, out.hidden_states), mqwen_outputs(weights, pixels))


def test_transformers_clip_model_with_projection(tmp_path):
    """A full CLIPModel checkpoint (text tower ignored): pooled output = get_image_features' image embedding."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModelWithProjection

    vision = clip_vision_config(28, "quick_gelu")
    config = CLIPConfig(
        text_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=99,
            max_position_embeddings=16,
        ),
        vision_config=vision.to_dict(),
        projection_dim=24,
    )
    clip = randomize(CLIPModel(config), 5).eval()
    clip.save_pretrained(tmp_path / "clip")
    save_clip_image_processor(tmp_path / "clip", 28)
    weights = load_vision(tmp_path / "clip")
    assert weights.config["output_dim"] == 24

    reference = CLIPVisionModelWithProjection(clip.config.vision_config).eval()
    reference.vision_model.load_state_dict(clip.vision_model.state_dict())
    reference.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        out = reference(pixel_values=pixels, output_hidden_states=True)
    assert_parity((out.image_embeds, out.hidden_states), mqwen_outputs(weights, pixels))


def test_transformers_clip_pickle_needs_allow_pickle(tmp_path):
    from transformers import CLIPVisionModel

    reference = CLIPVisionModel(clip_vision_config(28, "gelu"))
    (tmp_path / "clip").mkdir()
    reference.config.save_pretrained(tmp_path / "clip")
    torch.save(reference.state_dict(), tmp_path / "clip" / "pytorch_model.bin")
    with pytest.raises(ConvertError, match="--allow-pickle"):
        load_vision(tmp_path / "clip")
    assert load_vision(tmp_path / "clip", allow_pickle=True).config["width"] == 32


def test_unsupported_transformers_vision_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip_vision_model"}))
    with pytest.raises(ConvertError, match="must be CLIP"):
        load_vision(tmp_path)


def test_openclip_hf_hub_repo(tmp_path, monkeypatch):
    """hf-hub:ORG/REPO goes through open_clip's own Hub loading; the download is served from a local save."""
    from open_clip import factory, pretrained
    from open_clip.push_to_hf_hub import save_for_hf

    cfg = openclip_cfg(28, quick_gelu=True)
    model = make_openclip(cfg, seed=6)
    save_for_hf(model, _NoTokenizer(), cfg, tmp_path / "repo", safe_serialization="both")
    requested = []

    def fake_download(model_id, filename=None, revision=None, cache_dir=None):
        requested.append((model_id, filename))
        return str(tmp_path / "repo" / (filename or "open_clip_model.safetensors"))

    monkeypatch.setattr(pretrained, "download_pretrained_from_hf", fake_download)
    monkeypatch.setattr(factory, "download_pretrained_from_hf", fake_download)
    weights = load_vision("hf-hub:someone/tiny-clip")
    assert weights.base_model == "someone/tiny-clip" and ("someone/tiny-clip", None) in requested
    pixels = torch.randn(1, 3, 28, 28)
    assert_parity(openclip_outputs(model.visual, pixels), mqwen_outputs(weights, pixels))
