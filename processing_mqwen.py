"""MQwen processor: CLIP image preprocessing + the Qwen tokenizer, and the `image-to-text` pipeline.

The processor's one MQwen-specific job is the placeholder expansion: every `<image>` in a prompt becomes
`image_seq_length` image tokens, one per image feature the model will splice in. It also builds the default
caption prompt (Qwen's ChatML) when images come without a prompt, and left-pads batches for generation.

The pipeline lives here (not in its own file) so that a Hub repo needs only the three MQwen files.
"""

import os
from pathlib import Path

import numpy as np
import transformers
from transformers import Pipeline, ProcessorMixin
from transformers.feature_extraction_utils import BatchFeature

try:  # transformers >= 4.52: what `_get_num_multimodal_tokens` returns (vLLM reads it)
    from transformers.processing_utils import MultiModalData
except ImportError:  # pragma: no cover - older transformers
    MultiModalData = dict

try:
    from PIL import Image
except ImportError:  # pragma: no cover - PIL comes with transformers' vision extras
    Image = None

_TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5

DEFAULT_CAPTION_INSTRUCTION = "Describe this image."
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2.5's ChatML, with image content parts rendered as `<image>` and a newline. Every piece of output is
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


def to_rgb_image(image):
    """Any supported image input as an RGB PIL image.

    Accepts PIL images of any mode (transparency is composited on white), numpy arrays and torch tensors
    (HW, HWC or CHW; uint8, or floats in [0, 1]), and local file paths.
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
        image = image.detach().cpu().float().numpy() if image.is_floating_point() else image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    if Image is None or not isinstance(image, Image.Image):
        raise TypeError(
            f"Unsupported image type {type(image).__name__}: pass a PIL image, a numpy array or torch tensor "
            "(HW, HWC or CHW), or a path to an image file."
        )
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _array_to_pil(array):
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # CHW -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"Image arrays must be HW, HWC or CHW with 1, 3 or 4 channels, got shape {array.shape}")
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating) and array.size and array.max() <= 1.0:
            array = array * 255.0
        array = np.clip(array, 0, 255).round().astype(np.uint8)
    return Image.fromarray(array)


class MQwenProcessor(ProcessorMixin):
    """CLIP image processor + Qwen tokenizer, with `<image>` expansion and a default caption prompt.

    Args:
        image_processor: a `CLIPImageProcessor` set to the vision tower's size and normalisation.
        tokenizer: the language model's tokenizer, with `image_token` added as a special token.
        chat_template: ChatML with image parts; defaults to `CHAT_TEMPLATE`.
        image_token: the placeholder string in prompts.
        image_seq_length: image tokens per `<image>`; must equal the model config's `image_seq_length`.
        caption_instruction: the user turn of the default caption prompt.
    """

    if _TRANSFORMERS_4:  # transformers 5 reads the sub-processors from the __init__ signature instead
        attributes = ["image_processor", "tokenizer"]
        image_processor_class = "AutoImageProcessor"
        tokenizer_class = "AutoTokenizer"

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        image_token="<image>",
        image_seq_length=256,
        caption_instruction=DEFAULT_CAPTION_INSTRUCTION,
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
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values"]

    def caption_prompt(self, instruction=None) -> str:
        """The default prompt for one image: ChatML with the image, then the caption instruction."""
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

    def __call__(self, images=None, text=None, padding=True, padding_side="left", return_tensors="pt", **kwargs):
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
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        if images is not None:
            images = [image for item in images for image in (item if isinstance(item, (list, tuple)) else [item])]
        if text is None and images is None:
            raise ValueError("Pass images, text, or both.")
        texts = [text] if isinstance(text, str) else (list(text) if text is not None else None)
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
        encoding = self.tokenizer(
            expanded, padding=padding, padding_side=padding_side, return_tensors=return_tensors, **kwargs
        )
        self._check_placeholders_survived(encoding["input_ids"], counts)
        data = dict(encoding)
        if images:
            rgb = [to_rgb_image(image) for image in images]
            data["pixel_values"] = self.image_processor(rgb, return_tensors=return_tensors)["pixel_values"]
        batch = BatchFeature(data=data, tensor_type=return_tensors)
        if return_offsets:  # set after the tensor conversion: a list of dicts per prompt
            batch["text_replacement_offsets"] = offsets
        return batch

    def replace_image_token(self, image_inputs=None, image_idx=0, **kwargs) -> str:
        """What one `<image>` becomes in the prompt: `image_seq_length` image tokens, whatever the image
        (every image is resized to the vision tower's size)."""
        return self.image_token * self.image_seq_length

    def _expand_image_placeholders(self, texts, n_images):
        """(prompts with every `<image>` expanded, where each expansion sits: one list of dicts per prompt).

        The offsets are transformers 5's `text_replacement_offsets` (vLLM asks for them); transformers 4
        has no `get_text_with_replacements`, and there the offsets are empty lists.
        """
        if not hasattr(self, "get_text_with_replacements"):
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

    def _check_placeholders_survived(self, input_ids, counts):
        for row, (ids, count) in enumerate(zip(input_ids, counts)):
            found = int((np.asarray(ids) == self.image_token_id).sum())
            if found != count * self.image_seq_length:
                raise ValueError(
                    f"Prompt {row} should hold {count * self.image_seq_length} image tokens ({count} images x "
                    f"{self.image_seq_length}) but holds {found} after tokenization: truncation cut the image "
                    "placeholders. Do not truncate prompts with images, or raise max_length."
                )

    def decode_captions(self, generated_ids, prompt_length: int):
        """Decode only what `generate` added after a prompt of `prompt_length` tokens, stripped."""
        texts = self.tokenizer.batch_decode(generated_ids[:, prompt_length:], skip_special_tokens=True)
        return [text.strip() for text in texts]

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs):
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)


class MQwenImageToTextPipeline(Pipeline):
    """`pipeline("image-to-text", model=repo, trust_remote_code=True)(image)` -> `[{"generated_text": caption}]`.

    Registered through `config.custom_pipelines`, which transformers consults before it rewrites the task
    name (5.x turns "image-to-text" into "image-text-to-text", which insists on a prompt). Without `prompt`,
    the processor's default caption prompt is used.
    """

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False

    def _sanitize_parameters(self, prompt=None, max_new_tokens=None, generate_kwargs=None, timeout=None, **kwargs):
        preprocess = {"prompt": prompt}
        forward = dict(generate_kwargs or {})
        if max_new_tokens is not None:
            forward["max_new_tokens"] = max_new_tokens
        return preprocess, forward, {}

    def preprocess(self, image, prompt=None):
        return self.processor(images=image, text=prompt, return_tensors="pt")

    def _forward(self, model_inputs, **generate_kwargs):
        generated = self.model.generate(**model_inputs, **generate_kwargs)
        return {"generated": generated, "prompt_length": model_inputs["input_ids"].shape[1]}

    def postprocess(self, model_outputs):
        captions = self.processor.decode_captions(model_outputs["generated"], model_outputs["prompt_length"])
        return [{"generated_text": caption} for caption in captions]


MQwenProcessor.register_for_auto_class()

__all__ = ["MQwenProcessor", "MQwenImageToTextPipeline", "to_rgb_image", "CHAT_TEMPLATE"]
