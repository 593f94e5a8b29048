"""What an input of `mqwen-caption` is (tar shard, Parquet file, datasets folder, image folder or file), from its
name alone: the CLI asks this before the readers in `inputs.py` (and their optional `caption` extra) are imported."""

from __future__ import annotations

from pathlib import Path

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# PIL's own decompression-bomb threshold (Image.MAX_IMAGE_PIXELS): larger images become error rows.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


def input_kind(path: Path) -> str:
    """ "tar", "parquet", "datasets" (a `save_to_disk` folder), "folder" (of image files) or "image"."""
    path = Path(path)
    name = path.name.lower()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return "datasets"
        return "folder"
    if name.endswith(TAR_SUFFIXES):
        return "tar"
    if name.endswith(".parquet"):
        return "parquet"
    return "image"
