"""Where the weights of a transformers-format folder are, and fetching only the files a build needs from the Hub.

Local folders and Hub repos go through the same choice (`select_weight_files`), so a repo converts exactly
as its downloaded snapshot would. Pickle weights are chosen only when there are no safetensors and the user
allowed them.
"""

import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import ConvertError

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Everything but weights that a build may read: configs, tokenizer files, chat templates, model cards.
META_PATTERNS = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "README.md", "LICENSE*"]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_pickle(path: str | os.PathLike) -> bool:
    return Path(path).suffix in PICKLE_SUFFIXES


def pickle_refused(path: str | os.PathLike, what: str) -> ConvertError:
    return ConvertError(
        f"{what} weights {path} are a pickle file. Pickle can run code when loaded, so it is read only when you "
        "pass --allow-pickle (and then with torch.load(weights_only=True)). Prefer a safetensors copy if there is one."
    )


def select_weight_files(
    names: Iterable[str],
    read_index: Callable[[str], dict],
    allow_pickle: bool,
    where: str | os.PathLike,
    what: str,
) -> list[str]:
    """The weight files (relative names) of a transformers checkpoint, given the names of its top-level files."""
    names = set(names)
    for index_name, single in ((SAFE_INDEX, SAFE_SINGLE), (PICKLE_INDEX, PICKLE_SINGLE)):
        if index_name in names:
            files = sorted(set(read_index(index_name)["weight_map"].values()))
        elif single in names:
            files = [single]
        else:
            continue
        if single == PICKLE_SINGLE and not allow_pickle:
            raise pickle_refused(f"{where}/{files[0]}", what)
        return files
    raise ConvertError(
        f"{what} {where} has no weights: expected {SAFE_SINGLE}, or {SAFE_INDEX} with its shards (the layout "
        "transformers' save_pretrained writes). Point at the folder that holds config.json and the weights."
    )


def find_local_weights(folder: str | os.PathLike, allow_pickle: bool, what: str) -> list[Path]:
    folder = Path(folder)
    names = [path.name for path in folder.iterdir() if path.is_file()]

    def read_index(name):
        return json.loads((folder / name).read_text())

    files = [folder / name for name in select_weight_files(names, read_index, allow_pickle, folder, what)]
    missing = [str(path.name) for path in files if not path.is_file()]
    if missing:
        raise ConvertError(f"{what} {folder}: the shard index names files that are missing: {', '.join(missing)}")
    return files


def fetch_repo(repo_id: str, allow_pickle: bool, what: str, revision: str | None = None) -> Path:
    """Download the configs, tokenizer files and chosen weights of a Hub repo; returns the snapshot folder."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    try:
        names = [name for name in HfApi().list_repo_files(repo_id, revision=revision) if "/" not in name]

        def read_index(name):
            return json.loads(Path(hf_hub_download(repo_id, name, revision=revision)).read_text())

        weights = select_weight_files(names, read_index, allow_pickle, repo_id, what)
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=META_PATTERNS + weights))
    except ConvertError:
        raise
    except Exception as error:
        raise ConvertError(
            f"Could not fetch {what} {repo_id!r} from the Hugging Face Hub ({type(error).__name__}: {error}). "
            "Check the repo id, the network (and HF_HUB_OFFLINE), and a token for gated repos; or pass a local folder."
        ) from error


def hub_id_from_path(folder: str | os.PathLike) -> str | None:
    """`Org/Name` for a folder inside the Hub cache (`.../models--Org--Name/snapshots/<sha>`), else None."""
    for part in Path(folder).resolve().parts:
        if part.startswith("models--"):
            return part[len("models--") :].replace("--", "/", 1)
    return None
