"""Vision sources -> OpenCLIP `VisionTransformer` weights and the MQwenVisionConfig values that describe them.

MQwen's vision tower uses OpenCLIP's parameter names verbatim, so every source ends in one form,
`VisionWeights`: a state dict named like `open_clip.transformer.VisionTransformer.state_dict()` plus the
config read from the source (never guessed). `VISION_PREFIX` + those names are the checkpoint's names.

Accepted `VISION` strings (first match wins):

- `hf-hub:ORG/REPO`    an OpenCLIP repo on the Hub (open_clip_config.json + weights).
- an existing folder    with `open_clip_config.json`: OpenCLIP's own save format (`open_clip.push_to_hf_hub`);
                        with `config.json` of model_type clip / clip_vision_model: a transformers CLIP checkpoint.
- an existing file      an OpenCLIP checkpoint; its architecture comes from `open_clip_config.json` in the same
                        folder (use `NAME:FILE` when there is none).
- `NAME:TAG`            an OpenCLIP model name and pretrained tag, e.g. `ViT-L-14:openai` (downloads to
                        open_clip's cache). `NAME:FILE` builds architecture NAME and loads the local FILE.
- `ORG/REPO`            a transformers CLIP checkpoint on the Hub, e.g. `openai/clip-vit-large-patch14`.

OpenCLIP models are built by open_clip itself (`create_model` + `load_checkpoint`, which handles its checkpoint
variants); only the image tower is kept. OpenAI weights use QuickGELU: open_clip records that on the pretrained
tag (`quick_gelu=True`) or in the model name (`-quickgelu`); transformers records it as `hidden_act`.
"""

import difflib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPImageProcessor, CLIPVisionConfig

from ..configuration_mqwen import MQwenVisionConfig
from ..modeling_mqwen import MQwenVisionTransformer
from .errors import ConvertError
from .hub import HUB_ID, PICKLE_SUFFIXES, fetch_repo, find_local_weights, is_pickle, pickle_refused
from .licenses import fetch_hub_license, read_card_license
from .shards import open_weights

logger = logging.getLogger(__name__)

VISION_PREFIX = "vision_tower."
PIL_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3}
OPENCLIP_CONFIG = "open_clip_config.json"


@dataclass
class VisionWeights:
    """A vision tower in OpenCLIP layout, ready to be written under `VISION_PREFIX`."""

    config: dict  # MQwenVisionConfig keyword arguments
    state_dict: dict  # OpenCLIP VisionTransformer names -> tensors
    resample: int = 3  # PIL resampling filter of the source's preprocessing (3 = bicubic)
    resize_mode: str = "shortest"  # "shortest" (resize + center crop) or "squash" (resize to a square)
    name: str = ""  # short name for the model card (no local paths)
    source: str = ""  # human-readable description for logs
    base_model: str = None  # Hub id, when there is one
    license: dict = field(default_factory=dict)  # model-card license fields of the source, when known


# ------------------------------------------------------------------------------------------------------
# transformers CLIP -> OpenCLIP names. The single place where the two layouts meet.
# ------------------------------------------------------------------------------------------------------

_HF_CLIP_RENAMES = [
    (r"embeddings\.class_embedding", "class_embedding"),
    (r"embeddings\.patch_embedding\.weight", "conv1.weight"),
    (r"embeddings\.position_embedding\.weight", "positional_embedding"),
    (r"(?:pre_layrnorm|pre_layernorm)\.(weight|bias)", r"ln_pre.\1"),
    (r"encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)", r"transformer.resblocks.\1.ln_1.\2"),
    (r"encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)", r"transformer.resblocks.\1.ln_2.\2"),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"transformer.resblocks.\1.attn.out_proj.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)", r"transformer.resblocks.\1.mlp.c_fc.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)", r"transformer.resblocks.\1.mlp.c_proj.\2"),
    (r"(?:post_layernorm|post_layrnorm)\.(weight|bias)", r"ln_post.\1"),
]
# q, k and v projections are concatenated, in that order, into nn.MultiheadAttention's in_proj_{weight,bias}.
_HF_CLIP_QKV = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")
_HF_CLIP_IGNORED = re.compile(r"embeddings\.position_ids")
# CLIPModel and transformers 4.x CLIPVisionModel nest the tower under `vision_model.`; 5.x CLIPVisionModel does not.
_HF_VISION_MODEL_PREFIX = "vision_model."


def hf_clip_to_openclip(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and fuse q/k/v, transpose the projection of) transformers CLIP vision weights to OpenCLIP's layout.

    `tensors` maps transformers names (with or without `vision_model.`) to tensors; text-tower entries are
    ignored. Returns the OpenCLIP state dict; `proj` is present only if `visual_projection.weight` was.
    """
    out, qkv, unknown = {}, {}, []
    for name, tensor in tensors.items():
        if name == "visual_projection.weight":
            out["proj"] = tensor.t().contiguous()
            continue
        if not name.startswith(_HF_VISION_MODEL_PREFIX) and (name.startswith("text_") or name == "logit_scale"):
            continue
        name = name[len(_HF_VISION_MODEL_PREFIX) :] if name.startswith(_HF_VISION_MODEL_PREFIX) else name
        if _HF_CLIP_IGNORED.fullmatch(name):
            continue
        match = _HF_CLIP_QKV.fullmatch(name)
        if match:
            layer, which, kind = match.groups()
            qkv.setdefault((layer, kind), {})[which] = tensor
            continue
        for pattern, replacement in _HF_CLIP_RENAMES:
            if re.fullmatch(pattern, name):
                out[re.sub(pattern, replacement, name)] = tensor
                break
        else:
            unknown.append(name)
    if unknown:
        raise ConvertError(f"Unrecognised transformers CLIP vision weights: {', '.join(sorted(unknown)[:8])}")
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ConvertError(f"CLIP layer {layer} {kind}: expected q, k and v projections, found {sorted(parts)}")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


# ------------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------------


def load_vision(spec: str | os.PathLike, allow_pickle: bool = False) -> VisionWeights:
    """Read any supported vision source (see the module docstring) into OpenCLIP layout, checked against MQwen."""
    spec = str(spec)
    path = Path(spec).expanduser()
    if spec.startswith("hf-hub:"):
        weights = _openclip_hub(spec[len("hf-hub:") :], allow_pickle)
    elif path.is_dir():
        if (path / OPENCLIP_CONFIG).is_file():
            weights = _openclip_folder(path, None, allow_pickle)
        elif (path / "config.json").is_file():
            weights = _hf_clip_folder(path, allow_pickle)
        else:
            raise ConvertError(
                f"Vision folder {path} holds neither {OPENCLIP_CONFIG} (an OpenCLIP model) nor config.json "
                "(a transformers CLIP checkpoint)."
            )
    elif path.is_file():
        weights = _openclip_folder(path.parent, path, allow_pickle)
    elif ":" in spec and not spec.startswith(("/", ".", "~")):
        name, tag = spec.split(":", 1)
        weights = _openclip_named(name, tag, allow_pickle)
    elif HUB_ID.match(spec) and not spec.endswith((".safetensors",) + PICKLE_SUFFIXES):
        weights = _hf_clip_folder(fetch_repo(spec, allow_pickle, "Vision checkpoint"), allow_pickle, hub_id=spec)
    else:
        raise ConvertError(
            f"Vision source {spec!r} is not an existing file or folder, an OpenCLIP NAME:TAG (e.g. ViT-L-14:openai), "
            "an OpenCLIP hf-hub:ORG/REPO, or a transformers CLIP Hub id (e.g. openai/clip-vit-large-patch14)."
        )
    check_vision_weights(weights)
    return weights


def check_vision_weights(weights: VisionWeights) -> None:
    """The state dict must be exactly what MQwen's vision tower, built from the derived config, holds."""
    try:
        config = MQwenVisionConfig(**weights.config)
    except (TypeError, ValueError) as error:
        raise ConvertError(f"{weights.source}: {error}") from error
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in MQwenVisionTransformer(config).state_dict().items()}
    found = {name: tuple(t.shape) for name, t in weights.state_dict.items()}
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    wrong = [f"{n} {found[n]} != {expected[n]}" for n in sorted(set(found) & set(expected)) if found[n] != expected[n]]
    if missing or unexpected or wrong:
        raise ConvertError(
            f"{weights.source} does not match MQwen's OpenCLIP-layout ViT. Missing: {missing[:6]}; "
            f"unexpected: {unexpected[:6]}; wrong shapes: {wrong[:6]}."
        )


# ------------------------------------------------------------------------------------------------------
# OpenCLIP
# ------------------------------------------------------------------------------------------------------


def _openclip_named(name, tag, allow_pickle):
    import open_clip  # optional: the convert extra

    if open_clip.get_model_config(name) is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=5, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConvertError(
            f"Unknown OpenCLIP model name {name!r}.{hint} open_clip.list_models() lists the names; "
            "write a pretrained model as NAME:TAG, e.g. ViT-L-14:openai."
        )
    file = Path(tag).expanduser()
    if file.is_file():
        checkpoint, pretrained_cfg, pretrained = file, {}, None
        source, base_model, short = f"OpenCLIP {name} with weights {file}", None, f"OpenCLIP {name}:{file.name}"
    elif "/" in tag or tag.endswith((".safetensors",) + PICKLE_SUFFIXES):
        raise ConvertError(f"Vision checkpoint file {tag} (from {name}:{tag}) does not exist.")
    else:
        pretrained_cfg = open_clip.get_pretrained_cfg(name, tag)
        if not pretrained_cfg:
            tags = open_clip.list_pretrained_tags_by_model(name)
            known = f"Its tags: {', '.join(tags)}." if tags else "It has no pretrained tags in open_clip."
            raise ConvertError(
                f"OpenCLIP model {name} has no pretrained tag {tag!r}. {known} "
                "open_clip.list_pretrained() lists every NAME:TAG pair."
            )
        try:
            checkpoint = Path(open_clip.download_pretrained(pretrained_cfg))
        except Exception as error:
            raise ConvertError(
                f"Could not fetch the OpenCLIP weights {name}:{tag} ({type(error).__name__}: {error}). They download "
                "to open_clip's cache on first use: check the network, or pass a local checkpoint as NAME:FILE."
            ) from error
        pretrained = tag
        source = short = f"OpenCLIP {name}:{tag}"
        # open_clip writes the Hub location as "org/repo/" or "org/repo/filename"
        hub_parts = pretrained_cfg.get("hf_hub", "").strip("/").split("/")
        base_model = "/".join(hub_parts[:2]) if len(hub_parts) >= 2 else None
    if is_pickle(checkpoint) and not allow_pickle:
        raise pickle_refused(checkpoint, "Vision")

    def create():
        return open_clip.create_model(
            name,
            pretrained=pretrained,
            load_weights=False,
            force_quick_gelu=bool(pretrained_cfg.get("quick_gelu", False)),
            pretrained_text=False,
        )

    weights = _openclip_weights(create, checkpoint, source)
    weights.name, weights.base_model = short, base_model
    if base_model:
        weights.license = fetch_hub_license(base_model)
    if not weights.license and tag.lower() == "openai":
        weights.license = {"license": "mit"}  # OpenAI CLIP's weights and code are MIT-licensed
    return weights


def _openclip_hub(repo_id, allow_pickle):
    import open_clip  # optional: the convert extra
    from open_clip.pretrained import download_pretrained_from_hf  # optional: the convert extra

    try:
        checkpoint = Path(download_pretrained_from_hf(repo_id))
    except Exception as error:
        raise ConvertError(
            f"Could not fetch the OpenCLIP repo hf-hub:{repo_id} ({type(error).__name__}: {error}). Check the repo id "
            "and the network, or pass a local folder."
        ) from error
    if is_pickle(checkpoint) and not allow_pickle:
        raise pickle_refused(checkpoint, "Vision")

    def create():
        return open_clip.create_model(f"hf-hub:{repo_id}", load_weights=False, pretrained_text=False)

    weights = _openclip_weights(create, checkpoint, f"OpenCLIP hf-hub:{repo_id}")
    weights.name, weights.base_model = f"OpenCLIP hf-hub:{repo_id}", repo_id
    weights.license = fetch_hub_license(repo_id)
    return weights


def _openclip_folder(folder, checkpoint, allow_pickle):
    """An OpenCLIP model saved by open_clip (`open_clip_config.json` + weights), or one file next to that config."""
    import open_clip  # optional: the convert extra

    config_file = folder / OPENCLIP_CONFIG
    if not config_file.is_file():
        raise ConvertError(
            f"Vision checkpoint {checkpoint} has no {OPENCLIP_CONFIG} next to it, so its architecture is unknown. "
            f"Pass NAME:FILE with the OpenCLIP model it was trained as (e.g. ViT-L-14-quickgelu:{checkpoint}), or "
            f"put open_clip's {OPENCLIP_CONFIG} ({{'model_cfg': ..., 'preprocess_cfg': ...}}) beside it."
        )
    if "model_cfg" not in json.loads(config_file.read_text()):
        raise ConvertError(f"{config_file} has no 'model_cfg': it is not open_clip's {OPENCLIP_CONFIG} format.")
    if checkpoint is None:
        checkpoint = _openclip_checkpoint_in(folder, allow_pickle)
    if is_pickle(checkpoint) and not allow_pickle:
        raise pickle_refused(checkpoint, "Vision")

    def create():
        return open_clip.create_model(f"local-dir:{folder}", load_weights=False, pretrained_text=False)

    weights = _openclip_weights(create, checkpoint, f"OpenCLIP checkpoint {checkpoint}")
    weights.name = f"OpenCLIP {folder.name}/{checkpoint.name}"
    weights.license = read_card_license(folder / "README.md")
    return weights


def _openclip_checkpoint_in(folder, allow_pickle):
    preferred = ["open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "model.safetensors"]
    preferred += ["open_clip_pytorch_model.bin", "pytorch_model.bin"]
    for name in preferred:
        if (folder / name).is_file():
            return folder / name
    candidates = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors",) + PICKLE_SUFFIXES)
    if len(candidates) == 1:
        return candidates[0]
    raise ConvertError(
        f"OpenCLIP folder {folder}: {'no weights found' if not candidates else 'several weight files'}; pass the "
        "checkpoint file itself as VISION."
    )


def _openclip_weights(create, checkpoint, source):
    """Build the OpenCLIP model with open_clip, load the checkpoint strictly, keep only the image tower."""
    import open_clip  # optional: the convert extra

    try:
        model = create()
    except Exception as error:
        raise ConvertError(f"open_clip could not build the model for {source}: {error}") from error
    try:
        open_clip.load_checkpoint(model, str(checkpoint), strict=True, weights_only=True)
    except Exception as error:
        raise ConvertError(
            f"{checkpoint} does not load into the OpenCLIP architecture of {source}: {error}. Use the model name "
            "or config the checkpoint was trained with."
        ) from error
    visual = model.visual
    del model  # the text tower is not needed
    config = _openclip_vision_config(visual, source)
    preprocess = getattr(visual, "preprocess_cfg", {})
    config["image_mean"] = list(preprocess.get("mean", config.get("image_mean", ())))
    config["image_std"] = list(preprocess.get("std", config.get("image_std", ())))
    resize_mode = preprocess.get("resize_mode", "shortest")
    if resize_mode not in ("shortest", "squash"):
        logger.warning(
            "%s is preprocessed with resize_mode=%r, which CLIPImageProcessor cannot do; the processor resizes the "
            "shortest side and center-crops instead.",
            source,
            resize_mode,
        )
        resize_mode = "shortest"
    state_dict = {name: tensor.detach() for name, tensor in visual.state_dict().items()}
    return VisionWeights(
        config=config,
        state_dict=state_dict,
        resample=PIL_RESAMPLE.get(preprocess.get("interpolation", "bicubic"), 3),
        resize_mode=resize_mode,
        source=source,
    )


def _openclip_vision_config(visual, source):
    """MQwenVisionConfig values read off an instantiated OpenCLIP image tower, refusing what MQwen cannot run."""
    from open_clip.transformer import (  # optional: the convert extra
        QuickGELU,
        ResidualAttentionBlock,
        VisionTransformer,
    )

    def refuse(why):
        return ConvertError(f"{source}: {why}; MQwen's vision tower is OpenCLIP's plain ViT (class-token pooling).")

    if not isinstance(visual, VisionTransformer):
        raise refuse(f"the image tower is {type(visual).__name__}, not an OpenCLIP VisionTransformer")
    if visual.attn_pool is not None or visual.pool_type != "tok":
        raise refuse("the tower pools with attention or averaging")
    if not isinstance(visual.ln_pre, nn.LayerNorm):
        raise refuse("the tower has no ln_pre")
    blocks = list(visual.transformer.resblocks)
    for block in blocks:
        if not isinstance(block, ResidualAttentionBlock) or not isinstance(block.attn, nn.MultiheadAttention):
            raise refuse(f"block type {type(block).__name__} (custom attention / qk-norm / scaled-cosine)")
        if not (isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity)):
            raise refuse("the blocks use LayerScale")
    act = blocks[0].mlp.gelu
    if isinstance(act, QuickGELU):
        hidden_act = "quick_gelu"
    elif isinstance(act, nn.GELU) and act.approximate == "none":
        hidden_act = "gelu"
    else:
        raise refuse(f"activation {act!r}")
    norms = [m for m in visual.modules() if isinstance(m, nn.LayerNorm)]
    eps = {m.eps for m in norms}
    if len(eps) != 1:
        raise refuse(f"layer norms with different eps {sorted(eps)}")
    (height, width_px), (patch_h, patch_w) = visual.image_size, visual.patch_size
    if height != width_px or patch_h != patch_w:
        raise refuse(f"non-square images or patches ({visual.image_size}, {visual.patch_size})")
    width = visual.conv1.out_channels
    return dict(
        image_size=height,
        patch_size=patch_h,
        width=width,
        layers=len(blocks),
        heads=blocks[0].attn.num_heads,
        mlp_ratio=_mlp_ratio(blocks[0].mlp.c_fc.out_features, width),
        hidden_act=hidden_act,
        layer_norm_eps=eps.pop(),
        output_dim=visual.proj.shape[1],
    )


def _mlp_ratio(hidden, width):
    """A ratio r with int(width * r) == hidden, which is how the MLP width is computed from the config."""
    ratio = hidden / width
    return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width


# ------------------------------------------------------------------------------------------------------
# transformers CLIP
# ------------------------------------------------------------------------------------------------------


def _hf_clip_folder(folder, allow_pickle, hub_id=None):
    config = json.loads((folder / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type == "clip":
        vision = config.get("vision_config", {})
    elif model_type == "clip_vision_model":
        vision = config
    else:
        raise ConvertError(
            f"{folder}/config.json has model_type {model_type!r}; transformers vision checkpoints must be CLIP "
            "(model_type 'clip' or 'clip_vision_model'). For OpenCLIP models use NAME:TAG or hf-hub:ORG/REPO."
        )

    vision = CLIPVisionConfig(**{k: v for k, v in vision.items() if k not in ("model_type", "transformers_version")})
    if vision.hidden_act not in ("gelu", "quick_gelu"):
        raise ConvertError(f"{folder}: CLIP hidden_act {vision.hidden_act!r}; MQwen supports gelu and quick_gelu.")
    if vision.num_channels != 3:
        raise ConvertError(f"{folder}: CLIP with {vision.num_channels} input channels; MQwen reads RGB images.")

    tensors = {}
    for file in find_local_weights(folder, allow_pickle, "Vision checkpoint"):
        reader = open_weights(file)
        for key in reader.keys():
            if not (key.startswith(("text_model.", "text_projection")) or key == "logit_scale"):
                tensors[key] = reader.get(key).clone()
        reader.close()
    state_dict = hf_clip_to_openclip(tensors)
    del tensors
    source = f"transformers CLIP {hub_id or folder}"
    width = vision.hidden_size
    if "proj" in state_dict:
        output_dim = state_dict["proj"].shape[1]
    else:
        # CLIPVisionModel has no projection: an identity `proj` makes the pooled output its pooler_output.
        state_dict["proj"] = torch.eye(width, dtype=state_dict["class_embedding"].dtype)
        output_dim = width
        source += " (no visual_projection: identity proj)"

    image_mean, image_std, resample, resize_mode = _hf_clip_preprocessing(folder, vision.image_size)
    config = dict(
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        width=width,
        layers=vision.num_hidden_layers,
        heads=vision.num_attention_heads,
        mlp_ratio=_mlp_ratio(vision.intermediate_size, width),
        hidden_act=vision.hidden_act,
        layer_norm_eps=vision.layer_norm_eps,
        output_dim=output_dim,
        image_mean=image_mean,
        image_std=image_std,
    )
    return VisionWeights(
        config=config,
        state_dict=state_dict,
        resample=resample,
        resize_mode=resize_mode,
        source=source,
        base_model=hub_id,
        name=f"CLIP {hub_id or folder.name}",
        license=read_card_license(folder / "README.md"),
    )


def _hf_clip_preprocessing(folder, image_size):
    file = folder / "preprocessor_config.json"
    if file.is_file():
        settings = json.loads(file.read_text())
    else:
        logger.warning("%s has no preprocessor_config.json; using CLIPImageProcessor's defaults (OpenAI's).", folder)
        settings = {}
    defaults = CLIPImageProcessor()
    mean = list(settings.get("image_mean", defaults.image_mean))
    std = list(settings.get("image_std", defaults.image_std))
    resample = int(settings.get("resample", defaults.resample))
    size = settings.get("size", {})
    crop = settings.get("crop_size", image_size)
    crop = crop.get("height", image_size) if isinstance(crop, dict) else crop
    if settings.get("do_center_crop", True) and crop != image_size:
        raise ConvertError(f"{file}: crop size {crop} differs from the model's image_size {image_size}.")
    squash = isinstance(size, dict) and "height" in size and not settings.get("do_center_crop", True)
    return mean, std, resample, "squash" if squash else "shortest"
