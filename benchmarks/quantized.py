"""`python -m mqwen.benchmarks.quantized`: quantized MQwen on CPU, in one run on one machine.

1. torch: peak resident memory and decode tokens/s of bitsandbytes 4-bit (NF4) and 8-bit against bf16 (and
   fp32), each loaded by `runtime.load_for_inference` in a fresh process (`--worker`): the vision tower,
   projector and embeddings stay in bf16, the language model's linear layers are quantized.
2. llama.cpp: caption latency of the `mqwen-convert gguf` export at q4_k_m, q8_0 and f16 (mmproj f16) against
   MQwen in torch at fp32 and bf16, the same images, prompt and number of new tokens, the same threads.

Shapes: a Qwen2.5-0.5B-shaped language model (hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864, vocabulary
151936, tied embeddings) and OpenAI's ViT-L/14 at 224 px, random weights (`--quick`: tiny, for the test). The
rows of the stop tokens in the (tied) embedding are zeroed, so that greedy decoding of random weights never
stops early and every runtime generates exactly `--new-tokens` tokens. Writes RESULTS-quantized.md / .json with
the machine (CPU model, cores, threads, load) and the date.

    python -m mqwen.benchmarks.quantized --llama-cpp-python "$(bash scripts/build_llama_cpp.sh)"
    python -m mqwen.benchmarks.quantized --quick --out /tmp/quantized.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..common.machine import load_average, machine_description
from ..common.tiny_model import build_tiny, save_checkpoint
from .gguf import llama_cpp_command

HERE = Path(__file__).resolve().parent
REAL = dict(
    vision=dict(image_size=224, patch_size=14, width=1024, layers=24, heads=16, output_dim=768),
    text=dict(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    ),
)
QUICK = dict(
    vision=dict(image_size=56, patch_size=14, width=64, layers=2, heads=2, output_dim=64),
    text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, tie_word_embeddings=True),
)
TORCH_CONTENDERS = [("torch bf16", "bf16", None), ("torch 8-bit", "bf16", "8bit"), ("torch 4-bit NF4", "bf16", "4bit")]
TORCH_CONTENDERS += [("torch fp32", "fp32", None)]
GGUF_EXPORTS = [("f16", "f16"), ("q8_0", "f16"), ("q4_k_m", "f16"), ("q4_k_m", "q8_0")]  # (LM, mmproj)


def build_checkpoint(shapes: dict, folder: Path) -> Path:
    """A random MQwen at `shapes`, saved in bf16, its stop tokens' embedding rows zeroed (see the docstring)."""
    model, processor = build_tiny(seed=0, **shapes)
    with torch.no_grad():
        for token in model.generation_config.eos_token_id:
            model.get_input_embeddings().weight[token] = 0
            model.get_output_embeddings().weight[token] = 0
    return save_checkpoint(model.to(torch.bfloat16), processor, folder)


def write_images(folder: Path, n: int, size: int) -> list[Path]:
    from PIL import Image

    rng = np.random.RandomState(0)
    paths = []
    for i in range(n):
        path = folder / f"image{i}.png"
        Image.fromarray((rng.rand(size, size, 3) * 255).astype("uint8")).save(path)
        paths.append(path)
    return paths


def _resident(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


class Timestamps(list):
    """A logits processor that records when each new token's scores arrive (and changes nothing)."""

    def __call__(self, input_ids, scores):
        self.append(time.perf_counter())
        return scores


def worker(model_dir: str, dtype: str, quantization: str | None, images: list[str], new_tokens: int) -> dict:
    """In a fresh process: load, caption each image (`new_tokens` exactly), time 1-token and n-token generates."""
    from PIL import Image

    from ..runtime import caption_images, load_for_inference, model_inputs

    baseline = _resident("VmRSS")  # the interpreter and the imports (torch, transformers, mqwen)
    start = time.perf_counter()
    model, processor = load_for_inference(model_dir, "cpu", dtype, quantization=quantization)
    load_seconds = time.perf_counter() - start
    quantized = sum(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules())
    pictures = [Image.open(p).convert("RGB") for p in images]
    fixed = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    seconds = []
    with torch.inference_mode():
        next(caption_images(model, processor, pictures[:1], **fixed))  # warm-up
        for picture in pictures:
            t = time.perf_counter()
            next(caption_images(model, processor, [picture], **fixed))
            seconds.append(time.perf_counter() - t)
        stamps = Timestamps()
        inputs = model_inputs(model, processor, pictures[:1])
        model.generate(**inputs, logits_processor=[stamps], **fixed)
        t = time.perf_counter()
        model.get_image_features(inputs["pixel_values"])
        vision_seconds = time.perf_counter() - t
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.state_dict().values()}
    return {
        "peak_bytes_above_imports": _resident("VmHWM") - baseline,
        "resident_bytes_above_imports_at_the_end": _resident("VmRSS") - baseline,
        # the model's tensors (parameters, buffers and, through state_dict, bitsandbytes' quantization state)
        "model_bytes": sum(storages.values()),
        "load_seconds": load_seconds,
        "quantized_linear_layers": quantized,
        "seconds_per_image": seconds,
        "vision_tower_and_projector_seconds": vision_seconds,
        # from the first new token's logits to the last's: decode steps only, the prompt and image excluded
        "decode_tokens_per_second": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
    }


def run_worker(
    model_dir: Path, dtype: str, quantization: str | None, images: list[Path], args: argparse.Namespace
) -> dict:
    command = [sys.executable, "-m", "mqwen.benchmarks.quantized", "--worker", str(model_dir), dtype]
    command += [quantization or "none", str(args.new_tokens), str(args.threads), *map(str, images)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"the {dtype}/{quantization} worker failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def llama_cpp_rows(model_dir: Path, images: list[Path], args: argparse.Namespace, workdir: Path) -> dict:
    from ..convert.gguf import export_gguf
    from ..processing_mqwen import MQwenProcessor

    prompt_file = workdir / "prompt.txt"
    prompt_file.write_text(MQwenProcessor.from_pretrained(model_dir).caption_prompt().replace("<image>", "<__media__>"))
    results = {}
    for outtype, mmproj_outtype in GGUF_EXPORTS:
        lm, mmproj = export_gguf(
            model_dir,
            workdir / f"{outtype}-{mmproj_outtype}",
            outtype,
            progress=False,
            mmproj_outtype=mmproj_outtype,
            llama_cpp_python=args.llama_cpp_python,
        )
        out = workdir / f"{outtype}-{mmproj_outtype}.json"
        command = llama_cpp_command(
            args.llama_cpp_python, lm, mmproj, prompt_file, out, [images[0], *images], args.new_tokens, args.threads
        )
        subprocess.run(command, check=True, capture_output=True)
        result = json.loads(out.read_text())
        result["seconds_per_image"] = result["seconds_per_image"][1:]  # the first image warms up, as in torch
        result["file_bytes"] = lm.stat().st_size + mmproj.stat().st_size
        results[f"llama.cpp {outtype} (mmproj {mmproj_outtype})"] = result
        lm.unlink()
        mmproj.unlink()
    return results


def report(torch_results: dict, llama_results: dict, args: argparse.Namespace, checkpoint_bytes: int) -> str:
    base = torch_results["torch bf16"]
    lines = [
        "## 1. torch on CPU: peak memory and decode speed",
        "",
        "| contender | model tensors (MB) | ÷ bf16 | peak RSS above imports (MB) | ÷ bf16 | RSS at the end (MB) | "
        "decode tokens/s | ÷ bf16 | quantized linear layers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in torch_results.items():
        lines.append(
            f"| {name} | {r['model_bytes'] / 1e6:.0f} | {r['model_bytes'] / base['model_bytes']:.2f} | "
            f"{r['peak_bytes_above_imports'] / 1e6:.0f} | "
            f"{r['peak_bytes_above_imports'] / base['peak_bytes_above_imports']:.2f} | "
            f"{r['resident_bytes_above_imports_at_the_end'] / 1e6:.0f} | "
            f"{r['decode_tokens_per_second']:.2f} | "
            f"{r['decode_tokens_per_second'] / base['decode_tokens_per_second']:.2f} | {r['quantized_linear_layers']} |"
        )
    lines += [
        "",
        "## 2. caption latency: llama.cpp against MQwen in torch",
        "",
        "| runtime | median caption latency (s) | ÷ torch bf16 | ÷ torch fp32 | files (MB) |",
        "|---|---|---|---|---|",
    ]
    rows = {k: v for k, v in torch_results.items() if k in ("torch fp32", "torch bf16")} | llama_results
    bf16 = statistics.median(torch_results["torch bf16"]["seconds_per_image"])
    fp32 = statistics.median(torch_results["torch fp32"]["seconds_per_image"])
    for name, r in rows.items():
        median = statistics.median(r["seconds_per_image"])
        size = f"{r['file_bytes'] / 1e6:.0f}" if "file_bytes" in r else f"{checkpoint_bytes / 1e6:.0f} (bf16)"
        lines.append(f"| {name} | {median:.3f} | {median / bf16:.2f} | {median / fp32:.2f} | {size} |")
    if not llama_results:
        lines.append("| llama.cpp | not measured: no --llama-cpp-python | | |")
    machine = machine_description("cpu")
    vision = {k: torch_results[k]["vision_tower_and_projector_seconds"] for k in ("torch bf16", "torch fp32")}
    lines += [
        "",
        f"Of torch's caption latency, the vision tower and projector alone take {vision['torch bf16']:.3f} s in bf16 "
        f"and {vision['torch fp32']:.3f} s in fp32 (one image).",
        "",
        f"Shapes: {'quick (tiny)' if args.quick else 'Qwen2.5-0.5B-shaped LM + ViT-L/14 at 224 px'}, random "
        f"weights (checkpoint {checkpoint_bytes / 1e6:.0f} MB in bf16); {args.images} images of 224 px, one at a "
        f"time after one warm-up, greedy, exactly {args.new_tokens} new tokens; {args.threads} thread(s) for every "
        f"runtime. Machine: {machine['cpu']}, {machine['cores']} cores, {machine.get('memory', '?')}; torch "
        f"{machine['torch']}, transformers {machine['transformers']}; load average {load_average()} at the end "
        f"(a shared machine: other jobs ran at the same time). Date: {datetime.date.today().isoformat()}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        model_dir, dtype, quantization, new_tokens, threads, *images = argv[1:]
        torch.set_num_threads(int(threads))
        quantization = None if quantization == "none" else quantization
        print(json.dumps(worker(model_dir, dtype, quantization, images, int(new_tokens))))
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m mqwen.benchmarks.quantized",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for the test")
    parser.add_argument("--llama-cpp-python", help="python of the environment with llama_cpp (figure 2)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--out", default=str(HERE / "RESULTS-quantized.md"))
    args = parser.parse_args(argv)
    shapes = QUICK if args.quick else REAL

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_dir = build_checkpoint(shapes, workdir / "model")
        checkpoint_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
        images = write_images(workdir, args.images, 224)
        torch_results = {}
        for name, dtype, quantization in TORCH_CONTENDERS:
            torch_results[name] = run_worker(model_dir, dtype, quantization, images, args)
            print(f"{name}: {json.dumps(torch_results[name])}", file=sys.stderr)
        llama_results = llama_cpp_rows(model_dir, images, args, workdir) if args.llama_cpp_python else {}
    text = "# Quantized MQwen on CPU\n\n" + report(torch_results, llama_results, args, checkpoint_bytes)
    print(text)
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(
        json.dumps(
            {
                "machine": machine_description("cpu"),
                "date": datetime.date.today().isoformat(),
                "quick": args.quick,
                "torch": torch_results,
                "llama.cpp": llama_results,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
