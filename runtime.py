"""MQwen inference runtime: load a checkpoint for captioning, and caption images, the one way every tool does.

The web page (`app.py`), the caption CLI (`mqwen-caption`), train/'s evaluation (`mqwen-eval`), the shapes
demo's reload check and the benchmarks all load and caption through these functions, so they share one
device/dtype rule, one set of spellings and one batching recipe:

- `load_for_inference(path_or_repo, device="auto", dtype="auto", quantization=None)`: model + processor through
  the Auto classes with `trust_remote_code=True` (exactly what a Hub user runs), or a peft adapter folder on its
  base model; `quantization="4bit"` (or `8bit`, ... `QUANTIZATION_CHOICES`) loads the language model's linear
  layers quantized through transformers' own quantization configs (`quantization_config`).
- `caption_images(model, processor, images, batch_size=8, ...)`: batched, left-padded (the processor's default)
  `generate` + `processor.decode_captions`, yielding captions in input order as each batch finishes.
- `stream_caption(model, processor, image, ...)`: one image, its text growing as tokens arrive (the web page).

Only torch, transformers and tqdm (a transformers dependency) are imported, never the rest of this package,
so a Space can hold this file next to `app.py` and nothing else of the repository.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

# Every spelling a tool accepts for a dtype (CLIs: --dtype), and the torch dtype it means.
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32", "bfloat16", "float16", "float32")
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
ADAPTER_CONFIG = "adapter_config.json"
# `--quantize` names (`quantization_config` says what each means): 4bit = nf4; torchao-int4 needs CUDA.
QUANTIZATION_CHOICES = ("4bit", "nf4", "fp4", "8bit", "torchao-int8", "torchao-int4")
# What a quantized load leaves alone: `MQwenPreTrainedModel._not_quantized_modules`, the model's own declaration
# (tests/test_quantized.py checks they are equal). Named here too because `trust_remote_code` runs the modeling file
# saved with a checkpoint, and one saved before that declaration existed would quantize its vision tower.
NOT_QUANTIZED_MODULES = ("vision_tower", "multi_modal_projector", "language_model.lm_head")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` is cuda if torch sees a GPU, else mps (Apple silicon), else cpu; anything else is checked.

    An unavailable device is a ValueError saying so, not a deep error from the first tensor moved there.
    """
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"device {device!r} is not a device torch knows; use one of {', '.join(DEVICE_CHOICES)}"
        ) from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for but torch sees no CUDA device; use cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r} was asked for but torch sees no MPS device; use cpu or auto")
    return device


def resolve_dtype(dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> torch.dtype:
    """`auto` is bfloat16 on a CUDA device that supports it, float32 everywhere else (CPU, MPS, older GPUs):
    never a precision that may overflow where the user did not ask for it. Names: fp32/float32,
    bf16/bfloat16, fp16/float16, or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        device = torch.device(device)
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[dtype]


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """`--device` and `--dtype` as every MQwen tool spells them (values for `load_for_inference`)."""
    parser.add_argument(
        "--device", default="auto", help="auto (cuda, then mps, then cpu; the default), cpu, cuda:1, mps"
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="weights dtype (auto: bf16 on a GPU that has it, else fp32)",
    )


def add_quantization_argument(parser: argparse.ArgumentParser) -> None:
    """`--quantize` as every MQwen tool spells it (a value for `load_for_inference(quantization=...)`)."""
    parser.add_argument(
        "--quantize",
        choices=QUANTIZATION_CHOICES,
        default=None,
        help="load the language model's linear layers quantized (the vision tower and projector stay in --dtype): "
        "4bit/nf4, fp4 and 8bit through bitsandbytes, torchao-int8 (and torchao-int4, CUDA only) through torchao",
    )


def quantization_config(
    quantization: Any, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Any:
    """The transformers quantization config a `--quantize` name means, computing in `dtype`; None for None, and
    a transformers `QuantizationConfigMixin` (BitsAndBytesConfig, TorchAoConfig, ...) as given.

    4bit/nf4: bitsandbytes NF4 with double quantization (QLoRA's recipe); fp4: bitsandbytes FP4; 8bit:
    bitsandbytes LLM.int8(); torchao-int8 / torchao-int4: torchao weight-only. The vision tower, projector and
    lm_head are left alone (`NOT_QUANTIZED_MODULES`; a config passed as given gets the model's own declaration).
    A name whose library is missing is an ImportError that says what to install.
    """
    if quantization is None or not isinstance(quantization, str):
        return quantization
    if quantization not in QUANTIZATION_CHOICES:
        raise ValueError(f"quantization {quantization!r} is not one of {', '.join(QUANTIZATION_CHOICES)}")
    if quantization.startswith("torchao"):
        _require_package("torchao", quantization)
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig  # optional: the quant extra
        from transformers import TorchAoConfig

        skip = list(NOT_QUANTIZED_MODULES)
        if quantization == "torchao-int8":
            return TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=skip)
        if torch.device(device).type != "cuda":
            raise ValueError(
                "torchao-int4 runs on CUDA only (torchao's int4 weight-only kernels); on "
                f"{torch.device(device).type} use 4bit (bitsandbytes NF4) or torchao-int8"
            )
        return TorchAoConfig(Int4WeightOnlyConfig(), modules_to_not_convert=skip)
    _require_package("bitsandbytes", quantization)
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(NOT_QUANTIZED_MODULES))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        llm_int8_skip_modules=list(NOT_QUANTIZED_MODULES),
        bnb_4bit_quant_type="fp4" if quantization == "fp4" else "nf4",
        bnb_4bit_use_double_quant=quantization != "fp4",
        bnb_4bit_compute_dtype=dtype,
    )


def _require_package(package: str, quantization: str) -> None:
    try:
        importlib.import_module(package)
    except ImportError as error:
        raise ImportError(
            f"quantization {quantization!r} needs the {package} package, which is not installed ({error}): "
            f"pip install {package}  (or pip install 'mqwen[quant]')"
        ) from error


def load_for_inference(
    path_or_repo: str | Path,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    quantization: Any = None,
) -> tuple[Any, Any]:
    """(model, processor) for captioning: the model in eval mode on `device` in `dtype` (see `resolve_device`,
    `resolve_dtype`), its language model's linear layers quantized if `quantization` says so (a name of
    `QUANTIZATION_CHOICES` or a transformers quantization config: `quantization_config`).

    A checkpoint folder or Hub repo loads through `AutoModelForCausalLM` / `AutoProcessor` with
    `trust_remote_code=True`, i.e. the code files saved next to the weights. A peft adapter folder (train/'s
    `--keep-adapter` output: `adapter_config.json`, the adapter, the processor) loads its base model the same
    way, from `base_model_name_or_path`, and wraps it with `PeftModel`. A checkpoint saved quantized loads
    quantized without `quantization`. Quantized weights are placed on `device` as they load (`device_map`):
    bitsandbytes refuses `.to()` on an 8-bit model.
    """
    from transformers import AutoModelForCausalLM, AutoProcessor

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    source = str(path_or_repo)
    adapter_config = Path(source) / ADAPTER_CONFIG
    base_path = source
    if adapter_config.is_file():
        base_path = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        if not base_path:
            raise ValueError(f"{adapter_config} does not name its base model (base_model_name_or_path).")
    load = dict(trust_remote_code=True, dtype=torch_dtype)
    quantized = quantization_config(quantization, torch_dtype, device)
    if quantized is not None:
        load["quantization_config"] = quantized
    if quantized is not None or _saved_quantized(base_path):
        load["device_map"] = {"": str(device)}
    model = AutoModelForCausalLM.from_pretrained(base_path, **load)
    if base_path != source:
        from peft import PeftModel  # optional: the train extra

        model = PeftModel.from_pretrained(model, source)
    processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
    if "device_map" not in load:
        model = model.to(device)
    return model.eval(), processor


def _saved_quantized(path_or_repo: str) -> bool:
    """Whether the checkpoint's config.json holds a `quantization_config` (it was saved quantized)."""
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(path_or_repo)
    except (OSError, ValueError):  # from_pretrained then says what is wrong with the source
        return False
    return config.get("quantization_config") is not None


def processor_inputs(processor: Any, images: list, prompt: str | None = None) -> Any:
    """The processor's batch for `images` (left-padded, one `prompt` for all, default the caption instruction),
    on the CPU: the part of `model_inputs` that needs no model (Ray's CPU preprocessing tasks run it)."""
    text = None if prompt is None else [prompt] * len(images)
    return processor(images=list(images), text=text, return_tensors="pt")


def on_model(model: Any, batch: Any) -> Any:
    """A processor batch on the model's device, pixels in the model's dtype."""
    batch = batch.to(model.device)
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    return batch


def model_inputs(model: Any, processor: Any, images: list, prompt: str | None = None) -> Any:
    """The processor's batch for `images` (`processor_inputs`) on the model's device (`on_model`)."""
    return on_model(model, processor_inputs(processor, images, prompt))


def generate_captions(model: Any, processor: Any, inputs: Any, max_new_tokens: int = 64, **generate_kwargs) -> list:
    """Captions for one batch of model inputs: `model.generate`, then `processor.decode_captions`."""
    with torch.inference_mode():
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, **generate_kwargs)
    return processor.decode_captions(generated, inputs["input_ids"].shape[1])


def caption_images(
    model: Any,
    processor: Any,
    images: Iterable,
    batch_size: int = 8,
    prompt: str | None = None,
    max_new_tokens: int = 64,
    progress: bool | None = None,
    total: int | None = None,
    **generate_kwargs: Any,
) -> Iterator[str]:
    """Caption `images` (any form the processor accepts), `batch_size` at a time; yields one caption per image,
    in input order, as soon as its batch is done (`list(...)` for all of them).

    `images` may be a generator: batches are drawn from it lazily. Generation is `model.generate` with the
    model's generation config (greedy for MQwen checkpoints) plus `generate_kwargs`; captions are decoded by
    `processor.decode_captions`. A tqdm bar is shown on stderr when `progress` is True, or, by default, when
    `images` holds more than one batch (its length, or `total` for a generator).
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if total is None and hasattr(images, "__len__"):
        total = len(images)
    if progress is None:
        progress = total is not None and total > batch_size
    iterator = iter(images)
    with tqdm(total=total, desc="captioning", unit="img", disable=not progress) as bar:
        while batch := list(itertools.islice(iterator, batch_size)):
            captions = generate_captions(
                model, processor, model_inputs(model, processor, batch, prompt), max_new_tokens, **generate_kwargs
            )
            bar.update(len(batch))
            yield from captions


def stream_caption(
    model: Any,
    processor: Any,
    image: Any,
    prompt: str | None = None,
    max_new_tokens: int = 64,
    lock: threading.Lock | None = None,
    **generate_kwargs: Any,
) -> Iterator[tuple[str, int | None]]:
    """Caption one image, yielding `(text_so_far, None)` as tokens arrive and `(caption, n_new_tokens)` last.

    The last caption is decoded from the ids `generate` returned (`processor.decode_captions`), so it is exactly
    what `caption_images` gives; the partial texts come from `TextIteratorStreamer`. Generation runs in a worker
    thread (under `lock`, if given); if the consumer stops early, it stops at the next token.
    """
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    batch = model_inputs(model, processor, [image], prompt)
    prompt_length = batch["input_ids"].shape[1]
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    cancelled = threading.Event()

    class StopWhenCancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool, device=input_ids.device)

    settings = dict(
        generate_kwargs,
        max_new_tokens=int(max_new_tokens),
        streamer=streamer,
        stopping_criteria=StoppingCriteriaList([StopWhenCancelled()]),
    )
    result = {}

    def work():
        try:
            result["ids"] = model.generate(**batch, **settings)
        except BaseException as error:  # re-raised in the consumer's thread below
            result["error"] = error
        finally:
            streamer.end()  # unblocks the reader even when generate failed before streaming anything

    with lock or threading.Lock():
        worker = threading.Thread(target=work, name="mqwen-generate", daemon=True)
        worker.start()
        try:
            text = ""
            for piece in streamer:
                if piece:
                    text += piece
                    yield text.strip(), None
        finally:
            cancelled.set()  # a no-op once generation has finished
            worker.join()
    if "error" in result:
        raise result["error"]
    ids = result["ids"]
    yield processor.decode_captions(ids, prompt_length)[0], int(ids.shape[1] - prompt_length)
