"""One training run: load model and data, build the Trainer, train, save the final model.

`train(config)` is what `mqwen-train` calls; `build_trainer(config)` stops before training, for callers
that want to add callbacks or inspect the optimizer. Both run unchanged under `torchrun` and
`accelerate launch`: the Trainer reads the distributed environment itself.
"""

import dataclasses
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file
from transformers import PreTrainedModel, TrainerCallback, TrainingArguments, set_seed

from ..common.atomic_files import replace_folder, staged_file, write_atomically
from ..modeling_mqwen import MQwenForCausalLM
from ..runtime import load_for_inference
from .collator import CaptionCollator
from .config import TrainConfig
from .data import CaptionDataset, SkipReport, load_caption_dataset
from .distributed import destroy_process_group_at_exit, fsdp_requested, own_class, request_fsdp
from .loading import load_model_for_training
from .memory_report import MemoryReport
from .precision import RunDtypes, apply_run_dtypes, cast_state_dict, dtype_name, weights_dtype
from .stages import PROJECTOR, prepare_model_for_stage, trainable_summary
from .trainer import CaptionTrainer

logger = logging.getLogger(__name__)

_TA_FIELDS = {f.name for f in dataclasses.fields(TrainingArguments)}
# compat(transformers<5): 4.57's TrainingArguments writes its mixed precision to ACCELERATE_MIXED_PRECISION and the
# next one reads it back, so one --bf16 run made every later run in the process bf16 too. The value a launcher set
# before the process started is the one each run starts from.
_LAUNCHER_MIXED_PRECISION = os.environ.get("ACCELERATE_MIXED_PRECISION")
FINAL_DIR = "final"
PROJECTOR_FILE = "projector.safetensors"  # align: the projector alone, for `mqwen-convert build --projector`


@dataclass
class TrainResult:
    """What `train` returns. `model_dir` is the saved final model (Hub format, with the processor)."""

    model_dir: Optional[Path]
    metrics: dict
    skipped: SkipReport
    log_history: list
    trainer: Any
    projector_file: Optional[Path] = None  # align: OUTPUT_DIR/projector.safetensors


def training_arguments(config: TrainConfig, has_eval: bool) -> TrainingArguments:
    """`TrainingArguments` for `config` on the installed transformers (4.57 and 5.x spell a few differently)."""
    if not config.output_dir:
        raise ValueError("output_dir is required (--output-dir): checkpoints and the final model go there.")
    args = dict(
        output_dir=str(config.output_dir),
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.lm_learning_rate,
        weight_decay=config.weight_decay,
        lr_scheduler_type=config.lr_scheduler_type,
        max_grad_norm=config.max_grad_norm,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        bf16=config.bf16,
        fp16=config.fp16,
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=(config.eval_steps or config.save_steps) if has_eval else None,
        seed=config.seed,
        dataloader_num_workers=config.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        report_to=config.report_to,
        disable_tqdm=config.disable_tqdm,
        deepspeed=config.deepspeed,
        # The collator needs every field of an example; the Trainer must not drop "unused" ones.
        remove_unused_columns=False,
        label_names=["labels"],
        # Every trainable parameter is used in every step (frozen ones are not registered with DDP).
        ddp_find_unused_parameters=False,
    )
    # Non-reentrant checkpointing works with frozen inputs and with DDP. transformers 5 renamed the option.
    # compat(transformers<5.23): `gradient_checkpointing` is the option's name before 5.23
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in _TA_FIELDS else "gradient_checkpointing"
    args[checkpointing] = config.gradient_checkpointing
    args[f"{checkpointing}_kwargs"] = {"use_reentrant": False}
    if not torch.cuda.is_available() and (_world_size() > 1 or config.bf16):
        # Without `use_cpu`, accelerate sees no GPU and runs every process undistributed on the whole data, and
        # TrainingArguments refuses bf16 (CPU autocast runs it).
        args["use_cpu"] = True
    # compat(transformers<5.16): `warmup_ratio` exists before 5.16; from 5.16 on, warmup_steps takes a ratio below 1
    if "warmup_ratio" in _TA_FIELDS:  # transformers 4.x
        args["warmup_ratio"] = config.warmup_ratio
    else:  # transformers 5: a float below 1 is a ratio
        args["warmup_steps"] = float(config.warmup_ratio)
    unknown = set(config.training_args) - _TA_FIELDS
    if unknown:
        raise ValueError(f"training_args has fields TrainingArguments does not know: {sorted(unknown)}")
    args.update(config.training_args)
    if _LAUNCHER_MIXED_PRECISION is None:
        os.environ.pop("ACCELERATE_MIXED_PRECISION", None)
    else:
        os.environ["ACCELERATE_MIXED_PRECISION"] = _LAUNCHER_MIXED_PRECISION
    return TrainingArguments(**args)


def _world_size() -> int:
    """Processes of this run, as torchrun / accelerate launch announce them."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _dataset(spec, config, resample_bad=True):
    if spec is None:
        return None
    return load_caption_dataset(
        spec,
        image_root=config.image_root,
        image_column=config.image_column,
        caption_column=config.caption_column,
        split=config.split,
        instructions=config.instructions,
        seed=config.seed,
        resample_bad=resample_bad,
    )


def build_trainer(
    config: TrainConfig,
    model: Any = None,
    processor: Any = None,
    train_dataset: Any = None,
    eval_dataset: Any = None,
    callbacks: list[TrainerCallback] | None = None,
) -> CaptionTrainer:
    """A ready `CaptionTrainer` for `config` (model frozen/wrapped for the stage, data loaded, optimizer groups
    set up on first use). `model`/`processor`/datasets override `config.model`/`config.data`/`config.eval_data`."""
    model, processor = load_model_for_training(model if model is not None else config.model, processor)
    sharded = _shards_weights(config)
    dtypes = RunDtypes.of(config, source=weights_dtype(model), sharded=sharded)
    train_dataset = _dataset(train_dataset if train_dataset is not None else config.data, config)
    if train_dataset is None:
        raise ValueError("Pass training data (--data).")
    eval_dataset = _dataset(eval_dataset if eval_dataset is not None else config.eval_data, config)
    if config.fsdp:
        request_fsdp(model)  # before the Trainer builds its Accelerator, which reads the request
    args = training_arguments(config, has_eval=eval_dataset is not None)
    if _world_size() > 1 and args.world_size != _world_size():
        raise RuntimeError(
            f"Launched as {_world_size()} processes but the Trainer sees {args.world_size}: every process would "
            "train on all the data on its own. Check the launcher (torchrun / accelerate launch) and the devices."
        )
    if args.world_size > 1:
        destroy_process_group_at_exit()
    set_seed(config.seed)  # LoRA's initial weights: the same in every process, and in every run of a seed
    model = apply_run_dtypes(prepare_model_for_stage(model, config), dtypes)
    trainer = CaptionTrainer(
        model=model,
        args=args,
        data_collator=CaptionCollator(processor, max_length=config.max_length),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        callbacks=[MemoryReport(), *(callbacks or [])],
        recipe=config.recipe(),
        dtypes=dtypes,
        # align: checkpoints hold the projector (lora's hold the adapters anyway: peft saves only those)
        trainable_only_checkpoints=config.stage == "align" and not sharded,
    )
    return trainer


def _shards_weights(config: TrainConfig) -> bool:
    """Whether this run shards weights across processes (FSDP, DeepSpeed), as asked or as a launcher set it up."""
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    return bool(config.fsdp or config.deepspeed or fsdp_requested() or deepspeed)


def train(
    config: TrainConfig,
    model: Any = None,
    processor: Any = None,
    train_dataset: Any = None,
    eval_dataset: Any = None,
    callbacks: list[TrainerCallback] | None = None,
    save: bool = True,
) -> TrainResult:
    """Train for `config` and save the final model to `OUTPUT_DIR/final` (see `build_trainer` for overrides)."""
    trainer = build_trainer(config, model, processor, train_dataset, eval_dataset, callbacks)
    if trainer.is_world_process_zero():
        logger.info("Trainable parameters: %s", trainable_summary(trainer.model))
        logger.info("Dtypes: %s", trainer.dtypes.describe())
        dataset = trainer.train_dataset
        if isinstance(dataset, CaptionDataset) and dataset.dropped:
            logger.warning(
                "%d records without an image or caption were left out of %s.", dataset.dropped, dataset.source
            )
    resume = config.resume_from_checkpoint
    if resume == "last":
        resume = last_complete_checkpoint(config.output_dir)
    elif resume:
        _check_checkpoint(resume)
    output = trainer.train(resume_from_checkpoint=resume)
    skipped = trainer.gathered_skip_report()
    model_dir = save_final_model(trainer, config) if save else None
    projector_file = model_dir and _projector_file(config)
    if trainer.is_world_process_zero():
        if len(skipped):
            logger.warning(skipped.summary())
        summary = {
            "model_dir": str(model_dir) if model_dir else None,
            "metrics": output.metrics,
            "skipped_images": skipped.to_dict(),
            "config": config.to_dict(),
        }
        write_atomically(Path(config.output_dir) / "train_summary.json", json.dumps(summary, indent=2))
    return TrainResult(model_dir, output.metrics, skipped, trainer.state.log_history, trainer, projector_file)


# ----------------------------------------------------------------------------------------------------------
# Resuming
# ----------------------------------------------------------------------------------------------------------

# The Trainer writes this file last; a checkpoint folder without it was cut short.
CHECKPOINT_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"checkpoint-\d+")


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str:
    """The newest `checkpoint-N` in `output_dir` that is complete; incomplete newer ones are named in a warning.

    Checkpoints written by `CaptionTrainer` appear only once complete, but a folder from an older run, a
    copy or a full disk can still lack its trainer state.
    """
    folder = Path(output_dir)
    found = [path for path in (folder.iterdir() if folder.is_dir() else ()) if _CHECKPOINT.fullmatch(path.name)]
    checkpoints = sorted(
        (path for path in found if path.is_dir()), key=lambda path: int(path.name.split("-")[1]), reverse=True
    )
    skipped = []
    for path in checkpoints:
        problem = _checkpoint_problem(path)
        if problem is None:
            if skipped:
                logger.warning(
                    "--resume-from-checkpoint last: skipped incomplete %s; resuming from %s.",
                    "; ".join(skipped),
                    path.name,
                )
            return str(path)
        skipped.append(f"{path.name} ({problem})")
    raise FileNotFoundError(
        f"--resume-from-checkpoint last: no complete checkpoint-* folder in {output_dir}"
        + (f" (incomplete: {'; '.join(skipped)})." if skipped else ".")
    )


def _checkpoint_problem(path: Path) -> Optional[str]:
    state = path / CHECKPOINT_STATE
    if not state.is_file():
        return f"no {CHECKPOINT_STATE}"
    try:
        json.loads(state.read_text())
    except ValueError:
        return f"{CHECKPOINT_STATE} is truncated"
    return None


def _check_checkpoint(path):
    """A clear error for a `--resume-from-checkpoint` folder that is missing or incomplete."""
    problem = _checkpoint_problem(Path(path)) if Path(path).is_dir() else "no such folder"
    if problem:
        raise FileNotFoundError(
            f"--resume-from-checkpoint {path}: {problem}. Pass a complete checkpoint-N folder, or last."
        )


# ----------------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------------


def _sharded(trainer) -> bool:
    """Whether parameters are split across processes (ZeRO-3, FSDP): only the Trainer can gather them."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return True
    if getattr(trainer, "is_deepspeed_enabled", False):
        plugin = trainer.accelerator.state.deepspeed_plugin
        return plugin is not None and plugin.zero_stage == 3
    return False


def save_final_model(trainer: CaptionTrainer, config: TrainConfig, out_dir: str | os.PathLike | None = None) -> Path:
    """Write the trained model + processor in the Hub format to `out_dir` (default `OUTPUT_DIR/final`).

    Weights are written in the run's final dtype (`trainer.dtypes.final`: the base checkpoint's unless
    `--final-dtype`), whatever dtype each part trained in; the align stage also writes the projector alone to
    `OUTPUT_DIR/projector.safetensors` (for `mqwen-convert build --projector`). LoRA is merged into the language
    model unless `config.keep_adapter`, which writes a peft adapter folder (adapter + trained projector) that
    `load_trained` reads. Sharded weights (FSDP, ZeRO-3) are gathered from every process; the main process alone
    writes safetensors files of at most `config.max_shard_size`. Files go to a temporary folder first and are
    renamed into place, so `out_dir` is never half-written. Call on every process.
    """
    from peft import PeftModel  # optional: the train extra

    out_dir = Path(out_dir or Path(config.output_dir) / FINAL_DIR)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    main = trainer.is_world_process_zero()
    accelerator = trainer.accelerator
    dtype = trainer.dtypes.final if getattr(trainer, "dtypes", None) else None
    if main and tmp.exists():
        shutil.rmtree(tmp)
    # Every process takes part in gathering; only the main one keeps the full state dict.
    state_dict = accelerator.get_state_dict(trainer.model_wrapped) if _sharded(trainer) else None
    if main:
        model = accelerator.unwrap_model(trainer.model)
        save = dict(safe_serialization=True, max_shard_size=config.max_shard_size)
        if not isinstance(model, PeftModel):
            _save_in_dtype(model, tmp, dtype, state_dict, **save)
        elif config.keep_adapter:  # the adapter and the trained projector (modules_to_save)
            _save_in_dtype(model, tmp, dtype, state_dict, safe_serialization=True)
        elif state_dict is None:
            _save_in_dtype(model.merge_and_unload(), tmp, dtype, **save)
        else:  # the model's own weights are shards: merge the gathered adapter into a fresh base model
            adapter_tmp = out_dir.with_name(f".{out_dir.name}.adapter.tmp")
            model.save_pretrained(adapter_tmp, state_dict=state_dict, safe_serialization=True)
            _merge_saved_adapter(config, adapter_tmp, tmp, save, dtype)
            shutil.rmtree(adapter_tmp)
        trainer.processing_class.save_pretrained(tmp)
        if _projector_file(config):
            _save_projector(model, state_dict, _projector_file(config), dtype)
        replace_folder(tmp, out_dir)
    accelerator.wait_for_everyone()
    return out_dir


def _save_in_dtype(model, folder, dtype, state_dict=None, **save_kwargs):
    """`model.save_pretrained(folder)` with every weight in `dtype` (None: as they are), config.json saying so.

    Only the tensors in another dtype are copied (the trained ones, in align and lora); the model in memory keeps
    its training dtypes.
    """
    state = state_dict if state_dict is not None else model.state_dict()
    if dtype is not None:
        state = cast_state_dict(state, dtype)
    with own_class(model):
        model.save_pretrained(folder, state_dict=state, **save_kwargs)
    if dtype is not None and isinstance(model, PreTrainedModel):  # not a peft adapter folder: it has no config.json
        # `save_pretrained` names the dtype of the model's first weight, which may be a frozen part's
        for part in (model.config, getattr(model.config, "text_config", None)):
            if part is not None:
                part.dtype = dtype_name(dtype)
        model.config.save_pretrained(folder)


def _projector_file(config: TrainConfig) -> Optional[Path]:
    return Path(config.output_dir) / PROJECTOR_FILE if config.stage == "align" else None


def _save_projector(model, state_dict, path, dtype):
    """The projector's tensors alone, under the model's names (`multi_modal_projector.linear_1.weight`, ...)."""
    state = state_dict if state_dict is not None else model.state_dict()
    tensors = {name: tensor for name, tensor in state.items() if name.startswith(f"{PROJECTOR}.")}
    if dtype is not None:
        tensors = cast_state_dict(tensors, dtype)
    with staged_file(path) as tmp:
        save_file({name: t.contiguous() for name, t in tensors.items()}, tmp, metadata={"format": "pt"})


def _merge_saved_adapter(config, adapter_dir, out_dir, save_kwargs, dtype):
    from peft import PeftModel  # optional: the train extra

    if not isinstance(config.model, (str, os.PathLike)):
        raise ValueError("Merging LoRA under ZeRO-3/FSDP reloads the base model: pass --model as a path or repo.")
    base = MQwenForCausalLM.from_pretrained(str(config.model), dtype=dtype or "auto")
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    _save_in_dtype(merged, out_dir, dtype, **save_kwargs)


def load_trained(path: str | os.PathLike, dtype: str | torch.dtype = "auto", device: str = "cpu") -> tuple[Any, Any]:
    """(model, processor) from a `train` output folder: a merged/full model, or a LoRA adapter folder
    (`--keep-adapter`). The shared runtime's `load_for_inference`, on the CPU unless `device` says otherwise (as
    this function always loaded: callers feed it CPU tensors)."""
    return load_for_inference(path, device=device, dtype=dtype)
