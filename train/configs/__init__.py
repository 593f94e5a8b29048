"""Launcher configs that ship with the package: accelerate (`*.yaml`) and DeepSpeed (`deepspeed_zero3.json`).

They install inside the package, so an installed user finds them by name, from any directory:

    accelerate launch --config_file "$(python -m mqwen.train.configs fsdp_cpu.yaml)" -m mqwen.train ...
    mqwen-train --deepspeed "$(python -m mqwen.train.configs deepspeed_zero3.json)" ...
"""

from pathlib import Path

FOLDER = Path(__file__).resolve().parent


def names() -> list[str]:
    """The shipped configs' file names."""
    return sorted(p.name for p in FOLDER.iterdir() if p.suffix in (".yaml", ".json"))


def path(name: str) -> Path:
    """The absolute path of the shipped config `name` (a file name from `names()`)."""
    if name not in names():
        raise ValueError(f"No shipped config is named {name!r}; the configs are: {', '.join(names())}.")
    return FOLDER / name
