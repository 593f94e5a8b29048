"""Write a folder under a temporary name next to its destination and rename it into place at the end.

An interrupted build (an exception, Ctrl-C, SIGTERM) removes its temporary folder; a killed one (SIGKILL,
power loss) leaves `.NAME.partial-PID` behind, which the next build next to it deletes once that process is
gone. Either way OUT_DIR itself is never half-written: it appears, complete, in one rename.
"""

import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

from .errors import ConvertError


def check_destination(out_dir, overwrite):
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConvertError(f"OUT_DIR {out_dir} exists and is a file; choose a folder path.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ConvertError(
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


@contextmanager
def staged_folder(out_dir, overwrite=False):
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
        if out_dir.exists():
            retired = out_dir.parent / f".{out_dir.name}.replaced-{os.getpid()}"
            out_dir.rename(retired)
            staging.rename(out_dir)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(out_dir)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(staging, ignore_errors=True)
