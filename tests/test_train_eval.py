"""train/: caption metrics, batched evaluation, `mqwen-eval`, accelerate configs."""

import json
from pathlib import Path

import pytest

from mqwen.runtime import caption_images
from mqwen.train.eval import eval_main as main
from mqwen.train.eval import evaluate_captions
from mqwen.train.metrics import caption_scores, tokenize_caption

CONFIGS = Path(__file__).resolve().parents[1] / "train" / "configs"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_bleu4_matches_a_hand_computed_value():
    # Clipped n-gram precisions 5/6, 4/5, 3/4, 2/3, no brevity penalty: BLEU-4 = (1/3) ** (1/4).
    corpus, per_image = caption_scores({"x": "A red circle on the left."}, {"x": ["a red circle on the right"]})
    assert corpus["bleu4"] == pytest.approx((1 / 3) ** 0.25, rel=1e-6)
    assert per_image["x"]["bleu4"] == pytest.approx((1 / 3) ** 0.25, rel=1e-6)
    assert corpus["exact_match"] == 0.0


def test_cider_d_and_exact_match_of_perfect_captions():
    references = {
        "a": ["a red circle above a blue square"],
        "b": ["two green triangles next to each other"],
        "c": ["one big yellow square in the middle"],
    }
    predictions = {
        "a": "A red circle above a blue square.",
        "b": "two green triangles next to each other",
        "c": "a small yellow square at the top",
    }
    corpus, per_image = caption_scores(predictions, references)
    # Identical (after tokenization) captions: cosine 1 for every n, no length penalty, x10.
    assert per_image["a"]["cider"] == pytest.approx(10.0) and per_image["b"]["cider"] == pytest.approx(10.0)
    assert 0 < per_image["c"]["cider"] < 10
    assert corpus["cider"] == pytest.approx(sum(p["cider"] for p in per_image.values()) / 3)
    assert per_image["a"]["exact_match"] == 1.0 and corpus["exact_match"] == pytest.approx(2 / 3)
    assert per_image["a"]["bleu4"] == pytest.approx(1.0)
    assert tokenize_caption("A dog's ball, red!") == "a dog's ball red"
    with pytest.raises(ValueError, match="same ids"):
        caption_scores({"a": "x"}, {"b": ["x"]})


def test_evaluate_captions_batches_skips_and_scores(tiny, make_image, tmp_path):
    model, processor = tiny
    images = [make_image(seed, size=(56, 60)) for seed in range(5)]
    single = [next(caption_images(model, processor, [image], max_new_tokens=6)) for image in images]
    # References equal to the model's own captions: every image is an exact match.
    data = [(image, caption or "empty") for image, caption in zip(images, single)]
    data.insert(2, (tmp_path / "missing.png", "never read"))
    results = evaluate_captions(model, processor, data, batch_size=2, max_new_tokens=6, progress=False)
    assert [entry["caption"] for entry in results["per_image"]] == single  # batching changes nothing
    assert results["metrics"]["images"] == 5 and results["metrics"]["skipped_images"] == 1
    assert results["skipped"]["missing"] == 1
    expected_exact = sum(bool(c) for c in single) / 5
    assert results["metrics"]["exact_match"] == pytest.approx(expected_exact)
    assert not model.training


def test_eval_cli_writes_per_image_results(tiny_dir, make_image, tmp_path, capsys):
    folder = tmp_path / "val"
    folder.mkdir()
    rows = []
    for seed in range(3):
        make_image(seed).save(folder / f"{seed}.png")
        rows.append({"image": f"{seed}.png", "caption": f"caption {seed}"})
    (folder / "broken.png").write_bytes(b"broken")
    rows.append({"image": "broken.png", "caption": "x"})
    data = folder / "val.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows))
    out = tmp_path / "results" / "results.json"
    assert (
        main(
            [
                "--model",
                str(tiny_dir),
                "--data",
                str(data),
                "--batch-size",
                "2",
                "--out",
                str(out),
                "--max-new-tokens",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    results = json.loads(out.read_text())
    assert set(results["metrics"]) >= {"bleu4", "cider", "exact_match", "images", "skipped_images"}
    assert [entry["id"] for entry in results["per_image"]] == ["0.png", "1.png", "2.png"]
    assert results["per_image"][1]["references"] == ["caption 1"]
    assert results["skipped"]["corrupt"] == 1
    printed = json.loads(capsys.readouterr().out)
    assert printed["images"] == 3


def test_accelerate_configs_are_valid():
    from accelerate.commands.config.config_args import ClusterConfig

    kinds = {}
    for path in sorted(CONFIGS.glob("*.yaml")):
        config = ClusterConfig.from_yaml_file(str(path))  # raises on unknown keys
        kinds[path.stem] = (str(config.distributed_type).split(".")[-1], config.deepspeed_config.get("zero_stage"))
    assert kinds == {
        "ddp": ("MULTI_GPU", None),
        "deepspeed_zero2": ("DEEPSPEED", 2),
        "deepspeed_zero3": ("DEEPSPEED", 3),
        "fsdp": ("FSDP", None),
        "fsdp_cpu": ("FSDP", None),
    }
