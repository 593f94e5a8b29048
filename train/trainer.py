"""`CaptionTrainer`: transformers' Trainer with per-part learning rates and a count of skipped images.

Everything else (mixed precision, gradient accumulation and checkpointing, warmup + cosine, logging,
checkpoints and resuming, DDP / DeepSpeed / FSDP through accelerate) is the stock Trainer; on CPU, FSDP is
switched on where accelerate would leave it off (see `distributed`).
"""

import os
import shutil
from pathlib import Path

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from mqwen.modeling_mqwen import scored_positions

from .data import SkipReport
from .distributed import enable_fsdp_on_cpu
from .stages import part_param_groups

# Where checkpoints are written before they are complete (a dot folder: never matched as `checkpoint-N`).
STAGING_DIR = ".checkpoint-staging"


class CaptionTrainer(Trainer):
    """Trainer for caption fine-tuning.

    Args (besides Trainer's):
        projector_lr: learning rate of the `multi_modal_projector` parameters;
        vision_lr: learning rate of the `vision_tower` parameters, when they train. Both default to
            `args.learning_rate`, which the language model uses. Only parameters with `requires_grad` reach
            the optimizer.
    """

    def __init__(self, *args, projector_lr=None, vision_lr=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.projector_lr = projector_lr
        self.vision_lr = vision_lr
        self.skip_report = SkipReport()

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if enable_fsdp_on_cpu(self.accelerator, getattr(self.args, "fsdp_plugin_args", None)):
            self.is_fsdp_enabled = True

    def create_optimizer(self, model=None):
        # Build the optimizer here; the parent then only applies its wrappers (it skips creation when
        # `self.optimizer` is set). `model` exists as an argument in transformers 5 only.
        opt_model = self.model if model is None else model
        if self.optimizer is None:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            groups = part_param_groups(
                opt_model,
                lm_lr=self.args.learning_rate,
                weight_decay=self.args.weight_decay,
                decay_names=set(self.get_decay_parameter_names(opt_model)),
                projector_lr=self.projector_lr,
                vision_lr=self.vision_lr,
            )
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return super().create_optimizer() if model is None else super().create_optimizer(model)

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
            from ..convert.staging import replace_folder

            final = os.path.join(run_dir, name)
            replace_folder(Path(staging) / name, Path(final))
            if self.state.best_model_checkpoint == os.path.join(staging, name):
                self.state.best_model_checkpoint = final
            self._rotate_saved_checkpoints(run_dir)
        self.accelerator.wait_for_everyone()

    def _get_output_dir(self, trial):
        return getattr(self, "_checkpoint_staging", None) or super()._get_output_dir(trial)

    def _rotate_saved_checkpoints(self, run_dir):
        """Apply `save_total_limit` (the stock save rotated inside the staging folder, where there is nothing
        to remove). transformers 5 has a function for it, 4.x a method."""
        if hasattr(self, "_rotate_checkpoints"):
            self._rotate_checkpoints(use_mtime=True, output_dir=run_dir)
        else:
            from transformers.trainer_utils import rotate_checkpoints

            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    def compute_loss(self, model, inputs, *args, **kwargs):
        # Skipped-image records ride along with the batch so they are counted here, in the main process,
        # even when images load in DataLoader workers.
        inputs = dict(inputs)
        self.skip_report.update(inputs.pop("skipped", None))
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
        return super().compute_loss(model, inputs, *args, **kwargs)

    def log(self, logs, *args, **kwargs):
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
