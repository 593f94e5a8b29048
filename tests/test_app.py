"""The web demo's logic without a browser: streaming equals the model's own output, the Caption handler's
outputs, readable messages for bad input, the CLI, the example images and the Space files.

The browser drives the same code in tests/test_app_browser.py.
"""

import html
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def load_app():
    """app.py as a module, loaded from its file the way a Space runs it (not through the mqwen package)."""
    spec = importlib.util.spec_from_file_location("mqwen_web_app", REPO / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def app():
    return load_app()


@pytest.fixture(scope="module")
def captioner(app, tiny):
    model, processor = tiny
    return app.Captioner(model, processor)


def reference(tiny, image, instruction=None, **generate_kwargs):
    """The model's own caption: processor -> generate -> decode_captions, no app code involved."""
    model, processor = tiny
    batch = processor(images=image, text=instruction)
    with torch.no_grad():
        ids = model.generate(**batch, **generate_kwargs)
    return processor.decode_captions(ids, batch["input_ids"].shape[1])[0], ids.shape[1] - batch["input_ids"].shape[1]


def save_png(image, path):
    image.save(path)
    return str(path)


@pytest.fixture
def gradio():
    return pytest.importorskip("gradio", reason="gradio is not installed: pip install -e '.[app]'")


# ----------------------------------------------------------------------------------------------------------
# Streaming
# ----------------------------------------------------------------------------------------------------------


def test_stream_grows_and_ends_with_the_models_caption(captioner, tiny, make_image):
    image = make_image(1)
    expected, new_tokens = reference(tiny, image, max_new_tokens=12, do_sample=False)
    items = list(captioner.stream(image, captioner.default_instruction, max_new_tokens=12))
    partial = [text for text, count in items if count is None]
    final_text, final_count = items[-1]

    assert expected, "the tiny model should say something for this image (else the comparison is vacuous)"
    assert (final_text, final_count) == (expected, new_tokens)
    assert len(partial) >= 2, "the caption should arrive in several pieces"
    assert all(b.startswith(a) for a, b in zip(partial, partial[1:])), partial
    assert partial[-1] == expected  # what was streamed adds up to the caption


def test_stream_passes_prompt_and_sampling_settings(captioner, tiny, make_image):
    image = make_image(2)
    prompt = "List the colours."
    expected, _ = reference(tiny, image, prompt, max_new_tokens=10, do_sample=False)
    *_, (greedy, _) = captioner.stream(image, prompt, max_new_tokens=10)
    assert greedy == expected
    assert expected != reference(tiny, image, max_new_tokens=10, do_sample=False)[0]  # the prompt matters

    torch.manual_seed(7)
    sampled, _ = reference(tiny, image, prompt, max_new_tokens=10, do_sample=True, temperature=1.7, top_p=0.95)
    torch.manual_seed(7)
    *_, (streamed, _) = captioner.stream(image, prompt, 10, do_sample=True, temperature=1.7, top_p=0.95)
    assert streamed == sampled
    assert sampled != greedy


def test_leaving_early_stops_generation(captioner, make_image):
    lengths = []
    generate = captioner.model.generate

    def recording_generate(**kwargs):
        ids = generate(**kwargs)
        lengths.append(ids.shape[1] - kwargs["input_ids"].shape[1])
        return ids

    captioner.model.generate = recording_generate
    try:
        stream = captioner.stream(make_image(3), captioner.default_instruction, max_new_tokens=400)
        next(stream)
        stream.close()  # what gradio does when the visitor goes away
    finally:
        del captioner.model.generate
    assert len(lengths) == 1 and lengths[0] < 100, lengths


# ----------------------------------------------------------------------------------------------------------
# The Caption handler
# ----------------------------------------------------------------------------------------------------------


def test_handler_streams_one_caption(app, captioner, tiny, make_image, tmp_path, gradio):
    path = save_png(make_image(4, size=(70, 90)), tmp_path / "cat & <dog>.png")
    expected, new_tokens = reference(tiny, make_image(4, size=(70, 90)), max_new_tokens=12, do_sample=False)
    handler = app.caption_handler(captioner)

    outputs = list(handler([path], captioner.default_instruction, 12, False, 0.7, 0.9))

    caption, table, status = outputs[-1]
    assert caption == expected
    assert len(outputs) >= 3, "partial captions should be shown while generating"
    assert "cat &amp; &lt;dog&gt;.png" in table and html.escape(expected) in table
    assert status.startswith("Captioned 1 image in ") and f"{new_tokens} new tokens, greedy" in status


def test_handler_several_images_give_a_table(app, captioner, tiny, make_image, tmp_path, gradio):
    images = [make_image(5), make_image(6, size=(40, 120))]
    paths = [save_png(image, tmp_path / f"img{i}.png") for i, image in enumerate(images)]
    expected = [reference(tiny, image, max_new_tokens=8, do_sample=False)[0] for image in images]
    assert expected[0] != expected[1], "pick images the tiny model captions differently, so order is checked"
    handler = app.caption_handler(captioner)

    caption, table, status = list(handler(paths, captioner.default_instruction, 8, False, 0.7, 0.9))[-1]

    assert caption == "\n".join(expected)
    cells = re.findall(r"<td class='mqwen-caption'>(.*?)</td>", table)
    assert cells == [html.escape(text) for text in expected]
    assert re.findall(r"<td class='mqwen-name'>(.*?)</td>", table) == ["img0.png", "img1.png"]
    assert table.count("data:image/png;base64,") == 2
    assert status.startswith("Captioned 2 images")


def _huge_png(path):
    from PIL import Image

    Image.new("1", (9000, 6000)).save(path)  # 54 megapixels, a few kilobytes on disk
    return str(path)


def _bad_inputs(tmp_path, make_image):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image\n")
    good = save_png(make_image(7), tmp_path / "good.png")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(Path(good).read_bytes()[:200])
    return {
        "text file": (dict(files=[str(text_file)]), "notes.txt is not an image file this demo can read"),
        "truncated": (dict(files=[str(truncated)]), "cut.png could not be read as an image"),
        "huge": (dict(files=[_huge_png(tmp_path / "huge.png")]), "huge.png is 9000 x 6000 pixels (54.0 megapixels)"),
        "empty prompt": (dict(files=[good], instruction="  \n"), "The prompt is empty"),
        "no image": (dict(files=None), "No image yet"),
        "too many": (dict(files=[good] * 17), "17 images were given; caption at most 16"),
    }


@pytest.mark.parametrize("case", ["text file", "truncated", "huge", "empty prompt", "no image", "too many"])
def test_bad_input_gives_a_readable_message(app, captioner, make_image, tmp_path, gradio, case):
    kwargs, message = _bad_inputs(tmp_path, make_image)[case]
    handler = app.caption_handler(captioner)
    args = dict(files=None, instruction=captioner.default_instruction)
    args.update(kwargs)

    with pytest.warns(UserWarning) as popups:  # gr.Warning outside a request: the page's pop-up
        outputs = list(handler(args["files"], args["instruction"], 8, False, 0.7, 0.9))

    assert len(outputs) == 1
    caption, table, status = outputs[0]
    assert (caption, table) == ("", "")
    assert status.startswith("**Cannot caption:** ")
    shown = re.sub(r"\\(.)", r"\1", status)  # the status is Markdown with punctuation escaped
    assert message in shown
    assert any(message in html.unescape(str(p.message)) for p in popups)


def test_decompression_bombs_are_refused(app, captioner, make_image, tmp_path, gradio, monkeypatch):
    from PIL import Image

    path = save_png(make_image(8, size=(60, 60)), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses > 2x this before decoding anything
    handler = app.caption_handler(captioner, max_pixels=10**9)
    with pytest.warns(UserWarning):
        ((_, _, status),) = handler([path], "Describe this image.", 8, False, 0.7, 0.9)
    assert "too large to open safely" in status


# ----------------------------------------------------------------------------------------------------------
# CLI, default model, examples, Space files
# ----------------------------------------------------------------------------------------------------------


def test_help_lists_options_and_examples():
    done = subprocess.run([sys.executable, str(REPO / "app.py"), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for option in ("--model", "--host", "--port", "--device", "--dtype", "examples:", "mqwen-convert tiny"):
        assert option in done.stdout


def test_without_a_model_it_says_how_to_get_one(app, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MQWEN_MODEL", raising=False)
    trained = tmp_path / "mqwen-shapes-demo" / "model"
    monkeypatch.setattr(app, "default_model_dirs", lambda: [trained])
    assert app.main([]) == 2
    message = capsys.readouterr().err
    assert "No model to serve" in message and str(trained) in message
    assert "python -m mqwen.demo" in message and "mqwen-convert tiny" in message and "--model" in message

    trained.mkdir(parents=True)
    (trained / "config.json").write_text("{}")
    assert app.resolve_model(None) == str(trained)  # the trained demo model, once it exists
    assert app.resolve_model("user/repo") == "user/repo"


def test_default_model_is_where_the_demo_job_writes_it(app, tmp_path, monkeypatch):
    demo_run = pytest.importorskip("mqwen.demo.run")
    monkeypatch.chdir(tmp_path)
    out = demo_run.DemoSettings().out_dir
    assert tmp_path / out / "model" in app.default_model_dirs()


def test_examples_are_shapes_test_images_labelled_with_their_captions(app):
    shapes = pytest.importorskip("mqwen.demo.shapes")
    import numpy as np
    from PIL import Image

    rows, labels = app.example_sets()
    singles = [(row[0][0], label) for row, label in zip(rows, labels) if len(row[0]) == 1]
    assert len(singles) >= 4
    assert len(rows[-1][0]) > 1, "one example should show several images at once"
    for index, (path, label) in enumerate(singles):
        example = shapes.make_example("test", index)
        assert label == example.caption, f"{path}: rerun `python space/make_examples.py`"
        assert shapes.parse_caption(label)
        with Image.open(path) as image:
            assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(example.image)), path


def test_space_layout_runs_without_the_package(tmp_path):
    """A Space holds app.py and runtime.py only: the page must start from them (here: its --help) with no
    mqwen package importable."""
    for name in ("app.py", "runtime.py"):
        (tmp_path / name).write_text((REPO / name).read_text())
    # `import mqwen` fails in this process (sys.modules entry None), whatever is installed.
    code = (
        "import runpy, sys; sys.modules['mqwen'] = None; sys.argv = ['app.py', '--help']; "
        "runpy.run_path('app.py', run_name='__main__')"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--model" in done.stdout and "--dtype" in done.stdout


def test_space_card_points_at_app_py():
    import yaml

    card = (REPO / "space" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["sdk"] == "gradio" and front["app_file"] == "app.py"
    assert (REPO / front["app_file"]).is_file()
    lines = (REPO / "space" / "requirements.txt").read_text().splitlines()
    requirements = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    assert any(line.startswith("transformers") for line in requirements)
    assert not any(line.startswith("gradio") for line in requirements), "a Space installs gradio from sdk_version"
