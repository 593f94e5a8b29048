"""evaluation/clipscore.py: CLIPScore and RefCLIPScore (Hessel et al. 2021), the formula on fixed embeddings and
the plumbing end to end with a random-weight OpenCLIP model saved to a local file (nothing is downloaded)."""

import json

import open_clip
import pytest
import torch

from mqwen.evaluation.clipscore import PREFIX, CLIPScorer, clip_scores_from_embeddings, parse_clip_model
from mqwen.train.eval import eval_main

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = "MQwenTestTinyCLIP"  # an OpenCLIP architecture small enough to build in a test


def test_formula_on_fixed_embeddings():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    candidate = torch.tensor([[0.6, 0.8], [-1.0, 0.0], [0.0, 5.0]])  # cos 0.6, -1 and 1 (lengths do not matter)
    references = [
        torch.tensor([[1.0, 0.0], [0.0, 1.0]]),  # cos with the candidate 0.6 and 0.8: the best is 0.8
        torch.tensor([[-1.0, 0.0]]),  # cos 1, but CLIP-S is 0
        torch.tensor([[0.0, -1.0], [3.0, 0.0]]),  # cos -1 and 0: the best is 0
    ]
    scores = clip_scores_from_embeddings(image, candidate, references)
    assert scores["clipscore"].tolist() == pytest.approx([2.5 * 0.6, 0.0, 2.5])
    # harmonic mean of CLIP-S and the best reference's cosine (clipped at 0); 0 when either is 0
    assert scores["refclipscore"].tolist() == pytest.approx([2 * 1.5 * 0.8 / (1.5 + 0.8), 0.0, 0.0])
    assert set(clip_scores_from_embeddings(image, candidate)) == {"clipscore"}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """(spec, model, preprocess, tokenizer): a random-weight tiny OpenCLIP model saved as a local weights file."""
    folder = tmp_path_factory.mktemp("tiny-clip")
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (folder / f"{TINY}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / f"{TINY}.json")
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(TINY)
    weights = folder / "weights.pt"
    torch.save(model.state_dict(), weights)
    return f"{TINY}:{weights}", model.eval(), preprocess, open_clip.get_tokenizer(TINY)


def _expected(model, preprocess, tokenizer, images, captions, references):
    with torch.no_grad():
        image = model.encode_image(torch.stack([preprocess(i) for i in images]))
        candidate = model.encode_text(tokenizer([PREFIX + c for c in captions]))
        refs = [model.encode_text(tokenizer([PREFIX + r for r in rs])) for rs in references]
    image, candidate = (torch.nn.functional.normalize(t, dim=-1) for t in (image, candidate))
    clip_s = 2.5 * (image * candidate).sum(-1).clamp(min=0)
    best = torch.stack(
        [(torch.nn.functional.normalize(r, dim=-1) @ c).max().clamp(min=0) for c, r in zip(candidate, refs)]
    )
    return clip_s, 2 * clip_s * best / (clip_s + best)


def test_scorer_loads_the_local_weights_and_scores_with_the_prefix(tiny_clip, make_image):
    spec, model, preprocess, tokenizer = tiny_clip
    images = [make_image(seed, size=(40, 50)) for seed in range(3)]
    captions = ["a red circle", "two blue squares", "a green triangle at the top"]
    references = [["a red circle"], ["a blue square", "two squares"], ["a triangle"]]
    torch.manual_seed(123)  # a loader that built new random weights instead of reading the file would differ
    scorer = CLIPScorer.load(spec, batch_size=2)  # two batches of images
    corpus, per_image = scorer.score(iter(images), captions, references)
    clip_s, ref_s = _expected(model, preprocess, tokenizer, images, captions, references)
    assert [p["clipscore"] for p in per_image] == pytest.approx(clip_s.tolist(), abs=1e-5)
    assert [p["refclipscore"] for p in per_image] == pytest.approx(ref_s.tolist(), abs=1e-5)
    assert corpus["clipscore"] == pytest.approx(clip_s.mean().item(), abs=1e-5)
    assert corpus["clipscore_model"] == spec
    with pytest.raises(ValueError, match="2 images for 3 candidates"):
        scorer.score(images[:2], captions, references)


def test_eval_cli_reports_clipscore(tiny_clip, tiny_dir, make_image, tmp_path, capsys):
    spec, model, preprocess, tokenizer = tiny_clip
    rows = []
    for seed in range(2):
        make_image(seed).save(tmp_path / f"{seed}.png")
        rows.append({"image": f"{seed}.png", "caption": f"shape number {seed}"})
    data = tmp_path / "val.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows))
    out = tmp_path / "results.json"
    args = ["--model", str(tiny_dir), "--data", str(data), "--out", str(out), "--max-new-tokens", "4"]
    assert eval_main([*args, "--no-progress", "--tokenizer", "simple", "--clipscore-model", spec]) == 0
    results = json.loads(out.read_text())
    images = [make_image(seed) for seed in range(2)]
    captions = [entry["caption"] for entry in results["per_image"]]
    clip_s, ref_s = _expected(model, preprocess, tokenizer, images, captions, [[r["caption"]] for r in rows])
    assert [e["clipscore"] for e in results["per_image"]] == pytest.approx(clip_s.tolist(), abs=1e-5)
    assert [e["refclipscore"] for e in results["per_image"]] == pytest.approx(ref_s.tolist(), abs=1e-5)
    assert results["metrics"]["clipscore_model"] == spec and results["metrics"]["tokenizer"] == "simple"
    assert "not comparable" in capsys.readouterr().err


def test_bad_model_names_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="name the weights of ViT-L-14: ViT-L-14:TAG.*openai"):
        parse_clip_model("ViT-L-14")
    with pytest.raises(ValueError, match="not an OpenCLIP architecture"):
        parse_clip_model("ViT-Q-99:openai")
    with pytest.raises(ValueError, match="neither a pretrained tag of ViT-L-14"):
        parse_clip_model("ViT-L-14:" + str(tmp_path / "missing.pt"))
    assert parse_clip_model("ViT-L-14:openai") == ("ViT-L-14", "openai")
    assert parse_clip_model("hf-hub:org/repo") == ("hf-hub:org/repo", None)
    # mqwen-eval refuses before loading anything
    with pytest.raises(SystemExit, match="--clipscore-model: .*not an OpenCLIP architecture"):
        eval_main(["--model", "never-loaded", "--data", "never-read", "--clipscore-model", "ViT-Q-99:openai"])
