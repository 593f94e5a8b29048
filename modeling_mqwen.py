"""MQwen: a causal language model that reads images through an OpenCLIP ViT and a small projector.

How an image reaches the language model (the "image-placeholder splice"):

1. The processor expands every `<image>` in the prompt into `config.image_seq_length` copies of the image
   token, so the prompt already holds one position per image feature.
2. `get_image_features` runs the ViT up to `config.vision_feature_layer`, drops (or keeps) the class token,
   optionally average-pools the patch grid, and projects each patch into the language model's hidden size.
3. `_splice_image_features` writes those features, image after image in reading order, over the token
   embeddings at the placeholder positions. Every other position keeps its ordinary token embedding.
4. The language model (any transformers causal LM, built from `config.text_config`) runs on the result.

The ViT is written here rather than taken from transformers so that its parameter names are exactly
OpenCLIP's (`conv1`, `transformer.resblocks.N.attn.in_proj_weight`, ...): the checkpoint layout must not
depend on the installed transformers version, and OpenCLIP weights load with `strict=True`.
"""

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling

try:  # transformers >= 5: init helpers that skip tensors already loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # transformers 4.x tracks that per module and calls _init_weights only where needed
    from torch.nn import init

try:
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # pragma: no cover - very old transformers
    GradientCheckpointingLayer = nn.Module

from .configuration_mqwen import MQwenConfig, MQwenVisionConfig


# ----------------------------------------------------------------------------------------------------------
# Vision tower: OpenCLIP's VisionTransformer, same parameter names, attention through SDPA.
# ----------------------------------------------------------------------------------------------------------


class QuickGELU(nn.Module):
    """The activation of OpenAI's CLIP weights: x * sigmoid(1.702 x)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class MQwenVisionAttention(nn.Module):
    """Multi-head self-attention with `nn.MultiheadAttention`'s parameter names (in_proj_weight, out_proj)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x):
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

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class MQwenVisionBlock(GradientCheckpointingLayer):
    """One pre-norm residual block (OpenCLIP's `ResidualAttentionBlock`)."""

    def __init__(self, config: MQwenVisionConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.attn = MQwenVisionAttention(config.width, config.heads)
        self.ln_2 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = MQwenVisionMLP(config.width, int(config.width * config.mlp_ratio), config.hidden_act)

    def forward(self, x):
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
        """Patchify, prepend the class token, add positions, `ln_pre`: (n, 1 + grid**2, width)."""
        expected = (3, self.config.image_size, self.config.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape (num_images, {', '.join(map(str, expected))}), got "
                f"{tuple(pixel_values.shape)}. Prepare images with MQwenProcessor, which resizes them to "
                f"{self.config.image_size} px."
            )
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

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False):
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

    def forward(self, features):
        features = self.linear_1(features)
        if hasattr(self, "linear_2"):
            features = self.linear_2(self.act(features))
        return features


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------


class MQwenPreTrainedModel(PreTrainedModel):
    config_class = MQwenConfig
    base_model_prefix = "mqwen"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["MQwenVisionBlock"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _supports_cache_class = True
    _supports_static_cache = True

    def push_to_hub(self, repo_id, *args, processor=None, **kwargs):
        """Publish the model; with `processor=`, model and processor go to the repo in one commit.

        transformers' own `push_to_hub` uploads only the model, so a repo published that way cannot be used
        with AutoProcessor or the pipelines. Keyword arguments `token`, `private`, `revision`,
        `commit_message` and `create_pr` are honoured. Returns the commit info.
        """
        if processor is None:
            return super().push_to_hub(repo_id, *args, **kwargs)
        import tempfile
        from pathlib import Path

        from huggingface_hub import CommitOperationAdd, HfApi

        api = HfApi(token=kwargs.get("token"))
        repo_id = api.create_repo(repo_id, private=kwargs.get("private"), exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            processor.save_pretrained(folder)
            files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
            return api.create_commit(
                repo_id=repo_id,
                operations=[CommitOperationAdd(p.relative_to(folder).as_posix(), str(p)) for p in files],
                revision=kwargs.get("revision"),
                commit_message=kwargs.get("commit_message") or "Upload MQwen model and processor",
                create_pr=kwargs.get("create_pr", False),
            )

    def _init_weights(self, module):
        """Initialise what MQwen owns; the language model initialises its own modules."""
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
    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings):
        self.language_model.set_output_embeddings(new_embeddings)

    def get_decoder(self):
        return self.language_model.get_decoder()

    # -- images --------------------------------------------------------------------------------------------
    def get_image_features(self, pixel_values: torch.Tensor, return_dict: bool = False):
        """Projected image features, (num_images, image_seq_length, text hidden size).

        With `return_dict=True` (transformers 5's convention, which vLLM's Transformers backend calls), a
        `BaseModelOutputWithPooling` that holds them as both `last_hidden_state` and `pooler_output`.
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
            return BaseModelOutputWithPooling(last_hidden_state=features, pooler_output=features)
        return features

    def _splice_image_features(self, input_ids, inputs_embeds, pixel_values, has_cache=False):
        """Write projected image features over the `<image>` placeholder embeddings, in reading order."""
        image_mask = input_ids == self.config.image_token_id
        n_tokens = int(image_mask.sum())
        if pixel_values is None:
            if n_tokens and not has_cache:
                raise ValueError(
                    f"The input has {n_tokens} `<image>` placeholder tokens but no pixel_values. Pass the images "
                    "(processor(images=..., text=...)) or remove `<image>` from the prompt."
                )
            return inputs_embeds
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
        features = self.get_image_features(pixel_values)
        features = features.to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(image_mask.unsqueeze(-1).to(inputs_embeds.device), features)

    def _embed(self, input_ids, pixel_values, inputs_embeds, kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is not None:
            if pixel_values is not None:
                raise ValueError(
                    "pixel_values need input_ids to find the `<image>` placeholders; pass input_ids instead of "
                    "inputs_embeds, or splice the features yourself with get_image_features()."
                )
            return inputs_embeds
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        has_cache = cache is not None and cache.get_seq_length() > 0
        inputs_embeds = self.get_input_embeddings()(input_ids)
        return self._splice_image_features(input_ids, inputs_embeds, pixel_values, has_cache)

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        return_dict=None,
        **kwargs,
    ):
        """Runs the language model's decoder on the spliced embeddings. `kwargs` (the cache under either
        name, `use_cache`, `output_hidden_states`, ...) go straight to the language model.

        `return_dict=False` (vLLM's Transformers backend passes it) returns `outputs.to_tuple()`."""
        inputs_embeds = self._embed(input_ids, pixel_values, inputs_embeds, kwargs)
        outputs = self.get_decoder()(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )
        outputs = BaseModelOutputWithPast(**outputs) if not isinstance(outputs, BaseModelOutputWithPast) else outputs
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        return outputs if return_dict else outputs.to_tuple()


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

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        logits_to_keep=0,
        **kwargs,
    ):
        """Returns the language model's own output (logits, loss, cache).

        With `labels`, the loss is the language model's causal-LM loss; positions labelled -100 and every
        `<image>` position are ignored, so `labels=input_ids` is safe.

        `logits_to_keep` is the language model's: an int keeps the last that many positions (0: all), a 1D
        tensor keeps those positions. With labels and a tensor, the loss is computed from the kept logits
        alone, so training can pass `scored_positions(labels)` and skip the LM head (and the loss's fp32
        copy of the logits) at the image and prompt positions, which are most of a caption sample.
        The loss is the same; `outputs.logits` then holds the kept positions only.
        """
        inputs_embeds = self._embed(input_ids, pixel_values, inputs_embeds, kwargs)
        if labels is not None and input_ids is not None:
            labels = labels.masked_fill(input_ids == self.config.image_token_id, -100)
        loss_from_kept = labels is not None and torch.is_tensor(logits_to_keep) and logits_to_keep.dim() == 1
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=None if loss_from_kept else labels,
            logits_to_keep=logits_to_keep,
            **kwargs,
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

    def prepare_inputs_for_generation(self, *args, pixel_values=None, **kwargs):
        """Encode images only on the prefill step; decode steps reuse the cache and never see pixels."""
        model_inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        cache = model_inputs.get("cache", model_inputs.get("past_key_values"))
        if cache is None or cache.get_seq_length() == 0:
            model_inputs["pixel_values"] = pixel_values
        else:
            model_inputs.pop("pixel_values", None)
        return model_inputs

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """Beam search and num_return_sequences repeat each sample; repeat its images as a group with it.

        The default repeats `pixel_values` image by image, which is right only with one image per sample.
        """
        pixel_values = model_kwargs.pop("pixel_values", None)
        if pixel_values is not None and expand_size > 1 and input_ids is not None:
            per_sample = (input_ids == self.config.image_token_id).sum(-1) // self.config.image_seq_length
            groups = pixel_values.split(per_sample.tolist())
            pixel_values = torch.cat([group for group in groups for _ in range(expand_size)])
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        if pixel_values is not None:
            model_kwargs["pixel_values"] = pixel_values
        return input_ids, model_kwargs


_AUTO_MAP = {
    "AutoConfig": "configuration_mqwen.MQwenConfig",
    "AutoModel": "modeling_mqwen.MQwenModel",
    "AutoModelForCausalLM": "modeling_mqwen.MQwenForCausalLM",
    "AutoModelForImageTextToText": "modeling_mqwen.MQwenForCausalLM",
}
try:
    from transformers import AutoModelForVision2Seq  # noqa: F401  (gone in transformers 5)

    _AUTO_MAP["AutoModelForVision2Seq"] = "modeling_mqwen.MQwenForCausalLM"
except ImportError:
    pass

MQwenConfig.register_for_auto_class()
MQwenModel.register_for_auto_class("AutoModel")
MQwenForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["MQwenModel", "MQwenForCausalLM", "MQwenPreTrainedModel", "MQwenVisionTransformer"]
