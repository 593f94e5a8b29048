"""Compute tests/data/coco_reference_scores.json ONCE with pycocoevalcap's reference implementation.

This script does not import MQwen. It runs the steps of pycocoevalcap's `COCOEvalCap.evaluate` (eval.py) on
the captions below: `PTBTokenizer().tokenize` on the references (gts) and, separately, on the candidates (res),
each caption given as `{"caption": text}` as a COCO annotation holds it, then `Bleu(4)`, `Meteor()`, `Rouge()`
and `Cider()`'s `compute_score(gts, res)`, in that order. SPICE is left out (it downloads Stanford CoreNLP on
first use). tests/test_coco_metrics.py checks that MQwen's `caption_scores` reproduces the stored numbers.

    python tests/data/make_coco_reference_scores.py       # rewrites the JSON next to this file

The captions are chosen where a regex tokenizer and the PTB tokenizer disagree: hyphens ("left-hand"),
contractions ("isn't", "it's"), possessives, numbers with separators ("3.5", "1,000"), brackets, quotes,
semicolons, ellipses and a caption with no punctuation at all.
"""

import json
import platform
import subprocess
from importlib.metadata import version
from pathlib import Path

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

REFERENCES = {
    "1": [
        "A red circle is on the left-hand side of a blue square.",
        "There's a red circle to the left of the blue square.",
        "a blue square, and a red circle left of it",
    ],
    "2": [
        "Two green triangles -- side by side -- on a white background.",
        "two green triangles next to each other",
    ],
    "3": [
        "The yellow square isn't in the middle; it's at the top-right.",
        "A yellow square (small) in the upper right corner.",
    ],
    "4": [
        "A man's dog catches a frisbee, 3.5 metres in the air!",
        "The dog is jumping to catch a frisbee.",
        "Dog mid-air, catching a red frisbee...",
    ],
    "5": [
        "1,000 people stand in line at a well-known cafe.",
        "A long line of people outside a cafe",
    ],
    "6": [
        'A sign that says "STOP" at a four-way intersection.',
        "A red stop sign on a street corner.",
    ],
}
CANDIDATES = {
    "1": "A red circle on the left-hand side of a blue square.",
    "2": "Two green triangles, side-by-side.",
    "3": "The yellow square's at the top-right; it isn't small.",
    "4": "A dog catches a frisbee 3.5 metres up in the air.",
    "5": "a line of 1,000 people at a well-known cafe",
    "6": 'A "STOP" sign at a four-way intersection...',
}


def main():
    gts = {k: [{"caption": c} for c in v] for k, v in REFERENCES.items()}
    res = {k: [{"caption": CANDIDATES[k]}] for k in REFERENCES}
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize(gts)
    res = tokenizer.tokenize(res)
    corpus, per_image = {}, {k: {} for k in gts}
    scorers = [
        (Bleu(4), ["bleu1", "bleu2", "bleu3", "bleu4"]),
        (Meteor(), "meteor"),
        (Rouge(), "rouge_l"),
        (Cider(), "cider"),
    ]
    for scorer, method in scorers:
        score, scores = scorer.compute_score(gts, res)
        for name, value, values in (
            zip(method, score, scores) if isinstance(method, list) else [(method, score, scores)]
        ):
            corpus[name] = float(value)
            for key, v in zip(gts, values):
                per_image[key][name] = float(v)
    java = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.splitlines()[0]
    record = {
        "how": (
            "pycocoevalcap's COCOEvalCap.evaluate steps, run by tests/data/make_coco_reference_scores.py: "
            "PTBTokenizer().tokenize(gts) and .tokenize(res) separately, then Bleu(4), Meteor(), Rouge(), Cider() "
            "compute_score(gts, res); SPICE left out. MQwen's code is not involved."
        ),
        "pycocoevalcap": version("pycocoevalcap"),
        "java": java,
        "python": platform.python_version(),
        "references": REFERENCES,
        "candidates": CANDIDATES,
        "tokenized": {"references": gts, "candidates": {k: v[0] for k, v in res.items()}},
        "corpus": corpus,
        "per_image": per_image,
    }
    out = Path(__file__).with_name("coco_reference_scores.json")
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(corpus, indent=2))


if __name__ == "__main__":
    main()
