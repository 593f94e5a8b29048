"""`mqwen-caption`: batched captions for files and folders; unreadable files reported and skipped."""

import json
import os
import subprocess
import sys

import pytest
import torch

from mqwen.caption.cli import collect_images, main


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    from conftest import random_image

    folder = tmp_path_factory.mktemp("images")
    for i in range(3):
        random_image(i, size=(40 + 10 * i, 60)).save(folder / f"img{i}.png")
    random_image(5, size=(50, 50), mode="RGBA").save(folder / "img3_alpha.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    (folder / "notes.txt").write_text("not an image, and not named like one: ignored")
    return folder


def _direct_captions(tiny_dir, paths, max_new_tokens):
    """Each image captioned alone, with the model and processor loaded directly (the reference)."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    from mqwen.processing_mqwen import to_rgb_image

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(tiny_dir, trust_remote_code=True)
    captions = []
    for path in paths:
        inputs = processor(images=[to_rgb_image(path)], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        captions.append(processor.decode_captions(out, inputs["input_ids"].shape[1])[0])
    return captions


def test_folder_with_an_unreadable_file(tiny_dir, image_dir, capsys):
    good = ["img0.png", "img1.png", "img2.png", "img3_alpha.png"]
    argv = [str(image_dir), "--model", str(tiny_dir), "--batch-size", "3", "--max-new-tokens", "6", "--no-progress"]
    code = main([*argv, "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 1
    # One line per readable image, in sorted order, whatever bytes the random model generates.
    assert [line.split("\t")[0] for line in out.splitlines()] == [str(image_dir / name) for name in good]
    assert "broken.png" in err and "Could not read" in err and "1 of 5 inputs could not be read" in err
    assert "notes.txt" not in out + err

    code = main([*argv, "--jsonl"])
    out, err = capsys.readouterr()
    assert code == 1
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["image"] for r in records] == [str(image_dir / n) for n in ["broken.png", *good]]
    assert "Could not read" in records[0]["error"] and "caption" not in records[0]
    # Batched captions (batch 3: two batches, the first with the bad file) equal one-by-one generation.
    expected = _direct_captions(tiny_dir, [image_dir / name for name in good], 6)
    assert [r["caption"] for r in records[1:]] == expected
    assert len(set(expected)) > 1, "the reference captions should depend on the image"


def test_one_line_escapes_line_breaks():
    from mqwen.caption.cli import one_line

    assert one_line("a\tb\nc\\n") == "a\\tb\\nc\\\\n"
    for text in ("x\r\ny", "x\x0by", "x\x1cy", "x\u2028y", "x\x85y"):
        assert len(one_line(text).splitlines()) == 1 and "\t" not in one_line(text + "\t")


def test_jsonl_and_explicit_missing_file(tiny_dir, image_dir, capsys):
    missing = image_dir / "nope.jpg"
    code = main(
        [
            str(image_dir / "img1.png"),
            str(missing),
            "--model",
            str(tiny_dir),
            "--jsonl",
            "--max-new-tokens",
            "4",
            "--prompt",
            "What is this?",
            "--no-progress",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 1
    records = [json.loads(line) for line in out.splitlines()]
    assert records[0] == {"image": str(missing), "error": "no such file or folder"}
    assert records[1]["image"] == str(image_dir / "img1.png") and isinstance(records[1]["caption"], str)
    assert "nope.jpg" in err


def test_all_good_exits_zero(tiny_dir, image_dir, capsys):
    assert (
        main(
            [
                str(image_dir / "img0.png"),
                "--model",
                str(tiny_dir),
                "--max-new-tokens",
                "2",
                "--dtype",
                "fp32",
                "--no-progress",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.count("\n") == 1


def test_nothing_to_caption_and_bad_model_are_usage_errors(tiny_dir, tmp_path, image_dir, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty), "--model", str(tiny_dir)]) == 2
    assert "no image files found" in capsys.readouterr().err
    assert main([str(image_dir / "img0.png"), "--model", str(tmp_path / "no-model")]) == 2
    assert "could not load the model" in capsys.readouterr().err


def test_collect_images_recursive(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.png", "a.JPG", "sub/c.webp", "skip.json"):
        (tmp_path / name).write_bytes(b"")
    flat, missing = collect_images([str(tmp_path)])
    assert [p.name for p in flat] == ["a.JPG", "b.png"] and missing == []
    deep, _ = collect_images([str(tmp_path)], recursive=True)
    assert sorted(p.name for p in deep) == ["a.JPG", "b.png", "c.webp"]


def test_help_and_module_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "mqwen.caption", "--help"],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=120,
    )
    assert result.returncode == 0
    assert "examples:" in result.stdout and "mqwen-caption photos/" in result.stdout
    for flag in ("--model", "--prompt", "--max-new-tokens", "--batch-size", "--device", "--dtype", "--jsonl"):
        assert flag in result.stdout
    bad = subprocess.run([sys.executable, "-m", "mqwen.caption", "x.png"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--model" in bad.stderr
