"""evaluation/coco_metrics.py: the official COCO caption scores (pycocoevalcap, its Java PTB tokenizer, METEOR 1.5).

The known values in tests/data/coco_reference_scores.json were computed once by pycocoevalcap's reference steps
(tests/data/make_coco_reference_scores.py, which does not import MQwen); these tests check MQwen reproduces them.
"""

import json
from pathlib import Path

import pytest

from mqwen.evaluation import coco_metrics
from mqwen.evaluation.coco_metrics import JavaNotFoundError, caption_scores
from mqwen.train.eval import eval_main

KNOWN = json.loads((Path(__file__).parent / "data" / "coco_reference_scores.json").read_text())
OFFICIAL = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")


@pytest.fixture(scope="module")
def official():
    return caption_scores(KNOWN["candidates"], KNOWN["references"])


def test_reproduces_pycocoevalcaps_reference_scores_to_4_decimals(official):
    corpus, per_image = official
    for name in OFFICIAL:
        assert corpus[name] == pytest.approx(KNOWN["corpus"][name], abs=5e-5), name
        for key, expected in KNOWN["per_image"].items():
            assert per_image[key][name] == pytest.approx(expected[name], abs=5e-5), (key, name)
    assert list(per_image) == list(KNOWN["candidates"])
    assert corpus["tokenizer"] == "ptb" and corpus["images"] == 6
    assert corpus["exact_match"] == 0.0
    # SPICE is absent offline: said in one note, not silently dropped.
    assert "spice" not in corpus and any("SPICE" in note for note in corpus["notes"])


def test_simple_tokenizer_is_labelled_and_differs_from_the_official_scores(official):
    simple, per_image = caption_scores(KNOWN["candidates"], KNOWN["references"], tokenizer="simple")
    assert simple["tokenizer"] == "simple" and "not comparable" in simple["notes"][0]
    assert "meteor" not in simple and "meteor" not in per_image["1"]
    # These captions are where a regex tokenizer and the PTB tokenizer disagree.
    assert abs(simple["bleu4"] - official[0]["bleu4"]) > 0.05
    assert abs(simple["cider"] - official[0]["cider"]) > 0.2
    with pytest.raises(ValueError, match="tokenizer must be one of ptb, simple"):
        caption_scores({"a": "x"}, {"a": ["x"]}, tokenizer="regex")


def test_line_breaks_inside_a_caption_do_not_shift_captions_onto_other_images():
    # pycocoevalcap's tokenizer reads one caption per line, and Java breaks lines at \r and U+2028 too.
    references = {"a": ["a big red\rcircle"], "b": ["two small blue\u2028squares"], "c": ["one green\x0ctriangle here"]}
    predictions = {"a": "a big red circle", "b": "two small blue squares", "c": "one green\r\ntriangle here"}
    corpus, per_image = caption_scores(predictions, references)
    assert [per_image[k]["cider"] for k in "abc"] == pytest.approx([10.0, 10.0, 10.0])
    assert corpus["bleu4"] == pytest.approx(1.0)


def test_empty_caption_scores_zero_without_shifting_the_others():
    corpus, per_image = caption_scores(
        {"a": "", "b": "a big blue square"}, {"a": ["a red circle"], "b": ["a big blue square"]}
    )
    assert per_image["a"]["cider"] == 0.0 and per_image["a"]["meteor"] == 0.0
    assert per_image["b"]["cider"] == pytest.approx(10.0) and per_image["b"]["meteor"] > 0.9


def test_without_java_the_error_names_the_debian_package(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no `java` anywhere on it
    with pytest.raises(JavaNotFoundError, match="apt-get install openjdk-17-jre-headless"):
        caption_scores({"a": "x"}, {"a": ["x"]})
    # mqwen-eval says so before loading the model or captioning anything.
    with pytest.raises(SystemExit, match="openjdk-17-jre-headless.*--tokenizer simple"):
        eval_main(["--model", str(tmp_path / "never-loaded"), "--data", str(tmp_path / "never-read.jsonl")])
    # Java-free scores are available on request.
    predictions = {"a": "a big red circle", "b": "two small blue squares"}
    corpus, _ = caption_scores(predictions, {k: [v] for k, v in predictions.items()}, tokenizer="simple")
    assert corpus["cider"] == pytest.approx(10.0) and corpus["tokenizer"] == "simple"


def test_spice_is_reported_when_its_models_are_present(monkeypatch):
    calls = []

    class FakeSpice:
        def compute_score(self, gts, res):
            calls.append((gts, res))
            return 0.25, [{"All": {"f": 0.5}}, {"All": {"f": 0.0}}]

    monkeypatch.setattr(coco_metrics, "spice_models_present", lambda: True)
    monkeypatch.setattr(coco_metrics, "Spice", FakeSpice)
    corpus, per_image = caption_scores({"x": "A dog's ball.", "y": "a cat"}, {"x": ["a dog's ball"], "y": ["a hat"]})
    assert corpus["spice"] == 0.25 and per_image["x"]["spice"] == 0.5 and per_image["y"]["spice"] == 0.0
    assert not any("SPICE" in note for note in corpus["notes"])
    # SPICE gets the PTB-tokenized captions, as in COCOEvalCap.
    gts, res = calls[0]
    assert res["x"] == ["a dog 's ball"] and gts["x"] == ["a dog 's ball"]


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="same ids"):
        caption_scores({"a": "x"}, {"b": ["x"]})
    with pytest.raises(TypeError, match="not a caption"):
        caption_scores({"a": None}, {"a": ["x"]})
    with pytest.raises(TypeError, match="list of captions"):
        caption_scores({"a": "x"}, {"a": "x"})
    with pytest.raises(ValueError, match="no reference caption"):
        caption_scores({"a": "x"}, {"a": []})
