"""Shared fixtures: tiny random MQwen checkpoints built locally (no test downloads anything)."""

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny():
    """(model, processor): a tiny random MQwenForCausalLM in eval mode and its processor, in memory."""
    from mqwen.common.tiny_model import build_tiny

    return build_tiny(seed=0)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny):
    """The same tiny model saved as a Hub-ready folder (the `mqwen-convert tiny` layout)."""
    from mqwen.common.tiny_model import save_checkpoint

    model, processor = tiny
    return save_checkpoint(model, processor, tmp_path_factory.mktemp("mqwen-tiny"))


def stop_process(process, timeout):
    """Stop a server the test started: SIGTERM, then SIGKILL if it has not exited after `timeout` seconds."""
    import subprocess

    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def random_image(seed, size=(64, 80), mode="RGB"):
    """A deterministic random PIL image (height, width) = size."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    array = (rng.rand(size[0], size[1], 3) * 255).astype("uint8")
    return Image.fromarray(array).convert(mode)


@pytest.fixture
def make_image():
    return random_image


@pytest.fixture
def one_thread():
    """torch on one thread for the test: tiny matrices run many times faster on one thread than on two when
    other processes share the CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize(module, seed):
    """Random values everywhere (layer norms too), so that a swapped or dropped weight changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for submodule in module.modules():
            for name, param in submodule.named_parameters(recurse=False):
                noise = torch.randn(param.shape, generator=generator) * 0.2
                is_scale = isinstance(submodule, torch.nn.LayerNorm) and name == "weight"
                param.copy_(noise + 1.0 if is_scale else noise)
    return module
