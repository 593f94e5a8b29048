"""`mqwen-convert gguf`: export a saved MQwen model for llama.cpp (and the tools built on it).

llama.cpp's multimodal library (libmtmd) loads two files, which this writes into OUT_DIR:

- `NAME-OUTTYPE.gguf`         the language model, its tokenizer and a chat template (`text.py`)
- `mmproj-NAME-MMPROJ_OUTTYPE.gguf`  the vision tower and projector, as a CLIP "mlp" projector (`vision.py`)

f32, f16 and q8_0 are written here (gguf-py); the language model at q4_0, q4_k_m, q5_k_m or q6_k is written at f16
and then quantized by llama.cpp's own quantizer (`kquants.py`), while its mmproj stays at f16 (or q8_0, f32), as
llama.cpp's users keep it: the vision tower is small beside a 7B language model, and quantizing it costs accuracy.

Both are checked for what llama.cpp can express before anything is written, then streamed tensor by tensor
(`writer.py`) into a temporary folder that is renamed to OUT_DIR at the end (`..staging`).
"""

import os
from pathlib import Path

from ...common.atomic_files import staged_folder
from ..errors import ConvertError, check_destination
from .kquants import KQUANT_FTYPES, find_llama_cpp_python, quantize_language_model
from .source import MQwenFolder
from .text import add_text_metadata, add_tokenizer, arch_of, check_text, plan_text_tensors
from .vision import add_vision_metadata, check_vision, plan_vision_tensors
from .writer import OUTTYPES, check_quantizable, write_gguf

FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}  # llama.cpp's LLAMA_FTYPE_ALL_F32 / MOSTLY_F16 / MOSTLY_Q8_0
ALL_OUTTYPES = OUTTYPES + tuple(KQUANT_FTYPES)


def export_gguf(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    outtype: str = "f16",
    overwrite: bool = False,
    name: str | None = None,
    progress: bool = True,
    mmproj_outtype: str | None = None,
    llama_cpp_python: str | os.PathLike | None = None,
) -> tuple[Path, Path]:
    """Write the LM and mmproj GGUF files of the MQwen model in `model_dir` to `out_dir`; returns both paths.

    `mmproj_outtype` defaults to `outtype`, and to f16 for the llama.cpp-quantized types; `llama_cpp_python` is
    the interpreter with llama-cpp-python for those (default: found as `kquants.find_llama_cpp_python` says)."""
    import gguf  # optional: the gguf extra

    if outtype not in ALL_OUTTYPES:
        raise ConvertError(f"--outtype must be one of {', '.join(ALL_OUTTYPES)}, got {outtype!r}")
    mmproj_outtype = mmproj_outtype or (outtype if outtype in OUTTYPES else "f16")
    if mmproj_outtype not in OUTTYPES:
        raise ConvertError(f"--mmproj-outtype must be one of {', '.join(OUTTYPES)}, got {mmproj_outtype!r}")
    check_destination(out_dir, overwrite)
    llama_cpp = find_llama_cpp_python(outtype, llama_cpp_python) if outtype in KQUANT_FTYPES else None
    source = MQwenFolder(model_dir)
    config = source.config
    check_text(config)
    check_vision(config)
    name = name or Path(model_dir).resolve().name
    text_plan, vision_plan = plan_text_tensors(source, config), plan_vision_tensors(source, config)
    text_outtype = "f16" if llama_cpp else outtype  # what gguf-py writes; llama.cpp quantizes it afterwards
    check_quantizable(text_plan, text_outtype)
    check_quantizable(vision_plan, mmproj_outtype)
    chat_template, image_token, _ = source.processor_settings()

    lm_name, mmproj_name = f"{name}-{outtype}.gguf", f"mmproj-{name}-{mmproj_outtype}.gguf"
    with staged_folder(out_dir, overwrite) as staging:
        written = staging / (f".{name}-f16-unquantized.gguf" if llama_cpp else lm_name)
        writer = gguf.GGUFWriter(written, arch_of(config))
        add_text_metadata(writer, config, name, FILE_TYPES[text_outtype])
        add_tokenizer(writer, source, config, chat_template, image_token)
        write_gguf(written, writer, text_plan, text_outtype, progress, desc=lm_name)
        if llama_cpp:
            quantize_language_model(llama_cpp, written, staging / lm_name, outtype)
            written.unlink()

        writer = gguf.GGUFWriter(staging / mmproj_name, "clip")
        add_vision_metadata(writer, config, name, FILE_TYPES[mmproj_outtype])
        write_gguf(staging / mmproj_name, writer, vision_plan, mmproj_outtype, progress, desc=mmproj_name)
    out_dir = Path(out_dir)
    return out_dir / lm_name, out_dir / mmproj_name
