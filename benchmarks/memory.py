"""Figure 4: peak resident memory of loading a checkpoint and of `convert build`.

Both are measured in fresh processes (`benchmarks/rss.py` explains the method), against the bytes of
the safetensors files involved: loading should cost about one copy of the weights, and assembling a
checkpoint shard by shard about one shard in and one out.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from .report import Row
from .rss import measure
from .timing import Stats

if TYPE_CHECKING:
    from .contenders import Contenders
    from .shapes import Shapes

MB = 1e6


def safetensors_bytes(folder: str | os.PathLike) -> int:
    return sum(path.stat().st_size for path in Path(folder).glob("*.safetensors"))


def largest_shard(folder: str | os.PathLike) -> int:
    return max(path.stat().st_size for path in Path(folder).glob("*.safetensors"))


def from_pretrained_figure(c: Contenders, shapes: Shapes, workdir: str | os.PathLike) -> list[Row]:
    """Peak RSS of `MQwenForCausalLM.from_pretrained` ÷ the checkpoint's bytes; the bare LM for context."""
    rows = []
    kinds = [("mqwen", c.mqwen, "MQwenForCausalLM.from_pretrained", "<= 1.15")]
    if shapes.memory_context:
        kinds.append(("lm", c.bare_lm, "AutoModelForCausalLM.from_pretrained (the LM alone, for context)", ""))
    for kind, model, label, target in kinds:
        folder = Path(workdir) / f"checkpoint-{kind}"
        model.save_pretrained(folder, safe_serialization=True)
        size = safetensors_bytes(folder)
        reports = [measure(["load", kind, str(folder)]) for _ in range(shapes.memory_reps)]
        load_only = max(report["peak_load"] for report in reports)
        seconds = max(report["seconds"] for report in reports)
        rows.append(
            Row(
                "4",
                f"peak RSS MB of from_pretrained + first read of every weight, above the imports "
                f"(from_pretrained alone: <= {load_only / MB:.0f} MB, <= {seconds:.1f} s)",
                label,
                Stats([report["peak"] / MB for report in reports]),
                "safetensors MB",
                Stats([size / MB]),
                target,
            )
        )
    return rows


def build_available() -> bool:
    """Whether `mqwen-convert build` exists in this checkout."""
    return importlib.util.find_spec("mqwen.convert.build") is not None


def write_sharded_lm(shapes: Shapes, folder: str | os.PathLike, seed: int = 0) -> Path:
    """A random Qwen2 of about `shapes.build_lm_bytes`, saved in shards of `shapes.build_shard_bytes`.

    The layer count is raised until the fp32 weights reach the size asked for; the other shapes are the
    benchmark's.
    """
    text = dict(shapes.build_text or shapes.text)
    hidden, inter, vocab = text["hidden_size"], text["intermediate_size"], text["vocab_size"]
    kv = text["num_key_value_heads"] * (hidden // text["num_attention_heads"])
    per_layer = 4 * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter)
    fixed = 4 * 2 * vocab * hidden
    text["num_hidden_layers"] = max(1, round((shapes.build_lm_bytes - fixed) / per_layer))
    config = AutoConfig.for_model(text.pop("model_type"), **text)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=shapes.build_shard_bytes)
    del model
    return folder


def build_figure(c: Contenders, shapes: Shapes, workdir: str | os.PathLike) -> list[Row]:
    """Peak RSS of `mqwen-convert build` (above a bare interpreter with torch and transformers
    imported) ÷ the largest shard of the ~1 GB sharded language model it assembles."""
    workdir = Path(workdir)
    lm_dir = write_sharded_lm(shapes, workdir / "lm")
    c.tokenizer.save_pretrained(lm_dir)
    vision = workdir / "vision"  # a transformers CLIP folder: the LLaVA contender's ViT
    c.llava.model.vision_tower.save_pretrained(vision, safe_serialization=True)
    c.mqwen_processor.image_processor.save_pretrained(vision)
    out = workdir / "built"
    command = [sys.executable, "-m", "mqwen.convert", "build", "--llm", str(lm_dir), "--vision", str(vision), str(out)]
    peaks, seconds = [], 0.0
    for _ in range(shapes.memory_reps):
        shutil.rmtree(out, ignore_errors=True)
        baseline = measure(["baseline"])["baseline"]
        report = measure(["run", "--", *command])
        if report["returncode"]:
            raise RuntimeError(f"`{' '.join(command)}` failed with exit code {report['returncode']}")
        peaks.append((report["peak"] - baseline) / MB)
        seconds = max(seconds, report["seconds"])
    shard = largest_shard(lm_dir)
    total = safetensors_bytes(lm_dir)
    return [
        Row(
            "4",
            f"peak RSS MB of `convert build` above the imports ({total / MB:.0f} MB LM in "
            f"{len(list(lm_dir.glob('*.safetensors')))} shards, <= {seconds:.0f} s)",
            "mqwen-convert build",
            Stats(peaks),
            "largest LM shard MB",
            Stats([shard / MB]),
            "<= 2.0",
        )
    ]


def memory_figures(c: Contenders, shapes: Shapes, include_build: bool = True) -> tuple[list[Row], list[str]]:
    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="mqwen-bench-") as workdir:
        rows += from_pretrained_figure(c, shapes, workdir)
        if include_build:
            if build_available():
                rows += build_figure(c, shapes, workdir)
            else:
                notes.append("4b (`convert build` peak RSS) not measured: convert/build.py is not in this checkout.")
    return rows, notes
