"""The language model at llama.cpp's k-quants (q4_k_m, q5_k_m, q6_k) and q4_0, made by llama.cpp's own quantizer.

gguf-py writes f32, f16 and q8_0 itself (`writer.py`), but not these: their block layouts, and the per-tensor
choices of a "_M" mix (some layers' attn_v and ffn_down one type higher, output.weight at q6_K, a fallback type for
rows that are not a multiple of 256), are llama.cpp's `llama_model_quantize` (libllama). So the export writes the
language model at f16 and hands it to that function, exactly what `llama-quantize` does. llama.cpp is reached
through llama-cpp-python's bindings, run by the interpreter of whichever environment has them (`llama_quantize.py`
in a subprocess): they are not a dependency of this package, and often live in an environment of their own
(scripts/build_llama_cpp.sh makes one, with the build the GGUF tests use).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ..errors import ConvertError

# llama.cpp's `llama_ftype` values (LLAMA_FTYPE_MOSTLY_*, include/llama.h) for the names --outtype accepts.
KQUANT_FTYPES = {"q4_0": 2, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
LLAMA_CPP_PYTHON_VARIABLE = "MQWEN_LLAMA_CPP_PYTHON"
QUANTIZE_SCRIPT = Path(__file__).with_name("llama_quantize.py")


def cached_llama_cpp_python() -> Path:
    """Where scripts/build_llama_cpp.sh leaves its environment's python (the machine's cache, as CI uses it)."""
    cache = Path(os.environ.get("MQWEN_CI_CACHE", Path.home() / ".cache" / "mqwen-ci"))
    return cache / "llama-cpp-python-0.3.36-cls-first" / "bin" / "python"


def how_to_get_llama_cpp(outtype: str) -> str:
    return (
        f"--outtype {outtype} is made by llama.cpp's own quantizer (llama_model_quantize), reached through "
        "llama-cpp-python, which was not found. Install it with `pip install llama-cpp-python` (it compiles "
        "llama.cpp: cmake and a C++ compiler), in this environment or another one whose python you pass as "
        f"--llama-cpp-python PATH (or set {LLAMA_CPP_PYTHON_VARIABLE}); in a clone of MQwen, "
        "`bash scripts/build_llama_cpp.sh` builds it and prints that python. f32, f16 and q8_0 need no llama.cpp."
    )


def _has_llama_cpp(python: str) -> bool:
    try:
        result = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def find_llama_cpp_python(outtype: str, python: str | os.PathLike | None = None) -> str:
    """The python of an environment with llama-cpp-python: `python` if given (an error if it has none), else
    $MQWEN_LLAMA_CPP_PYTHON, this interpreter, or scripts/build_llama_cpp.sh's cached one, the first that has it;
    a ConvertError that says how to get it when none does. Checked before anything is written."""
    if python is not None:
        if not _has_llama_cpp(str(python)):
            raise ConvertError(f"{python} cannot `import llama_cpp`. " + how_to_get_llama_cpp(outtype))
        return str(python)
    candidates = [os.environ.get(LLAMA_CPP_PYTHON_VARIABLE), sys.executable, str(cached_llama_cpp_python())]
    for candidate in dict.fromkeys(filter(None, candidates)):
        if Path(candidate).exists() and _has_llama_cpp(candidate):
            return candidate
    raise ConvertError(how_to_get_llama_cpp(outtype))


def quantize_language_model(python: str, source: Path, destination: Path, outtype: str, threads: int = 0) -> None:
    """`llama_model_quantize(source -> destination, outtype)` in `python`'s llama.cpp; threads 0: every core."""
    command = [python, str(QUANTIZE_SCRIPT), str(source), str(destination), str(KQUANT_FTYPES[outtype]), str(threads)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise ConvertError(
            f"llama.cpp's quantizer failed on {source.name} -> {outtype} (exit status {result.returncode}):\n"
            + (result.stderr or result.stdout)[-2000:]
        )
