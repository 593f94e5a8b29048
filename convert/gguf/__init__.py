"""`mqwen-convert gguf`: export a saved MQwen model for llama.cpp (and the tools built on it).

llama.cpp's multimodal library (libmtmd) loads two files, which this writes into OUT_DIR:

- `NAME-OUTTYPE.gguf`         the language model, its tokenizer and a chat template (`text.py`)
- `mmproj-NAME-OUTTYPE.gguf`  the vision tower and projector, as a CLIP "mlp" projector (`vision.py`)

Both are checked for what llama.cpp can express before anything is written, then streamed tensor by tensor
(`writer.py`) into a temporary folder that is renamed to OUT_DIR at the end (`..staging`).
"""

import os
from pathlib import Path

from ...common.atomic_files import staged_folder
from ..errors import ConvertError, check_destination
from .source import MQwenFolder
from .text import add_text_metadata, add_tokenizer, arch_of, check_text, plan_text_tensors
from .vision import add_vision_metadata, check_vision, plan_vision_tensors
from .writer import OUTTYPES, check_quantizable, write_gguf

FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}  # llama.cpp's LLAMA_FTYPE_ALL_F32 / MOSTLY_F16 / MOSTLY_Q8_0


def export_gguf(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    outtype: str = "f16",
    overwrite: bool = False,
    name: str | None = None,
    progress: bool = True,
) -> tuple[Path, Path]:
    """Write the LM and mmproj GGUF files of the MQwen model in `model_dir` to `out_dir`; returns both paths."""
    import gguf  # optional: the gguf extra

    if outtype not in OUTTYPES:
        raise ConvertError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    check_destination(out_dir, overwrite)
    source = MQwenFolder(model_dir)
    config = source.config
    check_text(config)
    check_vision(config)
    name = name or Path(model_dir).resolve().name
    text_plan, vision_plan = plan_text_tensors(source, config), plan_vision_tensors(source, config)
    check_quantizable(text_plan + vision_plan, outtype)
    chat_template, image_token, _ = source.processor_settings()

    lm_name, mmproj_name = f"{name}-{outtype}.gguf", f"mmproj-{name}-{outtype}.gguf"
    with staged_folder(out_dir, overwrite) as staging:
        writer = gguf.GGUFWriter(staging / lm_name, arch_of(config))
        add_text_metadata(writer, config, name, FILE_TYPES[outtype])
        add_tokenizer(writer, source, config, chat_template, image_token)
        write_gguf(staging / lm_name, writer, text_plan, outtype, progress, desc=lm_name)

        writer = gguf.GGUFWriter(staging / mmproj_name, "clip")
        add_vision_metadata(writer, config, name, FILE_TYPES[outtype])
        write_gguf(staging / mmproj_name, writer, vision_plan, outtype, progress, desc=mmproj_name)
    out_dir = Path(out_dir)
    return out_dir / lm_name, out_dir / mmproj_name
