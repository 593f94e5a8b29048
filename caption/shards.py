"""The output folder of a dataset captioning job: shards renamed into place, a manifest, and resume.

DIR holds `_mqwen_caption.json` (the model, prompt and generation settings the captions came from) and shards
`part-rRRR-NNNNN.parquet` (or `.jsonl`), one per unit of input (`inputs.py`), each row `key`, `caption`, `error`
(`caption` null and `error` the reason when the image could not be read). A shard is written under a temporary
name (`common/atomic_files.py`'s `staged_file`) and renamed when complete, so a file named like a shard is always
complete: resume is "every key in a shard is done", with no bookkeeping that a kill could leave half-updated.
`RRR` is the run that wrote it (one more than the highest in DIR), so a rerun never overwrites a shard.

The manifest's leading underscore and the lock's and temporaries' leading dot make Parquet readers skip them:
`pandas.read_parquet(DIR)` / `pyarrow.dataset.dataset(DIR)` read the shards as one table.

One job writes a DIR at a time (an exclusive `flock` on DIR/.lock, released by the kernel when the job dies).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from pathlib import Path

from ..common.atomic_files import staged_file, write_atomically

MANIFEST = "_mqwen_caption.json"
LOCK = ".lock"
SHARD_NAME = re.compile(r"^part-r(\d{3,})-(\d{5,})\.(parquet|jsonl)$")
FORMATS = ("parquet", "jsonl")
# The settings a caption depends on: a DIR written with other values is refused (see `check_settings`).
COMPARED = ("model", "model_config_sha256", "prompt", "max_new_tokens", "format")


class OutputError(ValueError):
    """The output folder cannot be used as asked (another model's captions, a foreign folder, locked)."""


def job_settings(model: str, prompt: str | None, max_new_tokens: int, format: str) -> dict:
    """The manifest of a job: the model as a resolved folder path (and its config.json's SHA-256) or a Hub id."""
    if format not in FORMATS:
        raise OutputError(f"format {format!r} is not one of {', '.join(FORMATS)}")
    config_sha = None
    if Path(model).is_dir():
        config = Path(model) / "config.json"
        model = str(Path(model).resolve())
        if config.is_file():
            config_sha = hashlib.sha256(config.read_bytes()).hexdigest()
    return {
        "model": str(model),
        "model_config_sha256": config_sha,
        "prompt": prompt,
        "max_new_tokens": int(max_new_tokens),
        "format": format,
    }


def _shard_schema():
    import pyarrow as pa  # optional: the caption extra

    return pa.schema([("key", pa.string()), ("caption", pa.string()), ("error", pa.string())])


class OutputFolder:
    """DIR for one job: `open()` checks and locks it, `done_keys()` lists what completed shards hold,
    `write_shard(rows)` adds one shard atomically. Use as a context manager."""

    def __init__(self, path: str | os.PathLike, settings: dict, overwrite: bool = False):
        self.path = Path(path)
        self.settings = settings
        self.overwrite = overwrite
        self._lock = None
        self.run = None
        self._written = 0

    def __enter__(self) -> OutputFolder:
        self.open()
        return self

    def __exit__(self, *exc):
        self.close()

    def open(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"--output {self.path} is a file; name a folder (it is created if missing)")
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.path / LOCK, "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise OutputError(
                f"another mqwen-caption job is writing {self.path}; wait for it or use another folder"
            ) from None
        for stale in self.path.glob(".part-*.tmp*"):  # a killed job's unfinished shard (we hold the lock)
            stale.unlink(missing_ok=True)
        self._check_or_write_manifest()
        runs = [int(m.group(1)) for m in map(SHARD_NAME.match, os.listdir(self.path)) if m]
        self.run = max(runs, default=0) + 1

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def _ours(self, name):
        return name in (MANIFEST, LOCK) or SHARD_NAME.match(name) is not None

    def _check_or_write_manifest(self):
        manifest = self.path / MANIFEST
        names = os.listdir(self.path)
        foreign = sorted(n for n in names if not self._ours(n) and not n.startswith(".part-"))
        if not manifest.is_file():
            if foreign or any(SHARD_NAME.match(n) for n in names):
                raise OutputError(
                    f"--output {self.path} is not empty and was not written by mqwen-caption (it holds "
                    f"{', '.join(foreign[:5]) or 'shards without a manifest'}); name a new or empty folder"
                )
        else:
            try:
                found = json.loads(manifest.read_text())
            except (OSError, json.JSONDecodeError) as error:
                raise OutputError(f"cannot read {manifest} ({error}); pass --overwrite to start over") from error
            differing = [k for k in COMPARED if found.get(k) != self.settings.get(k)]
            if differing and not self.overwrite:
                was = ", ".join(f"{k}={found.get(k)!r}" for k in differing)
                now = ", ".join(f"{k}={self.settings.get(k)!r}" for k in differing)
                raise OutputError(
                    f"{self.path} holds captions made with {was}, not {now}. Resuming would mix them: pass "
                    "--overwrite to delete those captions and start over, or name another --output folder."
                )
            if self.overwrite:
                if foreign:
                    raise OutputError(
                        f"--overwrite: {self.path} also holds files mqwen-caption did not write "
                        f"({', '.join(foreign[:5])}); it is left alone. Remove them or name another folder."
                    )
                for name in names:
                    if SHARD_NAME.match(name):
                        (self.path / name).unlink()
            elif not differing:
                return
        write_atomically(manifest, json.dumps(self.settings, indent=2) + "\n")

    def shards(self) -> list[Path]:
        """Completed shards, by name."""
        return sorted(p for p in self.path.iterdir() if SHARD_NAME.match(p.name))

    def done_keys(self) -> set[str]:
        """Every key in a completed shard."""
        keys = set()
        for shard in self.shards():
            keys.update(row["key"] for row in read_shard(shard, columns=["key"]))
        return keys

    def write_shard(self, rows: list[dict]) -> Path:
        """Write rows ({key, caption, error}) as the next shard of this run: a temporary file, then a rename."""
        self._written += 1
        path = self.path / f"part-r{self.run:03d}-{self._written:05d}.{self.settings['format']}"
        with staged_file(path) as tmp:
            if self.settings["format"] == "parquet":
                import pyarrow as pa  # optional: the caption extra
                import pyarrow.parquet as pq  # optional: the caption extra

                columns = {name: [row[name] for row in rows] for name in ("key", "caption", "error")}
                pq.write_table(pa.table(columns, schema=_shard_schema()), tmp)
            else:
                with open(tmp, "w", encoding="utf-8") as file:
                    for row in rows:
                        file.write(json.dumps({k: row[k] for k in ("key", "caption", "error")}) + "\n")
        return path


def read_shard(path: str | os.PathLike, columns: list[str] | None = None) -> list[dict]:
    """The rows of one shard (Parquet or JSONL) as dicts."""
    path = Path(path)
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq  # optional: the caption extra

            return pq.read_table(path, columns=columns).to_pylist()
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    except Exception as error:  # a shard that is there but cannot be read: say which
        raise OutputError(f"cannot read the shard {path}: {error}; delete it to caption its keys again") from error
    return [{k: row.get(k) for k in columns} for row in rows] if columns else rows


def read_output(path: str | os.PathLike) -> list[dict]:
    """Every row of every completed shard in an output folder (a convenience for notebooks and tests)."""
    return [
        row for shard in sorted(Path(path).glob("part-r*")) if SHARD_NAME.match(shard.name) for row in read_shard(shard)
    ]
