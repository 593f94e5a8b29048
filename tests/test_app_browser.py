"""The web demo in a real browser: `python app.py --model TINY` on 127.0.0.1, driven by Debian's headless
Chromium through Playwright (no browser download: `executable_path` points at the system chromium).

The captions shown must equal the model's own greedy output for the same image. Screenshots are written to
`test-artifacts/` at the repository root (or $MQWEN_TEST_ARTIFACTS); that folder ignores itself in git.

Needs: pip install -e '.[app]' playwright; apt-get install -y chromium. Without them the tests skip, unless
MQWEN_REQUIRE_BROWSER=1 (as in CI), which turns the skip into a failure.
"""

import base64
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import stop_process

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # no network here: background requests only flood refused connections
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 60_000  # one caption takes well under a second; this only bounds a slow, shared CI machine


def _missing(reason):
    if os.environ.get("MQWEN_REQUIRE_BROWSER") == "1":
        pytest.fail(f"MQWEN_REQUIRE_BROWSER=1 but {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


if importlib.util.find_spec("gradio") is None:  # the app imports it; this process needs only to know it is there
    _missing("gradio is not installed: pip install -e '.[app]'")
try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    _missing("playwright is not installed: pip install playwright (not `playwright install`: Debian's chromium runs)")
expect.set_options(timeout=TIMEOUT_MS)  # its default is 5 s, short for a busy CI machine
CHROMIUM = os.environ.get("MQWEN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    _missing(f"no chromium at {CHROMIUM}: apt-get install -y chromium (or set MQWEN_CHROMIUM)")


def artifacts_dir() -> Path:
    folder = Path(os.environ.get("MQWEN_TEST_ARTIFACTS") or REPO / "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    ignore = folder / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# screenshots written by tests/test_app_browser.py\n*\n")
    return folder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    """`python app.py --model tiny_dir` on a free port of 127.0.0.1; yields its URL, stops it afterwards."""
    port = free_port()
    work = tmp_path_factory.mktemp("app-server")
    log_path = work / "server.log"
    env = dict(
        os.environ,
        GRADIO_ANALYTICS_ENABLED="False",
        GRADIO_TEMP_DIR=str(work / "uploads"),
        HF_HUB_OFFLINE="1",
        HF_MODULES_CACHE=str(work / "modules"),
        TOKENIZERS_PARALLELISM="false",
        # The same thread count as this process, so the server's float sums (and greedy picks) match ours.
        OMP_NUM_THREADS=str(torch.get_num_threads()),
    )
    env.pop("MQWEN_MODEL", None)
    command = [sys.executable, str(REPO / "app.py"), "--model", str(tiny_dir), "--host", "127.0.0.1"]
    command += ["--port", str(port)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 240
        while True:
            if process.poll() is not None:
                pytest.fail(f"app.py exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"app.py did not answer on {url} in 240 s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        yield url
    finally:
        stop_process(process, timeout=20)
    log = log_path.read_text()
    assert log.count("Loading model ") == 1, "the model should be loaded once, at start-up"
    assert "Traceback" not in log, log[-4000:]


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium-profile")  # empty: no first-run state, no sync, no extensions
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 1000},
        )
        context.set_default_timeout(TIMEOUT_MS)
        yield context
        context.close()


@pytest.fixture
def page(browser_context, server):
    page = browser_context.new_page()
    page.goto(server)
    page.wait_for_selector("#caption-button")
    yield page
    page.close()


def reference(tiny, path, max_new_tokens):
    """The model's own greedy caption for the image file at `path` (no app code involved)."""
    from PIL import Image

    model, processor = tiny
    with Image.open(path) as image:
        batch = processor(images=image.convert("RGB"))
    with torch.no_grad():
        ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    caption = processor.decode_captions(ids, batch["input_ids"].shape[1])[0]
    assert caption, "the tiny model should say something for this image (else the comparison is vacuous)"
    return caption


def set_max_new_tokens(page, value):
    """Type `value` into the slider's number box and wait until the page state holds it.

    Right after the page loads, gradio may still re-render the settings and drop a typed value now and then
    on a busy machine, so the value is typed again until the slider (which follows the page state) shows it.
    """
    page.get_by_text("Generation settings").click()
    box = page.locator("#max-new-tokens input[type=number]")
    slider = page.locator("#max-new-tokens input[type=range]")
    for _ in range(10):
        box.fill(str(value))
        box.press("Enter")
        box.blur()
        try:
            expect(slider).to_have_value(str(value), timeout=3000)
            break
        except AssertionError:
            continue
    expect(slider).to_have_value(str(value))
    expect(box).to_have_value(str(value))
    page.get_by_text("Generation settings").click()


def wait_uploaded(page, *names):
    """Until each file is in the list as a finished upload (a download link; "Uploading..." shows the name too)."""
    for name in names:
        expect(page.locator(f"#images a[href$='/{name}']")).to_have_count(1)


def upload(page, *paths):
    page.locator("#images input[type=file]").set_input_files([str(p) for p in paths])
    wait_uploaded(page, *(Path(p).name for p in paths))


def caption_and_wait(page, expected_status):
    page.click("#caption-button")
    expect(page.locator("#status")).to_contain_text(expected_status)


def test_caption_in_the_browser_is_the_models_own(page, tiny, make_image, tmp_path):
    path = tmp_path / "photo.png"
    make_image(11, size=(90, 120)).save(path)
    expected = reference(tiny, path, max_new_tokens=16)

    set_max_new_tokens(page, 16)
    upload(page, path)
    caption_and_wait(page, "Captioned 1 image")

    assert page.locator("#caption textarea").input_value() == expected
    expect(page.locator("#status")).to_contain_text("16 new tokens, greedy")
    expect(page.locator("#table td.mqwen-name")).to_have_text(["photo.png"])
    expect(page.locator("#table img")).to_have_count(1)
    page.screenshot(path=str(artifacts_dir() / "app-caption.png"), full_page=True)


def test_text_file_is_refused_then_an_image_is_captioned_in_the_same_page(page, tiny, make_image, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("shopping list: eggs, milk\n")
    upload(page, notes)
    caption_and_wait(page, "Cannot caption")
    message = "notes.txt is not an image file this demo can read"
    expect(page.locator("#status")).to_contain_text(message)
    expect(page.locator(".toast-body").filter(has_text=message)).to_be_visible()  # the pop-up, too
    assert page.locator("#caption textarea").input_value() == ""
    page.screenshot(path=str(artifacts_dir() / "app-not-an-image.png"), full_page=True)

    path = tmp_path / "after-error.png"
    make_image(12).save(path)
    expected = reference(tiny, path, max_new_tokens=16)
    page.locator("#images button[aria-label='Clear']").click()
    expect(page.locator("#images")).not_to_contain_text("notes")
    set_max_new_tokens(page, 16)
    upload(page, path)
    caption_and_wait(page, "Captioned 1 image")
    assert page.locator("#caption textarea").input_value() == expected


def test_pasted_images_join_the_dropped_ones_and_give_a_table(page, tiny, make_image, tmp_path):
    dropped, pasted = tmp_path / "dropped.png", tmp_path / "clip.png"
    make_image(5).save(dropped)
    make_image(14, size=(50, 50)).save(pasted)
    expected = [reference(tiny, p, max_new_tokens=16) for p in (dropped, pasted)]
    assert expected[0] != expected[1], "pick images the tiny model captions differently, so order is checked"

    set_max_new_tokens(page, 16)
    upload(page, dropped)
    page.evaluate(  # what Ctrl+V with an image on the clipboard delivers to the page
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], "clip.png", { type: "image/png" }));
            document.body.dispatchEvent(new ClipboardEvent("paste", { clipboardData: data, bubbles: true }));
        }""",
        base64.b64encode(pasted.read_bytes()).decode("ascii"),
    )
    wait_uploaded(page, "dropped.png", "clip.png")
    caption_and_wait(page, "Captioned 2 images")

    assert page.locator("#caption textarea").input_value() == "\n".join(expected)
    expect(page.locator("#table td.mqwen-name")).to_have_text(["dropped.png", "clip.png"])
    assert page.locator("#table td.mqwen-caption").all_inner_texts() == expected
    page.screenshot(path=str(artifacts_dir() / "app-table.png"), full_page=True)


def test_two_visitors_at_once_each_get_their_own_caption(browser_context, server, tiny, make_image, tmp_path):
    pages, expected = [], []
    for index in range(2):
        path = tmp_path / f"visitor{index}.png"
        make_image(20 + index).save(path)
        expected.append(reference(tiny, path, max_new_tokens=64))
        page = browser_context.new_page()
        page.goto(server)
        page.wait_for_selector("#caption-button")
        upload(page, path)
        pages.append(page)
    assert expected[0] != expected[1], "pick images the tiny model captions differently"
    for page in pages:  # both requests are in flight together; the queue runs them one after the other
        page.click("#caption-button")
    for page, caption in zip(pages, expected):
        expect(page.locator("#status")).to_contain_text("Captioned 1 image")
        assert page.locator("#caption textarea").input_value() == caption
        page.close()


def test_an_example_is_one_click_away(page, tiny):
    example = next((REPO / "space" / "examples").glob("02_*.png"))
    label = example.stem.split("_", 1)[1].replace("_", " ")
    expected = reference(tiny, example, max_new_tokens=16)

    page.get_by_text(label, exact=True).click()
    wait_uploaded(page, example.name)
    set_max_new_tokens(page, 16)
    caption_and_wait(page, "Captioned 1 image")
    assert page.locator("#caption textarea").input_value() == expected
