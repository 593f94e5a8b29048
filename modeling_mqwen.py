"""MQwen: a causal language model that reads images through an OpenCLIP ViT and a small projector.

How an image reaches the language model (the "image-placeholder splice"):

1. The processor expands every `<image>` in the prompt into `config.image_seq_length` copies of the image
   token, so the prompt already holds one position per image feature.
2. `get_image_features` runs the ViT up to `config.vision_feature_layer`, drops (or keeps) the class token,
   optionally average-pools the patch grid, and projects each patch into the language model's hidden size.
3. `_splice_image_features` writes those features, image after image in reading order, over the token
   embeddings at the placeholder positions. Every other position keeps its ordinary token embedding.
   The placeholders are found in `input_ids`, or, when the caller passes `inputs_embeds` instead, where an
   embedding equals the `<image>` token's own (LLaVA's convention, `get_placeholder_mask`).
4. The language model (any transformers causal LM, built from `config.text_config`) runs on the result.

Only a forward that is given `pixel_values` does any image work, and only it checks that the number of
placeholders matches the images (a clear ValueError otherwise). Without pixels, `<image>` tokens are embedded as
ordinary tokens, as in every transformers VLM (text-only assistants, serving engines' warm-up passes and
transformers' own equivalence tests rely on it); a prompt-length call logs a one-time warning, since a user
who forgot the images usually meant to pass them. During `generate`, the step that consumes the images drops
them from the generation state, so decode steps neither scan for placeholders nor wait on the device.

The ViT is written here rather than taken from transformers so that its parameter names are exactly
OpenCLIP's (`conv1`, `transformer.resblocks.N.attn.in_proj_weight`, ...): the checkpoint layout must not
depend on the installed transformers version, and OpenCLIP weights load with `strict=True`.

The file reads top-down as the model: vision tower, projector, `MQwenPreTrainedModel`, `MQwenModel` (image
features, placeholder mask, splice, forward), `MQwenForCausalLM`. The fenced sections at the end hold what
guards it: the input checks, the damaged-checkpoint message, the transformers-version shims (each tagged
`compat(transformers<...)`, so `grep -rn "compat(transformers"` lists every one) and the speed shim. Publishing
to the Hub is not here (a published checkpoint carries this file): it is `mqwen.convert.push.push_to_hub`.
"""

import copy
import inspect
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import snapshot_download  # a transformers dependency (for the damaged-weights message)
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoModelForCausalLM, Cache, GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling
from transformers.utils import ModelOutput, can_return_tuple, logging

from .configuration_mqwen import MQwenConfig, MQwenVisionConfig

logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------
# Vision tower: OpenCLIP's VisionTransformer, same parameter names, attention through SDPA.
# ----------------------------------------------------------------------------------------------------------


class QuickGELU(nn.Module):
    """The activation of OpenAI's CLIP weights: x * sigmoid(1.702 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class MQwenVisionAttention(nn.Module):
    """Multi-head self-attention with `nn.MultiheadAttention`'s parameter names (in_proj_weight, out_proj)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class MQwenVisionMLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = QuickGELU() if act == "quick_gelu" else nn.GELU()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class MQwenVisionBlock(GradientCheckpointingLayer):
    """One pre-norm residual block (OpenCLIP's `ResidualAttentionBlock`)."""

    def __init__(self, config: MQwenVisionConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.attn = MQwenVisionAttention(config.width, config.heads)
        self.ln_2 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = MQwenVisionMLP(config.width, int(config.width * config.mlp_ratio), config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class MQwenVisionEncoder(nn.Module):
    """Holds the blocks under OpenCLIP's name, `transformer.resblocks`."""

    def __init__(self, config: MQwenVisionConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(MQwenVisionBlock(config) for _ in range(config.layers))


class MQwenVisionTransformer(nn.Module):
    """OpenCLIP's `VisionTransformer` (class-token pooling, no attention pooling, no patch dropout).

    `hidden_states` indexes like transformers' CLIP and LLaVA: 0 is the embedding output (after `ln_pre`),
    k is the output of block k-1, so -1 is the last block and -2 the penultimate one.
    """

    def __init__(self, config: MQwenVisionConfig):
        super().__init__()
        self.config = config
        width, grid = config.width, config.grid_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.transformer = MQwenVisionEncoder(config)
        self.ln_post = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.proj = nn.Parameter(torch.empty(width, config.output_dim))

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patchify, prepend the class token, add positions, `ln_pre`: (n, 1 + grid**2, width).

        Every image path (the model's forward, `get_image_features`, the tower on its own) starts here, so this
        is where the pixels are checked, once (`_check_pixel_values`, in the input checks at the end of the file).
        """
        _check_pixel_values(pixel_values, self.config)
        x = self.conv1(pixel_values.to(self.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x)

    def hidden_state(self, pixel_values: torch.Tensor, layer: int) -> torch.Tensor:
        """The hidden state at index `layer`, running only the blocks needed to get there."""
        x = self.embed(pixel_values)
        for block in self.transformer.resblocks[: layer % (len(self.transformer.resblocks) + 1)]:
            x = block(x)
        return x

    def forward(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """OpenCLIP's image embedding `ln_post(x[:, 0]) @ proj`, and optionally every hidden state."""
        x = self.embed(pixel_values)
        hidden_states = [x]
        for block in self.transformer.resblocks:
            x = block(x)
            hidden_states.append(x)
        pooled = self.ln_post(x[:, 0]) @ self.proj
        return (pooled, tuple(hidden_states)) if output_hidden_states else pooled


# ----------------------------------------------------------------------------------------------------------
# Projector
# ----------------------------------------------------------------------------------------------------------


class MQwenMultiModalProjector(nn.Module):
    """Maps ViT features to the language model's hidden size: Linear-GELU-Linear, or a single Linear."""

    def __init__(self, config: MQwenConfig):
        super().__init__()
        hidden = config.text_config.hidden_size
        self.linear_1 = nn.Linear(config.vision_config.width, hidden)
        if config.projector_type == "mlp2x_gelu":
            self.act = nn.GELU()
            self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = self.linear_1(features)
        if hasattr(self, "linear_2"):
            features = self.linear_2(self.act(features))
        return features


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------


class MQwenPreTrainedModel(PreTrainedModel):
    """What both MQwen classes tell transformers (config class, attention and cache support), and their init."""

    config_class = MQwenConfig
    base_model_prefix = "mqwen"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["MQwenVisionBlock"]
    # compat(transformers<5.24): the generation cache is `past_key_values` before 5.24, `cache` from it on
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flash_attn_2 = True  # compat(transformers<4.57): the older name (4.57 and 5.x read the one above)
    _supports_flex_attn = True
    _supports_attention_backend = True
    _supports_cache_class = True  # compat(transformers<4.57): read by older releases only, not by 4.57 or 5.x
    _supports_static_cache = True  # compat(transformers<4.57): read by older releases only, not by 4.57 or 5.x
    # Never quantized by a `quantization_config` (bitsandbytes, torchao, any HfQuantizer): they stay in the compute
    # dtype. Quantizing a VLM's vision tower and projector is the field's known accuracy trap, and bitsandbytes
    # fails on layers narrower than its blocks. `from_pretrained` applies it (the "Quantization" section at the end).
    _not_quantized_modules = ("vision_tower", "multi_modal_projector", "language_model.lm_head")

    # The only loading code here, and it must be here: a Hub user's `AutoModel*.from_pretrained(repo,
    # trust_remote_code=True)` runs just the three Hub files, and a damaged download must get the same clear error.
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args, **kwargs) -> PreTrainedModel:
        """transformers' `from_pretrained`; a damaged weight file gets an error that names it (safetensors' own
        "Error while deserializing header" names no file): `_damaged_weights_message`, at the end of the file.
        A `quantization_config` that names no modules to skip gets `_not_quantized_modules` (see
        `_keep_modules_unquantized`)."""
        kwargs = _keep_modules_unquantized(cls, kwargs)
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except SafetensorError as error:
            raise ValueError(_damaged_weights_message(pretrained_model_name_or_path, kwargs, error)) from error

    def _init_weights(self, module):
        """Initialise what MQwen owns; the language model initialises its own modules. (`init`: a version shim.)"""
        std = getattr(self.config.text_config, "initializer_range", 0.02)
        if isinstance(module, MQwenVisionTransformer):
            width = module.config.width
            init.normal_(module.class_embedding, std=width**-0.5)
            init.normal_(module.positional_embedding, std=0.01)
            init.normal_(module.proj, std=width**-0.5)
        elif isinstance(module, MQwenVisionAttention):
            init.normal_(module.in_proj_weight, std=module.in_proj_weight.shape[1] ** -0.5)
            init.zeros_(module.in_proj_bias)
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            init.normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, std=std)


class MQwenModel(MQwenPreTrainedModel):
    """Vision tower + projector + language model; `forward` returns the language model's last hidden states.

    MQwenForCausalLM has the same modules under the same names, so either class loads the other's weights.
    """

    def __init__(self, config: MQwenConfig):
        super().__init__(config)
        self.vision_tower = MQwenVisionTransformer(config.vision_config)
        self.multi_modal_projector = MQwenMultiModalProjector(config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        # One text config object for both, so resizing embeddings or choosing attention updates what is saved.
        config.text_config = self.language_model.config
        config.auto_map = {**_AUTO_MAP, **(getattr(config, "auto_map", None) or {})}
        self.post_init()

    # -- embeddings are the language model's --------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.language_model.set_output_embeddings(new_embeddings)

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    # -- images --------------------------------------------------------------------------------------------
    def get_image_features(
        self, pixel_values: torch.Tensor, return_dict: bool = False
    ) -> torch.Tensor | BaseModelOutputWithPooling:
        """Projected image features, (num_images, image_seq_length, text hidden size).

        With `return_dict=True`, the same tensor as both `pooler_output` and `last_hidden_state` of a
        `BaseModelOutputWithPooling`: the form transformers' multimodal code (and vLLM's Transformers backend)
        reads image features in.
        """
        hidden = self.vision_tower.hidden_state(pixel_values, self.config.vision_feature_layer)
        cls, patches = hidden[:, :1], hidden[:, 1:]
        pool = self.config.image_token_pooling
        if pool > 1:
            grid = self.config.vision_config.grid_size
            patches = patches.transpose(1, 2).reshape(patches.shape[0], -1, grid, grid)
            patches = F.avg_pool2d(patches, pool).flatten(2).transpose(1, 2)
        features = torch.cat([cls, patches], dim=1) if self.config.keep_class_token else patches
        features = self.multi_modal_projector(features)
        if return_dict:
            return BaseModelOutputWithPooling(pooler_output=features, last_hidden_state=features)
        return features

    def get_placeholder_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """Where the `<image>` placeholders are, (batch, length) bool: from `input_ids`, or, without them, where
        `inputs_embeds` equals the `<image>` token's embedding (LLaVA's convention)."""
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        token = torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
        return (inputs_embeds == self.get_input_embeddings()(token).to(inputs_embeds.dtype)).all(-1)

    def _splice_image_features(self, input_ids, inputs_embeds, pixel_values):
        """Write projected image features over the `<image>` placeholder embeddings, in reading order.

        The vision tower checks the pixels before the counts are compared, so pixels of the wrong shape (or none)
        are named as such, not as a placeholder mismatch."""
        image_mask = self.get_placeholder_mask(input_ids, inputs_embeds)
        n_tokens = int(image_mask.sum())
        features = self.get_image_features(pixel_values)
        per_image = self.config.image_seq_length
        n_images = pixel_values.shape[0]
        if n_tokens != n_images * per_image:
            raise ValueError(
                f"Image features and image tokens do not match: the prompt holds {n_tokens} `<image>` tokens "
                f"({n_tokens / per_image:g} images at {per_image} tokens each) but {n_images} images were given "
                f"({n_images * per_image} features). Likely causes: truncation cut placeholder tokens (do not "
                "truncate prompts with images, or raise max_length); a prompt with a missing or extra `<image>`; "
                "or input_ids not built by MQwenProcessor, which expands each `<image>` to image_seq_length tokens."
            )
        features = features.to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(image_mask.unsqueeze(-1).to(inputs_embeds.device), features)

    # -- forward -------------------------------------------------------------------------------------------
    def _language_model_inputs(
        self,
        input_ids,
        pixel_values,
        attention_mask,
        position_ids,
        inputs_embeds,
        cache,
        past_key_values,
        kwargs,
        labels=None,
    ) -> dict:
        """What both forwards do first: check the inputs, hand the cache on under the name the installed
        transformers uses (`CACHE_KWARG`), splice the images in. Returns the language model's keyword arguments.

        Only a call with pixels builds the embeddings here; otherwise the language model embeds `input_ids`
        itself, exactly as it would alone, and a decode step does no image work at all.
        """
        kwargs[CACHE_KWARG] = cache if cache is not None else past_key_values
        _check_inputs(self, input_ids, pixel_values, attention_mask, inputs_embeds, labels, kwargs)
        if pixel_values is not None:
            if inputs_embeds is None:
                inputs_embeds = self.get_input_embeddings()(input_ids)
            input_ids, inputs_embeds = None, self._splice_image_features(input_ids, inputs_embeds, pixel_values)
        return dict(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **kwargs,
        )

    # Both forwards name every input they take: generate passes on only keywords a signature names, and the
    # Trainer and generate look for `labels` and `logits_to_keep` there. What they share is `_language_model_inputs`.
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        past_key_values: Cache | None = None,  # compat(transformers<5.24): the cache's name before 5.24
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Runs the language model's decoder on the spliced embeddings; `return_dict=False` gives a tuple.

        `cache` is the generation cache, `past_key_values` its name before transformers 5.24: either works
        (generate passes only keywords a signature names). `kwargs` (`use_cache`, `output_hidden_states`, ...) go
        straight to the language model.
        """
        inputs = self._language_model_inputs(
            input_ids, pixel_values, attention_mask, position_ids, inputs_embeds, cache, past_key_values, kwargs
        )
        outputs = self.get_decoder()(**inputs)
        return BaseModelOutputWithPast(**outputs) if not isinstance(outputs, BaseModelOutputWithPast) else outputs


def _next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels[:, p + 1] at position p (-100 at the end): what the logits at p are scored against."""
    return F.pad(labels, (0, 1), value=-100)[:, 1:]


def scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """The positions whose logits a causal-LM loss on `labels` reads: p where some sample labels token p + 1.

    Training passes them as `MQwenForCausalLM.forward(..., labels=labels, logits_to_keep=...)`.
    """
    return (_next_token_labels(labels) != -100).any(dim=0).nonzero().squeeze(-1)


class MQwenForCausalLM(MQwenModel, GenerationMixin):
    """MQwen with the language model's head: captioning, chat, training with labels, and `generate()`."""

    # Tells train/ that `forward(labels=..., logits_to_keep=scored_positions(labels))` gives the full loss
    # (checkpoints published with older code lack it, and train/ then computes every position's logits).
    loss_from_kept_logits = True

    # Its signature is computed once (`signature_computed_once`, applied in the speed shim at the end of the file).
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,  # compat(transformers<5.24): the cache's name before 5.24
        **kwargs,
    ) -> ModelOutput:
        """Returns the language model's own output (loss, logits, cache); `return_dict=False` gives it as a tuple.

        Inputs as `MQwenModel.forward`. With `labels`, the loss is the language model's causal-LM loss; positions
        labelled -100 and every `<image>` position are ignored, so `labels=input_ids` is safe.

        `logits_to_keep` is the language model's: an int keeps the last that many positions (0: all), a 1D
        tensor keeps those positions. With labels and a tensor, the loss is computed from the kept logits
        alone, so training can pass `scored_positions(labels)` and skip the LM head (and the loss's fp32
        copy of the logits) at the image and prompt positions, which are most of a caption sample.
        The loss is the same; `outputs.logits` then holds the kept positions only.
        """
        inputs = self._language_model_inputs(
            input_ids, pixel_values, attention_mask, position_ids, inputs_embeds, cache, past_key_values, kwargs, labels
        )
        if labels is not None and input_ids is not None:
            labels = labels.masked_fill(input_ids == self.config.image_token_id, -100)
        loss_from_kept = labels is not None and torch.is_tensor(logits_to_keep) and logits_to_keep.dim() == 1
        outputs = self.language_model(
            **inputs, labels=None if loss_from_kept else labels, logits_to_keep=logits_to_keep
        )
        if loss_from_kept:
            loss = self._loss_at_kept_positions(outputs.logits, labels, logits_to_keep, kwargs)
            return type(outputs)(loss=loss, **outputs)
        return outputs

    def _loss_at_kept_positions(self, logits, labels, kept, kwargs):
        """The causal-LM loss of `labels` from logits at the positions `kept` only (see `forward`)."""
        shift_labels = _next_token_labels(labels)
        kept = kept.to(labels.device)
        scored = shift_labels != -100
        scored[:, kept] = False
        if scored.any():
            missing = scored.any(0).nonzero().squeeze(-1).tolist()
            raise ValueError(
                f"logits_to_keep leaves out position(s) {missing[:8]}{' ...' if len(missing) > 8 else ''} whose "
                "next token is labelled, so the loss would drop them. Pass logits_to_keep=scored_positions(labels) "
                "(from modeling_mqwen), or 0 to compute every position's logits."
            )
        return self.language_model.loss_function(
            logits=logits,
            labels=None,
            shift_labels=shift_labels[:, kept],
            vocab_size=logits.shape[-1],
            num_items_in_batch=kwargs.get("num_items_in_batch"),
        )

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        inputs_embeds: torch.FloatTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        **kwargs,
    ) -> dict:
        """Hand the images to the step that first sees their placeholders, and to no other step.

        That is the prefill; when `generate` continues from a cache an earlier call returned, it is the first
        step, and only the images whose placeholders are not yet in the cache are encoded. Decode steps get no
        pixels: `_update_model_kwargs_for_generation` drops them once a forward has used them.
        """
        model_inputs = super().prepare_inputs_for_generation(input_ids, inputs_embeds=inputs_embeds, **kwargs)
        if pixel_values is not None:
            cache = model_inputs.get(CACHE_KWARG)
            cached = int(cache.get_seq_length()) if cache is not None else 0
            if cached:
                pixel_values = self._images_after(input_ids, model_inputs.get("inputs_embeds"), cached, pixel_values)
            model_inputs["pixel_values"] = pixel_values
        return model_inputs

    def _images_after(self, input_ids, inputs_embeds, position, pixel_values):
        """The images whose placeholders start at or after `position` (the rest are already in the cache)."""
        if input_ids is None or input_ids.shape[-1] == 0:  # generating from inputs_embeds alone
            return pixel_values if inputs_embeds is not None else None
        per_image = self.config.image_seq_length
        mask = input_ids == self.config.image_token_id
        total = mask.sum(-1) // per_image
        cached = mask[:, :position].sum(-1) // per_image
        keep = torch.cat([torch.arange(n, device=total.device) >= c for n, c in zip(total.tolist(), cached.tolist())])
        return pixel_values[keep.to(pixel_values.device)] if bool(keep.any()) else None

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        """Once a forward has put the images in the cache, generation carries no pixels, so decode steps do no
        image work. (Without a cache every step reruns the whole sequence and needs them again.)"""
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        if model_kwargs.get("use_cache", True):
            model_kwargs.pop("pixel_values", None)
        return model_kwargs

    def _get_candidate_generator(self, *args, **kwargs):
        """Assisted decoding hands the assistant a copy of generate's inputs; a text-only assistant (a plain
        causal LM sharing the tokenizer) rejects `pixel_values`, so it does not get them."""
        generator = super()._get_candidate_generator(*args, **kwargs)
        assistant = getattr(generator, "assistant_model", None)
        if assistant is not None and "pixel_values" not in inspect.signature(assistant.forward).parameters:
            generator.assistant_kwargs.pop("pixel_values", None)
        return generator

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """Beam search and num_return_sequences repeat each sample; repeat its images as a group with it.

        The default repeats `pixel_values` image by image, which is right only with one image per sample.
        """
        pixel_values = model_kwargs.pop("pixel_values", None)
        if pixel_values is not None and expand_size > 1:
            if input_ids is not None and input_ids.shape[-1] > 0:
                mask = self.get_placeholder_mask(input_ids, None)
            else:  # generate(inputs_embeds=...) passes an empty input_ids
                mask = self.get_placeholder_mask(None, model_kwargs["inputs_embeds"])
            per_sample = mask.sum(-1) // self.config.image_seq_length
            groups = pixel_values.split(per_sample.tolist())
            pixel_values = torch.cat([group for group in groups for _ in range(expand_size)])
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        if pixel_values is not None:
            model_kwargs["pixel_values"] = pixel_values
        return input_ids, model_kwargs


# ----------------------------------------------------------------------------------------------------------
# Auto classes: what `trust_remote_code=True` loads from a saved folder's config.json
# ----------------------------------------------------------------------------------------------------------

_AUTO_MAP = {  # written into every saved config (one class registers for one auto class; the rest by hand)
    "AutoConfig": "configuration_mqwen.MQwenConfig",
    "AutoModel": "modeling_mqwen.MQwenModel",
    "AutoModelForCausalLM": "modeling_mqwen.MQwenForCausalLM",
    "AutoModelForImageTextToText": "modeling_mqwen.MQwenForCausalLM",
}

MQwenConfig.register_for_auto_class()
MQwenModel.register_for_auto_class("AutoModel")
MQwenForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["MQwenModel", "MQwenForCausalLM", "MQwenPreTrainedModel", "MQwenVisionTransformer"]


# ==========================================================================================================
# Input checks: a clear error for what the language model or the vision tower would fail on deep inside, or
# misread. Every forward starts with `_check_inputs`; every image path with `_check_pixel_values` (in
# `MQwenVisionTransformer.embed`).
# ==========================================================================================================


def _check_inputs(model, input_ids, pixel_values, attention_mask, inputs_embeds, labels=None, kwargs=None):
    """Check types, dtypes and shapes of `model.forward`'s inputs (free per step). Token ids and labels are
    range-checked on the CPU only, where that needs no device synchronisation, and not on one-token decode
    steps (they feed back generated ids); elsewhere an id outside the vocabulary still fails inside the
    embedding. Pixels are checked by the vision tower before any image work; `<image>` tokens in a prompt
    without pixels get a warning."""
    tokens = None
    if input_ids is not None:
        _require_tensor(input_ids, "input_ids", "a LongTensor of token ids of shape (batch, sequence)")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must hold int64 (or int32) token ids, got {input_ids.dtype}.")
        tokens = _require_batch(input_ids, "input_ids", 2, "(batch, sequence)")
        if tokens[1] > 1:  # a one-token decode step feeds back a generated id: no value check, no sync
            _check_token_ids(input_ids, "input_ids", model.get_input_embeddings())
    if inputs_embeds is not None:
        _require_tensor(inputs_embeds, "inputs_embeds", "a float tensor of shape (batch, sequence, hidden)")
        hidden = model.config.text_config.hidden_size
        if not inputs_embeds.is_floating_point() or inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != hidden:
            raise ValueError(
                f"inputs_embeds must be a float tensor of shape (batch, sequence, {hidden}), got a "
                f"{inputs_embeds.dtype} tensor of shape {tuple(inputs_embeds.shape)}."
            )
        tokens = tokens or _require_batch(inputs_embeds, "inputs_embeds", 3, f"(batch, sequence, {hidden})")
    # transformers 5 hands a static-cache or compiled generate's masks over ready-made, one per layer type
    if attention_mask is not None and tokens is not None and not isinstance(attention_mask, dict):
        _require_tensor(attention_mask, "attention_mask", f"a tensor of shape {tokens}")
        # compat(transformers<5.24): the cache arrives as `past_key_values` before 5.24
        has_cache = (kwargs or {}).get("cache", (kwargs or {}).get("past_key_values")) is not None
        shape = tuple(attention_mask.shape)
        if attention_mask.dim() == 2:  # with a cache it also covers the cached positions
            fits = shape[0] == tokens[0] and (shape[1] >= tokens[1] if has_cache else shape[1] == tokens[1])
        else:  # a 4D mask (batch, heads, query, key) made by the caller
            fits = attention_mask.dim() == 4 and shape[0] == tokens[0] and shape[2] == tokens[1]
        if not fits:
            raise ValueError(
                f"attention_mask must have the shape of the input tokens, {tokens} (batch, sequence"
                f"{' + cached tokens' if has_cache else ''}), got {shape}."
            )
    if labels is not None and tokens is not None:
        _require_tensor(labels, "labels", f"a LongTensor of shape {tokens}")
        if labels.dtype != torch.int64:
            raise TypeError(f"labels must hold int64 token ids (-100 = not scored), got {labels.dtype}.")
        if tuple(labels.shape) != tokens:
            raise ValueError(
                f"labels must have the shape of the input tokens, {tokens}, got {tuple(labels.shape)} "
                "(a mismatched shape would be broadcast into a wrong loss)."
            )
        _check_token_ids(labels, "labels", model.get_output_embeddings(), ignore=-100)
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
    if pixel_values is None and input_ids is not None and tokens[1] > 1:
        _warn_if_placeholders_without_pixels(model.config, input_ids)


def _check_token_ids(ids, name, embedding, ignore=None):
    size = getattr(embedding, "num_embeddings", getattr(embedding, "out_features", None))
    if ids.device.type != "cpu" or size is None:
        return
    valid = ids if ignore is None else ids[ids != ignore]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= size):
        bad = valid[(valid < 0) | (valid >= size)]
        raise ValueError(
            f"{name} holds id(s) {sorted(set(bad.tolist()))[:5]} outside the vocabulary (0..{size - 1}"
            f"{f', or {ignore} for not scored' if ignore is not None else ''}). Were they made with another "
            "tokenizer? Use this model's processor."
        )


def _check_pixel_values(pixel_values, config: MQwenVisionConfig):
    """pixel_values as MQwenProcessor makes them: float (num_images, 3, size, size), finite, normalised.

    The value check is one pass over the pixels (the vision tower makes thousands), once per image batch;
    it catches NaN/inf and raw 0-255 pixels, which would otherwise give NaN or meaningless logits.
    """
    size = config.image_size
    expected = f"(num_images, 3, {size}, {size})"
    _require_tensor(pixel_values, "pixel_values", f"a float tensor of shape {expected} from MQwenProcessor")
    if not pixel_values.is_floating_point():
        raise TypeError(
            f"pixel_values must be a float tensor of normalised pixels, got {pixel_values.dtype}. Raw images "
            "go through MQwenProcessor(images=...), which resizes and normalises them."
        )
    if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, size, size) or not len(pixel_values):
        raise ValueError(
            f"pixel_values must have shape {expected}, got {tuple(pixel_values.shape)}. Prepare images with "
            f"MQwenProcessor, which resizes them to {size} px."
        )
    low, high = torch.stack(torch.aminmax(pixel_values.detach())).float().tolist()
    reach = max(max(m, 1 - m) / s for m, s in zip(config.image_mean, config.image_std))
    if not math.isfinite(low) or not math.isfinite(high):
        raise ValueError("pixel_values hold NaN or infinite values; the image they came from must be finite.")
    if max(-low, high) > 10 * reach:
        raise ValueError(
            f"pixel_values range over {low:g}..{high:g}, but normalised images lie within about "
            f"+-{reach:.2f} (image_mean/image_std). Were raw 0-255 pixels passed? Use MQwenProcessor."
        )


def _warn_if_placeholders_without_pixels(config, input_ids):
    """Placeholders without pixels are embedded as ordinary tokens (see the module docstring); say so once.

    `_check_inputs` asks for prompt-length calls only (a decode step feeds one generated token); never
    under torch.compile.
    """
    if torch.compiler.is_compiling():
        return
    if bool((input_ids == config.image_token_id).any()):
        logger.warning_once(
            "The input holds `<image>` placeholder tokens but no pixel_values, so they are embedded as ordinary "
            "tokens and the model sees no image. If you meant to caption or ask about an image, pass the "
            "processor's pixel_values too: model(**processor(images=..., text=...))."
        )


def _require_tensor(value, name, expected):
    if not isinstance(value, torch.Tensor):
        hint = ""
        if hasattr(value, "__len__"):  # an array or a list
            hint = " (torch.from_numpy(...), or the processor with return_tensors='pt')"
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}{hint}.")


def _require_batch(tensor, name, ndim, layout):
    """`tensor.shape[:2]` after checking it has `ndim` dimensions and at least one sample and one position."""
    if tensor.dim() != ndim or 0 in tensor.shape[:2]:
        raise ValueError(
            f"{name} must have shape {layout} with at least one sample and one position, got {tuple(tensor.shape)}"
            + (f"; add the batch dimension: {name}[None]." if tensor.dim() == ndim - 1 else ".")
        )
    return tuple(tensor.shape[:2])


# ==========================================================================================================
# Damaged checkpoints: the error `MQwenPreTrainedModel.from_pretrained` raises for a weight file that does not
# open. Here, not in runtime.py, because remote code loads through this file alone (see `from_pretrained`).
# ==========================================================================================================


def _damaged_weights_message(source, kwargs, error):
    """Which `*.safetensors` files of a local folder (or of a Hub repo's cached snapshot) fail to open, and why."""
    folder = Path(source)
    if not folder.is_dir():
        try:  # the local cache only: no download
            folder = Path(
                snapshot_download(
                    str(source),
                    revision=kwargs.get("revision"),
                    local_files_only=True,
                    allow_patterns=["*.safetensors"],
                )
            )
        except Exception:  # not cached, or no Hub access: say what we know
            return f"Could not load the weights of {source!r}: a safetensors file is damaged ({error})."
    folder = folder / (kwargs.get("subfolder") or "")
    damaged = []
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as reason:
            damaged.append(f"{os.path.realpath(path)} ({path.stat().st_size} bytes: {reason})")
    what = "; ".join(damaged) or f"a safetensors file in {folder} ({error})"
    return (
        f"Could not load the weights of {str(source)!r}: {what}. The file is empty or truncated (an interrupted "
        "download, copy or save?): download or convert it again."
    )


# ==========================================================================================================
# Quantization: what `MQwenPreTrainedModel.from_pretrained` does to a `quantization_config` it is given.
# ==========================================================================================================

# The field each kind of config names its unconverted modules in: bitsandbytes' `llm_int8_skip_modules` (4-bit too),
# every other HfQuantizer's config (torchao, quanto, HQQ, FP8, ...) `modules_to_not_convert`.
_SKIP_FIELDS = ("llm_int8_skip_modules", "modules_to_not_convert")


def _keep_modules_unquantized(cls, kwargs: dict) -> dict:
    """`kwargs` with a copy of its `quantization_config` whose skip list is `cls._not_quantized_modules`, when the
    caller named none (a list the caller gave is theirs, and kept).

    Why here: transformers 4.57 and 5.x build every quantizer's skip list from the config's field, else from the
    model's tied and output embeddings plus `_keep_in_fp32_modules`; that attribute would also upcast the vision
    tower to float32 (5.x: under fp16; 4.57: under any bitsandbytes load), so MQwen declares its own list and
    fills the config's field. A checkpoint saved quantized carries the filled field in its config.json.
    """
    config = kwargs.get("quantization_config")
    if config is None:
        return kwargs
    config = copy.deepcopy(config)
    fields = config if isinstance(config, dict) else vars(config)
    field = next((name for name in _SKIP_FIELDS if name in fields), None)
    if field is None and isinstance(config, dict):  # a dict names only what it sets
        bitsandbytes = str(config.get("quant_method", "")).startswith("bitsandbytes") or "load_in_4bit" in config
        field = _SKIP_FIELDS[0] if bitsandbytes or "load_in_8bit" in config else _SKIP_FIELDS[1]
    if field is not None and fields.get(field) is None:
        fields[field] = list(cls._not_quantized_modules)
    return {**kwargs, "quantization_config": config}


# ==========================================================================================================
# transformers-version shims, each tagged `compat(transformers<...)`: dropping a version is one grep. Module
# names that the methods above read when they run, so defining them here, after the classes, is enough.
# ==========================================================================================================

# compat(transformers<5): 5.x has init helpers that skip tensors already loaded from a checkpoint; 4.x tracks
# that per module and calls `_init_weights` only where needed, so torch's own init functions serve.
try:
    from transformers import initialization as init
except ImportError:
    from torch.nn import init

# compat(transformers<5.24): what the installed transformers calls the generation cache, `cache` (5.24 on) or
# `past_key_values` (before). forward names `cache` (generate only forwards keywords a signature names) and
# hands it on to the language model under this name.
_GENERATION_KEYWORDS = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
CACHE_KWARG = "cache" if "cache" in _GENERATION_KEYWORDS else "past_key_values"

# compat(transformers<5): 4.x still has AutoModelForVision2Seq (gone in 5), and its pipelines load through it.
try:
    from transformers import AutoModelForVision2Seq  # noqa: F401

    _AUTO_MAP["AutoModelForVision2Seq"] = "modeling_mqwen.MQwenForCausalLM"
except ImportError:
    pass


# ==========================================================================================================
# Speed shim: `MQwenForCausalLM.forward`'s signature, computed once instead of on every decode step.
# ==========================================================================================================


class _MethodSignature(inspect.Signature):
    """A method's signature that also holds, made once, the one its bound methods report (without `self`).

    For a bound method, `inspect.signature` takes the function's signature and calls
    `.replace(parameters=<all but the first>)`, which builds and re-validates a new Signature on every call (most
    of what a decode step spends in inspect). Asked for exactly that, `replace` returns the copy made here; any
    other `replace` is inspect's own.
    """

    __slots__ = ("_bound_parameters", "_bound")

    @classmethod
    def of(cls, function: Callable) -> "_MethodSignature":
        signature = inspect.signature(function)
        stored = cls(signature.parameters.values(), return_annotation=signature.return_annotation)
        stored._bound_parameters = tuple(stored.parameters.values())[1:]
        stored._bound = inspect.Signature(stored._bound_parameters, return_annotation=signature.return_annotation)
        return stored

    def replace(self, **changes) -> inspect.Signature:
        if changes.keys() == {"parameters"} and changes["parameters"] == getattr(self, "_bound_parameters", None):
            return self._bound
        return super().replace(**changes)


def signature_computed_once(method: Callable) -> Callable:
    """Store the signature of the function under `method`'s decorators on that function, computed once.

    Registered for an auto class, MQwen is remote code to transformers, and transformers 5 then rebuilds
    `inspect.signature(model.forward)` on every decode step (it looks for the retired `cache_position`; 4.57 does
    it for every model, looking for `position_ids`): a few percent of a small model's step. `inspect.signature`
    follows `__wrapped__` down to the innermost function and computes the signature from it, so storing exactly
    that result there changes no answer, only the cost; it is a `_MethodSignature`, so the bound method's
    signature (without `self`) is not rebuilt either. Only under a decorator, never on the outer function: a
    hook that wraps the bound method (accelerate's `add_hook_to_module`) copies the outer function's attributes
    and would then report the signature with `self`.
    """
    function = inspect.unwrap(method)
    if function is not method:
        function.__signature__ = _MethodSignature.of(function)
    return method


signature_computed_once(MQwenForCausalLM.forward)
