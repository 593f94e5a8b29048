"""What trains in each stage, and the optimizer parameter groups that follow from it.

- `align`: only `multi_modal_projector`. The vision tower and the language model get `requires_grad=False`
  and never reach the optimizer, so their weights are bit-identical after the run.
- `lora`: peft LoRA adapters on the language model's linear layers (names chosen by a regex that must
  match inside `language_model`, so the vision tower's `c_fc`/`c_proj`/`out_proj` are never wrapped unless
  `train_vision_tower`), plus the projector, which peft trains and saves as a `modules_to_save` copy.
- `full`: projector + language model (and the vision tower with `train_vision_tower`).

A training vision tower trains only what captioning runs: the blocks up to `config.vision_feature_layer`.
The blocks after it and OpenCLIP's pooled-embedding head (`ln_post`, `proj`) never get a gradient, so they
stay frozen: their weights are unchanged either way, and an FSDP checkpoint could not be resumed with
optimizer state they never had (DDP without `find_unused_parameters` also expects a gradient for every
trainable parameter).

Per-part learning rates (projector, vision tower) come from `part_param_groups`, used by `CaptionTrainer`.
"""

import re
from collections.abc import Container, Iterable

from torch import nn

from .config import VISION_LORA_TARGETS, TrainConfig

PROJECTOR = "multi_modal_projector"
VISION_TOWER = "vision_tower"
LANGUAGE_MODEL = "language_model"


def lora_target_regex(lm_targets: Iterable[str], vision_targets: Iterable[str] = ()) -> str:
    """A peft `target_modules` regex (full match on module names) for the given leaf names."""
    parts = [rf".*{LANGUAGE_MODEL}\..*\.({'|'.join(map(re.escape, lm_targets))})"]
    if vision_targets:
        parts.append(rf".*{VISION_TOWER}\..*\.({'|'.join(map(re.escape, vision_targets))})")
    return "|".join(f"(?:{p})" for p in parts)


def prepare_model_for_stage(model: nn.Module, config: TrainConfig) -> nn.Module:
    """Freeze / wrap `model` (an MQwenForCausalLM) for `config.stage`; returns the model to train.

    For `lora` this is a `peft.PeftModel` around `model`; otherwise `model` itself.
    """
    stage = config.stage
    model.requires_grad_(False)
    if stage == "lora":
        if not config.lora_target_modules:
            raise ValueError("lora_target_modules is empty; name at least one language-model module (q_proj, ...).")
        from peft import LoraConfig, get_peft_model  # optional: the train extra

        vision = VISION_LORA_TARGETS if config.train_vision_tower else ()
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=lora_target_regex(config.lora_target_modules, vision),
            modules_to_save=[PROJECTOR],
            bias="none",
        )
        matched = [n for n, _ in model.named_modules() if re.fullmatch(lora.target_modules, n)]
        if not any(f"{LANGUAGE_MODEL}." in n for n in matched):
            raise ValueError(
                f"No language-model module is named like {list(config.lora_target_modules)}; pick names from "
                f"{sorted({n.rsplit('.', 1)[-1] for n, m in model.language_model.named_modules() if n})[:20]}"
            )
        model = get_peft_model(model, lora)
        if config.train_vision_tower:
            freeze_unused_vision_parts(model.get_base_model())
    else:
        model.multi_modal_projector.requires_grad_(True)
        if stage == "full":
            model.language_model.requires_grad_(True)
            if config.train_vision_tower:
                model.vision_tower.requires_grad_(True)
                freeze_unused_vision_parts(model)
    if config.gradient_checkpointing:
        # Frozen embeddings give the first checkpointed block inputs without grad; make them require it.
        model.enable_input_require_grads()
    return model


def freeze_unused_vision_parts(model: nn.Module) -> None:
    """Freeze the vision tower's parts that `get_image_features` never runs (see the module docstring)."""
    tower = model.vision_tower
    blocks = tower.transformer.resblocks
    for block in blocks[model.config.vision_feature_layer % (len(blocks) + 1) :]:
        block.requires_grad_(False)
    tower.ln_post.requires_grad_(False)
    tower.proj.requires_grad_(False)


def part_of(name: str) -> str:
    """The top-level part a parameter or module name belongs to: projector, vision tower or language model."""
    return next((p for p in (PROJECTOR, VISION_TOWER) if p in name), LANGUAGE_MODEL)


def part_param_groups(
    model: nn.Module,
    lm_lr: float,
    weight_decay: float,
    decay_names: Container[str],
    projector_lr: float | None = None,
    vision_lr: float | None = None,
) -> list[dict]:
    """AdamW parameter groups: only trainable parameters, the projector and the vision tower each at its own
    learning rate (`None`: the language model's), and no weight decay on biases and norms (`decay_names`,
    from `Trainer.get_decay_parameter_names`).

    A vision tower trained with the rest usually wants a lower rate than the parts that start from scratch
    (LLaVA-NeXT trains an unfrozen CLIP at a fifth of the LM's rate); a tower trained from scratch may want
    a higher one.
    """
    rates = {PROJECTOR: projector_lr, VISION_TOWER: vision_lr}
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = part_of(name)
        lr = rates.get(part)
        decays = name in decay_names
        key = (part, decays)
        if key not in groups:
            groups[key] = {
                "params": [],
                "lr": lm_lr if lr is None else lr,
                "weight_decay": weight_decay if decays else 0.0,
            }
        groups[key]["params"].append(param)
    if not groups:
        raise ValueError("Nothing to train: every parameter is frozen.")
    return list(groups.values())


def trainable_summary(model: nn.Module) -> dict:
    """Trainable / total parameter counts per top-level part (vision_tower, projector, language_model)."""
    summary = {}
    for name, param in model.named_parameters():
        part = part_of(name)
        entry = summary.setdefault(part, {"trainable": 0, "total": 0})
        entry["total"] += param.numel()
        if param.requires_grad:
            entry["trainable"] += param.numel()
    return summary
