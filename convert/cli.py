"""`mqwen-convert {tiny,build,push,gguf}` (or `python -m mqwen.convert`): make, assemble, publish and export
MQwen checkpoints. Each sub-command's runner turns the parsed arguments into one call of the library function
that does the work (`write_tiny`, `build`, `push`, `export_gguf`)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

# `export_gguf`'s outtypes (gguf.ALL_OUTTYPES; gguf-py writes the first three), spelt out here because importing
# mqwen.convert.gguf costs seconds that `--help` should not pay; tests/test_gguf_kquants.py checks they agree.
GGUF_OUTTYPES = ("f32", "f16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k")

EXAMPLES = """examples:
  mqwen-convert tiny /tmp/mqwen-tiny --seed 0
  mqwen-convert build --llm Qwen/Qwen2.5-7B-Instruct --vision ViT-L-14:openai out/mqwen-7b
  mqwen-convert build --llm ./Qwen2.5-7B-Instruct --vision openai/clip-vit-large-patch14-336 \\
      --image-token-pooling 2 --projector mm_projector.safetensors out/mqwen-7b-336
  mqwen-convert push out/mqwen-7b your-name/mqwen-7b --private
  mqwen-convert gguf out/mqwen-7b out/mqwen-7b-gguf --outtype q8_0
  mqwen-convert gguf out/mqwen-7b out/mqwen-7b-q4 --outtype q4_k_m     # llama.cpp's quantizer (llama-cpp-python)
"""

BUILD_EXAMPLES = """VISION forms:
  ViT-L-14:openai                   OpenCLIP model name + pretrained tag (open_clip downloads and caches it)
  ViT-L-14-quickgelu:ckpt.pt        OpenCLIP architecture + a local checkpoint file
  hf-hub:timm/vit_large_patch14_clip_224.openai   OpenCLIP repo on the Hub
  path/to/open_clip_model.safetensors   local OpenCLIP checkpoint with open_clip_config.json beside it
  path/to/folder                    OpenCLIP folder (open_clip_config.json) or transformers CLIP (config.json)
  openai/clip-vit-large-patch14     transformers CLIP checkpoint on the Hub

examples:
  mqwen-convert build --llm Qwen/Qwen2.5-7B-Instruct --vision ViT-L-14:openai out/mqwen-7b
  mqwen-convert build --llm ~/models/Qwen2.5-7B-Instruct --vision ~/models/clip-vit-large-patch14 \\
      --dtype bf16 --image-token-pooling 2 out/mqwen-7b-pool2 --push-to-hub you/mqwen-7b-pool2
  mqwen-convert build --llm ~/models/Qwen-7B-Chat --vision ViT-L-14:openai out/mqwen-v1-7b
      (an original Qwen (v1) folder: converted to transformers' Qwen2, tokenizer from qwen.tiktoken)
"""

PUSH_EXAMPLES = """examples:
  mqwen-convert push out/mqwen-7b your-name/mqwen-7b
  mqwen-convert push out/mqwen-7b your-name/mqwen-7b --revision v0.1 --commit-message "first build"
"""


GGUF_EXAMPLES = """examples:
  mqwen-convert gguf out/mqwen-7b out/mqwen-7b-gguf                   # f16
  mqwen-convert gguf out/mqwen-7b out/mqwen-7b-q8 --outtype q8_0
  mqwen-convert gguf mqwen-shapes-demo/model /tmp/shapes-gguf --outtype f32
  mqwen-convert gguf out/mqwen-7b out/mqwen-7b-q4 --outtype q4_k_m     # LM Q4_K_M (~4.7 GB for a 7B), mmproj f16
  mqwen-convert gguf out/mqwen-7b out/mqwen-7b-q4 --outtype q4_k_m --mmproj-outtype q8_0 \\
      --llama-cpp-python ~/envs/llama/bin/python

q4_0, q4_k_m, q5_k_m and q6_k are made by llama.cpp's own quantizer (llama_model_quantize), reached through
llama-cpp-python: `pip install llama-cpp-python` here, or pass the python of an environment that has it.

then caption with llama.cpp's multimodal CLI (the prompt is MQwen's default caption prompt):
  llama-mtmd-cli -m out/mqwen-7b-gguf/mqwen-7b-f16.gguf --mmproj out/mqwen-7b-gguf/mmproj-mqwen-7b-f16.gguf \\
      --image photo.jpg --jinja --temp 0 -p $'<__media__>\\nDescribe this image.'
"""


def add_gguf_parser(sub: argparse._SubParsersAction) -> None:
    gguf = sub.add_parser(
        "gguf",
        help="export a saved MQwen model to GGUF for llama.cpp (LM + mmproj)",
        description="Write the language model GGUF (weights, tokenizer, chat template) and the mmproj GGUF (ViT + "
        "projector) that llama.cpp's multimodal tools load. Settings llama.cpp cannot run as MQwen does "
        "(pooled patches, a kept class token, the linear projector) are refused. Tensors are streamed one at a "
        "time into a temporary folder that is renamed to OUT_DIR at the end.",
        epilog=GGUF_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gguf.add_argument("model_dir", metavar="MODEL_DIR", help="a saved MQwen model folder")
    gguf.add_argument("out_dir", metavar="OUT_DIR")
    gguf.add_argument(
        "--outtype",
        choices=GGUF_OUTTYPES,
        default="f16",
        help="language model weight precision (default f16; q8_0 needs weight rows in multiples of 32; q4_0, "
        "q4_k_m, q5_k_m, q6_k: llama.cpp's quantizer)",
    )
    gguf.add_argument(
        "--mmproj-outtype",
        choices=GGUF_OUTTYPES[:3],
        help="vision tower + projector precision (default: --outtype; f16 for the llama.cpp-quantized types)",
    )
    gguf.add_argument(
        "--llama-cpp-python",
        metavar="PYTHON",
        help="python of an environment with llama-cpp-python, for q4_0/q4_k_m/q5_k_m/q6_k (default: "
        "$MQWEN_LLAMA_CPP_PYTHON, this python, or scripts/build_llama_cpp.sh's)",
    )
    gguf.add_argument("--name", help="file name stem (default: MODEL_DIR's name)")
    gguf.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR (once the export succeeds)")
    gguf.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mqwen-convert",
        description="Build and publish MQwen checkpoints.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("tiny", help="write a tiny random Hub-ready checkpoint (for tests and examples)")
    tiny.add_argument("out_dir")
    tiny.add_argument("--seed", type=int, default=0)

    build = sub.add_parser(
        "build",
        help="assemble an MQwen checkpoint from a pretrained LLM and a CLIP vision tower",
        description="Assemble a Hub-ready MQwen folder: the LLM's weights, tokenizer and generation config, "
        "a CLIP ViT in OpenCLIP layout, `<image>` added to the tokenizer, and a projector (fresh or --projector). "
        "Weights are streamed one tensor at a time into a temporary folder that is renamed to OUT_DIR at the end.",
        epilog=BUILD_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    build.add_argument(
        "--llm",
        required=True,
        help="Hub id or local folder of a transformers causal LM (or an original Qwen v1 checkpoint)",
    )
    build.add_argument("--vision", required=True, help="vision source (forms below)")
    build.add_argument("out_dir", metavar="OUT_DIR")
    build.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="weight dtype (default: the LLM's own)")
    build.add_argument("--image-token-pooling", type=int, default=1, help="NxN average pooling of patch tokens")
    build.add_argument("--projector", metavar="FILE", help="projector weights to load instead of a fresh init")
    build.add_argument(
        "--projector-type",
        choices=["mlp2x_gelu", "linear"],
        help="projector architecture (default: mlp2x_gelu, or whatever --projector holds)",
    )
    build.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR (once the build succeeds)")
    build.add_argument(
        "--allow-pickle", action="store_true", help="read .bin/.pt/.pth weights (with torch.load(weights_only=True))"
    )
    build.add_argument("--max-shard-size", default="5GB", help="largest output safetensors shard (default 5GB)")
    build.add_argument("--seed", type=int, default=0, help="seed of the fresh projector init")
    build.add_argument("--push-to-hub", metavar="REPO_ID", help="publish OUT_DIR to this Hub repo after the build")
    build.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")

    push = sub.add_parser(
        "push",
        help="publish a built folder to the Hugging Face Hub in one commit",
        description="Upload every file of OUT_DIR to REPO_ID in one commit (creating the repo if needed) and "
        "print the commit URL. The folder is only read: after a failure, run the same command again.",
        epilog=PUSH_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    push.add_argument("out_dir", metavar="OUT_DIR")
    push.add_argument("repo_id", metavar="REPO_ID")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    push.add_argument("--revision", help="branch to commit to (created if missing)")
    push.add_argument("--commit-message", help="commit title")
    add_gguf_parser(sub)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def run_tiny(args: argparse.Namespace) -> int:
    from ..common.tiny_model import write_tiny

    out = write_tiny(args.out_dir, seed=args.seed)
    files = sorted(p.name for p in Path(out).iterdir())
    print(json.dumps({"out_dir": str(out), "files": files}, indent=1))
    return 0


def run_build(args: argparse.Namespace) -> int:
    from .build import build, public_argument

    build(
        args.llm,
        args.vision,
        args.out_dir,
        dtype=args.dtype,
        image_token_pooling=args.image_token_pooling,
        projector=args.projector,
        projector_type=args.projector_type,
        overwrite=args.overwrite,
        allow_pickle=args.allow_pickle,
        push_to_hub=args.push_to_hub,
        private=args.private,
        max_shard_size=args.max_shard_size,
        seed=args.seed,
        command="mqwen-convert " + " ".join(shlex.quote(public_argument(arg)) for arg in args.argv),
    )
    return 0


def run_push(args: argparse.Namespace) -> int:
    from .push import push

    print(push(args.out_dir, args.repo_id, args.private, args.revision, args.commit_message))
    return 0


def run_gguf(args: argparse.Namespace) -> int:
    from .gguf import export_gguf

    lm, mmproj = export_gguf(
        args.model_dir,
        args.out_dir,
        args.outtype,
        overwrite=args.overwrite,
        name=args.name,
        progress=not args.no_progress,
        mmproj_outtype=args.mmproj_outtype,
        llama_cpp_python=args.llama_cpp_python,
    )
    print(f"wrote {lm}\nwrote {mmproj}")
    print(
        f"caption with: llama-mtmd-cli -m {lm} --mmproj {mmproj} --image IMAGE --jinja --temp 0 "
        "-p $'<__media__>\\nDescribe this image.'"
    )
    return 0


RUNNERS = {"tiny": run_tiny, "build": run_build, "push": run_push, "gguf": run_gguf}


def main(argv: list[str] | None = None) -> int:
    """`mqwen-convert`: parse `argv` (default: the command line) and run the sub-command; a ConvertError is
    printed without a traceback (exit status 2)."""
    from ..common.atomic_files import DestinationError
    from .errors import ConvertError

    args = parse_args(argv)
    try:
        return RUNNERS[args.command](args)
    except (ConvertError, DestinationError) as error:  # DestinationError: OUT_DIR filled while a build ran
        print(f"error: {error}", file=sys.stderr)
        return 2
