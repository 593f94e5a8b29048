"""The model card (README.md) of a built checkpoint: Hub metadata, provenance, licenses and a usage snippet.

Metadata goes through huggingface_hub's `ModelCardData`, so the YAML front matter is what the Hub parses.
Licenses are read from the sources' own model cards, never assumed; one the build cannot find is reported
as unknown so that the publisher fills it in.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

from huggingface_hub import ModelCard, ModelCardData

if TYPE_CHECKING:
    from ..configuration_mqwen import MQwenConfig
    from .vision import VisionWeights


def _license_label(fields):
    if not fields:
        return "unknown (check the source's terms)"
    label = fields.get("license_name") or fields["license"]
    return f"[{label}]({fields['license_link']})" if fields.get("license_link") else label


def _combined_license(licenses):
    """One `license` value for the front matter: the shared one, or `other` naming each component's."""
    known = [fields for fields in licenses if fields]
    names = sorted({str(fields.get("license_name") or fields["license"]) for fields in known})
    if not known:
        return {}
    if len(names) == 1 and len(known) == len(licenses):
        return dict(known[0])
    names += ["unknown"] if len(known) < len(licenses) else []
    return {"license": "other", "license_name": "-and-".join(re.sub(r"[^a-z0-9.-]+", "-", n.lower()) for n in names)}


def write_model_card(
    path: str | os.PathLike,
    *,
    llm_name: str,
    llm_id: str | None,
    llm_license: dict[str, str],
    vision: VisionWeights,
    config: MQwenConfig,
    dtype: str,
    projector_source: str | os.PathLike | None,
    command: str,
    repo_id: str | None = None,
) -> ModelCard:
    """Write README.md for a build. `vision` is a `VisionWeights`; `config` the MQwenConfig written."""
    base_models = [model for model in (llm_id, vision.base_model) if model]
    data = ModelCardData(
        base_model=base_models or None,
        pipeline_tag="image-to-text",
        library_name="transformers",
        tags=["mqwen", "image-to-text", "image-captioning", "vision-language", "custom_code"],
        **_combined_license([llm_license, vision.license]),
    )
    vc = config.vision_config
    trained = projector_source is not None
    projector_line = (
        f"loaded from `{projector_source}`"
        if trained
        else "freshly initialised: **captions are meaningless until the projector is trained** (see `train/`)"
    )
    body = f"""
# MQwen: {llm_name} + {vision.name}

An image-captioning vision-language model in the MQwen layout: the language model reads images through an
OpenCLIP-layout ViT and a `{config.projector_type}` projector whose outputs replace the `<image>` placeholder
tokens of the prompt. Loads with `trust_remote_code=True` (the model code ships in this repo).

| part | source | license |
|---|---|---|
| language model | {llm_id or llm_name} | {_license_label(llm_license)} |
| vision tower | {vision.base_model or vision.name} | {_license_label(vision.license)} |
| projector | {projector_line} | |

- Vision: {vc.image_size} px, patch {vc.patch_size}, {vc.layers} layers, width {vc.width}, {vc.hidden_act};
  features from hidden state {config.vision_feature_layer}, pooling {config.image_token_pooling}, so
  **{config.image_seq_length} tokens per image**.
- `<image>` is token id {config.image_token_id}; weights are stored in {dtype}.

## Usage

```python
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor, pipeline

repo = "{repo_id or "PATH_OR_REPO_ID"}"
model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True, dtype="auto")
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)

image = Image.open("photo.jpg")
inputs = processor(images=image, return_tensors="pt")  # default caption prompt
generated = model.generate(**inputs, max_new_tokens=64)
print(processor.decode_captions(generated, inputs["input_ids"].shape[1])[0])

# or the image-to-text pipeline
captioner = pipeline("image-to-text", model=repo, trust_remote_code=True)
print(captioner(image, max_new_tokens=64)[0]["generated_text"])
```

## How it was built

```
{command}
```
"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
    card.save(path)
    return card
