"""The one exception type the converter raises for bad input; the CLI prints it without a traceback."""

from __future__ import annotations

import os

from ..common import atomic_files


class ConvertError(ValueError):
    """Something about the sources, options or output folder is wrong; the message says what and how to fix it."""


def check_destination(out_dir: str | os.PathLike, overwrite: bool) -> None:
    """`common.atomic_files.check_destination`, raising ConvertError: OUT_DIR must be a new or empty folder unless
    `overwrite`."""
    try:
        atomic_files.check_destination(out_dir, overwrite)
    except atomic_files.DestinationError as error:
        raise ConvertError(str(error)) from None
