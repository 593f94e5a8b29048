"""`mqwen-convert push OUT_DIR REPO_ID`: publish a built folder to the Hub in one commit.

The upload itself is `modeling_mqwen.publish_folder`, the same function `MQwenForCausalLM.push_to_hub(processor=)`
uses (it lives in the Hub file so that remote code has it too). Already-uploaded large files are deduplicated by
the Hub, so after a network failure the same command simply runs again; the local folder is only ever read.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..modeling_mqwen import publish_folder
from .errors import ConvertError
from .hub import SAFE_INDEX, SAFE_SINGLE

if TYPE_CHECKING:
    from huggingface_hub import HfApi


def check_publishable(folder: str | Path) -> None:
    """A ConvertError unless `folder` holds a complete build (config, model card, weights)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConvertError(f"{folder} is not a folder. Build one first: mqwen-convert build ... {folder}")
    missing = [name for name in ("config.json", "README.md") if not (folder / name).is_file()]
    if not ((folder / SAFE_SINGLE).is_file() or (folder / SAFE_INDEX).is_file()):
        missing.append(f"{SAFE_SINGLE} or {SAFE_INDEX}")
    if missing:
        raise ConvertError(f"{folder} is not a complete MQwen build (missing {', '.join(missing)}).")


def push(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    api: HfApi | None = None,
) -> str:
    """Check `folder` is a build, then publish it in one commit (`modeling_mqwen.publish_folder`, the function
    behind `push_to_hub(processor=)` too); returns the commit URL."""
    folder = Path(folder)
    check_publishable(folder)
    try:
        info = publish_folder(
            folder, repo_id, private=private, revision=revision, commit_message=commit_message, api=api
        )
    except Exception as error:
        raise ConvertError(
            f"Publishing {folder} to {repo_id} failed ({type(error).__name__}: {error}). Nothing local was changed; "
            "fix the cause (network, `hf auth login` / HF_TOKEN, repo permissions) and run the same command again."
        ) from error
    return info.commit_url
