"""`mqwen-convert gguf --outtype q4_k_m` (and q4_0, q5_k_m, q6_k): the language model quantized by llama.cpp's own
quantizer, the mmproj kept at f16 (or q8_0).

- Without llama.cpp: the CLI's outtypes are the exporter's; asking for a k-quant where llama-cpp-python cannot be
  found is an error that says how to get it, before anything is written.
- With llama.cpp (CI: MQWEN_REQUIRE_LLAMA_CPP=1 fails instead of skipping, as in tests/test_gguf.py):
  - a random model 256 wide (k-quants pack rows in blocks of 256): the tensors have the types llama.cpp's mix
    gives (Q4_K_M: Q4_K matrices, some attn_v/ffn_down and output.weight Q6_K), the mmproj is F16 (or Q8_0), and
    transformers' GGUF reader, dequantizing, gives MQwen's language-model logits within what 4 to 6 bits allow
    (measured max |diff|, logits spanning +-1.2 on this random 2-layer model: q4_0 0.25, q4_k_m 0.21, q5_k_m 0.14,
    q6_k 0.06; the bounds are about 1.5x those, so a wrong type in either direction fails);
  - the trained GGUF test model (tests/gguf_model.py; 64-wide rows, so llama.cpp falls back to Q5_0 for Q4_K and
    Q8_0 for Q6_K there, as it does for any model of that width): llama.cpp loads the q4_k_m pair, and its greedy
    captions of the 50 test images agree with MQwen's on at least 86 % (measured: 46 of 50, 92 %, on 2 AMD EPYC
    cores, 2026-12-08, transformers 5.25 and 4.57; f16's is 100 %, q8_0's 88-98 % in tests/test_gguf.py's runs).
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from gguf_model import N_IMAGES, cached_gguf_test_model  # noqa: E402
from test_gguf import MAX_NEW_TOKENS, caption_with_llama_cpp, llama_cpp_python, read  # noqa: E402

from mqwen.convert.errors import ConvertError  # noqa: E402
from mqwen.convert.gguf import ALL_OUTTYPES, export_gguf  # noqa: E402

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    return cached_gguf_test_model(tmp_path_factory)


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    from mqwen.common.tiny_model import build_tiny, save_checkpoint

    model, processor = build_tiny(
        seed=1, text=dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    )
    return save_checkpoint(model, processor, tmp_path_factory.mktemp("mqwen-256"))


def test_cli_outtypes_are_the_exporters():
    from mqwen.convert import cli

    assert cli.GGUF_OUTTYPES == ALL_OUTTYPES


def test_without_llama_cpp_the_error_says_how_to_get_it(wide_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MQWEN_CI_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("MQWEN_LLAMA_CPP_PYTHON", raising=False)
    from mqwen.convert.gguf import kquants

    monkeypatch.setattr(kquants.sys, "executable", str(tmp_path / "no-python"))
    with pytest.raises(ConvertError, match=r"llama.cpp's own quantizer.*pip install llama-cpp-python.*build_llama_cpp"):
        export_gguf(wide_dir, tmp_path / "out", "q4_k_m")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConvertError, match=r"no-such-python cannot `import llama_cpp`"):
        export_gguf(wide_dir, tmp_path / "out", "q4_k_m", llama_cpp_python=tmp_path / "no-such-python")
    # f16 and q8_0 need no llama.cpp
    assert export_gguf(wide_dir, tmp_path / "out16", "f16", progress=False)[0].is_file()


def test_cli_without_llama_cpp_exits_2_with_the_message(wide_dir, tmp_path):
    command = [sys.executable, "-m", "mqwen.convert", "gguf", str(wide_dir), str(tmp_path / "out")]
    command += ["--outtype", "q4_k_m", "--llama-cpp-python", str(tmp_path / "missing-python")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "pip install llama-cpp-python" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_bad_mmproj_outtype_is_refused(wide_dir, tmp_path):
    with pytest.raises(ConvertError, match="--mmproj-outtype must be one of f32, f16, q8_0"):
        export_gguf(wide_dir, tmp_path / "out", "q4_k_m", mmproj_outtype="q4_k_m")


# -------------------------------------------------------------------------------------------------------------
# With llama.cpp
# -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "outtype, matrix_type, tolerance",
    [("q4_0", Q.Q4_0, 0.4), ("q4_k_m", Q.Q4_K, 0.32), ("q5_k_m", Q.Q5_K, 0.22), ("q6_k", Q.Q6_K, 0.1)],
)
def test_llama_cpp_quantizes_the_language_model_and_transformers_reads_it(
    wide_dir, tmp_path, outtype, matrix_type, tolerance
):
    from transformers import AutoModelForCausalLM

    from mqwen import MQwenForCausalLM

    python = llama_cpp_python()
    lm, mmproj = export_gguf(wide_dir, tmp_path / "out", outtype, progress=False, llama_cpp_python=python)
    assert sorted(p.name for p in lm.parent.iterdir()) == sorted([lm.name, mmproj.name])  # no f16 left behind
    assert (lm.name, mmproj.name) == (f"{wide_dir.name}-{outtype}.gguf", f"mmproj-{wide_dir.name}-f16.gguf")
    fields, tensors = read(lm)
    assert fields["general.file_type"] == {"q4_0": 2, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}[outtype]
    assert tensors["blk.0.attn_q.weight"].tensor_type == matrix_type
    assert tensors["blk.0.attn_norm.weight"].tensor_type == Q.F32
    if outtype == "q4_k_m":  # the "_M" mix: output.weight and some attn_v / ffn_down one type up
        assert tensors["output.weight"].tensor_type == Q.Q6_K
        assert Q.Q6_K in {tensors[f"blk.{i}.ffn_down.weight"].tensor_type for i in range(2)}
    assert (
        fields["tokenizer.chat_template"]
        == read(export_gguf(wide_dir, tmp_path / "f16", "f16")[0])[0]["tokenizer.chat_template"]
    )
    _, vision = read(mmproj)
    assert vision["v.blk.0.attn_q.weight"].tensor_type == Q.F16

    model = MQwenForCausalLM.from_pretrained(wide_dir).eval()
    reloaded = AutoModelForCausalLM.from_pretrained(lm.parent, gguf_file=lm.name).eval()
    ids = torch.tensor([[1, 2, 40, 77, 120, 200, 3]])
    with torch.no_grad():
        expected = model.language_model(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
    difference = (expected - got).abs().max().item()
    print(f"{outtype}: LM logits max |diff| {difference:.4f} (logits span +-{expected.abs().max():.2f})")
    assert 0 < difference <= tolerance


def test_mmproj_at_q8_0_beside_a_k_quant(wide_dir, tmp_path):
    python = llama_cpp_python()
    lm, mmproj = export_gguf(
        wide_dir, tmp_path / "out", "q4_k_m", progress=False, mmproj_outtype="q8_0", llama_cpp_python=python
    )
    assert mmproj.name == f"mmproj-{wide_dir.name}-q8_0.gguf"
    _, vision = read(mmproj)
    assert vision["v.blk.0.attn_q.weight"].tensor_type == Q.Q8_0


def test_llama_cpp_q4_k_m_captions_agree_with_mqwen(trained, tmp_path):
    from PIL import Image

    from mqwen import MQwenForCausalLM
    from mqwen.processing_mqwen import MQwenProcessor
    from mqwen.runtime import caption_images

    python = llama_cpp_python()
    model_dir, test_dir = trained
    model, processor = MQwenForCausalLM.from_pretrained(model_dir).eval(), MQwenProcessor.from_pretrained(model_dir)
    records = [json.loads(line) for line in (test_dir / "captions.jsonl").read_text().splitlines()]
    images = [test_dir / r["file"] for r in records]
    with torch.no_grad():
        ours = [
            next(caption_images(model, processor, [Image.open(p).convert("RGB")], max_new_tokens=MAX_NEW_TOKENS))
            for p in images
        ]
    lm, mmproj = export_gguf(
        model_dir, tmp_path / "q4", "q4_k_m", name="shapes", progress=False, llama_cpp_python=python
    )
    prompt = processor.caption_prompt().replace("<image>", "<__media__>")
    result = caption_with_llama_cpp(python, lm, mmproj, prompt, images, tmp_path)
    captions = [result["captions"][p.name] for p in images]
    agreement = np.mean([a == b for a, b in zip(captions, ours)])
    print(f"q4_k_m: agreement with MQwen {agreement:.0%} on {N_IMAGES} images")
    assert agreement >= 0.86, list(zip(captions, ours))
