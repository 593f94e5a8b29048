"""`pipeline("image-to-text", trust_remote_code=True)` behaves like transformers' pipelines: batches (lists,
generators, datasets) equal one-at-a-time calls and `model.generate`; generation keywords reach `generate`; unknown
keywords raise; images come as paths, URLs, base64, PIL images, arrays or tensors."""

import base64
import functools
import http.server
import socket
import threading
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import random_image
from transformers import pipeline
from transformers.pipelines.pt_utils import KeyDataset

NEW = 6
IMAGES = [random_image(30), random_image(31, size=(40, 90)), random_image(32), random_image(33), random_image(34)]
# Prompts of different lengths, so that batches are padded; None is the default caption prompt.
PROMPTS = [
    None,
    "Write one short caption for this picture, please, with the colours.",
    "Name the shapes.",
    None,
    "Count.",
]
TWO_IMAGES = "<|im_start|>user\n<image>\n<image>\nWhat differs?<|im_end|>\n<|im_start|>assistant\n"


def generate_captions(tiny, images, prompt=None, **generate_kwargs):
    """What `model.generate` gives for one pipeline item (its images and prompt), in the pipeline's output form."""
    model, processor = tiny
    inputs = processor(images=images, text=prompt)
    with torch.no_grad():
        generated = model.generate(**inputs, **generate_kwargs)
    captions = processor.decode_captions(generated, inputs["input_ids"].shape[1])
    return [{"generated_text": caption} for caption in captions]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Each test generates a few dozen tiny sequences: faster on one thread when other processes share the CPUs."""


@pytest.fixture(scope="module")
def captioner(tiny_dir):
    return pipeline("image-to-text", model=str(tiny_dir), trust_remote_code=True)


@pytest.fixture(scope="module")
def references(tiny):
    """Greedy `model.generate` for each (image, prompt) of IMAGES and PROMPTS, one at a time."""
    return [generate_captions(tiny, [image], prompt, max_new_tokens=NEW) for image, prompt in zip(IMAGES, PROMPTS)]


@pytest.fixture
def generate_calls(captioner, monkeypatch):
    """Records (rows, left_padded) of every `generate` call the pipeline makes."""
    calls, generate = [], captioner.model.generate

    def recording_generate(**kwargs):
        mask = kwargs["attention_mask"]
        calls.append((mask.shape[0], bool((mask[:, 0] == 0).any()) and bool((mask[:, -1] == 1).all())))
        return generate(**kwargs)

    monkeypatch.setattr(captioner.model, "generate", recording_generate)
    return calls


def test_single_calls_equal_generate_and_items_differ(captioner, tiny, references):
    singles = [captioner(image, prompt=prompt, max_new_tokens=NEW) for image, prompt in zip(IMAGES, PROMPTS)]
    assert singles == references
    # distinct captions and prompt lengths, so that the batch tests see a wrong order or wrong padding
    assert len({result[0]["generated_text"] for result in references}) >= 3
    _, processor = tiny
    lengths = {processor(images=[image], text=prompt)["input_ids"].shape[1] for image, prompt in zip(IMAGES, PROMPTS)}
    assert len(lengths) >= 3


@pytest.mark.parametrize("batch_size", [2, 5])
def test_batched_list_equals_single_calls_and_generate(captioner, references, generate_calls, batch_size):
    batched = captioner(IMAGES, prompt=PROMPTS, max_new_tokens=NEW, batch_size=batch_size)
    assert batched == references
    rows = [rows for rows, _ in generate_calls]
    assert rows == ([2, 2, 1] if batch_size == 2 else [5])
    assert any(left_padded for _, left_padded in generate_calls)


def test_generator_of_dicts_and_datasets_batch(captioner, references, generate_calls):
    # dict items, also under the image-text-to-text pipeline's names ("images", "text")
    items = ({"images": [image], "text": prompt} for image, prompt in zip(IMAGES, PROMPTS))
    assert list(captioner(items, max_new_tokens=NEW, batch_size=2)) == references
    assert [rows for rows, _ in generate_calls] == [2, 2, 1]

    features = datasets.Features(
        {"image": datasets.Image(), "prompt": datasets.Value("string"), "label": datasets.Value("int64")}
    )
    columns = {"image": IMAGES, "prompt": PROMPTS, "label": list(range(5))}  # "label": a column the pipeline ignores
    dataset = datasets.Dataset.from_dict(columns, features=features)
    generate_calls.clear()
    assert list(captioner(dataset, max_new_tokens=NEW, batch_size=3)) == references
    assert [rows for rows, _ in generate_calls] == [3, 2]
    # transformers' idiom for one column; items 0 and 3 have the default prompt
    only_images = KeyDataset(dataset.select([0, 3]), "image")
    assert list(captioner(only_images, max_new_tokens=NEW, batch_size=2)) == [references[0], references[3]]


def test_several_images_per_prompt_batch_with_single_image_items(captioner, tiny, generate_calls):
    a, b, c, d = IMAGES[:4]
    items, prompts = [[a, b], c, [d]], [TWO_IMAGES, None, "Count."]
    expected = [
        generate_captions(tiny, images, prompt, max_new_tokens=NEW)
        for images, prompt in zip([[a, b], [c], [d]], prompts)
    ]
    assert captioner(items, prompt=prompts, max_new_tokens=NEW, batch_size=3) == expected
    assert generate_calls == [(3, True)]
    assert captioner([[a, b]], prompt=TWO_IMAGES, max_new_tokens=NEW) == [expected[0]]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda cap: cap([IMAGES[:2]]), "holds 2 image.* has 0 `<image>`"),
        (lambda cap: cap(IMAGES[:2], prompt=TWO_IMAGES), "holds 1 image.* has 2 `<image>`"),
        (lambda cap: cap(IMAGES[:2], prompt=["Count."]), "1 prompts needs a list of as many images"),
        (lambda cap: cap({"picture": IMAGES[0]}), "'image' or 'images'.*'picture'"),
    ],
)
def test_images_and_prompts_that_do_not_match_are_refused(captioner, generate_calls, call, message):
    with pytest.raises(ValueError, match=message):
        call(captioner)
    assert generate_calls == []


def test_sampling_keywords_reach_generate(captioner, tiny):
    image, sampling = IMAGES[0], dict(do_sample=True, temperature=5.0, max_new_tokens=8)
    torch.manual_seed(0)
    sampled = captioner(image, **sampling)
    torch.manual_seed(0)
    assert sampled == generate_captions(tiny, [image], **sampling)
    torch.manual_seed(0)
    assert captioner(image, generate_kwargs=sampling) == sampled
    assert sampled != captioner(image, max_new_tokens=8), "greedy decoding would not differ"


def test_stop_strings_work_without_passing_the_tokenizer(captioner, tiny):
    image, stop = random_image(1), dict(stop_strings=["roll"], max_new_tokens=8)
    expected = generate_captions(tiny, [image], tokenizer=tiny[1].tokenizer, **stop)
    assert expected[0]["generated_text"].endswith("roll"), "the tiny model's caption holds the stop string"
    assert captioner(image, **stop) == expected != captioner(image, max_new_tokens=8)


def test_beam_search_with_several_sequences_per_image(captioner, tiny, generate_calls):
    beams = dict(num_beams=3, num_return_sequences=2, max_new_tokens=NEW)
    expected = [generate_captions(tiny, [image], prompt, **beams) for image, prompt in zip(IMAGES[:3], PROMPTS[:3])]
    assert all(len(result) == 2 for result in expected)
    assert captioner(IMAGES[0], **beams) == expected[0]
    generate_calls.clear()
    assert captioner(IMAGES[:3], prompt=PROMPTS[:3], batch_size=3, **beams) == expected
    assert generate_calls == [(3, True)]


def test_parameters_given_when_the_pipeline_is_built(tiny_dir, tiny, references):
    captioner = pipeline("image-to-text", model=str(tiny_dir), trust_remote_code=True, max_new_tokens=3, batch_size=2)
    assert captioner(IMAGES[:2]) == [generate_captions(tiny, [image], max_new_tokens=3) for image in IMAGES[:2]]
    assert captioner(IMAGES, prompt=PROMPTS, max_new_tokens=NEW) == references  # the call's value wins
    with pytest.raises(ValueError, match="'max_new_tokenz' \\(did you mean 'max_new_tokens'\\?\\)"):
        pipeline("image-to-text", model=str(tiny_dir), trust_remote_code=True, max_new_tokenz=3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokenz=6), "'max_new_tokenz' \\(did you mean 'max_new_tokens'\\?\\)"),
        (dict(generate_kwargs={"temprature": 1.0}, do_sample=True), "'temprature' \\(did you mean 'temperature'\\?\\)"),
        (dict(colour="red", max_new_tokens=NEW), "'colour'"),
        (dict(max_new_tokens=3, generate_kwargs={"max_new_tokens": 4}), "'max_new_tokens'.* both directly and in"),
    ],
)
def test_unknown_or_repeated_keywords_raise_before_generating(captioner, generate_calls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        captioner(IMAGES[0], **kwargs)
    assert generate_calls == []


@pytest.fixture
def no_proxy(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def served_folder(tmp_path, no_proxy):
    """`tmp_path` served over HTTP on 127.0.0.1; yields the base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_every_image_source_gives_the_same_caption(captioner, tmp_path, served_folder, generate_calls):
    image = IMAGES[2]
    path = tmp_path / "photo.png"
    image.save(path)
    expected = captioner(image, max_new_tokens=NEW)
    sources = [
        str(path),
        Path(path),
        f"{served_folder}/photo.png",
        "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode(),
        np.asarray(image),
        torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1),
    ]
    assert captioner(sources[2], max_new_tokens=NEW, timeout=10) == expected
    generate_calls.clear()
    assert captioner(sources, max_new_tokens=NEW, timeout=10, batch_size=3) == [expected] * len(sources)
    assert [rows for rows, _ in generate_calls] == [3, 3]


def test_timeout_reaches_the_url_download(captioner, no_proxy):
    silent = socket.socket()  # accepts connections (backlog) but never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    try:
        with pytest.raises(Exception) as error:
            captioner(f"http://127.0.0.1:{silent.getsockname()[1]}/photo.png", timeout=0.2)
    finally:
        silent.close()
    assert "timeout" in type(error.value).__name__.lower(), repr(error.value)


def test_missing_file_is_named(captioner, tmp_path, generate_calls):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        captioner(str(tmp_path / "missing.png"))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        captioner([IMAGES[0], str(tmp_path / "missing.png")], batch_size=2)
    assert generate_calls == []
