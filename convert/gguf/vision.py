"""The mmproj GGUF: MQwen's OpenCLIP ViT and projector as llama.cpp's CLIP loader (tools/mtmd/clip.cpp) reads
them, with projector type "mlp" (LLaVA's graph: ViT, then Linear-GELU-Linear over the patch tokens).

How MQwen's settings map onto that graph (llama.cpp's names in quotes):
- the ViT: "v.patch_embd" (conv1, no bias), "v.class_embd", "v.position_embd", "v.pre_ln" (ln_pre), and per
  block "ln1", "attn_q/k/v" (OpenCLIP's fused in_proj split in three), "attn_out", "ln2", "ffn_up" (c_fc),
  "ffn_down" (c_proj). `ln_post` and `proj` only serve CLIP's pooled embedding and are not exported.
- the activation: "clip.use_gelu" true for GELU; neither gelu nor silu set means QuickGELU.
- the feature layer: only the blocks MQwen runs are written, and "clip.vision.feature_layer" = [that count]
  makes the graph take the output of the last one (without it llama.cpp drops one more block, as LLaVA's
  penultimate-layer default).
- the class token runs through the ViT and is then dropped: the graph projects only the patch tokens.

What the graph cannot express is refused: a kept class token, pooled patches, the single-Linear projector
(the "mlp" graph always applies GELU after the first Linear), and a ViT MLP as wide as the ViT (llama.cpp
then takes ffn_up and ffn_down for a legacy swapped layout).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ConvertError
from .writer import PlannedTensor

if TYPE_CHECKING:
    import gguf

    from ...configuration_mqwen import MQwenConfig
    from .source import MQwenFolder

# tools/mtmd/clip-impl.h KEY_FEATURE_LAYERS; the gguf package has no constant for it.
KEY_FEATURE_LAYER = "clip.vision.feature_layer"
PROJECTOR_TYPE = "mlp"  # gguf.constants.VISION_PROJECTOR_TYPE_NAMES[VISION_PROJECTOR_TYPE.MLP]


def check_vision(config: MQwenConfig) -> None:
    """Raise ConvertError for MQwen settings llama.cpp's "mlp" projector graph cannot run as MQwen does."""
    vision = config.vision_config
    problems = []
    if config.keep_class_token:
        problems.append("keep_class_token=True: llama.cpp's LLaVA graph always drops the class token after the ViT")
    if config.image_token_pooling != 1:
        problems.append(
            f"image_token_pooling={config.image_token_pooling}: llama.cpp's MLP projector reads every "
            "patch token and has no pooling step"
        )
    if config.projector_type != "mlp2x_gelu":
        problems.append(
            f"projector_type={config.projector_type!r}: llama.cpp's MLP projector always applies GELU "
            "after its first Linear (only 'mlp2x_gelu' matches)"
        )
    if int(vision.width * vision.mlp_ratio) == vision.width:
        problems.append(
            "vision_config.mlp_ratio=1: llama.cpp would read the ViT's MLP weights as a legacy swapped layout"
        )
    if problems:
        raise ConvertError("This MQwen configuration cannot be exported to llama.cpp: " + "; ".join(problems) + ".")


def feature_blocks(config: MQwenConfig) -> int:
    """How many ViT blocks MQwen runs before it reads features (vision_feature_layer, LLaVA-indexed)."""
    layers = config.vision_config.layers
    return config.vision_feature_layer % (layers + 1)


def add_vision_metadata(writer: gguf.GGUFWriter, config: MQwenConfig, name: str, file_type: int) -> None:
    import gguf  # optional: the gguf extra

    vision = config.vision_config
    blocks = feature_blocks(config)
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(PROJECTOR_TYPE)
    writer.add_vision_image_size(vision.image_size)
    writer.add_vision_patch_size(vision.patch_size)
    writer.add_vision_embedding_length(vision.width)
    writer.add_vision_feed_forward_length(int(vision.width * vision.mlp_ratio))
    writer.add_vision_block_count(max(blocks, 1) if vision.layers else 0)
    writer.add_vision_head_count(vision.heads)
    writer.add_vision_attention_layernorm_eps(vision.layer_norm_eps)
    writer.add_vision_projection_dim(config.text_config.hidden_size)
    writer.add_vision_image_mean(list(vision.image_mean))
    writer.add_vision_image_std(list(vision.image_std))
    writer.add_vision_use_gelu(vision.hidden_act == "gelu")
    writer.add_array(KEY_FEATURE_LAYER, [blocks])
    writer.add_description(
        f"MQwen vision tower (OpenCLIP ViT, {vision.hidden_act}) + Linear-GELU-Linear projector; features after "
        f"block {blocks} of {vision.layers}, class token dropped"
    )


def plan_vision_tensors(source: MQwenFolder, config: MQwenConfig) -> list[PlannedTensor]:
    """The mmproj's tensors, in file order, each read from the MQwen checkpoint when written."""
    vision = config.vision_config
    width = vision.width
    v = "vision_tower."
    plan = [
        PlannedTensor(
            "v.patch_embd.weight",
            (width, 3, vision.patch_size, vision.patch_size),
            lambda: source.tensor(v + "conv1.weight"),
            "conv",
        ),
        PlannedTensor("v.class_embd", (width,), lambda: source.tensor(v + "class_embedding"), "keep_f32"),
        PlannedTensor(
            "v.position_embd.weight",
            (vision.grid_size**2 + 1, width),
            lambda: source.tensor(v + "positional_embedding"),
            "keep_f32",
        ),
        PlannedTensor("v.pre_ln.weight", (width,), lambda: source.tensor(v + "ln_pre.weight")),
        PlannedTensor("v.pre_ln.bias", (width,), lambda: source.tensor(v + "ln_pre.bias")),
    ]
    hidden = int(width * vision.mlp_ratio)
    for i in range(max(feature_blocks(config), 1) if vision.layers else 0):
        b, g = f"{v}transformer.resblocks.{i}.", f"v.blk.{i}."

        def part(name, index, b=b):  # q, k, v rows of OpenCLIP's fused in_proj
            return lambda: source.tensor(b + name)[index * width : (index + 1) * width]

        plan += [
            PlannedTensor(g + "ln1.weight", (width,), lambda b=b: source.tensor(b + "ln_1.weight")),
            PlannedTensor(g + "ln1.bias", (width,), lambda b=b: source.tensor(b + "ln_1.bias")),
        ]
        for index, letter in enumerate("qkv"):
            plan += [
                PlannedTensor(g + f"attn_{letter}.weight", (width, width), part("attn.in_proj_weight", index)),
                PlannedTensor(g + f"attn_{letter}.bias", (width,), part("attn.in_proj_bias", index)),
            ]
        plan += [
            PlannedTensor(g + "attn_out.weight", (width, width), lambda b=b: source.tensor(b + "attn.out_proj.weight")),
            PlannedTensor(g + "attn_out.bias", (width,), lambda b=b: source.tensor(b + "attn.out_proj.bias")),
            PlannedTensor(g + "ln2.weight", (width,), lambda b=b: source.tensor(b + "ln_2.weight")),
            PlannedTensor(g + "ln2.bias", (width,), lambda b=b: source.tensor(b + "ln_2.bias")),
            PlannedTensor(g + "ffn_up.weight", (hidden, width), lambda b=b: source.tensor(b + "mlp.c_fc.weight")),
            PlannedTensor(g + "ffn_up.bias", (hidden,), lambda b=b: source.tensor(b + "mlp.c_fc.bias")),
            PlannedTensor(g + "ffn_down.weight", (width, hidden), lambda b=b: source.tensor(b + "mlp.c_proj.weight")),
            PlannedTensor(g + "ffn_down.bias", (width,), lambda b=b: source.tensor(b + "mlp.c_proj.bias")),
        ]
    text_hidden = config.text_config.hidden_size
    p = "multi_modal_projector."
    plan += [
        PlannedTensor("mm.0.weight", (text_hidden, width), lambda: source.tensor(p + "linear_1.weight")),
        PlannedTensor("mm.0.bias", (text_hidden,), lambda: source.tensor(p + "linear_1.bias")),
        PlannedTensor("mm.2.weight", (text_hidden, text_hidden), lambda: source.tensor(p + "linear_2.weight")),
        PlannedTensor("mm.2.bias", (text_hidden,), lambda: source.tensor(p + "linear_2.bias")),
    ]
    return plan
