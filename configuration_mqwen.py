"""MQwen configuration: a causal language model, an OpenCLIP-layout ViT, and the projector between them.

The configuration is the single source of truth for how many placeholder tokens one image occupies in the
prompt (`image_seq_length`). The processor reads it when it expands `<image>`, and the model checks it again
when it splices features, so both always agree.
"""

import numbers
from collections.abc import Sequence

import transformers
from transformers import AutoConfig, PretrainedConfig

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

PROJECTOR_TYPES = ("mlp2x_gelu", "linear")

# `pipeline("image-to-text", model=repo, trust_remote_code=True)` finds its class here. transformers looks at
# `config.custom_pipelines` before it rewrites "image-to-text" to "image-text-to-text" (5.x), so the task and
# its prompt-free behaviour survive on every version.
CUSTOM_PIPELINES = {
    "image-to-text": {
        "impl": "processing_mqwen.MQwenImageToTextPipeline",
        "pt": ["AutoModelForCausalLM"],
        "tf": [],  # compat(transformers<5): the TensorFlow slot of 4.x's custom-pipeline format (5.x has none)
        "type": "multimodal",
    }
}

# Qwen2.5-7B-Instruct, the default language model.
QWEN25_7B_INSTRUCT = dict(
    model_type="qwen2",
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=False,
    bos_token_id=151643,
    eos_token_id=151645,
)
# The id `<image>` gets when it is appended to Qwen2.5's tokenizer (151665 tokens); the embedding matrix has
# 152064 rows, so the new token fits in the padding and no resize is needed.
QWEN25_IMAGE_TOKEN_ID = 151665


class MQwenVisionConfig(PretrainedConfig):
    """Hyper-parameters of an OpenCLIP `VisionTransformer` (defaults: ViT-L/14 at 224 px, OpenAI weights).

    The names follow OpenCLIP's `CLIPVisionCfg`, so a converter can copy them across one to one.
    `image_mean`/`image_std` are the normalisation the weights were trained with; the processor uses them.
    """

    model_type = "mqwen_vision"

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 14,
        width: int = 1024,
        layers: int = 24,
        heads: int = 16,
        mlp_ratio: float = 4.0,
        hidden_act: str = "quick_gelu",
        layer_norm_eps: float = 1e-5,
        output_dim: int = 768,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        **kwargs,
    ):
        for name, value in (
            ("image_size", image_size),
            ("patch_size", patch_size),
            ("width", width),
            ("layers", layers),
            ("heads", heads),
            ("output_dim", output_dim),
        ):
            _require_int(f"vision_config.{name}", value, minimum=1)
        for name, value in (("mlp_ratio", mlp_ratio), ("layer_norm_eps", layer_norm_eps)):
            _require_positive_number(f"vision_config.{name}", value)
        for name, value in (("image_mean", image_mean), ("image_std", image_std)):
            if not isinstance(value, (list, tuple)) or len(value) != 3:
                raise TypeError(f"vision_config.{name} must be a list of 3 numbers (R, G, B), got {value!r}")
            for channel in value:
                _require_positive_number(f"vision_config.{name}", channel, allow_zero=name == "image_mean")
        if hidden_act not in ("gelu", "quick_gelu"):
            raise ValueError(f"vision_config.hidden_act must be 'gelu' or 'quick_gelu', got {hidden_act!r}")
        if image_size % patch_size:
            raise ValueError(f"vision_config.image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
        if width % heads:
            raise ValueError(f"vision_config.width ({width}) must be divisible by heads ({heads})")
        self.image_size = image_size
        self.patch_size = patch_size
        self.width = width
        self.layers = layers
        self.heads = heads
        self.mlp_ratio = mlp_ratio
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.output_dim = output_dim
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        super().__init__(**kwargs)

    @property
    def grid_size(self) -> int:
        """Patches along one side of the image."""
        return self.image_size // self.patch_size


def _require_int(name, value, minimum=None):
    """TypeError unless `value` is an int (a bool is not), ValueError if it is below `minimum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value!r}")


def _require_positive_number(name, value, allow_zero=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not (value >= 0 if allow_zero else value > 0) or value != value or value == float("inf"):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def _build_text_config(text_config):
    if text_config is None:
        text_config = dict(QWEN25_7B_INSTRUCT)
    if isinstance(text_config, dict):
        text_config = dict(text_config)
        model_type = text_config.pop("model_type", "qwen2")
        if not isinstance(model_type, str) or model_type not in transformers.CONFIG_MAPPING:
            raise ValueError(f"text_config.model_type {model_type!r} is not a model type transformers knows")
        try:
            text_config = transformers.CONFIG_MAPPING[model_type](**text_config)
        except Exception as error:  # compat(transformers>=5.5): field errors come wrapped in StrictDataclassError
            cause = error.__cause__
            if not type(error).__name__.startswith("StrictDataclass") or not isinstance(cause, (TypeError, ValueError)):
                raise
            raise type(cause)(f"text_config is not a valid {model_type!r} config: {error}") from error
    if not isinstance(text_config, PretrainedConfig):
        raise TypeError(
            f"text_config must be a dict or a transformers config (e.g. Qwen2Config), got {type(text_config).__name__} "
            f"{text_config!r}. For a model type's defaults pass a dict: text_config={{'model_type': 'qwen2', ...}}."
        )
    for name in ("hidden_size", "vocab_size"):  # MQwen's projector and input checks read them
        _require_int(f"text_config.{name}", getattr(text_config, name, None), minimum=1)
    return text_config


class MQwenConfig(PretrainedConfig):
    """Configuration of an MQwen model.

    Args:
        text_config: any transformers causal-LM config (or its dict); default Qwen2.5-7B-Instruct's shape.
        vision_config: an `MQwenVisionConfig` (or its dict); default ViT-L/14 at 224 px.
        projector_type: `"mlp2x_gelu"` (Linear-GELU-Linear, as in LLaVA-1.5) or `"linear"`.
        vision_feature_layer: which ViT hidden state feeds the projector, indexed as in LLaVA: 0 is the
            embedding output, k the output of block k-1, -1 the last block, -2 (default) the penultimate.
        keep_class_token: whether the class token is spliced in after the patch tokens.
        image_token_pooling: side of the average-pooling window over the patch grid (1 = none,
            2 = 2x2: 256 -> 64 tokens for ViT-L/14 at 224 px).
        image_token_id: the id of `<image>` in the tokenizer.
        image_seq_length: placeholder tokens per image. Derived from the above; passing a value that
            disagrees raises, because a silent mismatch would only surface as a splice error later.
    """

    model_type = "mqwen"
    sub_configs = {"text_config": AutoConfig, "vision_config": MQwenVisionConfig}

    def __init__(
        self,
        text_config: PretrainedConfig | dict | None = None,
        vision_config: MQwenVisionConfig | dict | None = None,
        projector_type: str = "mlp2x_gelu",
        vision_feature_layer: int = -2,
        keep_class_token: bool = False,
        image_token_pooling: int = 1,
        image_token_id: int = QWEN25_IMAGE_TOKEN_ID,
        image_seq_length: int | None = None,
        **kwargs,
    ):
        self.text_config = _build_text_config(text_config)
        if vision_config is None:
            vision_config = MQwenVisionConfig()
        elif isinstance(vision_config, dict):
            vision_config = MQwenVisionConfig(**vision_config)
        elif not isinstance(vision_config, MQwenVisionConfig):
            raise TypeError(
                "vision_config must be a dict or an MQwenVisionConfig, got "
                f"{type(vision_config).__name__} {vision_config!r}"
            )
        self.vision_config = vision_config
        _require_int("vision_feature_layer", vision_feature_layer)
        _require_int("image_token_pooling", image_token_pooling)
        _require_int("image_token_id", image_token_id, minimum=0)
        if image_seq_length is not None:
            _require_int("image_seq_length", image_seq_length)
        if not isinstance(keep_class_token, bool):
            raise TypeError(f"keep_class_token must be True or False, got {keep_class_token!r}")

        if projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"projector_type must be one of {PROJECTOR_TYPES}, got {projector_type!r}")
        layers = self.vision_config.layers
        if not -(layers + 1) <= vision_feature_layer <= layers:
            raise ValueError(
                f"vision_feature_layer={vision_feature_layer} is outside the vision tower's {layers + 1} hidden "
                f"states (0 = embeddings, k = output of block k-1; use {-(layers + 1)}..{layers})"
            )
        grid = self.vision_config.grid_size
        if image_token_pooling < 1 or grid % image_token_pooling:
            raise ValueError(
                f"image_token_pooling={image_token_pooling} must be a positive divisor of the {grid}x{grid} patch grid"
            )
        self.projector_type = projector_type
        self.vision_feature_layer = vision_feature_layer
        self.keep_class_token = keep_class_token
        self.image_token_pooling = image_token_pooling
        self.image_token_id = image_token_id

        derived = (grid // image_token_pooling) ** 2 + int(keep_class_token)
        if image_seq_length is not None and image_seq_length != derived:
            raise ValueError(
                f"image_seq_length={image_seq_length} disagrees with the vision settings, which give {derived} tokens "
                f"per image ({grid}x{grid} patches, pooling {image_token_pooling}, class token "
                f"{'kept' if keep_class_token else 'dropped'}). Leave image_seq_length unset; it is derived."
            )
        self.image_seq_length = derived

        kwargs.setdefault("custom_pipelines", CUSTOM_PIPELINES)
        kwargs.setdefault("tie_word_embeddings", getattr(self.text_config, "tie_word_embeddings", False))
        super().__init__(**kwargs)


__all__ = ["MQwenConfig", "MQwenVisionConfig"]
