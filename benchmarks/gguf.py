"""`python -m mqwen.benchmarks.gguf`: caption latency on CPU, llama.cpp (f16, q8_0) against MQwen in torch fp32.

Same model, same images, same prompt, greedy, one image at a time, the same number of CPU threads for both.
The model is exported with `mqwen-convert gguf` at each outtype; llama.cpp runs through
llama-cpp-python (built by scripts/build_llama_cpp.sh) in its own process, timed per image after loading.
Writes benchmarks/RESULTS-gguf.md and RESULTS-gguf.json.

    python -m mqwen.benchmarks.gguf MODEL_DIR IMAGES_DIR \\
        --llama-cpp-python ~/.cache/mqwen-ci/llama-cpp-python-0.3.36-cls-first/bin/python
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open

from ..convert.gguf import export_gguf
from ..runtime import caption_images, load_for_inference

HERE = Path(__file__).resolve().parent


def llama_cpp_command(
    python: str,
    lm: str | os.PathLike,
    mmproj: str | os.PathLike,
    prompt_file: str | os.PathLike,
    out: str | os.PathLike,
    images: Iterable[str | os.PathLike],
    max_new_tokens: int,
    threads: int | None = None,
    repack: bool = True,
) -> list[str]:
    """The command that captions `images` with llama.cpp: `llama_cpp_caption.py` run by `python`, the interpreter
    of the environment llama-cpp-python is built in; it writes its captions and timings to `out` (JSON).
    `repack=False` loads the weights without llama.cpp's repacked and AMX layouts (see `llama_cpp_caption.py`)."""
    command = [python, str(HERE / "llama_cpp_caption.py"), "--model", str(lm), "--mmproj", str(mmproj)]
    command += ["--prompt-file", str(prompt_file), "--out", str(out), "--max-new-tokens", str(max_new_tokens)]
    if threads is not None:
        command += ["--threads", str(threads)]
    if not repack:
        command.append("--no-repack")
    return command + [str(image) for image in images]


def mqwen_latencies(
    model_dir: str | os.PathLike, images: Iterable[str | os.PathLike], threads: int, max_new_tokens: int
) -> tuple[dict, str]:
    torch.set_num_threads(threads)
    model, processor = load_for_inference(model_dir, device="cpu", dtype="float32")
    captions, seconds = {}, []
    with torch.no_grad():
        for path in images:
            image = Image.open(path).convert("RGB")
            start = time.perf_counter()
            captions[path.name] = next(caption_images(model, processor, [image], max_new_tokens=max_new_tokens))
            seconds.append(time.perf_counter() - start)
    return {"captions": captions, "seconds_per_image": seconds}, processor.caption_prompt()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mqwen.benchmarks.gguf",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model_dir")
    parser.add_argument("images_dir", help="a folder of images (captions.jsonl beside them adds exact match)")
    parser.add_argument("--llama-cpp-python", required=True, help="python of the environment with llama_cpp")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--no-repack",
        dest="repack",
        action="store_false",
        help="llama.cpp without its repacked and AMX weight layouts (needed on Xeons with AMX: llama.cpp #20824)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--out", default=str(HERE / "RESULTS-gguf.md"))
    args = parser.parse_args(argv)

    images = sorted(p for p in Path(args.images_dir).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    images = images[: args.limit]
    truth_file = Path(args.images_dir) / "captions.jsonl"
    truth = (
        {r["file"]: r["caption"] for r in map(json.loads, truth_file.read_text().splitlines())}
        if truth_file.is_file()
        else {}
    )
    results = {}
    results["MQwen torch fp32"], prompt = mqwen_latencies(
        Path(args.model_dir), images, args.threads, args.max_new_tokens
    )
    sizes = {"MQwen torch fp32": sum(p.stat().st_size for p in Path(args.model_dir).glob("*.safetensors"))}
    with tempfile.TemporaryDirectory() as tmp:
        prompt_file = Path(tmp) / "prompt.txt"
        prompt_file.write_text(prompt.replace("<image>", "<__media__>"))
        for outtype in ("f16", "q8_0"):
            lm, mmproj = export_gguf(args.model_dir, Path(tmp) / outtype, outtype, progress=False)
            out = Path(tmp) / f"{outtype}.json"
            command = llama_cpp_command(
                args.llama_cpp_python,
                lm,
                mmproj,
                prompt_file,
                out,
                images,
                args.max_new_tokens,
                args.threads,
                args.repack,
            )
            subprocess.run(command, check=True)
            name = f"llama.cpp {outtype}"
            results[name] = json.loads(out.read_text())
            sizes[name] = lm.stat().st_size + mmproj.stat().st_size

    reference = results["MQwen torch fp32"]
    base = statistics.median(reference["seconds_per_image"])
    rows = []
    for name, result in results.items():
        median = statistics.median(result["seconds_per_image"])
        same = sum(result["captions"][p.name] == reference["captions"][p.name] for p in images)
        exact = (
            f"{sum(result['captions'][p.name] == truth.get(p.name) for p in images) / len(images):.0%}"
            if truth
            else "-"
        )
        rows.append(
            f"| {name} | {median * 1000:.1f} | {median / base:.2f} | {sizes[name] / 1e6:.2f} | "
            f"{same}/{len(images)} | {exact} |"
        )
    table = "\n".join(
        [
            "| runtime | median caption latency (ms) | ÷ MQwen torch fp32 | files (MB) | captions equal "
            "MQwen's | exact match |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )

    parameters = 0
    for file in Path(args.model_dir).glob("*.safetensors"):
        with safe_open(file, "np") as f:
            parameters += sum(int(__import__("numpy").prod(f.get_slice(k).get_shape())) for k in f.keys())
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s) "
        f"for both runtimes, 1-minute load average {os.getloadavg()[0]:.1f} at the end (a shared machine: "
        f"other jobs ran at the same time); Python {platform.python_version()}; model "
        f"{Path(args.model_dir).resolve()} ({parameters / 1e6:.2f} M parameters); {len(images)} images from "
        f"{args.images_dir}, greedy, at most {args.max_new_tokens} new tokens; latency per image excludes "
        f"loading"
    )
    report = f"# GGUF export: caption latency on CPU\n\n{table}\n\nMachine: {machine}.\n"
    print(report)
    Path(args.out).write_text(report)
    Path(args.out).with_suffix(".json").write_text(
        json.dumps({"machine": machine, "results": results, "sizes": sizes}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
