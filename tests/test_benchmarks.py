"""`python -m benchmarks --quick` runs every figure and prints the table; the comparison it rests on is fair.

Speed targets are not asserted here (they live in benchmarks/RESULTS.md); these tests check that the
benchmark runs, reports what it measured, and that its contenders really compute the same thing.
"""

import json
import re
import statistics

import pytest
import torch

from mqwen.benchmarks import __main__ as cli
from mqwen.benchmarks.contenders import build_all, check_same_logits
from mqwen.benchmarks.figures import random_photos
from mqwen.benchmarks.report import Row, markdown_table
from mqwen.benchmarks.shapes import QUICK
from mqwen.benchmarks.timing import Stats, interleave

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
