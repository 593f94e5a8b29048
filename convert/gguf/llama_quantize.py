"""`python llama_quantize.py SOURCE.gguf DESTINATION.gguf FTYPE [THREADS]`: llama.cpp's `llama_model_quantize`.

Run by the interpreter of the environment that has llama-cpp-python (see `kquants.py`), so it imports nothing
but the bindings and the standard library. FTYPE is a `llama_ftype` number (15 = Q4_K_M); the defaults of
`llama_model_quantize_default_params` are llama-quantize's own (output.weight and the token embeddings at the
types the mix chooses).
"""

import ctypes
import sys

import llama_cpp


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    source, destination, ftype = argv[0], argv[1], int(argv[2])
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = int(argv[3]) if len(argv) == 4 else 0
    status = llama_cpp.llama_model_quantize(source.encode(), destination.encode(), ctypes.byref(params))
    if status != 0:
        print(f"llama_model_quantize({source!r}, {destination!r}, ftype={ftype}) returned {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
