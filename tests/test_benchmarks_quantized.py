"""`python -m mqwen.benchmarks.quantized --quick`: every contender runs, on what it says it runs.

The workers load in fresh processes through `load_for_inference`: bf16 and fp32 quantize nothing, 4-bit and
8-bit quantize exactly the language model's 14 decoder linear layers (2 layers x 7); every runtime generates the
fixed number of tokens; the report names the machine and the date. The figures themselves are in
benchmarks/RESULTS-quantized.md, never asserted (speed depends on the machine).
"""

import json

from test_gguf import llama_cpp_python

from mqwen.benchmarks import quantized


def test_quick_run_covers_every_contender(tmp_path):
    python = llama_cpp_python()
    out = tmp_path / "quantized.md"
    argv = ["--quick", "--images", "1", "--new-tokens", "3", "--threads", "1", "--out", str(out)]
    assert quantized.main([*argv, "--llama-cpp-python", python]) == 0
    results = json.loads(out.with_suffix(".json").read_text())
    layers = {name: r["quantized_linear_layers"] for name, r in results["torch"].items()}
    assert layers == {"torch bf16": 0, "torch 8-bit": 14, "torch 4-bit NF4": 14, "torch fp32": 0}
    for r in results["torch"].values():
        assert r["decode_tokens_per_second"] > 0 and r["peak_bytes_above_imports"] > 0
    assert sorted(results["llama.cpp"]) == sorted(f"llama.cpp {lm} (mmproj {mm})" for lm, mm in quantized.GGUF_EXPORTS)
    text = out.read_text()
    assert "| torch 4-bit NF4 |" in text and "| llama.cpp q4_k_m (mmproj f16) |" in text
    assert results["machine"]["cpu"] in text and f"Date: {results['date']}" in text
