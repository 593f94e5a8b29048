"""Saving without half-written results: every file and folder MQwen writes goes through this module.

- `staged_folder(out_dir)`: a folder is written under a temporary name next to its destination and renamed into
  place at the end (`convert build`, `convert gguf`, train/'s final model). An interrupted build (an exception,
  Ctrl-C, SIGTERM) removes its temporary folder; a killed one (SIGKILL, power loss) leaves
  `.NAME.partial-PID` behind, which the next build next to it deletes once that process is gone. Either way
  OUT_DIR itself is never half-written: it appears, complete, in one rename.
- `replace_folder(complete, out_dir)`: the rename at the end of that, for folders other code fills (the
  Trainer's checkpoints, written by every process of a distributed run).
- `staged_file(path)` / `write_atomically(path, text_or_bytes)`: the same for one file (results JSON, tables,
  figures): written to `.NAME.PID.tmpSUFFIX` beside it, then renamed over it.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class DestinationError(ValueError):
    """The output folder cannot be written: it is a file, or a non-empty folder and overwriting was not asked for."""


def check_destination(out_dir: str | os.PathLike, overwrite: bool) -> None:
    """A DestinationError if `out_dir` is a file, or a non-empty folder and `overwrite` is false."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DestinationError(f"OUT_DIR {out_dir} exists and is a file; choose a folder path.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise DestinationError(
            f"OUT_DIR {out_dir} already exists and is not empty. Pass --overwrite to replace it (it is replaced only "
            "once the new build is complete), or choose another folder."
        )


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(out_dir):
    for stale in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            print(f"Removing {stale}, left behind by an interrupted build")
            shutil.rmtree(stale, ignore_errors=True)


def _raise_on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def replace_folder(complete: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Rename the folder `complete` to `out_dir`; an existing `out_dir` is moved aside first and deleted only
    once the new one is in place."""
    complete, out_dir = Path(complete), Path(out_dir)
    if out_dir.exists():
        retired = out_dir.parent / f".{out_dir.name}.replaced-{os.getpid()}"
        shutil.rmtree(retired, ignore_errors=True)
        out_dir.rename(retired)
        complete.rename(out_dir)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        complete.rename(out_dir)
    return out_dir


@contextmanager
def staged_folder(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `out_dir`, on any failure it is deleted."""
    out_dir = Path(out_dir).absolute()
    check_destination(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out_dir)
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, _raise_on_sigterm)  # so that `finally` cleans up on a plain `kill`
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        yield staging
        check_destination(out_dir, overwrite)  # nobody filled it in the meantime
        replace_folder(staging, out_dir)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def staged_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix, for writers that go by it, e.g. matplotlib); when the
    block ends without error it is renamed over `path`, otherwise deleted. Parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomically(path: str | os.PathLike, content: str | bytes) -> Path:
    """Write `content` (text as UTF-8, or bytes) to `path` in one rename: readers never see half a file."""
    with staged_file(path) as tmp:
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content, encoding="utf-8")
    return Path(path)
