"""`python -m convert push OUT_DIR REPO_ID`: publish a built folder to the Hub in one commit.

The commit is made with `HfApi.create_commit` and one `CommitOperationAdd` per file, rather than
`upload_folder`, because recent huggingface_hub releases may split a large `upload_folder` into several
commits. Already-uploaded large files are deduplicated by the Hub, so after a network failure the same
command simply runs again; the local folder is only ever read.
"""

from pathlib import Path

from .errors import ConvertError
from .hub import SAFE_INDEX, SAFE_SINGLE


def folder_files(folder):
    """Every file of the folder, as repo paths (posix, relative), in a stable order."""
    folder = Path(folder)
    return sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and ".git" not in path.relative_to(folder).parts
    )


def check_publishable(folder):
    folder = Path(folder)
    if not folder.is_dir():
        raise ConvertError(f"{folder} is not a folder. Build one first: python -m convert build ... {folder}")
    missing = [name for name in ("config.json", "README.md") if not (folder / name).is_file()]
    if not ((folder / SAFE_SINGLE).is_file() or (folder / SAFE_INDEX).is_file()):
        missing.append(f"{SAFE_SINGLE} or {SAFE_INDEX}")
    if missing:
        raise ConvertError(f"{folder} is not a complete MQwen build (missing {', '.join(missing)}).")


def push(folder, repo_id, private=False, revision=None, commit_message=None, api=None):
    """Create the repo if needed and upload every file of `folder` in one commit; returns the commit URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    check_publishable(folder)
    files = folder_files(folder)
    api = api or HfApi()
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files]
        info = api.create_commit(
            repo_id,
            operations=operations,
            commit_message=commit_message or f"Upload MQwen checkpoint ({len(files)} files)",
            revision=revision,
        )
    except Exception as error:
        raise ConvertError(
            f"Publishing {folder} to {repo_id} failed ({type(error).__name__}: {error}). Nothing local was changed; "
            "fix the cause (network, `hf auth login` / HF_TOKEN, repo permissions) and run the same command again."
        ) from error
    return info.commit_url
