"""The models the benchmark compares, built so that only the code differs, never the arithmetic.

- **MQwen**: `MQwenForCausalLM` at the benchmark shapes, random weights.
- **bare LM**: MQwen's own `language_model`, which *is* `AutoModelForCausalLM.from_config(text_config)`:
  the same object, so the decode figure compares MQwen's wrapper against nothing at all.
- **LLaVA-HF**: transformers' `LlavaForConditionalGeneration` with a `CLIPVisionModel` of the same width,
  depth, patch and resolution, `vision_feature_layer=-2` and the "default" strategy (drop the class
  token), hence the same 256 image tokens. Its language model and LM head are MQwen's very modules, and
  its ViT and projector hold MQwen's weights converted to CLIP's names, so both models compute the same
  logits (`check_same_logits` proves it) and a ratio can only come from how they run.
- **MQwen pool 2**: MQwen with `image_token_pooling=2` (64 image tokens), sharing every weight.

Shared modules also keep the memory of a 7B comparison to one language model.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from ..common.photos import random_photos
from ..common.small_tokenizer import train_qwen_style_tokenizer, wrap_as_transformers_tokenizer
from ..configuration_mqwen import MQwenConfig, MQwenVisionConfig
from ..modeling_mqwen import MQwenForCausalLM
from ..processing_mqwen import CHAT_TEMPLATE, MQwenProcessor
from .shapes import pick
from .timing import use_clock

if TYPE_CHECKING:
    import argparse

    from PIL import Image
    from transformers import (
        CLIPVisionConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerBase,
        PreTrainedTokenizerFast,
    )

    from ..processing_mqwen import MQwenProcessor
    from .shapes import Shapes


@dataclass
class Contenders:
    mqwen: MQwenForCausalLM
    mqwen_processor: object
    llava: object
    llava_processor: object
    pooled: MQwenForCausalLM
    pooled_processor: object
    tokenizer: object

    @property
    def bare_lm(self) -> torch.nn.Module:
        return self.mqwen.language_model


def greedy_config(tokenizer: "PreTrainedTokenizerBase", new_tokens: int) -> GenerationConfig:
    """Exactly `new_tokens` greedy tokens: no end-of-sequence id, so random weights cannot stop early."""
    return GenerationConfig(
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
    )


def make_tokenizer() -> "PreTrainedTokenizerFast":
    """The locally trained Qwen-style tokenizer (Qwen2's pipeline and special tokens, `<image>`)."""
    return wrap_as_transformers_tokenizer(train_qwen_style_tokenizer(), chat_template=CHAT_TEMPLATE)


def mqwen_config(shapes: "Shapes", tokenizer: "PreTrainedTokenizerBase", pooling: int = 1) -> MQwenConfig:
    text = dict(shapes.text, pad_token_id=tokenizer.pad_token_id, eos_token_id=None, bos_token_id=None)
    return MQwenConfig(
        text_config=text,
        vision_config=MQwenVisionConfig(**shapes.vision),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_token_pooling=pooling,
    )


class _default_dtype:
    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        self.saved = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.saved)


def build_mqwen(
    shapes: "Shapes",
    tokenizer: "PreTrainedTokenizerBase",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> MQwenForCausalLM:
    """A random MQwen built directly on `device` in `dtype` (a 7B model never exists in fp32 on the host)."""
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        model = MQwenForCausalLM(mqwen_config(shapes, tokenizer))
    return model.eval()


def build_pooled(mqwen: MQwenForCausalLM, shapes: "Shapes", tokenizer: "PreTrainedTokenizerBase") -> MQwenForCausalLM:
    """MQwen with `image_token_pooling=2`, sharing every module (and so every weight) with `mqwen`."""
    with torch.device("meta"):
        pooled = MQwenForCausalLM(mqwen_config(shapes, tokenizer, pooling=2))
    pooled.vision_tower = mqwen.vision_tower
    pooled.multi_modal_projector = mqwen.multi_modal_projector
    pooled.language_model = mqwen.language_model
    pooled.config.text_config = mqwen.language_model.config
    _check_materialised(pooled, "MQwen pool 2")
    return pooled.eval()


def clip_vision_config(vision: MQwenVisionConfig) -> "CLIPVisionConfig":
    """transformers' CLIPVisionConfig with exactly the shapes of an MQwen (OpenCLIP) vision config."""
    return CLIPVisionConfig(
        hidden_size=vision.width,
        intermediate_size=int(vision.width * vision.mlp_ratio),
        num_hidden_layers=vision.layers,
        num_attention_heads=vision.heads,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        projection_dim=vision.output_dim,
        hidden_act=vision.hidden_act,
        layer_norm_eps=vision.layer_norm_eps,
    )


def openclip_to_clip_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MQwen/OpenCLIP vision weights under transformers' CLIP names (the `vision_model.` level omitted)."""
    out = {
        "embeddings.class_embedding": state_dict["class_embedding"],
        "embeddings.patch_embedding.weight": state_dict["conv1.weight"],
        "embeddings.position_embedding.weight": state_dict["positional_embedding"],
    }
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for kind in ("weight", "bias"):
            out[f"{theirs}.{kind}"] = state_dict[f"{ours}.{kind}"]
    n_layers = 1 + max(int(key.split(".")[2]) for key in state_dict if key.startswith("transformer.resblocks."))
    for i in range(n_layers):
        ours, theirs = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = state_dict[f"{ours}attn.in_proj_{kind}"].chunk(3)
            out[f"{theirs}self_attn.q_proj.{kind}"] = q
            out[f"{theirs}self_attn.k_proj.{kind}"] = k
            out[f"{theirs}self_attn.v_proj.{kind}"] = v
            for a, b in (
                ("attn.out_proj", "self_attn.out_proj"),
                ("ln_1", "layer_norm1"),
                ("ln_2", "layer_norm2"),
                ("mlp.c_fc", "mlp.fc1"),
                ("mlp.c_proj", "mlp.fc2"),
            ):
                out[f"{theirs}{b}.{kind}"] = state_dict[f"{ours}{a}.{kind}"]
    return out


def build_llava(
    mqwen: MQwenForCausalLM, shapes: "Shapes", tokenizer: "PreTrainedTokenizerBase"
) -> "LlavaForConditionalGeneration":
    """transformers' LLaVA at MQwen's shapes, computing exactly what `mqwen` computes.

    Built on the meta device, then given real parts: a CLIP ViT holding MQwen's vision weights, a LLaVA
    projector holding MQwen's projector weights, and MQwen's own language model and LM head.
    """
    device = mqwen.device
    dtype = mqwen.vision_tower.conv1.weight.dtype
    vision = mqwen.config.vision_config
    config = LlavaConfig(
        vision_config=clip_vision_config(vision),
        text_config=mqwen.language_model.config.to_dict(),
        image_token_index=mqwen.config.image_token_id,
        image_seq_length=mqwen.config.image_seq_length,
        projector_hidden_act="gelu",
        vision_feature_layer=mqwen.config.vision_feature_layer,
        vision_feature_select_strategy="default",
        multimodal_projector_bias=True,
    )
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(config)
    with torch.device(device), _default_dtype(dtype):
        vision_tower = CLIPVisionModel(config.vision_config)
        projector = LlavaMultiModalProjector(config)
    inner = getattr(vision_tower, "vision_model", vision_tower)
    missing, unexpected = inner.load_state_dict(
        openclip_to_clip_state_dict(mqwen.vision_tower.state_dict()), strict=False
    )
    if unexpected or any(not key.endswith("position_ids") for key in missing):
        raise RuntimeError(f"CLIP weight mapping is off: missing {missing}, unexpected {unexpected}")
    projector.load_state_dict(mqwen.multi_modal_projector.state_dict())
    llava.model.vision_tower = vision_tower.eval()
    llava.model.multi_modal_projector = projector.eval()
    llava.model.language_model = mqwen.language_model.model
    llava.lm_head = mqwen.language_model.lm_head
    _check_materialised(llava, "LLaVA")
    return llava.eval()


def build_llava_processor(mqwen_processor: "MQwenProcessor") -> "LlavaProcessor":
    """LLaVA's processor over the same image processor and tokenizer (256 tokens per `<image>`)."""
    image_processor = mqwen_processor.image_processor
    patch = image_processor.crop_size["height"] // int(mqwen_processor.image_seq_length**0.5)
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=mqwen_processor.tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=CHAT_TEMPLATE,
    )


def _check_materialised(model, name):
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{name} still has meta tensors after wiring: {left[:5]}")


def build_all(
    shapes: "Shapes", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
) -> Contenders:
    tokenizer = make_tokenizer()
    mqwen = build_mqwen(shapes, tokenizer, device=device, dtype=dtype, seed=seed)
    processor = MQwenProcessor.from_model_config(mqwen.config, tokenizer)
    pooled = build_pooled(mqwen, shapes, tokenizer)
    pooled_processor = MQwenProcessor.from_model_config(pooled.config, tokenizer)
    llava = build_llava(mqwen, shapes, tokenizer)
    return Contenders(
        mqwen=mqwen,
        mqwen_processor=processor,
        llava=llava,
        llava_processor=build_llava_processor(processor),
        pooled=pooled,
        pooled_processor=pooled_processor,
        tokenizer=tokenizer,
    )


@torch.no_grad()
def check_same_logits(contenders: Contenders, images: list["Image.Image"], atol: float = 1e-4) -> float:
    """MQwen and the LLaVA contender must tokenize alike and compute the same logits; raises otherwise.

    This is what makes the LLaVA ratios fair: same shapes, same weights, same image-token count.
    """
    prompts = [contenders.mqwen_processor.caption_prompt() for _ in images]
    ours = contenders.mqwen_processor(images=images, text=prompts)
    theirs = contenders.llava_processor(
        images=images, text=prompts, padding=True, padding_side="left", return_tensors="pt"
    )
    if not torch.equal(ours["input_ids"], theirs["input_ids"]):
        raise RuntimeError(
            f"MQwen and LLaVA processors disagree on the prompt: {ours['input_ids'].shape} vs "
            f"{theirs['input_ids'].shape}"
        )
    if not torch.allclose(ours["pixel_values"], theirs["pixel_values"]):
        raise RuntimeError("MQwen and LLaVA processors produced different pixel_values")
    device = contenders.mqwen.device
    ours = {k: v.to(device) for k, v in ours.items()}
    a = contenders.mqwen(**ours).logits.float()
    b = contenders.llava(**ours).logits.float()
    scale = a.abs().max().clamp_min(1.0)
    error = float((a - b).abs().max() / scale)
    if error > atol:
        raise RuntimeError(f"MQwen and LLaVA logits differ by {error:.2e} (relative), more than {atol:g}")
    return error


@dataclass
class CpuDecodeSetup:
    """What the decode-step studies (`decode_overhead`, `compile_decode`) run: MQwen and one captioning prompt.

    `inputs` hold one random photo and the caption prompt; `text_only` is the same prompt without the pixels,
    the bare language model's input.
    """

    shapes: "Shapes"
    tokenizer: "PreTrainedTokenizerFast"
    model: MQwenForCausalLM
    processor: "MQwenProcessor"
    inputs: dict
    text_only: dict


def add_cpu_decode_arguments(parser: "argparse.ArgumentParser") -> None:
    """The options of the decode-step studies that `cpu_decode_setup` and the decode length take."""
    parser.add_argument("--quick", action="store_true", help="tiny shapes (default: the CPU mid-size shapes)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per generation (default: the shapes')")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="as in `mqwen-bench`")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def cpu_decode_setup(quick: bool, threads: int | None, clock: str) -> CpuDecodeSetup:
    """The CPU model and prompt of the decode-step studies, at `--quick` or mid-size shapes.

    Also sets torch's CPU threads (when `threads` is given) and the timing clock (`timing.use_clock`).
    """
    if threads:
        torch.set_num_threads(threads)
    use_clock(clock)
    shapes = pick("cpu", quick)
    tokenizer = make_tokenizer()
    model = build_mqwen(shapes, tokenizer, device="cpu", dtype=torch.float32)
    processor = MQwenProcessor.from_model_config(model.config, tokenizer)
    inputs = processor(images=random_photos(1, shapes.image_size_in, seed=1), text=[processor.caption_prompt()])
    text_only = {key: inputs[key] for key in ("input_ids", "attention_mask")}
    return CpuDecodeSetup(shapes, tokenizer, model, processor, inputs, text_only)
