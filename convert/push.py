"""Publishing to the Hub in one commit: a built folder (`mqwen-convert push OUT_DIR REPO_ID`) or a model with its
processor (`push_to_hub(model, processor, repo_id)`).

Both end in `publish_folder`. It lives here, not in the Hub files, so that a published checkpoint carries no upload
code (loading one needs only transformers and torch). Already-uploaded large files are deduplicated by the Hub, so
after a network failure the same command simply runs again; the local folder is only ever read.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import CommitOperationAdd, HfApi

from .errors import ConvertError
from .hub import SAFE_INDEX, SAFE_SINGLE

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo
    from transformers import PreTrainedModel, ProcessorMixin


def publish_folder(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    api: HfApi | None = None,
) -> CommitInfo:
    """Upload every file of `folder` (`.git` aside) to the Hub repo `repo_id` in one commit; returns its CommitInfo.

    The one publishing path: `push_to_hub` and `mqwen-convert push` both end here. The repo (and the `revision`
    branch) is created if missing; one `create_commit` with a `CommitOperationAdd` per file, because
    `upload_folder` may split a large folder into several commits. The folder is only read.
    """
    folder = Path(folder)
    files = sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and ".git" not in path.relative_to(folder).parts
    )
    api = api or HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.create_commit(
        repo_id=repo_id,
        operations=[CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files],
        revision=revision,
        commit_message=commit_message or f"Upload MQwen checkpoint ({len(files)} files)",
        create_pr=create_pr,
    )


def push_to_hub(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
) -> CommitInfo:
    """Publish `model` and `processor` to the Hub repo `repo_id` in one commit; returns the commit info.

    transformers' own `model.push_to_hub(repo_id)` uploads only the model, so a repo published that way cannot be
    used with AutoProcessor or the pipelines. This saves both (the model's folder carries the three Hub files and
    `auto_map`) to a temporary folder and publishes it with `publish_folder`:

        from mqwen.convert.push import push_to_hub
        push_to_hub(model, processor, "your-org/mqwen-7b-captions", private=True)
    """
    with tempfile.TemporaryDirectory() as folder:
        try:
            model.save_pretrained(folder)
        except ValueError as error:  # transformers refuses to serialize some quantized models
            if getattr(model, "hf_quantizer", None) is None:
                raise
            raise ConvertError(_unsaveable_message(model, error)) from error
        processor.save_pretrained(folder)
        return publish_folder(
            folder,
            repo_id,
            token=token,
            private=private,
            revision=revision,
            commit_message=commit_message or "Upload MQwen model and processor",
            create_pr=create_pr,
        )


def _unsaveable_message(model: PreTrainedModel, error: ValueError) -> str:
    import transformers

    method = model.hf_quantizer.quantization_config.quant_method
    method = getattr(method, "value", method)
    return (
        f"transformers {transformers.__version__} cannot save this model quantized with {method} ({error}). "
        "torchao checkpoints save with transformers 5 (pip install 'transformers>=5'); or publish the unquantized "
        "checkpoint and load it quantized where it runs (mqwen-caption --quantize ..., "
        "load_for_inference(..., quantization=...))."
    )


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
    """Check `folder` is a build, then publish it in one commit (`publish_folder`, the function behind
    `push_to_hub` too); returns the commit URL."""
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
