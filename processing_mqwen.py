"""MQwen processor: CLIP image preprocessing + the Qwen tokenizer, and the `image-to-text` pipeline.

The processor's one MQwen-specific job is the placeholder expansion: every `<image>` in a prompt becomes
`image_seq_length` image tokens, one per image feature the model will splice in. It also builds the default
caption prompt (through the folder's chat template) when images come without a prompt, and left-pads batches
for generation.

The pipeline lives here (not in its own file) so that a Hub repo needs only the three MQwen files.
"""

import difflib
import inspect
import os
import types
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import transformers
from transformers import GenerationConfig, Pipeline, ProcessorMixin
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import ImageInput, load_image
from transformers.processing_utils import MultiModalData  # what `_get_num_multimodal_tokens` returns (vLLM reads it)

try:
    from PIL import Image
except ImportError:  # pragma: no cover - PIL comes with transformers' vision extras
    Image = None

if TYPE_CHECKING:
    import torch

# compat(transformers<5): 4.x's ProcessorMixin needs the sub-processor class attributes (see MQwenProcessor)
_TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5

DEFAULT_CAPTION_INSTRUCTION = "Describe this image."
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# MQwen's own template (used where `convert build` cannot keep the LLM's, and by tiny test checkpoints): Qwen2.5's
# ChatML, with image content parts rendered as `<image>` and a newline. Every piece of output is
# an explicit string, so no newline depends on Jinja's whitespace handling.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def to_rgb_image(image: ImageInput | str | os.PathLike) -> "Image.Image":
    """Any supported image input as an RGB PIL image.

    Accepts PIL images of any mode (transparency is composited on white), numpy arrays and torch tensors
    (HW, HWC or CHW; see `_array_to_pil` for how each dtype's values are read), and local file paths.
    Anything else, an empty image, or pixel values that cannot be read unambiguously raises a TypeError or
    ValueError that says what was given.
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"Image file not found: {str(path)!r}")
        try:
            with Image.open(path) as opened:
                opened.load()
                image = opened.copy()
        except Exception as error:
            raise ValueError(f"Could not read {str(path)!r} as an image: {error}") from error
    if hasattr(image, "detach") and hasattr(image, "cpu"):  # torch tensor, without importing torch here
        image = _tensor_to_array(image)
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    if Image is None or not isinstance(image, Image.Image):
        raise TypeError(
            f"Unsupported image type {type(image).__name__}: pass a PIL image, a numpy array or torch tensor "
            "(HW, HWC or CHW), or a path to an image file."
        )
    if image.width == 0 or image.height == 0:
        raise ValueError(f"The image is empty: {image.width}x{image.height} pixels (width x height).")
    if image.mode in _WIDE_PIL_MODES:  # PIL would clip 16-bit values to 255 and [0, 1] floats to black
        image = _array_to_pil(np.asarray(image))
    if image.mode == "La":  # premultiplied alpha: PIL converts it to "LA" only
        image = image.convert("LA")
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


# PIL modes whose values do not fit 8 bits: read through `_array_to_pil`'s value rules.
_WIDE_PIL_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def _tensor_to_array(tensor):
    try:
        tensor = tensor.detach().cpu()
        return (tensor.float() if tensor.is_floating_point() else tensor).numpy()
    except (RuntimeError, TypeError) as error:  # sparse, meta, quantized tensors...
        raise TypeError(f"Could not read a {tensor.dtype} tensor as an image: {error}") from error


def _array_to_pil(array):
    """An HW, HWC or CHW array (1, 3 or 4 channels) as a PIL image. Values are read by dtype:

    - uint8 as is; bool as black and white (True is white, as in PIL's mode "1");
    - uint16 as 16-bit (65535 is white); other integers must lie in 0..255;
    - floats must be finite and lie in [0, 1] (scaled by 255) or else in [0, 255].
    """
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # CHW -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"Image arrays must be HW, HWC or CHW with 1, 3 or 4 channels, got shape {array.shape}")
    if 0 in array.shape[:2]:
        raise ValueError(f"The image is empty: an array of shape {array.shape} has no pixels.")
    kind = array.dtype.kind
    if array.dtype == np.uint8:
        pass
    elif kind == "b":
        array = array.astype(np.uint8) * 255
    elif kind == "u" and array.dtype.itemsize == 2:  # uint16, either byte order (PIL's "I;16B")
        array = np.round(array / 257.0).astype(np.uint8)  # 65535 / 257 = 255
    elif kind in "iu":
        low, high = array.min(), array.max()
        if low < 0 or high > 255:
            raise ValueError(
                f"Integer image arrays must hold values in 0..255 (uint16 is read as 16-bit), but this {array.dtype} "
                f"array holds {low}..{high}. Scale it to 0..255 and pass uint8."
            )
        array = array.astype(np.uint8)
    elif kind == "f":
        bad = array.size - int(np.isfinite(array).sum())
        if bad:
            raise ValueError(f"The image array holds {bad} NaN or infinite value(s); pixel values must be finite.")
        low, high = array.min(), array.max()
        if low < 0 or high > 255:
            raise ValueError(
                f"Float image arrays must hold values in [0, 1] or [0, 255], but this one holds {low:g}..{high:g}. "
                "Pass the image before normalisation: the processor normalises it."
            )
        if array.dtype == np.float16:  # scaled in float16, 0.9 * 255 would be off by a step of 8-bit colour
            array = array.astype(np.float32)
        if high <= 1.0:
            array = array * 255.0
        array = np.clip(array, 0, 255).round().astype(np.uint8)
    else:
        raise TypeError(f"Image arrays must hold bool, integer or float values, got dtype {array.dtype}.")
    return Image.fromarray(array)


def _describe_non_text(value):
    if isinstance(value, (bytes, bytearray)):
        return f"{type(value).__name__} (decode it first: text.decode('utf-8'))"
    return type(value).__name__


class MQwenProcessor(ProcessorMixin):
    """CLIP image processor + Qwen tokenizer, with `<image>` expansion and a default caption prompt.

    Args:
        image_processor: a `CLIPImageProcessor` set to the vision tower's size and normalisation.
        tokenizer: the language model's tokenizer, with `image_token` added as a special token.
        chat_template: a template that renders image parts; `convert build` saves the LLM's own behind a
            preamble that flattens them (`convert/chat_template.py`). Defaults to MQwen's ChatML, `CHAT_TEMPLATE`.
        image_token: the placeholder string in prompts.
        image_seq_length: image tokens per `<image>`: the model config's `image_seq_length`, its one source.
            `MQwenProcessor.from_model_config(config, tokenizer)` takes it from there; a saved processor
            carries the value it was built with.
        caption_instruction: the user turn of the default caption prompt.
    """

    if _TRANSFORMERS_4:  # compat(transformers<5): 5.x reads the sub-processors from the __init__ signature instead
        attributes = ["image_processor", "tokenizer"]
        image_processor_class = "AutoImageProcessor"
        tokenizer_class = "AutoTokenizer"

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        image_token: str = "<image>",
        image_seq_length: int | None = None,
        caption_instruction: str = DEFAULT_CAPTION_INSTRUCTION,
        **kwargs,
    ):
        self.image_token = image_token
        self.image_seq_length = image_seq_length
        self.caption_instruction = caption_instruction
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(
                f"The tokenizer has no {image_token!r} token. Add it first: "
                f"tokenizer.add_special_tokens({{'additional_special_tokens': [{image_token!r}]}})"
            )
        if not isinstance(image_seq_length, int) or isinstance(image_seq_length, bool) or image_seq_length < 1:
            raise ValueError(
                f"image_seq_length={image_seq_length!r}: it must be the model config's image_seq_length (a positive "
                "int). Build the processor with MQwenProcessor.from_model_config(config, tokenizer)."
            )
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE)

    @classmethod
    def from_model_config(cls, config: Any, tokenizer: Any, caption_instruction: str | None = None) -> "MQwenProcessor":
        """The processor of a model with `config` (an `MQwenConfig`): a CLIP image processor at the vision tower's
        size and normalisation, `tokenizer` (given MQwen's ChatML template if it has none), the config's
        `image_seq_length`, and the caption instruction. Every MQwen processor is built here."""
        from transformers import CLIPImageProcessor

        vision = config.vision_config
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": vision.image_size},
            crop_size={"height": vision.image_size, "width": vision.image_size},
            image_mean=list(vision.image_mean),
            image_std=list(vision.image_std),
        )
        if tokenizer.chat_template is None:
            tokenizer.chat_template = CHAT_TEMPLATE
        return cls(
            image_processor=image_processor,
            tokenizer=tokenizer,
            chat_template=CHAT_TEMPLATE,
            image_seq_length=config.image_seq_length,
            caption_instruction=caption_instruction or DEFAULT_CAPTION_INSTRUCTION,
        )

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]

    def caption_prompt(self, instruction: str | None = None) -> str:
        """The default prompt for one image: the chat template's rendering of a user turn holding the image, then
        the caption instruction (with the template's default system prompt, if it has one)."""
        messages = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": instruction or self.caption_instruction}],
            }
        ]
        template = self.chat_template["default"] if isinstance(self.chat_template, dict) else self.chat_template
        return self.tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )

    def __call__(
        self,
        images: ImageInput | str | os.PathLike | list | None = None,
        text: str | list[str] | None = None,
        padding: bool | str = True,
        padding_side: str = "left",
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Tokenize prompts and preprocess images.

        - `images`: one image or a list (any form `to_rgb_image` accepts), in the order their `<image>`
          placeholders appear across the prompts.
        - `text`: a prompt or a list of prompts. With images and no text, each image gets the default caption
          prompt; text without any `<image>` is used as the caption instruction, one image per prompt.

        Returns `input_ids`, `attention_mask` (left-padded by default, as generation needs) and `pixel_values`.
        """
        for modality in ("videos", "audio"):  # apply_chat_template passes these as None
            if kwargs.pop(modality, None) is not None:
                raise ValueError(f"MQwen reads images and text only; {modality} are not supported.")
        for plumbing in ("text_kwargs", "images_kwargs", "common_kwargs", "processor_kwargs"):
            kwargs.update(kwargs.pop(plumbing, None) or {})
        padding = kwargs.pop("padding", padding)
        padding_side = kwargs.pop("padding_side", padding_side)
        return_tensors = kwargs.pop("return_tensors", return_tensors)
        return_offsets = kwargs.pop("return_text_replacement_offsets", False)
        images, texts = self._normalise_inputs(images, text)
        if images:
            if texts is None:
                texts = [self.caption_prompt() for _ in images]
            elif not any(self.image_token in t for t in texts):
                if len(texts) == 1 and len(images) > 1:
                    texts = texts * len(images)
                texts = [self.caption_prompt(t) for t in texts]

        counts = [t.count(self.image_token) for t in texts]
        n_images = len(images) if images else 0
        if sum(counts) != n_images:
            raise ValueError(
                f"The prompts hold {sum(counts)} `{self.image_token}` placeholders but {n_images} images were "
                "given; pass exactly one image per placeholder, in order."
            )
        expanded, offsets = self._expand_image_placeholders(texts, n_images)
        bos = self.tokenizer.bos_token
        if bos and all(t.startswith(bos) for t in expanded):  # a chat template wrote it (Llama 3, SmolLM2 on 4.x)
            kwargs.setdefault("add_special_tokens", False)  # so a tokenizer that adds a BOS does not add a second
        encoding = self.tokenizer(
            expanded, padding=padding, padding_side=padding_side, return_tensors=return_tensors, **kwargs
        )
        self._check_placeholders_survived(encoding["input_ids"], counts)
        data = dict(encoding)
        if images:
            rgb = [to_rgb_image(image) for image in images]
            # Every image is RGB HWC here; saying so stops the image processor guessing (a 3-pixel-high
            # image would otherwise read as channels-first).
            data["pixel_values"] = self.image_processor(
                rgb, return_tensors=return_tensors, input_data_format="channels_last"
            )["pixel_values"]
        batch = BatchFeature(data=data, tensor_type=return_tensors)
        if return_offsets:  # set after the tensor conversion: a list of dicts per prompt
            batch["text_replacement_offsets"] = offsets
        return batch

    def replace_image_token(self, image_inputs: dict | None = None, image_idx: int = 0, **kwargs) -> str:
        """What one `<image>` becomes in the prompt: `image_seq_length` image tokens, whatever the image
        (every image is resized to the vision tower's size)."""
        return self.image_token * self.image_seq_length

    def _expand_image_placeholders(self, texts, n_images):
        """(prompts with every `<image>` expanded, where each expansion sits: one list of dicts per prompt).

        The offsets are transformers 5's `text_replacement_offsets` (vLLM asks for them); transformers 4
        has no `get_text_with_replacements`, and there the offsets are empty lists.
        """
        if not hasattr(self, "get_text_with_replacements"):  # compat(transformers<5.10): no offsets before
            return [t.replace(self.image_token, self.replace_image_token()) for t in texts], [[] for _ in texts]
        replacements = [self.replace_image_token(image_idx=i) for i in range(n_images)]
        return self.get_text_with_replacements(list(texts), images_replacements=replacements)

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        """Placeholder tokens per image for images of `image_sizes` ((height, width) each), as
        `MultiModalData`: vLLM sizes its encoder budget with it. Every image costs `image_seq_length`."""
        if image_sizes is None:
            return MultiModalData()
        n_images = len(image_sizes)
        return MultiModalData(num_image_tokens=[self.image_seq_length] * n_images, num_image_patches=[1] * n_images)

    def _normalise_inputs(self, images, text):
        """`images` as a flat list and `text` as a list of prompts (either None when not given), checked.

        Accepted: one image, a list of images, or a list of per-prompt lists of images; one prompt (str) or a
        list of prompts. An empty list counts as not given.
        """
        given = images
        if isinstance(images, (list, tuple)):
            flat = []
            for i, item in enumerate(images):
                for j, image in enumerate(item if isinstance(item, (list, tuple)) else [item]):
                    if isinstance(image, (list, tuple)):
                        raise TypeError(
                            f"images[{i}][{j}] is a {type(image).__name__}: pass one image, a list of images, or a "
                            "list with one list of images per prompt (no deeper nesting)."
                        )
                    flat.append(image)
            images = flat or None
        elif images is not None:
            images = [images]
        if text is None or isinstance(text, str):
            texts = None if text is None else [text]
        elif isinstance(text, (list, tuple)):
            texts = list(text) or None
        else:
            raise TypeError(f"text must be a str or a list of str, got {_describe_non_text(text)}.")
        for i, prompt in enumerate(texts or ()):
            if not isinstance(prompt, str):
                raise TypeError(f"text[{i}] must be a str, got {_describe_non_text(prompt)}.")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as error:
                raise ValueError(
                    f"text[{i}] is not valid Unicode: {prompt[error.start : error.end]!r} at position {error.start} "
                    "is a lone surrogate (half of a UTF-16 pair), which no tokenizer can encode. Fix how the text "
                    "was decoded, or drop such characters: text.encode('utf-8', 'replace').decode('utf-8')."
                ) from None
        if images is None and texts is None:
            raise ValueError(f"Pass images, text, or both (got images={given!r}, text={text!r}).")
        return images, texts

    def _check_placeholders_survived(self, input_ids, counts):
        for row, (ids, count) in enumerate(zip(input_ids, counts)):
            found = int((np.asarray(ids) == self.image_token_id).sum())
            if found != count * self.image_seq_length:
                raise ValueError(
                    f"Prompt {row} should hold {count * self.image_seq_length} image tokens ({count} images x "
                    f"{self.image_seq_length}) but holds {found} after tokenization: truncation cut the image "
                    "placeholders. Do not truncate prompts with images, or raise max_length."
                )

    def decode_captions(self, generated_ids: "torch.Tensor", prompt_length: int) -> list[str]:
        """Decode only what `generate` added after a prompt of `prompt_length` tokens, stripped."""
        texts = self.tokenizer.batch_decode(generated_ids[:, prompt_length:], skip_special_tokens=True)
        return [text.strip() for text in texts]

    def post_process_image_text_to_text(
        self, generated_outputs: "torch.Tensor", skip_special_tokens: bool = True, **kwargs
    ) -> list[str]:
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)


class MQwenImageToTextPipeline(Pipeline):
    """`pipeline("image-to-text", model=repo, trust_remote_code=True)(image)` -> `[{"generated_text": caption}]`.

    Registered through `config.custom_pipelines`, which transformers consults before it rewrites the task
    name (5.x turns "image-to-text" into "image-text-to-text", which insists on a prompt). Without `prompt`,
    the processor's default caption prompt is used.

    It behaves like transformers' image-to-text pipeline (4.x):
    - Inputs: one image (a local path, an http(s) URL or base64 string read with transformers' `load_image`
      and `timeout`, a PIL image, a numpy array or torch tensor), a list of them, a generator, a torch
      `Dataset` (e.g. `KeyDataset`) or a 🤗 `datasets` dataset. An item may be a dict `{"image": ..., "prompt":
      ...}` (`"images"`, `"text"` also accepted; other keys such as dataset columns are ignored), and a list of
      images may come with a list of prompts, one per image. Several images for one prompt are one item: a list
      of images whose prompt holds one `<image>` per image.
    - Output: `[{"generated_text": ...}]` per item (`num_return_sequences` entries each); a list input gives a
      list of those in input order, a generator or dataset an iterator.
    - `batch_size` batches items: the pipeline's collate function pads them on the tokenizer's padding side,
      which is set to left here, as generation needs (transformers' text-generation pipeline does the same).
    - Generation parameters (`max_new_tokens`, `do_sample`, `temperature`, `num_beams`, ...) go to `generate`,
      given directly or in `generate_kwargs`; an unknown keyword raises an error that names it.
    """

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.tokenizer is not None:
            self.tokenizer.padding_side = "left"

    def __call__(self, inputs: Any = None, **kwargs) -> list | Iterable:
        if "images" in kwargs:  # transformers' image-to-text pipeline accepts this name too
            inputs = kwargs.pop("images")
        if inputs is None:
            raise ValueError("Pass the image(s) to caption: captioner(image), captioner([image, ...]) or a dataset.")
        prompts = kwargs.get("prompt")
        if isinstance(prompts, (list, tuple)):
            if not isinstance(inputs, (list, tuple)) or len(inputs) != len(prompts):
                raise ValueError(
                    f"A list of {len(prompts)} prompts needs a list of as many images (one prompt per image); got "
                    f"{len(inputs) if isinstance(inputs, (list, tuple)) else type(inputs).__name__}. For generators "
                    "and datasets, give each item its prompt: {'image': image, 'prompt': prompt}."
                )
            inputs = [{"image": image, "prompt": prompt} for image, prompt in zip(inputs, kwargs.pop("prompt"))]
        inputs = _as_pipeline_inputs(inputs)
        if isinstance(inputs, list) and not inputs:
            return []
        return super().__call__(inputs, **kwargs)

    def _sanitize_parameters(self, prompt=None, timeout=None, generate_kwargs=None, **kwargs):
        preprocess = {}
        if prompt is not None:
            preprocess["prompt"] = prompt
        if timeout is not None:
            preprocess["timeout"] = timeout
        generate = dict(generate_kwargs or {})
        given_twice = sorted(set(generate) & set(kwargs))
        if given_twice:
            raise ValueError(f"{given_twice} given both directly and in `generate_kwargs`; pass each only once.")
        generate.update(kwargs)
        self._check_generation_parameters(generate)
        if "stop_strings" in generate:  # generate() needs the tokenizer to match stop strings
            generate.setdefault("tokenizer", self.processor.tokenizer)
        return preprocess, generate, {}

    def _check_generation_parameters(self, generate_kwargs):
        known = {name for name in vars(GenerationConfig()) if not name.startswith("_")} - {"transformers_version"}
        known |= set(inspect.signature(self.model.generate).parameters) - {"inputs", "kwargs"}
        known |= {"tokenizer", "assistant_tokenizer"}  # generate() takes these through **kwargs
        unknown = sorted(set(generate_kwargs) - known)
        if unknown:
            hints = [
                f"{name!r} (did you mean {match[0]!r}?)"
                if (match := difflib.get_close_matches(name, known, n=1))
                else repr(name)
                for name in unknown
            ]
            raise ValueError(
                f"Unknown keyword argument(s) for the image-to-text pipeline: {', '.join(hints)}. It takes `prompt`, "
                "`timeout`, `batch_size`, `num_workers`, `generate_kwargs`, and the parameters of `generate()` / "
                "`GenerationConfig` (e.g. `max_new_tokens`, `do_sample`, `temperature`, `num_beams`)."
            )

    def preprocess(self, inputs: Any, prompt: str | None = None, timeout: float | None = None) -> BatchFeature:
        if isinstance(inputs, dict):
            inputs, prompt = _image_and_prompt_of(inputs, prompt)
        if prompt is not None and not isinstance(prompt, str):
            raise ValueError(
                f"`prompt` must be a string, got {type(prompt).__name__}. For one prompt per image, pass a list of "
                "images and a list of prompts of the same length."
            )
        images = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        placeholders = prompt.count(self.processor.image_token) if prompt else 0
        if len(images) != max(placeholders, 1):
            raise ValueError(
                f"One item holds {len(images)} image(s) but its prompt has {placeholders} "
                f"`{self.processor.image_token}` placeholder(s). To caption images one by one, pass them as a flat "
                f"list; to ask about several images at once, put one `{self.processor.image_token}` per image in "
                f"the prompt, e.g. captioner([[image_a, image_b]], prompt=...)."
            )
        images = [_load_image(image, timeout) for image in images]
        return self.processor(images=images, text=prompt, return_tensors="pt")

    def _forward(self, model_inputs, **generate_kwargs):
        input_ids = model_inputs["input_ids"]
        generated = self.model.generate(**model_inputs, **{**generate_kwargs, "return_dict_in_generate": False})
        # Batches are left-padded, so every row's prompt ends at the same column. The new tokens are grouped per
        # prompt (num_return_sequences rows each), so that the pipeline's batch unpacking keeps them together.
        new_tokens = generated[:, input_ids.shape[1] :]
        return {"new_tokens": new_tokens.unflatten(0, (input_ids.shape[0], -1))}

    def postprocess(self, model_outputs: dict) -> list[dict[str, str]]:
        captions = self.processor.decode_captions(model_outputs["new_tokens"].flatten(0, 1), 0)
        return [{"generated_text": caption} for caption in captions]


def _as_pipeline_inputs(inputs):
    """What `Pipeline.__call__` batches: lists, generators and torch map-style datasets (`KeyDataset`) as they
    are, other iterables (🤗 `datasets` datasets and columns) as generators; images and dicts stay single."""
    if isinstance(inputs, tuple):
        return list(inputs)
    single = (str, bytes, os.PathLike, dict, np.ndarray) + ((Image.Image,) if Image is not None else ())
    if isinstance(inputs, (list, types.GeneratorType) + single) or hasattr(inputs, "detach"):
        return inputs
    if isinstance(inputs, Iterable):
        return (item for item in inputs)
    return inputs


def _image_and_prompt_of(item, prompt):
    """`{"image": ..., "prompt": ...}` (or `"images"`, `"text"`) -> (image(s), prompt); the item's prompt wins."""
    image_keys = [key for key in ("image", "images") if key in item]
    if len(image_keys) != 1:
        raise ValueError(
            f"A dict input needs exactly one of the keys 'image' or 'images' (and optionally 'prompt' or 'text'); "
            f"got keys {sorted(item)}."
        )
    prompt_keys = [key for key in ("prompt", "text") if item.get(key) is not None]
    if len(prompt_keys) > 1:
        raise ValueError(f"A dict input holds both 'prompt' and 'text'; give the prompt once. Got keys {sorted(item)}.")
    return item[image_keys[0]], item[prompt_keys[0]] if prompt_keys else prompt


def _load_image(image, timeout):
    """Strings that are not local files (http(s) URLs, base64) are read by transformers' `load_image`; paths and
    in-memory images go to the processor, which reads files itself and composites transparency on white."""
    if not isinstance(image, str) or os.path.isfile(image):
        return image
    try:
        return load_image(image, timeout=timeout)
    except ValueError as error:  # load_image's last resort is base64; a mistyped path lands here
        if image.startswith(("http://", "https://", "data:")):
            raise
        shown = image if len(image) <= 200 else image[:200] + "..."
        raise FileNotFoundError(
            f"Image file not found: {shown!r}. A string must be a path to an image file, an http(s) URL or a "
            "base64-encoded image."
        ) from error


MQwenProcessor.register_for_auto_class()

__all__ = ["MQwenProcessor", "MQwenImageToTextPipeline", "to_rgb_image", "CHAT_TEMPLATE"]
