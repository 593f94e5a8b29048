"""Caption images with llama.cpp (through llama-cpp-python's bindings): greedy, one image at a time.

Runs in the environment that has `llama_cpp` (scripts/build_llama_cpp.sh), not MQwen's: it imports only the
bindings and the standard library. tests/test_gguf.py and benchmarks/gguf.py call it as a subprocess.

The prompt is given whole (as rendered from the GGUF's chat template), with libmtmd's `<__media__>` marker
where the image goes; libmtmd splits it there, tokenizes the text parts (special tokens parsed) and puts the
projected image embeddings in between.

    python benchmarks/llama_cpp_caption.py --model LM.gguf --mmproj MMPROJ.gguf --prompt-file PROMPT \\
        --out captions.json IMAGE [IMAGE ...]
"""

import argparse
import ctypes
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def caption_images(
    model: str | os.PathLike,
    mmproj: str | os.PathLike,
    prompt: str,
    images: list[str | os.PathLike],
    max_new_tokens: int = 24,
    threads: int = 1,
    repack: bool = True,
) -> dict:
    import llama_cpp  # optional: built by scripts/build_llama_cpp.sh
    import llama_cpp.mtmd_cpp as mtmd  # optional: built by scripts/build_llama_cpp.sh

    if not repack:
        _load_without_repacking(llama_cpp)
    start = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=str(model), n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    params = mtmd.mtmd_context_params_default()
    params.use_gpu = False
    params.print_timings = False
    params.n_threads = threads
    context = mtmd.mtmd_init_from_file(str(mmproj).encode(), llm.model, params)
    if not context:
        raise SystemExit(f"llama.cpp could not load the mmproj {mmproj}")
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    load_seconds = time.perf_counter() - start

    captions, seconds = {}, []
    for image in images:
        t = time.perf_counter()
        bitmap = mtmd.mtmd_helper_bitmap_init_from_file(context, str(image).encode(), False)
        if not bitmap:
            raise SystemExit(f"llama.cpp could not read the image {image}")
        text = mtmd.mtmd_input_text()
        encoded = prompt.encode()
        text.text, text.text_len, text.add_special, text.parse_special = encoded, len(encoded), True, True
        chunks = mtmd.mtmd_input_chunks_init()
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        if mtmd.mtmd_tokenize(context, chunks, ctypes.byref(text), bitmaps, 1) != 0:
            raise SystemExit(f"libmtmd could not tokenize the prompt for {image}")
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
        n_past = llama_cpp.llama_pos(0)
        if mtmd.mtmd_helper_eval_chunks(context, llm.ctx, chunks, 0, 0, llm.n_batch, True, ctypes.byref(n_past)):
            raise SystemExit(f"libmtmd could not evaluate the prompt for {image}")
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
        tokens = []
        for _ in range(max_new_tokens):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
            token = int(np.argmax(logits))
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                break
            tokens.append(token)
            batch = llama_cpp.llama_batch_get_one((llama_cpp.llama_token * 1)(token), 1)
            if llama_cpp.llama_decode(llm.ctx, batch) != 0:
                raise SystemExit("llama_decode failed")
        captions[Path(image).name] = llm.detokenize(tokens).decode("utf-8", errors="replace").strip()
        seconds.append(time.perf_counter() - t)
    mtmd.mtmd_free(context)
    return {"captions": captions, "seconds_per_image": seconds, "load_seconds": load_seconds}


def _load_without_repacking(llama_cpp) -> None:
    """Make `llama_cpp.Llama` load weights without llama.cpp's extra buffer types (`--no-repack` in its CLI).

    Those are the CPU backend's repacked and AMX layouts. On a Xeon with AMX, llama.cpp 0.3.36 (llama-cpp-python's)
    crashed with a segmentation fault inside `ggml_backend_amx_mul_mat` on the test model's q8_0 weights
    (ggml-org/llama.cpp issue #20824 reports the same crash with a real model). The bindings' `Llama` takes no
    argument for it, so the default parameters it starts from are changed, in this process only."""
    default_params = llama_cpp.llama_cpp.llama_model_default_params

    def params_without_extra_buffers():
        params = default_params()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = params_without_extra_buffers


def chat_template_of(model: str | os.PathLike) -> str | None:
    """The GGUF's tokenizer.chat_template, read with the bindings' own metadata reader."""
    import llama_cpp  # optional: built by scripts/build_llama_cpp.sh

    llm = llama_cpp.Llama(model_path=str(model), n_ctx=64, vocab_only=True, verbose=False)
    return llm.metadata.get("tokenizer.chat_template")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--mmproj", required=True)
    parser.add_argument("--prompt-file", required=True, help="the whole prompt, with <__media__> for the image")
    parser.add_argument("--out", required=True, help="JSON file for captions and timings")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--no-repack",
        dest="repack",
        action="store_false",
        help="load weights without llama.cpp's repacked and AMX layouts (as its CLI's --no-repack)",
    )
    parser.add_argument("images", nargs="+")
    args = parser.parse_args(argv)
    result = caption_images(
        args.model,
        args.mmproj,
        Path(args.prompt_file).read_text(),
        args.images,
        args.max_new_tokens,
        args.threads,
        args.repack,
    )
    result["chat_template"] = chat_template_of(args.model)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
