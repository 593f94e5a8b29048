"""`mqwen-convert build`: assemble a Hub-ready MQwen folder from a pretrained LLM and a CLIP vision tower.

Order of work, chosen so that bad input fails before anything heavy runs and memory stays near one tensor:

1. Check OUT_DIR, find the LLM's weights (safetensors, or pickle only with --allow-pickle), read --projector.
2. Read the vision source into OpenCLIP layout (`vision.load_vision`) and derive its config.
3. Load the LLM's config, tokenizer and generation config; add `<image>`; decide whether the embedding
   matrices must grow (only if `<image>` falls outside the existing, padded rows); keep the LLM's chat
   template, made to render image parts (`chat_template.py`).
4. Build the MQwen model on the meta device: it names and shapes every tensor the checkpoint must hold,
   and the plan below is checked against it, so weight names cannot drift from the model code.
5. Stream: vision tower and projector first, then the LLM tensors in source order, each read, converted
   to --dtype, written and freed (`shards.write_sharded`), into a temporary folder renamed at the end.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers.dynamic_module_utils import custom_object_save

from ..common.atomic_files import staged_folder
from ..common.small_tokenizer import add_image_token
from ..configuration_mqwen import MQwenConfig, MQwenVisionConfig
from ..modeling_mqwen import MQwenForCausalLM
from ..processing_mqwen import CHAT_TEMPLATE, MQwenProcessor
from .card import write_model_card
from .chat_template import image_aware_chat_template
from .errors import ConvertError, check_destination
from .licenses import read_card_license
from .llm import Vocabulary, meta_state, plan_language_model, resolve_llm  # noqa: F401  (resolve_llm: API)
from .llm_kind import llm_kind
from .projector import PROJECTOR_PREFIX, check_projector, fresh_projector, projector_type_of, read_projector
from .push import push
from .shards import TensorPlan, open_weights, parse_size, write_sharded
from .tokenizer import ensure_pad_token
from .vision import VISION_PREFIX, load_vision

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build(
    llm: str,
    vision: str,
    out_dir: str | Path,
    dtype: str | None = None,
    image_token_pooling: int = 1,
    projector: str | None = None,
    projector_type: str | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
    max_shard_size: str | int = "5GB",
    seed: int = 0,
    command: str | None = None,
) -> Path:
    """Build an MQwen checkpoint in `out_dir` and return its path. See `mqwen-convert build --help`.

    The steps of the module docstring, one function each: `_open_sources` (1), `load_vision` (2),
    `_text_side` (3), `_meta_model` (4), `_tensor_plan` (5), `_write` (6), then an optional push.
    """
    # 1. cheap checks first
    check_destination(out_dir, overwrite)
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    max_bytes = parse_size(max_shard_size)
    sources = _open_sources(llm, projector, projector_type, allow_pickle)
    target_dtype = DTYPES[dtype] if dtype else _source_dtype(sources.readers)

    # 2. vision
    print(f"Vision: reading {vision}")
    vision_weights = load_vision(vision, allow_pickle)
    print(f"Vision: {vision_weights.source}")

    # 3. the language model's config and tokenizer, with `<image>`
    text_config, tokenizer, vocabulary = _text_side(sources, target_dtype)

    # 4. config + meta model: the single statement of what the checkpoint holds
    config, model, expected = _meta_model(
        text_config, vision_weights, vocabulary, image_token_pooling, sources.projector_type, target_dtype
    )
    projector_state = _projector_weights(sources, model, config, expected, seed)

    # 5. the plan: every output tensor's name, dtype, shape and producer, in writing order
    plan = _tensor_plan(vision_weights, projector_state, sources.readers, model, vocabulary, target_dtype, expected)

    # 6. write, into a temporary folder renamed to OUT_DIR at the end
    checkpoint = _Checkpoint(
        model=model,
        config=config,
        processor=_processor(tokenizer, config, vision_weights),
        generation_config=sources.kind.generation_config(tokenizer),
        card=dict(
            llm_name=sources.llm.name,
            llm_id=sources.llm.hub_id,
            vision=vision_weights,
            dtype=_dtype_name(target_dtype),
            projector_source=Path(projector).name if projector else None,
            command=command or "mqwen.convert.build.build(...)",
            repo_id=push_to_hub,
        ),
    )
    _write(out_dir, plan, sources, checkpoint, overwrite=overwrite, max_bytes=max_bytes)
    print(f"Built {out_dir}")
    if push_to_hub:
        print(push(out_dir, push_to_hub, private=private))
    return Path(out_dir)


@dataclass
class _Sources:
    """The opened inputs of a build: the LLM, its kind (`llm_kind.py`) and weight readers, the projector."""

    llm: Any
    kind: Any
    readers: list
    projector: str | None
    projector_state: dict | None
    projector_type: str | None


def _open_sources(llm, projector, projector_type, allow_pickle) -> _Sources:
    """Find the LLM's weights and open them (a Qwen v1 checkpoint through its converter); read --projector and
    check it is of --projector-type."""
    source = resolve_llm(llm, allow_pickle)
    kind = llm_kind(source.folder)  # a transformers LLM, or the original Qwen converted to Qwen2 (qwen_v1.py)
    projector_state = read_projector(projector, allow_pickle) if projector else None
    if projector_state is not None:
        found_type = projector_type_of(projector_state)
        if projector_type and projector_type != found_type:
            raise ConvertError(f"--projector {projector} is a {found_type} projector, not {projector_type}.")
        projector_type = found_type
    if kind.notice():
        print(kind.notice())
    readers = kind.wrap_readers([open_weights(file) for file in source.files])
    return _Sources(source, kind, readers, projector, projector_state, projector_type)


def _text_side(sources: _Sources, target_dtype):
    """(text config, tokenizer with `<image>` and a pad token, vocabulary): the LLM's own, made ready for MQwen."""
    source = sources.llm
    text_config, tokenizer = sources.kind.text_side()
    vocabulary = Vocabulary(len(tokenizer), text_config.vocab_size, add_image_token(tokenizer))
    text_config.vocab_size = vocabulary.rows
    text_config._name_or_path = source.hub_id or ""
    _set_dtype(text_config, target_dtype)
    _adopt_chat_template(tokenizer)
    ensure_pad_token(tokenizer, getattr(text_config, "pad_token_id", None))
    return text_config, tokenizer, vocabulary


def _meta_model(text_config, vision_weights, vocabulary, image_token_pooling, projector_type, target_dtype):
    """(config, MQwenForCausalLM on the meta device, its expected tensors): what the checkpoint must hold."""
    try:
        config = MQwenConfig(
            text_config=text_config,
            vision_config=MQwenVisionConfig(**vision_weights.config),
            image_token_pooling=image_token_pooling,
            image_token_id=vocabulary.image_token_id,
            projector_type=projector_type or "mlp2x_gelu",
        )
    except ValueError as error:
        raise ConvertError(str(error)) from error
    _set_dtype(config, target_dtype)
    with torch.device("meta"):
        model = MQwenForCausalLM(config)
    expected, _ = meta_state(model)
    return config, model, expected


def _projector_weights(sources: _Sources, model, config, expected, seed) -> dict:
    """--projector's weights, checked against the model's projector shapes, or a fresh init from `seed`."""
    if sources.projector_state is None:
        return fresh_projector(model, seed)
    needed = {n[len(PROJECTOR_PREFIX) :]: s for n, s in expected.items() if n.startswith(PROJECTOR_PREFIX)}
    check_projector(
        sources.projector_state, needed, sources.projector, config.vision_config.width, config.text_config.hidden_size
    )
    return sources.projector_state


def _tensor_plan(vision_weights, projector_state, readers, model, vocabulary, target_dtype, expected) -> list:
    """Every output tensor in writing order (vision, projector, LLM), checked against the meta model's names."""
    vision_state = vision_weights.state_dict
    plan = [
        TensorPlan(VISION_PREFIX + name, target_dtype, tuple(t.shape), lambda name=name: vision_state.pop(name))
        for name, t in list(vision_state.items())
    ]
    plan += [
        TensorPlan(PROJECTOR_PREFIX + name, target_dtype, tuple(t.shape), lambda t=t: t)
        for name, t in projector_state.items()
    ]
    plan += plan_language_model(readers, model, vocabulary, target_dtype)
    drift = set(expected) ^ {entry.name for entry in plan}
    if drift:  # a renamed module in modeling_mqwen.py would surface here, not as random weights after loading
        raise ConvertError(f"Internal error: planned tensor names differ from MQwenForCausalLM's: {sorted(drift)[:6]}")
    return plan


@dataclass
class _Checkpoint:
    """Everything of the output besides the weights: the meta model (for its code files), its config, processor,
    generation config, and the model card's fields (`card.write_model_card`)."""

    model: Any
    config: Any
    processor: Any
    generation_config: Any
    card: dict


def _write(out_dir, plan, sources: _Sources, checkpoint: _Checkpoint, overwrite: bool, max_bytes: int):
    """Stream the planned tensors into shards, then the metadata and the model card, into a staged folder."""
    total = sum(entry.nbytes for entry in plan)
    print(f"Writing {len(plan)} tensors ({total / 1e9:.2f} GB, {checkpoint.card['dtype']}) to {out_dir}")
    with staged_folder(out_dir, overwrite) as staging:
        with tqdm(total=total, unit="B", unit_scale=True, desc="Writing weights") as progress:
            write_sharded(staging, plan, max_bytes, progress)
        for reader in sources.readers:
            reader.close()
        plan.clear()  # every vision tensor was popped as it was written
        _save_metadata(staging, checkpoint)
        write_model_card(
            staging / "README.md",
            llm_license=read_card_license(sources.llm.folder / "README.md"),
            config=checkpoint.config,
            **checkpoint.card,
        )
        sources.kind.add_card_section(staging / "README.md")


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def _set_dtype(config, dtype):
    config.dtype = _dtype_name(dtype)  # the name transformers >= 4.56 reads and writes


def _source_dtype(readers):
    """The LLM's own storage dtype: that of its first floating-point tensor."""
    for reader in readers:
        for key in reader.keys():
            dtype, _ = reader.info(key)
            if dtype.is_floating_point:
                return dtype
    return torch.bfloat16


def _processor(tokenizer, config, vision_weights):
    """MQwen's processor with the vision source's normalisation, resampling filter and resize mode."""
    processor = MQwenProcessor.from_model_config(config, tokenizer)
    processor.chat_template = tokenizer.chat_template  # the LLM's own, image-aware (`_adopt_chat_template`)
    image_processor = processor.image_processor
    image_processor.resample = vision_weights.resample
    if vision_weights.resize_mode == "squash":
        size = config.vision_config.image_size
        image_processor.size = {"height": size, "width": size}
        image_processor.do_center_crop = False
    return processor


def _adopt_chat_template(tokenizer):
    """Give the tokenizer the LLM's own chat template, made to render image parts (`chat_template.py`).

    transformers keeps one chat template per folder, shared by the tokenizer and the processor: conversations
    without images render byte-identically to the LLM's own template; where that template is missing or cannot
    take an image part, MQwen's ChatML is used with a warning that says what changes.
    """
    tokenizer.chat_template = image_aware_chat_template(tokenizer, fallback=CHAT_TEMPLATE)


def _save_metadata(folder, checkpoint: _Checkpoint):
    model, config = checkpoint.model, checkpoint.config

    custom_object_save(model, folder, config=config)  # modeling_mqwen.py + configuration_mqwen.py, auto_map
    config.architectures = [type(model).__name__]
    config.save_pretrained(folder)
    checkpoint.generation_config.save_pretrained(folder)
    checkpoint.processor.save_pretrained(folder)  # tokenizer, chat template, image processor, processing_mqwen.py


def public_argument(arg: str) -> str:
    """A command-line argument fit for a public model card: absolute local paths shortened to their name."""
    path = Path(str(arg))
    return path.name if path.is_absolute() and path.exists() else str(arg)
