"""Figures 1, 2, 3 and 5: decode speed, caption latency, training throughput, bandwidth efficiency.

Each figure function runs its contenders interleaved (`timing.interleave`) and returns table rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from ..common.photos import random_photos
from ..modeling_mqwen import scored_positions
from .contenders import greedy_config
from .report import Row
from .timing import Stats, StepClock, interleave, now, synchronize, unit

if TYPE_CHECKING:
    from PIL import Image

    from .contenders import Contenders
    from .shapes import Shapes


def _to(batch, device, dtype):
    """Move a processor's output to the model: floats to the model's dtype, ids stay integers."""
    return {
        key: value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
        for key, value in batch.items()
    }


def _generate(model, inputs, generation_config, device):
    """One `generate` call; returns (output ids, seconds to the first token, seconds per decode step)."""
    clock = StepClock()
    synchronize(device)
    start = now()
    out = model.generate(**inputs, generation_config=generation_config, streamer=clock)
    synchronize(device)
    new = out.shape[1] - inputs["input_ids"].shape[1]
    if new != generation_config.max_new_tokens:
        raise RuntimeError(f"{type(model).__name__} generated {new} tokens, not {generation_config.max_new_tokens}")
    return out, clock.stamps[1] - start, clock.decode_seconds_per_step()


# ------------------------------------------------------------------------------------------------------------
# 1. decode tokens/s against the bare language model
# ------------------------------------------------------------------------------------------------------------


def decode_figure(
    c: Contenders, shapes: Shapes, device: str | torch.device, dtype: torch.dtype, reps: int, warmup: int
) -> list[Row]:
    """MQwen's decode tokens/s (batch 1) ÷ the bare LM's, fed the same context length (image tokens included)."""
    photo = random_photos(1, shapes.image_size_in, seed=1)
    prompt = c.mqwen_processor.caption_prompt()
    inputs = _to(c.mqwen_processor(images=photo, text=[prompt]), device, dtype)
    text_only = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    config = greedy_config(c.tokenizer, shapes.decode_tokens)

    def run(model, model_inputs):
        def once():
            _, _, step = _generate(model, model_inputs, config, device)
            return {"decode tokens/s": 1.0 / step}

        return once

    with torch.inference_mode():
        stats = interleave(
            {"MQwen": run(c.mqwen, inputs), "bare LM": run(c.bare_lm, text_only)},
            reps=reps,
            warmup=warmup,
            desc="1 decode",
        )
    context = inputs["input_ids"].shape[1]
    return [
        Row(
            "1",
            f"decode tokens/{unit()}, batch 1, context {context} "
            f"(incl. {c.mqwen.config.image_seq_length} image tokens), {shapes.decode_tokens} new",
            "MQwen",
            stats["MQwen"]["decode tokens/s"],
            "AutoModelForCausalLM, same text config and weights",
            stats["bare LM"]["decode tokens/s"],
            ">= 0.98",
        )
    ]


# ------------------------------------------------------------------------------------------------------------
# 2. caption latency against LLaVA-HF
# ------------------------------------------------------------------------------------------------------------


def _caption_run(model, processor, photos, prompts, config, device, dtype):
    """preprocess + generate + decode to text, as a user's captioning call does it."""

    def once():
        synchronize(device)
        start = now()
        batch = processor(images=photos, text=prompts, padding=True, padding_side="left", return_tensors="pt")
        inputs = _to(batch, device, dtype)
        preprocessed = now()
        out, prefill, step = _generate(model, inputs, config, device)
        processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        end = now()
        return {"latency s": end - start, "prefill s": prefill, "preprocess s": preprocessed - start}

    return once


def caption_figure(
    c: Contenders, shapes: Shapes, device: str | torch.device, dtype: torch.dtype, reps: int, warmup: int, batch: int
) -> list[Row]:
    """Caption latency (preprocess + prefill + N new tokens) of MQwen and LLaVA-HF; at batch 1 also MQwen
    with `image_token_pooling=2`, whose prefill is compared with LLaVA's."""
    photos = random_photos(batch, shapes.image_size_in, seed=2)
    prompts = [c.mqwen_processor.caption_prompt()] * batch
    config = greedy_config(c.tokenizer, shapes.caption_tokens)
    runs = {
        "MQwen": _caption_run(c.mqwen, c.mqwen_processor, photos, prompts, config, device, dtype),
        "LLaVA": _caption_run(c.llava, c.llava_processor, photos, prompts, config, device, dtype),
    }
    if batch == 1:
        runs["MQwen pool 2"] = _caption_run(c.pooled, c.pooled_processor, photos, prompts, config, device, dtype)
    with torch.inference_mode():
        stats = interleave(runs, reps=reps, warmup=warmup, desc=f"2 caption b{batch}")
    llava = "LlavaForConditionalGeneration, same shapes and weights"
    rows = [
        Row(
            "2",
            f"caption latency {unit()}, batch {batch} (preprocess + prefill + {shapes.caption_tokens} new tokens)",
            "MQwen",
            stats["MQwen"]["latency s"],
            llava,
            stats["LLaVA"]["latency s"],
            "<= 0.95",
        ),
        Row(
            "2",
            f"prefill {unit()} (time to first token), batch {batch}",
            "MQwen",
            stats["MQwen"]["prefill s"],
            llava,
            stats["LLaVA"]["prefill s"],
        ),
    ]
    if batch == 1:
        rows.append(vision_row(c, photos, device, dtype, reps, warmup))
    if "MQwen pool 2" in stats:
        pooled_tokens = c.pooled.config.image_seq_length
        rows.append(
            Row(
                "2",
                f"prefill {unit()}, batch {batch}, {pooled_tokens} vs {c.mqwen.config.image_seq_length} image tokens",
                "MQwen, image_token_pooling=2",
                stats["MQwen pool 2"]["prefill s"],
                llava,
                stats["LLaVA"]["prefill s"],
                "<= 0.5",
            )
        )
        rows.append(
            Row(
                "2",
                f"caption latency {unit()}, batch {batch}, {pooled_tokens} vs {c.mqwen.config.image_seq_length} "
                "image tokens",
                "MQwen, image_token_pooling=2",
                stats["MQwen pool 2"]["latency s"],
                llava,
                stats["LLaVA"]["latency s"],
            )
        )
    return rows


def vision_row(
    c: Contenders, photos: list[Image.Image], device: str | torch.device, dtype: torch.dtype, reps: int, warmup: int
) -> Row:
    """The image encoders alone (ViT + projector), the only part where MQwen and LLaVA do different work:
    MQwen stops at `vision_feature_layer`, LLaVA runs every block and picks that layer's hidden state."""
    pixel_values = _to(c.mqwen_processor.image_processor(photos, return_tensors="pt"), device, dtype)["pixel_values"]
    config = c.llava.config

    def mqwen():
        synchronize(device)
        start = now()
        c.mqwen.get_image_features(pixel_values)
        synchronize(device)
        return {"s": now() - start}

    def llava():
        synchronize(device)
        start = now()
        c.llava.model.get_image_features(
            pixel_values,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )
        synchronize(device)
        return {"s": now() - start}

    with torch.inference_mode():
        stats = interleave({"MQwen": mqwen, "LLaVA": llava}, reps=reps, warmup=warmup, desc="2 vision")
    layers = c.mqwen.config.vision_config.layers
    used = c.mqwen.config.vision_feature_layer % (layers + 1)
    return Row(
        "2",
        f"image features {unit()}, batch {len(photos)} (ViT + projector; MQwen runs {used} of {layers} blocks)",
        "MQwen",
        stats["MQwen"]["s"],
        "LlavaForConditionalGeneration",
        stats["LLaVA"]["s"],
    )


# ------------------------------------------------------------------------------------------------------------
# 3. training throughput against LLaVA-HF
# ------------------------------------------------------------------------------------------------------------

STAGES = {
    # LLaVA-1.5's recipe: stage 1 trains the projector alone, stage 2 the projector and the language model;
    # the vision tower stays frozen in both.
    "align": ("multi_modal_projector",),
    "full": ("multi_modal_projector", "language_model", "lm_head"),
}


def training_batch(
    c: Contenders, shapes: Shapes, device: str | torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Right-padded caption samples with labels: -100 on padding, the prompt and the image tokens."""
    photos = random_photos(shapes.train_batch, shapes.image_size_in, seed=3)
    words = "a photo of a cat sitting on a wooden table next to a cup of coffee while waves roll in".split()
    prompt = c.mqwen_processor.caption_prompt()
    texts = [
        prompt + " ".join(words[(i + j) % len(words)] for j in range(shapes.train_text_tokens)) + "<|im_end|>"
        for i in range(shapes.train_batch)
    ]
    batch = c.mqwen_processor(images=photos, text=texts, padding_side="right")
    prompt_length = len(c.mqwen_processor(images=photos[:1], text=[prompt])["input_ids"][0])
    labels = batch["input_ids"].clone()
    labels[:, :prompt_length] = -100
    labels[batch["attention_mask"] == 0] = -100
    batch["labels"] = labels
    return _to(batch, device, dtype)


def _trainable(model, stage):
    prefixes = STAGES[stage]
    params = []
    for name, param in model.named_parameters():
        path = name.split(".")
        param.requires_grad_(any(prefix in path for prefix in prefixes))
        if param.requires_grad:
            params.append(param)
    return params


def make_optimizer(params: Iterable[torch.nn.Parameter], kind: str) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-6)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=1e-6)
    raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {kind!r}")


def train_figure(
    c: Contenders,
    shapes: Shapes,
    device: str | torch.device,
    dtype: torch.dtype,
    reps: int,
    warmup: int,
    optimizer: str = "adamw",
) -> list[Row]:
    """Samples/s of one optimizer step (forward, backward, update) for MQwen and LLaVA-HF, per stage.

    MQwen runs twice: as train/'s CaptionTrainer calls it (`logits_to_keep=scored_positions(labels)`, the LM
    head only where a caption token is scored; same loss, checked here) and as a plain `model(**batch)`.
    """
    batch = training_batch(c, shapes, device, dtype)
    scored = dict(batch, logits_to_keep=scored_positions(batch["labels"]))
    c.mqwen.train()
    with torch.no_grad():
        full_loss, scored_loss = c.mqwen(**batch).loss, c.mqwen(**scored).loss
    if not torch.allclose(full_loss.float(), scored_loss.float(), rtol=1e-4):
        raise RuntimeError(f"the loss from scored positions differs: {scored_loss.item()} vs {full_loss.item()}")
    rows = []
    contenders = [("MQwen (train/)", c.mqwen, scored), ("LLaVA", c.llava, batch), ("MQwen (plain)", c.mqwen, batch)]
    for stage in STAGES:
        for _, model, _ in contenders:
            # set on every model before building any optimizer: the language model is shared
            _trainable(model, stage)
        runs = {}
        for name, model, inputs in contenders:
            params = [p for p in model.parameters() if p.requires_grad]
            runs[name] = _train_run(model, inputs, make_optimizer(params, optimizer), device)
        stats = interleave(runs, reps=reps, warmup=warmup, desc=f"3 train {stage}")
        trained = " + ".join(STAGES[stage][:2])
        metric = (
            f"training samples/{unit()}, {stage} ({trained} trained, vision frozen), batch {shapes.train_batch}, "
            f"{batch['input_ids'].shape[1]} tokens ({len(scored['logits_to_keep'])} scored), {optimizer}"
        )
        llava = "LlavaForConditionalGeneration"
        for name, label in (("MQwen (train/)", "MQwen as train/ runs it"), ("MQwen (plain)", "MQwen, plain forward")):
            rows.append(Row("3", metric, label, stats[name]["samples/s"], llava, stats["LLaVA"]["samples/s"], ">= 1.0"))
    for model in (c.mqwen, c.llava):
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
    return rows


def _train_run(model, batch, optimizer, device):
    n = batch["input_ids"].shape[0]

    def once():
        model.train()
        synchronize(device)
        start = now()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if not torch.isfinite(loss):
            raise RuntimeError(f"{type(model).__name__} training loss is {loss.item()}")
        return {"samples/s": n / (now() - start)}

    return once


# ------------------------------------------------------------------------------------------------------------
# 5. GPU: decode speed as a fraction of the memory-bandwidth bound
# ------------------------------------------------------------------------------------------------------------


def measured_bandwidth(device: str | torch.device, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Device memory bandwidth in bytes/s from a large on-device copy (bytes read + bytes written)."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    start = now()
    for _ in range(reps):
        dst.copy_(src)
    synchronize(device)
    return 2 * src.numel() * src.element_size() * reps / (now() - start)


def decode_bytes_per_token(lm: torch.nn.Module, context: int) -> int:
    """Bytes one batch-1 decode step must read: every weight but the input embedding table (one row is
    read), plus the KV cache of `context` positions."""
    embedding = lm.get_input_embeddings().weight
    weights = sum(p.numel() * p.element_size() for p in lm.parameters() if p is not embedding)
    weights += embedding.shape[1] * embedding.element_size()
    cfg = lm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * context * embedding.element_size()
    return weights + kv


def bandwidth_figure(
    c: Contenders, shapes: Shapes, device: str | torch.device, dtype: torch.dtype, reps: int, warmup: int
) -> list[Row]:
    """MQwen's batch-1 decode tokens/s ÷ (bandwidth ÷ bytes per token), against the measured copy bandwidth."""
    photo = random_photos(1, shapes.image_size_in, seed=4)
    inputs = _to(c.mqwen_processor(images=photo, text=[c.mqwen_processor.caption_prompt()]), device, dtype)
    config = greedy_config(c.tokenizer, shapes.decode_tokens)
    bandwidth = measured_bandwidth(device)
    context = inputs["input_ids"].shape[1] + shapes.decode_tokens // 2
    per_token = decode_bytes_per_token(c.bare_lm, context)
    bound = bandwidth / per_token

    def once():
        _, _, step = _generate(c.mqwen, inputs, config, device)
        return {"tokens/s": 1.0 / step}

    with torch.inference_mode():
        stats = interleave({"MQwen": once}, reps=reps, warmup=warmup, desc="5 bandwidth")
    return [
        Row(
            "5",
            f"{str(dtype).replace('torch.', '')} decode tokens/{unit()}, batch 1, vs bound = copy bandwidth "
            f"{bandwidth / 1e9:.0f} GB/s ÷ {per_token / 1e9:.2f} GB per token",
            "MQwen",
            stats["MQwen"]["tokens/s"],
            "memory-bandwidth bound (tokens/s)",
            Stats([bound]),
        )
    ]
