"""The one exception type the converter raises for bad input (the CLI prints it without a traceback), and the check
of an output folder that raises it."""

from __future__ import annotations

import os
from pathlib import Path


class ConvertError(ValueError):
    """Something about the sources, options or output folder is wrong; the message says what and how to fix it."""


def check_destination(out_dir: str | os.PathLike, overwrite: bool) -> None:
    """A ConvertError if `out_dir` is a file, or a non-empty folder and `overwrite` is false."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConvertError(f"OUT_DIR {out_dir} exists and is a file; choose a folder path.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ConvertError(
            f"OUT_DIR {out_dir} already exists and is not empty. Pass --overwrite to replace it (it is replaced only "
            "once the new build is complete), or choose another folder."
        )
