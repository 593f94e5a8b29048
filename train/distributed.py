"""FSDP for `mqwen-train --fsdp` (torchrun) and for FSDP on CPU.

`accelerate launch --config_file train/configs/fsdp.yaml` hands its FSDP settings to the run as `FSDP_*`
environment variables, which accelerate's `FullyShardedDataParallelPlugin` reads when the Trainer builds its
`Accelerator`. `--fsdp` sets the same variables (only those a launcher has not set already), so FSDP is
configured one way whatever starts the processes, on transformers 4.57 (which sets FSDP up through these
variables too) and 5.x alike.

accelerate turns FSDP on only for GPU-like devices: on CPU it silently trains plain data-parallel instead.
torch's FSDP2 (`fully_shard`) runs on CPU with gloo, which is how the tests check sharded training against a
single process; `enable_fsdp_on_cpu` switches accelerate's state over to it.
"""

import atexit
import contextlib
import os
from collections.abc import Iterator

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.fsdp import FSDPModule

# FSDP2, every decoder layer and vision block its own unit, checkpoints written as one shard per process
# (torch.distributed.checkpoint), and the final model gathered once for `save_pretrained`.
FSDP_DEFAULTS = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_RESHARD_AFTER_FORWARD": "true",
    "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
}


def block_classes(model: torch.nn.Module) -> list[str]:
    """Class names of the model's repeated blocks (language-model decoder layers, vision blocks): the FSDP units.

    transformers 5 collects the submodels' `_no_split_modules` on the model; 4.57 has a method for it.
    """
    # compat(transformers<5.5): `_get_no_split_modules` is a method before 5.5
    collect = getattr(model, "_get_no_split_modules", None)
    return sorted(collect("auto") if collect is not None else model._no_split_modules)


def request_fsdp(model: torch.nn.Module) -> None:
    """Ask for FSDP2 over `model`'s blocks through accelerate's environment (a launcher's settings win)."""
    for name, value in {**FSDP_DEFAULTS, "FSDP_TRANSFORMER_CLS_TO_WRAP": ",".join(block_classes(model))}.items():
        os.environ.setdefault(name, value)


def fsdp_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def enable_fsdp_on_cpu(accelerator: Accelerator, plugin_args: dict | None = None) -> bool:
    """Switch a multi-process CPU run that asked for FSDP from plain data parallel to FSDP; True if it did.

    `plugin_args`: the Trainer's own FSDP plugin arguments (transformers 5 with `TrainingArguments.fsdp`),
    else the plugin reads the environment. The process-wide state (`PartialState`) is switched too: every
    `AcceleratorState` built later (the Trainer builds several) copies its `distributed_type` from there.
    """
    state = accelerator.state
    if state.device.type != "cpu" or state.num_processes < 2 or not (plugin_args or fsdp_requested()):
        return False
    if getattr(state, "fsdp_plugin", None) is None:
        state.fsdp_plugin = FullyShardedDataParallelPlugin(**(plugin_args or {}))
    PartialState().distributed_type = state.distributed_type = DistributedType.FSDP
    return True


@contextlib.contextmanager
def own_class(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`model` under its own class for the duration, e.g. of `save_pretrained`.

    FSDP2 turns a sharded module's class into a subclass defined in torch (`FSDPMQwenForCausalLM`);
    `save_pretrained` would name that class in config.json's `auto_map` and copy torch's files as remote code.
    """
    sharded_class = type(model)
    if isinstance(model, FSDPModule):
        model.__class__ = next(base for base in sharded_class.__bases__ if base is not FSDPModule)
    try:
        yield model
    finally:
        model.__class__ = sharded_class


def _destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def destroy_process_group_at_exit() -> None:
    """Tear the process group down when the interpreter exits, before it destroys what the group still uses.

    Left to the interpreter's own teardown, a rank of a DDP, FSDP or DeepSpeed run can abort in a C++ destructor
    ("terminate called without an active exception") after everything is saved, and torchrun then reports the
    whole run as failed. At exit, not at the end of `train`, so that a script can still use the group afterwards.
    Registering twice registers once.
    """
    atexit.unregister(_destroy_process_group)
    atexit.register(_destroy_process_group)
