"""MQwen web demo: drop or paste images in a browser page and watch their captions stream in (Gradio).

    python app.py --model DIR_OR_REPO [--host 127.0.0.1] [--port 7860] [--device auto] [--dtype auto]

The same file is a Hugging Face Space's `app_file` (see `space/README.md`): on a Space there are no command-line
arguments, so the model comes from the `MQWEN_MODEL` variable and the address from the `GRADIO_SERVER_NAME` /
`GRADIO_SERVER_PORT` variables that Spaces set.

Why it is built this way:
- The page is only the page: loading and captioning are the shared runtime's (`runtime.py`, next to this file:
  the Auto classes with `trust_remote_code=True`). Both files need only transformers, torch and gradio, never
  the rest of this repository, so a Space holding `app.py` and `runtime.py` runs from a bare checkpoint.
- One request generates at a time (`demo.queue(default_concurrency_limit=1)`); other visitors wait in the queue
  instead of sharing the CPU or GPU with it.
- Each caption streams (`runtime.stream_caption`: `TextIteratorStreamer`, generation in a worker thread); the
  text shown when an image is done is decoded from the ids `generate` returned, exactly as
  `processor.decode_captions` does, so the page shows the model's own output, not a re-assembly of pieces.
- Every input problem (a file that is not an image, an image too large, an empty prompt, too many images)
  becomes a readable message in the status box and an error pop-up; the handler never lets it take the
  server down.
"""

from __future__ import annotations

import argparse
import base64
import html
import importlib
import importlib.util
import io
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

# Before gradio is imported: no usage statistics or version checks (the page must work with no network).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

HERE = Path(__file__).resolve().parent
EXAMPLES_DIR = HERE / "space" / "examples"
# The main demo job (`python -m mqwen.demo`) writes its trained model to OUT/model, OUT being its --out
# (default `mqwen-shapes-demo`, relative to where it ran). That is the model served without --model.
DEMO_OUT_DEFAULT = "mqwen-shapes-demo"

DEFAULT_MAX_PIXELS = 50_000_000  # about 8000 x 6000: every phone camera, and well under PIL's bomb check
DEFAULT_MAX_IMAGES = 16
MAX_PROMPT_CHARS = 2000

EPILOG = """examples:
  mqwen-convert tiny /tmp/mqwen-tiny && python app.py --model /tmp/mqwen-tiny
  python -m mqwen.demo && python app.py          # train the shapes model, then serve it (the default)
  python app.py --model mqwen-shapes-demo/model --port 8080
  python app.py --model user/mqwen-checkpoint --device cuda --dtype bfloat16
  python app.py --model user/mqwen-7b --quantize 4bit     # a 7B on a 16 GB GPU or a laptop (bitsandbytes NF4)
  MQWEN_MODEL=user/mqwen-checkpoint python app.py        # how a Space picks its model

Open the printed URL, drop one or several images, press Caption.
"""

NO_MODEL_HELP = """No model to serve: pass --model DIR_OR_REPO (or set MQWEN_MODEL).
The shapes demo's trained model is not there yet (looked in: {looked}). Ways to get a model:
  - train it (about 20 minutes on 2 CPU cores), then run this again from the same folder:
        python -m mqwen.demo && python app.py
  - a tiny random checkpoint, to try the page out (its captions are gibberish):
        mqwen-convert tiny /tmp/mqwen-tiny && python app.py --model /tmp/mqwen-tiny
  - a published MQwen checkpoint on the Hub:  python app.py --model USER/REPO"""


class InputProblem(ValueError):
    """Something wrong with what the visitor sent; the message is shown in the page as is."""


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------


def _load_runtime() -> ModuleType:
    """The shared inference runtime, `runtime.py` beside this file.

    As part of the installed package this is `mqwen.runtime`; run as a script (`python app.py`, a Space, a test
    loading this file) it is read from its path, so a Space needs only `app.py` and `runtime.py`.
    """
    if __package__:
        return importlib.import_module(".runtime", __package__)
    spec = importlib.util.spec_from_file_location("mqwen_runtime", HERE / "runtime.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


runtime = _load_runtime()


class Captioner:
    """A loaded MQwen model + processor that captions one image at a time, streaming the text."""

    def __init__(self, model: Any, processor: Any, device: str = "cpu") -> None:
        self.model = model.eval()
        self.processor = processor
        self.device = device
        self._lock = threading.Lock()  # the queue already serialises requests; this also guards direct use

    @classmethod
    def load(cls, name_or_path: str, device: str = "auto", dtype: str = "auto", quantization: Any = None) -> Captioner:
        """Load a checkpoint folder or Hub repo once (`runtime.load_for_inference`: remote code, one rule for
        `auto` device and dtype; `quantization`: a `--quantize` name or a transformers quantization config)."""
        model, processor = runtime.load_for_inference(name_or_path, device, dtype, quantization)
        return cls(model, processor, str(model.device))

    @property
    def default_instruction(self) -> str:
        return self.processor.caption_instruction

    def max_new_tokens_default(self) -> int:
        configured = getattr(self.model.generation_config, "max_new_tokens", None)
        return int(configured) if configured else 64

    def stream(
        self,
        image: Any,
        instruction: str | None,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> Iterator[tuple[str, int | None]]:
        """Caption one image, yielding `(text_so_far, None)` as tokens arrive and `(caption, n_new_tokens)` last
        (`runtime.stream_caption`)."""
        settings = dict(do_sample=bool(do_sample))
        if do_sample:
            settings.update(temperature=float(temperature), top_p=float(top_p))
        yield from runtime.stream_caption(
            self.model, self.processor, image, instruction, max_new_tokens, lock=self._lock, **settings
        )


# ----------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------


def input_paths(files: Any) -> list[str]:
    """File paths from a gr.File value (a path, a list of paths, or file dicts / objects)."""
    items = list(files) if isinstance(files, (list, tuple)) else ([files] if files else [])
    paths = []
    for item in items:
        if isinstance(item, dict):
            item = item.get("path") or item.get("name")
        paths.append(str(getattr(item, "path", None) or getattr(item, "name", None) or item))
    return paths


def display_name(path: str | os.PathLike) -> str:
    """The name a visitor knows a file by (Gradio keeps the uploaded name as the last path component)."""
    return Path(str(path)).name


def open_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Any:
    """The image at `path`, EXIF-rotated, or InputProblem saying what is wrong with the file and what to do."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    name = display_name(path)
    try:
        with Image.open(path) as image:  # reads the header only: the size is known before any decoding
            width, height = image.size
            if width * height > max_pixels:
                raise InputProblem(
                    f"{name} is {width} x {height} pixels ({width * height / 1e6:.1f} megapixels); the limit is "
                    f"{max_pixels / 1e6:.1f} megapixels. Downscale it (the model sees it at a few hundred "
                    "pixels anyway) and upload it again."
                )
            image.load()
            image = ImageOps.exif_transpose(image)
            return image if image.mode in ("RGB", "L", "RGBA") else image.convert("RGBA")
    except InputProblem:
        raise
    except Image.DecompressionBombError as error:
        raise InputProblem(
            f"{name} is too large to open safely ({error}). Downscale it and upload it again."
        ) from error
    except UnidentifiedImageError:
        raise InputProblem(
            f"{name} is not an image file this demo can read. Upload PNG, JPEG, WebP, GIF, BMP or TIFF images."
        ) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise InputProblem(f"{name} could not be read as an image ({error}). Is the file complete?") from error


def check_request(paths: list[str], instruction: str | None, max_images: int = DEFAULT_MAX_IMAGES) -> str:
    if not paths:
        raise InputProblem("No image yet: drop, paste or upload one or more images, or click an example.")
    if len(paths) > max_images:
        raise InputProblem(f"{len(paths)} images were given; caption at most {max_images} at a time.")
    instruction = (instruction or "").strip()
    if not instruction:
        raise InputProblem(
            "The prompt is empty. Type an instruction, or press 'Default prompt' to restore the model's "
            "caption instruction."
        )
    if len(instruction) > MAX_PROMPT_CHARS:
        raise InputProblem(f"The prompt has {len(instruction)} characters; keep it under {MAX_PROMPT_CHARS}.")
    return instruction


# ----------------------------------------------------------------------------------------------------------
# Page
# ----------------------------------------------------------------------------------------------------------


def thumbnail_uri(image: Any, size: int = 128) -> str:
    thumb = image.copy()
    thumb.thumbnail((size, size))
    buffer = io.BytesIO()
    thumb.convert("RGBA" if thumb.mode == "RGBA" else "RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _caption_cell(caption) -> str:
    if caption is None:
        return "<i>waiting</i>"
    return html.escape(caption) if caption else "<i>(empty)</i>"


def captions_table(rows: list) -> str:
    """HTML table of (thumbnail uri, file name, caption or None while pending)."""
    if not rows:
        return ""
    body = "".join(
        "<tr>"
        f'<td><img src="{uri}" alt="{html.escape(name)}" title="{html.escape(name)}"></td>'
        f"<td class='mqwen-name'>{html.escape(name)}</td>"
        f"<td class='mqwen-caption'>{_caption_cell(caption)}</td>"
        "</tr>"
        for uri, name, caption in rows
    )
    return (
        "<table class='mqwen-table'><thead><tr><th>Image</th><th>File</th><th>Caption</th></tr></thead>"
        f"<tbody>{body}</tbody></table>"
    )


# Ctrl+V anywhere on the page (outside text fields) hands pasted images to the file box, as a drop would.
# A <script> in the page head, not launch(js=...), which some gradio 6 releases do not run.
PASTE_HEAD = """<script>
document.addEventListener("paste", (event) => {
  if (event.target && event.target.closest && event.target.closest("textarea, input")) return;
  const files = (event.clipboardData && event.clipboardData.files) || [];
  const images = Array.from(files).filter((file) => file.type.startsWith("image/"));
  const input = document.querySelector("#images input[type=file]");
  if (!images.length || !input) return;
  const transfer = new DataTransfer();
  images.forEach((file) => transfer.items.add(file));
  input.files = transfer.files;
  input.dispatchEvent(new Event("change", { bubbles: true }));
  event.preventDefault();
});
</script>"""

CSS = """
.mqwen-table { width: 100%; border-collapse: collapse; }
.mqwen-table td, .mqwen-table th {
  padding: 6px 10px; border-bottom: 1px solid var(--border-color-primary); text-align: left;
}
.mqwen-table img { max-width: 128px; max-height: 128px; }
.mqwen-table td.mqwen-name {
  font-size: 0.85em; color: var(--body-text-color-subdued); word-break: break-all; width: 20%;
}
.mqwen-table td.mqwen-caption { width: 60%; }
"""


def example_sets(examples_dir: str | os.PathLike = EXAMPLES_DIR) -> tuple[list, list[str]]:
    """gr.Examples rows for the file input (each a one-element list holding a list of paths) and labels."""
    files = sorted(Path(examples_dir).glob("*.png")) if Path(examples_dir).is_dir() else []
    rows, labels = [], []
    for path in files:
        rows.append([[str(path)]])
        number, _, caption = path.stem.partition("_")  # "03_a_blue_circle" -> "a blue circle"
        labels.append((caption if number.isdigit() and caption else path.stem).replace("_", " "))
    if len(files) > 1:
        rows.append([[str(path) for path in files[:3]]])
        labels.append(f"{min(3, len(files))} images at once")
    return rows, labels


def markdown_text(text: str) -> str:
    """`text` shown literally in Markdown (file names may hold `*`, `_`, `<` ...)."""
    return "".join("\\" + c if c in "\\`*_{}[]<>()#+-!|~" else c for c in text)


def caption_handler(
    captioner: Captioner, max_pixels: int = DEFAULT_MAX_PIXELS, max_images: int = DEFAULT_MAX_IMAGES
) -> Callable:
    """The Caption button's generator: yields (caption text, table html, status markdown) as captions stream.

    One image: the caption box holds its caption. Several: one caption per line, in upload order, and the
    table pairs each thumbnail with its caption.
    """
    import gradio as gr  # optional: the app extra

    def caption(files, instruction, max_new_tokens, do_sample, temperature, top_p):
        start = time.perf_counter()
        try:
            paths = input_paths(files)
            instruction = check_request(paths, instruction, max_images)
            images = [(display_name(path), open_image(path, max_pixels)) for path in paths]
        except InputProblem as problem:
            # A pop-up and the status box; not gr.Error, which would also stamp "Error" over every output.
            gr.Warning(html.escape(str(problem)), duration=20, title="Cannot caption this")
            yield "", "", "**Cannot caption:** " + markdown_text(str(problem))
            return

        rows = [[thumbnail_uri(image), name, None] for name, image in images]
        captions, tokens = [], 0
        for index, (name, image) in enumerate(images):
            status = f"Captioning {markdown_text(name)} ({index + 1} of {len(images)})..."
            try:
                for text, new_tokens in captioner.stream(  # noqa: B007  (the last pair's count is kept)
                    image, instruction, max_new_tokens, do_sample, temperature, top_p
                ):
                    rows[index][2] = text
                    yield text if len(images) == 1 else "\n".join(captions + [text]), captions_table(rows), status
            except Exception as error:  # the request fails with a message; the server carries on
                raise gr.Error(f"Generation failed on {name}: {type(error).__name__}: {error}") from error
            captions.append(text)
            tokens += new_tokens
        seconds = time.perf_counter() - start
        mode = "greedy" if not do_sample else f"sampling, temperature {temperature:g}, top-p {top_p:g}"
        noun = "image" if len(images) == 1 else "images"
        status = f"Captioned {len(images)} {noun} in {seconds:.2f} s: {tokens} new tokens, {mode}."
        if not all(captions):
            status += " An empty caption means the model ended its answer at once."
        yield "\n".join(captions), captions_table(rows), status

    return caption


def build_demo(
    captioner: Captioner,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_images: int = DEFAULT_MAX_IMAGES,
    examples_dir: str | os.PathLike = EXAMPLES_DIR,
    model_name: str = "",
) -> Any:
    """The Gradio Blocks page around a loaded `Captioner` (call `.queue()` on it before launching)."""
    import gradio as gr  # optional: the app extra

    default_instruction = captioner.default_instruction
    caption = caption_handler(captioner, max_pixels, max_images)

    with gr.Blocks(title="MQwen captioning") as demo:
        intro = "# MQwen image captioning\nDrop, paste or upload one or several images, then press **Caption**."
        gr.Markdown(intro + (f" Model: `{model_name}`." if model_name else ""))
        with gr.Row():
            with gr.Column(scale=1):
                # gr.File, not gr.Gallery: a gallery rejects non-image files in the browser with a message
                # that depends on the gradio version (and some versions then break the page); a file list
                # hands everything to `open_image`, which says exactly what is wrong with a file.
                files = gr.File(
                    label="Images: drop, click to upload, or paste (Ctrl+V) one or several; several give a table",
                    file_count="multiple",
                    type="filepath",
                    height=170,
                    elem_id="images",
                )
                prompt = gr.Textbox(
                    label="Prompt",
                    value=default_instruction,
                    lines=1,
                    max_lines=4,
                    elem_id="prompt",
                    info="What the model is asked about each image.",
                )
                with gr.Accordion("Generation settings", open=False):
                    max_new_tokens = gr.Slider(
                        1,
                        512,
                        value=captioner.max_new_tokens_default(),
                        step=1,
                        label="Max new tokens",
                        elem_id="max-new-tokens",
                    )
                    do_sample = gr.Checkbox(value=False, label="Sample (off: greedy, the same caption every time)")
                    temperature = gr.Slider(0.05, 2.0, value=0.7, step=0.05, label="Temperature (sampling only)")
                    top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p (sampling only)")
                with gr.Row():
                    reset = gr.Button("Default prompt", variant="secondary")
                    run = gr.Button("Caption", variant="primary", elem_id="caption-button")
            with gr.Column(scale=1):
                caption_box = gr.Textbox(
                    label="Caption", lines=3, interactive=False, elem_id="caption", buttons=["copy"]
                )
                status = gr.Markdown(elem_id="status")
                table = gr.HTML(elem_id="table")
        rows, labels = example_sets(examples_dir)
        if rows:
            gr.Examples(
                rows,
                inputs=[files],
                label="Examples: shapes-task test images, labelled with their true captions (click, then Caption)",
                example_labels=labels,
                examples_per_page=12,
            )
        run.click(
            caption,
            inputs=[files, prompt, max_new_tokens, do_sample, temperature, top_p],
            outputs=[caption_box, table, status],
            api_name="caption",
        )
        reset.click(lambda: default_instruction, outputs=[prompt], queue=False)
    return demo


def launch_kwargs(args: argparse.Namespace) -> dict:
    import gradio as gr  # optional: the app extra

    theme = gr.themes.Default(  # system fonts: the default theme would fetch Google Fonts
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    return dict(
        server_name=args.host,
        server_port=args.port,
        share=False,
        allowed_paths=[str(EXAMPLES_DIR)],  # the examples must load whatever folder the app is started from
        max_file_size=args.max_file_size,
        show_error=True,
        theme=theme,
        css=CSS,
        head=PASTE_HEAD,
        footer_links=["api", "settings"],
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python app.py",
        description="Serve a web page that captions images with an MQwen checkpoint (Gradio).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default=os.environ.get("MQWEN_MODEL"),
        help=f"checkpoint folder or Hub repo id (default: $MQWEN_MODEL, else the shapes demo's "
        f"model, {DEMO_OUT_DEFAULT}/model)",
    )
    parser.add_argument(
        "--host",
        default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        help="address to listen on (default: $GRADIO_SERVER_NAME or 127.0.0.1; 0.0.0.0 for all)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)),
        help="port (default: $GRADIO_SERVER_PORT or 7860)",
    )
    runtime.add_device_arguments(parser)
    runtime.add_quantization_argument(parser)
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="largest accepted image, in pixels (default: %(default)s)",
    )
    parser.add_argument(
        "--max-images", type=int, default=DEFAULT_MAX_IMAGES, help="most images per request (default: %(default)s)"
    )
    parser.add_argument("--max-file-size", default="50mb", help="largest upload, e.g. 50mb (default: %(default)s)")
    parser.add_argument(
        "--queue-size",
        type=int,
        default=64,
        help="most requests waiting in the queue; later ones are told to retry (default: %(default)s)",
    )
    return parser.parse_args(argv)


def default_model_dirs() -> list[Path]:
    """Where the main demo job leaves its model: OUT/model, under the working folder or this repository."""
    try:  # the demo's own setting, when this checkout has it (a Space does not)
        from .demo.settings import DemoSettings

        out = Path(DemoSettings().out_dir)
    except Exception:
        out = Path(DEMO_OUT_DEFAULT)
    dirs = [out / "model"] if out.is_absolute() else [Path.cwd() / out / "model", HERE / out / "model"]
    return list(dict.fromkeys(dirs))


def resolve_model(model: str | None) -> str | None:
    """--model / $MQWEN_MODEL if given, else the demo's trained model if it exists, else None."""
    if model:
        return str(model)
    for folder in default_model_dirs():
        if (folder / "config.json").is_file():
            return str(folder)
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = resolve_model(args.model)
    if model is None:
        print(NO_MODEL_HELP.format(looked=", ".join(map(str, default_model_dirs()))), file=sys.stderr)
        return 2
    print(f"Loading model {model} ...", flush=True)
    captioner = Captioner.load(model, device=args.device, dtype=args.dtype, quantization=args.quantize)
    quantized = f", language model {args.quantize}" if args.quantize else ""
    print(f"Loaded on {captioner.device} ({captioner.model.dtype}{quantized}).", flush=True)
    demo = build_demo(captioner, max_pixels=args.max_pixels, max_images=args.max_images, model_name=model)
    demo.queue(default_concurrency_limit=1, max_size=args.queue_size)
    demo.launch(**launch_kwargs(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
