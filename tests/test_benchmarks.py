"""`mqwen-bench --quick` runs every figure and prints the table; the comparison it rests on is fair.

Speed targets are not asserted here (they live in benchmarks/RESULTS.md); these tests check that the
benchmark runs, reports what it measured, and that its contenders really compute the same thing.
"""

import json
import re
import statistics

import pytest
import torch

from mqwen.benchmarks import cli
from mqwen.benchmarks.contenders import build_all, check_same_logits
from mqwen.benchmarks.report import Row, markdown_table
from mqwen.benchmarks.shapes import QUICK
from mqwen.benchmarks.timing import Stats, interleave
from mqwen.common.photos import random_photos

ROW = re.compile(r"^\| (\d) \| (.+?) \| (.+?) \| (.+?) \| (.+?) \| (.+?) \| ([0-9.]+) \| (.*?) \| (.*?) \|$")


def test_quick_run_prints_and_writes_the_table(tmp_path, capsys):
    output = tmp_path / "RESULTS.md"
    assert cli.main(["--quick", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    rows = [ROW.match(line) for line in printed.splitlines() if line.startswith("| ") and "---" not in line]
    rows = rows[1:]  # the header is not a data row
    assert rows and all(rows), printed
    figures = {row.group(1) for row in rows}
    assert figures >= {"1", "2", "3", "4"}, printed
    for row in rows:
        ratio, target, met = float(row.group(7)), row.group(8), row.group(9)
        assert ratio > 0
        if target:
            op, value = target.split()
            expected = ratio >= float(value) if op == ">=" else ratio <= float(value)
            assert met == ("yes" if expected else "**no**"), row.group(0)
    # the printed table is in the file, under the machine it came from
    written = output.read_text()
    table = "\n".join(line for line in printed.splitlines() if line.startswith("|"))
    assert table in written
    assert "transformers" in written and "torch" in written and "cpu" in written
    # every sample is kept beside the table, and the table's ratios are the samples' ratio of medians
    raw = json.loads(output.with_suffix(".json").read_text())
    assert len(raw["rows"]) == len(rows)
    for row, line in zip(raw["rows"], rows):
        ratio = statistics.median(row["ours_samples"]) / statistics.median(row["reference_samples"])
        assert f"{ratio:.3f}" == line.group(7)


def test_check_same_logits_catches_a_different_llava():
    """The fairness check is real: one changed LLaVA vision weight makes it fail."""
    contenders = build_all(QUICK)
    photos = random_photos(2, QUICK.image_size_in)
    assert check_same_logits(contenders, photos) < 1e-4
    with torch.no_grad():
        contenders.llava.model.vision_tower.get_input_embeddings().weight.mul_(1.5)
    with pytest.raises(RuntimeError, match="logits differ"):
        check_same_logits(contenders, photos)


def test_interleave_rotates_and_drops_warmup():
    calls = []

    def make(name):
        def run():
            calls.append(name)
            return {"n": len(calls)}

        return run

    stats = interleave({"A": make("A"), "B": make("B")}, reps=3, warmup=1)
    assert calls == ["A", "B", "B", "A", "A", "B", "B", "A"]
    assert stats["A"]["n"].samples == [4, 5, 8] and stats["B"]["n"].samples == [3, 6, 7]


def test_ratio_and_target():
    row = Row("1", "tokens/s", "MQwen", Stats([9.0, 10.0, 30.0]), "bare", Stats([10.0, 12.5, 11.0]), ">= 0.98")
    assert row.ratio == pytest.approx(10.0 / 11.0) and row.met is False
    table = markdown_table([row])
    assert "9.00 / **10.0** / 30.0" in table and "0.909" in table and "**no**" in table


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--reps", "0"])
    assert "--reps must be at least 1" in capsys.readouterr().err


def test_gpu_shapes_are_qwen25_7b_and_vit_l14():
    """`--device cuda` cannot run in CI (no GPU): build its model on the meta device and check it is the
    published size, 7,615,616,512 parameters for Qwen2.5-7B-Instruct and 303,966,208 for OpenAI's ViT-L/14
    (hand counts below), in bf16; and that figure 5 charges a decode step for exactly those bytes."""
    from mqwen.benchmarks.contenders import build_mqwen, make_tokenizer
    from mqwen.benchmarks.shapes import GPU_7B, pick
    from mqwen.benchmarks.speed_figures import decode_bytes_per_token

    assert pick("cuda", quick=False) is GPU_7B
    model = build_mqwen(GPU_7B, make_tokenizer(), device="meta", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}

    h, mlp, layers, vocab, kv_width = 3584, 18944, 28, 152064, 4 * 128
    lm_layer = (h * h + h) + 2 * (h * kv_width + kv_width) + h * h + 3 * h * mlp + 2 * h
    lm = layers * lm_layer + 2 * vocab * h + h  # untied embedding and head, final norm
    assert sum(p.numel() for p in model.language_model.parameters()) == lm == 7_615_616_512

    w, grid = 1024, 224 // 14
    vit_block = (3 * w * w + 3 * w) + (w * w + w) + 4 * w + (w * 4 * w + 4 * w) + (4 * w * w + w)
    vit = 3 * 14 * 14 * w + w + (grid * grid + 1) * w + 2 * w + 24 * vit_block + 2 * w + w * 768
    assert sum(p.numel() for p in model.vision_tower.parameters()) == vit == 303_966_208
    assert model.config.image_seq_length == grid * grid

    context = 300
    kv_cache = 2 * layers * kv_width * context  # keys and values, every layer, one sequence
    expected = 2 * (lm - vocab * h) + 2 * h + 2 * kv_cache  # bf16: all weights but one embedding row
    assert decode_bytes_per_token(model.language_model, context) == expected


def test_bandwidth_figure_runs_and_divides_by_the_bound(monkeypatch):
    """Figure 5's code, run on the CPU at tiny shapes (the CLI offers it only with --device cuda): the bound is
    the measured copy bandwidth ÷ the bytes one decode step reads, and the ratio is decode tokens/s over it."""
    from mqwen.benchmarks import speed_figures as figures

    real_bandwidth, measured = figures.measured_bandwidth, []

    def small_copy(device):
        measured.append(real_bandwidth(device, nbytes=1 << 20))
        return measured[-1]

    monkeypatch.setattr(figures, "measured_bandwidth", small_copy)
    contenders = build_all(QUICK)
    (row,) = figures.bandwidth_figure(contenders, QUICK, torch.device("cpu"), torch.float32, reps=2, warmup=0)

    processor = contenders.mqwen_processor
    prompt = processor(images=random_photos(1, QUICK.image_size_in), text=[processor.caption_prompt()])
    context = prompt["input_ids"].shape[1] + QUICK.decode_tokens // 2
    bound = measured[0] / figures.decode_bytes_per_token(contenders.bare_lm, context)
    assert row.figure == "5" and f"{measured[0] / 1e9:.0f} GB/s" in row.metric
    assert row.reference_stats.samples == [pytest.approx(bound)]
    assert len(row.ours_stats.samples) == 2 and all(s > 0 for s in row.ours_stats.samples)
    assert row.ratio == pytest.approx(statistics.median(row.ours_stats.samples) / bound)


def test_decode_overhead_counts_the_bytecodes_only_the_wrapper_runs(capsys):
    """`benchmarks/decode_overhead.py`: MQwen's decode step runs its forward and `_check_inputs`, the bare LM's
    runs no line of modeling_mqwen.py; and the tool prints its table of three contenders."""
    from mqwen import MQwenProcessor
    from mqwen.benchmarks import decode_overhead
    from mqwen.benchmarks.contenders import build_mqwen, greedy_config, make_tokenizer

    tokenizer = make_tokenizer()
    model = build_mqwen(QUICK, tokenizer)
    processor = MQwenProcessor.from_model_config(model.config, tokenizer)
    inputs = processor(images=random_photos(1, QUICK.image_size_in), text=[processor.caption_prompt()])
    config = greedy_config(tokenizer, 4)
    ours = decode_overhead.bytecodes_per_step(model, inputs, config)
    theirs = decode_overhead.bytecodes_per_step(model.language_model, {"input_ids": inputs["input_ids"]}, config)
    assert any(name.endswith("MQwenForCausalLM.forward") and count > 0 for name, count in ours.items())
    assert any("modeling_mqwen" in name and name.endswith(" _check_inputs") for name in ours)
    assert not any("modeling_mqwen" in name for name in theirs)
    assert not any(name.endswith("get_image_features") for name in ours), "decode steps do no image work"

    assert decode_overhead.main(["--quick", "--reps", "1", "--new-tokens", "3", "--top", "5"]) == 0
    printed = capsys.readouterr().out
    assert "Python bytecodes per decode step (3 new tokens)" in printed
    for name in ("| bare LM |", "| bare LM, vision tower run before its decode steps |", "| MQwen (with the image) |"):
        assert name in printed
