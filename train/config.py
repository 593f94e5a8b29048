"""`TrainConfig`: every setting of a caption fine-tuning run, in one dataclass.

The CLI (`mqwen-train`) is generated from these fields, so the programmatic API and the command line
can never drift apart: `--projector-lr 1e-4` is `TrainConfig(projector_lr=1e-4)`.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from .recipe import CaptionRecipe

# The dtype spellings of --model-dtype / --final-dtype and --trainable-dtype (train/precision.py).
WEIGHT_DTYPES = ("bf16", "fp16", "fp32")
TRAINABLE_DTYPES = ("fp32", "bf16")

STAGES = ("align", "lora", "full")

# Several phrasings of the caption request. One is drawn per training example (seeded by the example's
# index), so the model learns to caption, not to react to one fixed sentence.
CAPTION_INSTRUCTIONS = (
    "Describe this image.",
    "Write a short caption for this image.",
    "What is in this picture? Write a short caption.",
    "Give a brief description of the image.",
    "Caption this image.",
    "Summarize the contents of this picture in one sentence.",
)

# Every linear layer of a Qwen2/Llama-style decoder block.
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The vision tower's linear layers (its fused q/k/v is a raw parameter, which LoRA cannot wrap).
VISION_LORA_TARGETS = ("out_proj", "c_fc", "c_proj")

# Learning rates that work for a LLaVA-style recipe when none is given.
DEFAULT_LEARNING_RATES = {"align": 1e-3, "lora": 2e-4, "full": 2e-5}


def _help(text, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class TrainConfig:
    """Settings of one caption fine-tuning run (see `mqwen-train --help` for the same list)."""

    # -- what -----------------------------------------------------------------------------------------------
    model: Any = _help(
        "MQwen folder or Hub repo id to start from (or an MQwenForCausalLM object, in Python)", default=None
    )
    data: Any = _help(
        "training data: a file/folder/dataset spec, or (in Python) a list of (image, caption) "
        "pairs or a datasets.Dataset; see load_caption_dataset",
        default=None,
    )
    output_dir: str = _help("where checkpoints go; the final model is written to OUTPUT_DIR/final", default=None)
    stage: str = _help(
        "align: projector only; lora: LoRA on the language model + projector; full: projector + language model",
        default="align",
    )
    eval_data: Any = _help("held-out data (same forms as --data) for an evaluation loss during training", default=None)
    # -- data -----------------------------------------------------------------------------------------------
    image_root: Optional[str] = _help(
        "folder that relative image paths are resolved against (default: the data file's folder)", default=None
    )
    image_column: Optional[str] = _help("image column of a CSV/JSONL/datasets source (default: detected)", default=None)
    caption_column: Optional[str] = _help(
        "caption column of a CSV/JSONL/datasets source (default: detected)", default=None
    )
    split: Optional[str] = _help("split of a DatasetDict or Hub dataset (default: train)", default=None)
    instructions: tuple = _help("caption instructions, one sampled per example", default=CAPTION_INSTRUCTIONS)
    max_length: Optional[int] = _help(
        "cut each example to this many tokens (image tokens always survive)", default=None
    )
    curriculum_steps: int = _help(
        "for the first N optimizer steps, draw only from the shortest captions "
        "(--curriculum-fraction of the data), then from everything; 0: off",
        default=0,
    )
    curriculum_fraction: float = _help(
        "share of the training examples, fewest caption words first, that the curriculum steps draw from", default=0.25
    )
    curriculum_grow: bool = _help(
        "grow the curriculum's pool linearly from --curriculum-fraction to all the data over the curriculum "
        "steps, instead of keeping it at the shortest captions",
        default=False,
    )
    vision_warmup_steps: int = _help(
        "for the first N optimizer steps, train only the vision tower, to name its "
        "caption's words through a temporary head (for a vision tower trained "
        "from scratch; see train/vision_warmup.py); 0: off",
        default=0,
    )
    vision_warmup_target: str = _help(
        "what the vision warm-up names: 'words' (the caption's bag of words) or 'word_pairs' (its adjacent word "
        "pairs, which asks each object's patches to describe that object alone)",
        default="words",
    )
    vision_aux_weight: float = _help(
        "after the vision warm-up, keep its loss on at this weight beside the caption loss (on the caption pass's "
        "own vision features; logged as vision_aux_loss; see train/vision_warmup.py); 0: off",
        default=0.0,
    )
    # -- what trains ----------------------------------------------------------------------------------------
    learning_rate: Optional[float] = _help(
        "learning rate of the language model / LoRA weights (default: 1e-3 align, 2e-4 lora, 2e-5 full)", default=None
    )
    projector_lr: Optional[float] = _help("learning rate of the projector (default: --learning-rate)", default=None)
    train_vision_tower: bool = _help("also train the vision tower (full) or put LoRA on it (lora)", default=False)
    vision_lr: Optional[float] = _help(
        "learning rate of the vision tower (or its LoRA weights) when it trains (default: --learning-rate)",
        default=None,
    )
    lora_r: int = _help("LoRA rank", default=16)
    lora_alpha: int = _help("LoRA alpha", default=32)
    lora_dropout: float = _help("LoRA dropout", default=0.05)
    lora_target_modules: tuple = _help("language-model module names that get LoRA", default=DEFAULT_LORA_TARGETS)
    keep_adapter: bool = _help(
        "lora: save the LoRA adapter (+ projector) instead of merging it into the model", default=False
    )
    # -- optimisation (passed to transformers.TrainingArguments) -------------------------------------------
    num_train_epochs: float = _help("epochs", default=1.0)
    max_steps: int = _help("optimizer steps (overrides epochs when > 0)", default=-1)
    per_device_train_batch_size: int = _help("examples per device per step", default=8)
    per_device_eval_batch_size: int = _help("examples per device per evaluation step", default=8)
    gradient_accumulation_steps: int = _help("micro-batches per optimizer step", default=1)
    weight_decay: float = _help("AdamW weight decay (never on biases and norms)", default=0.0)
    warmup_ratio: float = _help("fraction of steps of linear warmup", default=0.03)
    lr_scheduler_type: str = _help("learning-rate schedule after warmup", default="cosine")
    max_grad_norm: float = _help("gradient clipping", default=1.0)
    bf16: bool = _help("bfloat16 mixed precision", default=False)
    fp16: bool = _help("float16 mixed precision", default=False)
    model_dtype: Optional[str] = _help(
        "dtype of the frozen weights in memory: bf16, fp16 or fp32 (default: the checkpoint's own, e.g. bf16 for a "
        "bf16 checkpoint; the trained dtype under --fsdp/--deepspeed; see train/precision.py)",
        default=None,
    )
    trainable_dtype: str = _help(
        "dtype of the trained weights and so of the optimizer's states: fp32 master weights, as mixed precision "
        "(--bf16/--fp16) expects, or bf16 for pure bf16 training (half the memory of the trained part and its "
        "optimizer, coarser updates; frozen weights then default to bf16 too)",
        default="fp32",
    )
    gradient_checkpointing: bool = _help("recompute activations in the backward pass to save memory", default=False)
    logging_steps: int = _help("log every N steps", default=10)
    save_steps: int = _help("checkpoint every N steps", default=500)
    save_total_limit: Optional[int] = _help("keep at most N checkpoints", default=2)
    eval_steps: Optional[int] = _help("evaluate every N steps (default: --save-steps)", default=None)
    seed: int = _help("random seed (data order, instruction sampling, initialisation of LoRA)", default=42)
    dataloader_num_workers: int = _help("processes that load images", default=0)
    resume_from_checkpoint: Optional[str] = _help(
        "checkpoint folder to resume from, or 'last' for the newest complete one in --output-dir", default=None
    )
    report_to: str = _help("where to log: none, tensorboard, wandb, ...", default="none")
    deepspeed: Optional[str] = _help(
        "DeepSpeed JSON config (with torchrun; `accelerate launch` configs set it themselves)", default=None
    )
    fsdp: bool = _help(
        "shard weights, gradients and optimizer states across processes with PyTorch FSDP2, "
        "one unit per decoder layer / vision block (with torchrun; `accelerate launch "
        "--config_file $(python -m mqwen.train.configs fsdp.yaml)` sets it itself)",
        default=False,
    )
    max_shard_size: str = _help("largest safetensors file of the final model", default="5GB")
    final_dtype: Optional[str] = _help(
        "dtype of OUTPUT_DIR/final (and of align's OUTPUT_DIR/projector.safetensors): bf16, fp16 or fp32 "
        "(default: the base checkpoint's)",
        default=None,
    )
    disable_tqdm: bool = _help("hide the progress bar", default=False)
    training_args: dict = _help("any other transformers.TrainingArguments fields (Python only)", default_factory=dict)

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.bf16 and self.fp16:
            raise ValueError("Choose one of bf16 and fp16, not both.")
        for name, allowed in (
            ("model_dtype", WEIGHT_DTYPES),
            ("trainable_dtype", TRAINABLE_DTYPES),
            ("final_dtype", WEIGHT_DTYPES),
        ):
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}.")
        if self.fsdp and self.deepspeed:
            raise ValueError("Choose one of fsdp and deepspeed, not both.")
        if self.keep_adapter and self.stage != "lora":
            raise ValueError(f"keep_adapter only applies to stage='lora' (got stage={self.stage!r}).")
        if self.vision_lr is not None and not self.train_vision_tower:
            raise ValueError(
                f"vision_lr={self.vision_lr} is set but the vision tower is frozen; add "
                "train_vision_tower=True (--train-vision-tower) or drop vision_lr."
            )
        recipe = self.recipe()  # checks its own fields
        if recipe.trains_vision_alone and not (self.train_vision_tower and self.stage == "full"):
            raise ValueError(
                "vision_warmup_steps and vision_aux_weight train the vision tower: they need stage='full' and "
                "train_vision_tower=True (--stage full --train-vision-tower)."
            )
        if isinstance(self.instructions, str):
            self.instructions = (self.instructions,)
        self.instructions = tuple(self.instructions)
        if not self.instructions:
            raise ValueError("instructions must hold at least one caption instruction.")
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = tuple(t.strip() for t in self.lora_target_modules.split(",") if t.strip())
        self.lora_target_modules = tuple(self.lora_target_modules)

    def recipe(self) -> CaptionRecipe:
        """What `CaptionTrainer` does beyond the stock Trainer (`recipe.py`), from these settings."""
        return CaptionRecipe.of(self)

    @property
    def lm_learning_rate(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LEARNING_RATES[self.stage]

    def to_dict(self) -> dict:
        """JSON-friendly view (objects passed in Python are shown by type)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (str, int, float, bool, type(None), tuple, list, dict)):
                value = f"<{type(value).__name__}>"
            elif isinstance(value, list) and value and not isinstance(value[0], (str, int, float)):
                value = f"<list of {len(value)}>"
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out
