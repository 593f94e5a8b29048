"""`CaptionTrainer`: transformers' Trainer with per-part learning rates and a count of skipped images.

Everything else (mixed precision, gradient accumulation and checkpointing, warmup + cosine, logging,
checkpoints and resuming, DDP / DeepSpeed / FSDP through accelerate) is the stock Trainer; on CPU, FSDP is
switched on where accelerate would leave it off (see `distributed`).
"""

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..common.atomic_files import replace_folder
from ..modeling_mqwen import scored_positions
from .curriculum import ShortCaptionsFirstSampler
from .data import SkipReport
from .distributed import enable_fsdp_on_cpu
from .precision import RunDtypes
from .recipe import CaptionRecipe
from .stages import part_param_groups
from .trainable_checkpoints import holds_trainable_weights, load_trainable_weights, save_trainable_weights
from .vision_warmup import VisionWarmup

# Where checkpoints are written before they are complete (a dot folder: never matched as `checkpoint-N`).
STAGING_DIR = ".checkpoint-staging"


class CaptionTrainer(Trainer):
    """Trainer for caption fine-tuning.

    Args (besides Trainer's):
        recipe: what the run does beyond the stock Trainer (`recipe.py`); default: nothing.
        dtypes: the run's dtypes (`precision.py`), of which `save_final_model` writes the final one; default:
            the model's own.
        trainable_only_checkpoints: checkpoints hold the trainable parameters, not the whole model
            (`trainable_checkpoints.py`; the align stage).
    """

    def __init__(
        self,
        *args,
        recipe: CaptionRecipe | None = None,
        dtypes: RunDtypes | None = None,
        trainable_only_checkpoints: bool = False,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.recipe = recipe or CaptionRecipe()
        self.dtypes = dtypes
        self.trainable_only_checkpoints = trainable_only_checkpoints
        # The auxiliary losses since the last log, summed (a running sum: a run that never logs keeps no list)
        self._vision_aux_sum, self._vision_aux_count = torch.zeros(()), 0
        self.vision_warmup = None  # built with the optimizer, whose parameter groups hold its head
        self.skip_report = SkipReport()

    def _in_vision_warmup(self, model) -> bool:
        return model.training and self.state.global_step < self.recipe.vision_warmup_steps

    def _get_train_sampler(self, train_dataset=None):
        """Short captions first for `curriculum_steps` steps (`curriculum.py`), else the stock sampler."""
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if not self.recipe.curriculum_steps:
            return super()._get_train_sampler(train_dataset)
        if not hasattr(dataset, "caption_words"):
            raise ValueError(
                f"curriculum_steps needs a CaptionDataset (one that can count caption words without "
                f"loading images); got {type(dataset).__name__}."
            )
        global_batch = (
            self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        )
        return ShortCaptionsFirstSampler(
            dataset.caption_words(),
            self.recipe.curriculum_steps * global_batch,
            self.recipe.curriculum_fraction,
            seed=self.args.seed,
            grow=self.recipe.curriculum_grow,
        )

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        # compat(transformers<5): 4.x has no `TrainingArguments.fsdp_plugin_args` (the plugin reads the environment)
        if enable_fsdp_on_cpu(self.accelerator, getattr(self.args, "fsdp_plugin_args", None)):
            self.is_fsdp_enabled = True

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        # Build the optimizer here; the parent then only applies its wrappers (it skips creation when
        # `self.optimizer` is set). `model` exists as an argument in transformers 5 only.
        # compat(transformers<5.5): before 5.5 the Trainer calls create_optimizer() without `model`
        opt_model = self.model if model is None else model
        if self.optimizer is None:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            groups = part_param_groups(
                opt_model,
                lm_lr=self.args.learning_rate,
                weight_decay=self.args.weight_decay,
                decay_names=set(self.get_decay_parameter_names(opt_model)),
                projector_lr=self.recipe.projector_lr,
                vision_lr=self.recipe.vision_lr,
            )
            if self.recipe.trains_vision_alone:
                groups.append(self._vision_warmup_group(opt_model))
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
            if self.vision_warmup is not None:
                # The Trainer clears the model's gradients after each step (`model.zero_grad()`), and the head is
                # not part of the model: without this its gradients would add up across steps.
                head = self.vision_warmup.head
                self.optimizer.register_step_post_hook(lambda *_: head.zero_grad(set_to_none=True))
        return super().create_optimizer() if model is None else super().create_optimizer(model)

    def _vision_warmup_group(self, model) -> dict:
        """The warm-up head's parameter group (`vision_warmup.py`); the head lives outside the model."""
        if self.args.world_size > 1:
            raise ValueError(
                "vision_warmup_steps and vision_aux_weight run in a single process (their head is not part of the "
                "model that DDP/FSDP/DeepSpeed synchronise); warm the vision tower up in one process first."
            )
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        self.vision_warmup = VisionWarmup(
            self.accelerator.unwrap_model(model),
            ignored_ids=getattr(tokenizer, "all_special_ids", ()),
            target=self.recipe.vision_warmup_target,
        )
        return {
            "params": list(self.vision_warmup.head.parameters()),
            "weight_decay": 0.0,
            "lr": self.recipe.vision_lr or self.args.learning_rate,
        }

    def _save_checkpoint(self, model, trial, *args, **kwargs):
        """The stock checkpoint, written under `OUTPUT_DIR/STAGING_DIR` and renamed into place once complete.

        A process killed mid-save leaves no `checkpoint-N` behind, so resuming (ours or the Trainer's own
        `get_last_checkpoint`) never picks a half-written one, and checkpoint rotation never deletes a complete
        checkpoint in favour of it.
        """
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, STAGING_DIR)
        if self.args.should_save and os.path.exists(os.path.join(staging, name)):
            shutil.rmtree(os.path.join(staging, name))  # left by a run killed while saving this step
        self._checkpoint_staging = staging
        try:
            super()._save_checkpoint(model, trial, *args, **kwargs)
        finally:
            self._checkpoint_staging = None
        self.accelerator.wait_for_everyone()  # every process has written its part (optimizer shards, RNG state)
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            replace_folder(Path(staging) / name, Path(final))
            if self.state.best_model_checkpoint == os.path.join(staging, name):
                self.state.best_model_checkpoint = final
            self._rotate_saved_checkpoints(run_dir)
        self.accelerator.wait_for_everyone()

    def _get_output_dir(self, trial):
        return getattr(self, "_checkpoint_staging", None) or super()._get_output_dir(trial)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """A checkpoint of the trainable parameters alone where asked (`trainable_checkpoints.py`), with the processor
        and training arguments the stock checkpoint holds; otherwise (and for `save_model`) the stock save."""
        if not (self.trainable_only_checkpoints and getattr(self, "_checkpoint_staging", None)):
            return super()._save(output_dir, state_dict)
        if self.args.should_save:
            save_trainable_weights(self.model, output_dir)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        """A trainable-only checkpoint is loaded over the model rebuilt from the base; others the stock way."""
        if holds_trainable_weights(resume_from_checkpoint):
            return load_trainable_weights(self.model if model is None else model, resume_from_checkpoint)
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        if holds_trainable_weights(self.state.best_model_checkpoint):
            return load_trainable_weights(self.model, self.state.best_model_checkpoint)
        return super()._load_best_model()

    def _rotate_saved_checkpoints(self, run_dir):
        """Apply `save_total_limit` (the stock save rotated inside the staging folder, where there is nothing
        to remove). transformers 5 has a function for it, 4.x a method."""
        # compat(transformers<5.5): `Trainer._rotate_checkpoints` before 5.5, `trainer_utils.rotate_checkpoints` after
        if hasattr(self, "_rotate_checkpoints"):
            self._rotate_checkpoints(use_mtime=True, output_dir=run_dir)
        else:
            from transformers.trainer_utils import rotate_checkpoints  # local: absent before 5.5 (tag above)

            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    def compute_loss(
        self, model: torch.nn.Module, inputs: dict[str, Any], *args, **kwargs
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        # Skipped-image records ride along with the batch so they are counted here, in the main process,
        # even when images load in DataLoader workers.
        inputs = dict(inputs)
        self.skip_report.update(inputs.pop("skipped", None))
        if self._in_vision_warmup(model):  # the vision tower alone, on its caption's words
            loss = self.vision_warmup.loss(inputs["pixel_values"], inputs["labels"])
            return_outputs = kwargs.get("return_outputs", args[0] if args else False)
            return (loss, None) if return_outputs else loss
        unwrapped = self.accelerator.unwrap_model(model)  # PEFT models pass the attribute lookup through
        if (
            model.training
            and "labels" in inputs
            and "logits_to_keep" not in inputs
            and getattr(unwrapped, "loss_from_kept_logits", False)
        ):
            # The LM head runs only where a caption token is scored (the loss is the same; see
            # MQwenForCausalLM.forward): a caption sample is mostly image and prompt positions.
            inputs["logits_to_keep"] = scored_positions(inputs["labels"])
        if not (self.recipe.vision_aux_weight and model.training and inputs.get("pixel_values") is not None):
            return super().compute_loss(model, inputs, *args, **kwargs)
        return self._caption_loss_with_vision_aux(model, inputs, *args, **kwargs)

    def _caption_loss_with_vision_aux(self, model, inputs: dict[str, Any], *args, **kwargs):
        """The caption loss plus `vision_aux_weight` x the warm-up loss of the caption pass's own vision features.

        The auxiliary term is scaled for gradient accumulation exactly as the Trainer scales the caption loss, so
        the logged `loss` minus the weighted mean auxiliary loss is the caption loss (`log`).
        """
        labels, pixel_values = inputs["labels"], inputs["pixel_values"]
        with self.vision_warmup.capturing_features() as captured:
            result = super().compute_loss(model, inputs, *args, **kwargs)
        loss = result[0] if isinstance(result, tuple) else result
        aux = self.vision_warmup.loss_from_caption_pass(captured, pixel_values, labels)
        self._vision_aux_sum = self._vision_aux_sum.to(aux.device) + aux.detach().float()
        self._vision_aux_count += 1
        if self._loss_is_scaled_for_accumulation(kwargs.get("num_items_in_batch")):
            aux = aux / self.current_gradient_accumulation_steps
        loss = loss + self.recipe.vision_aux_weight * aux
        return (loss, result[1]) if isinstance(result, tuple) else loss

    def _loss_is_scaled_for_accumulation(self, num_items_in_batch) -> bool:
        """Whether `training_step` leaves the loss undivided by the accumulation steps (its own rule, which
        transformers 5 can also set as `loss_is_scaled_for_ga`)."""
        # compat(transformers<5.19): no `loss_is_scaled_for_ga` before 5.19; the rule below is the Trainer's there
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return scaled
        return bool(self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
            self.compute_loss_func is not None
        )

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and 0 < self.state.global_step <= self.recipe.vision_warmup_steps:
            logs = {**logs, "vision_warmup": 1}  # this loss is the warm-up's, not the caption loss
        elif "loss" in logs and self._vision_aux_count:  # the caption loss alone, and the auxiliary loss beside it
            aux = float(self._vision_aux_sum) / self._vision_aux_count
            self._vision_aux_sum, self._vision_aux_count = torch.zeros(()), 0
            logs = {**logs, "loss": logs["loss"] - self.recipe.vision_aux_weight * aux, "vision_aux_loss": aux}
        if len(self.skip_report):
            logs = {**logs, "skipped_images": len(self.skip_report)}
        return super().log(logs, *args, **kwargs)

    def gathered_skip_report(self) -> SkipReport:
        """The skip reports of all processes merged (every rank must call this)."""
        report = SkipReport()
        report.merge(self.skip_report)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, self.skip_report)
            report = SkipReport()
            for other in gathered:
                report.merge(other)
        return report
