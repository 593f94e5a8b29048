"""The COCO caption metrics as papers report them: pycocoevalcap's own scorers on captions tokenized by its
Stanford PTB tokenizer.

`caption_scores(predictions, references)` runs what pycocoevalcap's `COCOEvalCap.evaluate` runs: the PTB
tokenizer of Stanford CoreNLP 3.4.1 (Java, lower-cased, punctuation tokens dropped), then `Bleu(4)` (BLEU-1..4,
corpus level), `Meteor` (METEOR 1.5, Java, with its paraphrase table), `Rouge` (ROUGE-L) and `Cider` (CIDEr-D,
document frequencies from the evaluated set's references), and `Spice` when Stanford CoreNLP 3.6.0's models
are present in pycocoevalcap's `spice/lib` (pycocoevalcap downloads them on first use; offline they are
absent, and the scores say so in `notes`). The jars ship in pycocoevalcap's wheel; Java 17 runs them.

Without Java, `tokenizer="simple"` (`mqwen-eval --tokenizer simple`) scores Java-free: a regex tokenizer,
BLEU, ROUGE-L and CIDEr-D only. Its numbers are labelled `tokenizer: "simple"` and are not comparable with
published ones: on captions with hyphens, contractions and numbers the two tokenizers disagree and BLEU-4 and
CIDEr-D move by 10-30 % (tests/data/coco_reference_scores.json holds such captions).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pycocoevalcap.spice as spice_package
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice.spice import Spice
from pycocoevalcap.tokenizer import ptbtokenizer

TOKENIZERS = ("ptb", "simple")
JAVA_PACKAGE = "openjdk-17-jre-headless"
METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")
SIMPLE_METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider")
NOT_COMPARABLE = (
    "tokenizer 'simple' (Java-free regex): these scores are not comparable with published COCO scores, "
    "which use the PTB tokenizer (install Java and use --tokenizer ptb); METEOR and SPICE need Java"
)
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


class JavaNotFoundError(RuntimeError):
    """The official COCO metrics need a Java runtime and none is on PATH."""


def require_java() -> str:
    """The `java` on PATH, or a JavaNotFoundError that says how to install one (or to score without it)."""
    java = shutil.which("java")
    if java is None:
        raise JavaNotFoundError(
            "The official COCO caption metrics (pycocoevalcap's PTB tokenizer and METEOR 1.5) run on Java, and no "
            f"`java` is on PATH. Install a Java runtime (Debian/Ubuntu: `apt-get install {JAVA_PACKAGE}`), or "
            "score with `--tokenizer simple` (tokenizer='simple'), whose scores are not comparable with published "
            "ones."
        )
    return java


def tokenize_caption(text: str) -> str:
    """The Java-free tokenizer of `tokenizer="simple"`: lower-cased words without punctuation, space-separated."""
    return " ".join(_WORD.findall(text.lower()))


def normalize_caption(text: str) -> str:
    """Canonical form for exact match: lower case, single spaces, no trailing full stop."""
    return " ".join(text.lower().split()).rstrip(" .!?")


def spice_models_present() -> bool:
    """Whether SPICE can run offline: pycocoevalcap's `spice/lib` holds Stanford CoreNLP 3.6.0 and its models."""
    lib = Path(spice_package.__file__).parent / "lib"
    return all((lib / name).is_file() for name in ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar"))


SPICE_NOTE = (
    "SPICE not computed: it needs Stanford CoreNLP 3.6.0 in pycocoevalcap/spice/lib; fetch it once with network: "
    "python -c 'from pycocoevalcap.spice.get_stanford_models import get_stanford_models as g; g()'"
)


def ptb_tokenize(captions: dict) -> dict:
    """`{key: [caption, ...]}` -> `{key: [tokenized, ...]}` by pycocoevalcap's `PTBTokenizer` (Java).

    Every caption is first put on one line (all whitespace, line separators included, becomes one space). The
    tokenizer reads one caption per line and Java ends lines at \\r, form feed, U+0085, U+2028 and U+2029 too:
    pycocoevalcap's `COCOEvalCap` (and so lmms-eval's COCO tasks) then shifts every later caption onto another
    image, silently. Only for such captions do MQwen's scores differ from theirs, and MQwen's are the right ones.
    """
    require_java()
    folder = Path(ptbtokenizer.__file__).parent
    if not os.access(folder, os.W_OK):
        raise PermissionError(
            f"pycocoevalcap's PTB tokenizer writes its input next to its jar, in {folder}, which this user cannot "
            "write to. Install pycocoevalcap into a virtual environment you own (python -m venv ...)."
        )
    tokenized = ptbtokenizer.PTBTokenizer().tokenize(
        {k: [{"caption": " ".join(c.split())} for c in v] for k, v in captions.items()}
    )
    for key, texts in captions.items():
        if len(tokenized.get(key, ())) != len(texts):
            raise RuntimeError(
                f"the PTB tokenizer returned {len(tokenized.get(key, ()))} captions for {key!r} instead of "
                f"{len(texts)}; Java's output was cut short (is the Java runtime working? try `java -version`)."
            )
    return tokenized


@contextmanager
def _meteor() -> Iterator:
    """pycocoevalcap's `Meteor` (a METEOR 1.5 Java process), stopped when the block ends."""
    scorer = Meteor()
    try:
        yield scorer
    finally:
        process = scorer.meteor_p
        process.stdin.close()
        try:
            process.wait(timeout=30)
        except Exception:
            process.kill()
            process.wait()


def _meteor_scores(gts: dict, res: dict) -> tuple:
    with _meteor() as scorer:
        try:
            return scorer.compute_score(gts, res)
        except ValueError as error:  # float('') when the Java process died
            stderr = scorer.meteor_p.stderr.read().decode(errors="replace")[-2000:] if scorer.meteor_p.stderr else ""
            raise RuntimeError(f"METEOR (Java) stopped without a score: {stderr or error}") from error


def _spice_scores(gts: dict, res: dict) -> tuple:
    score, scores = Spice().compute_score(gts, res)
    return float(score), [s["All"]["f"] for s in scores]


def _check(predictions: dict, references: dict) -> list:
    if set(predictions) != set(references):
        missing = set(references) - set(predictions)
        extra = set(predictions) - set(references)
        raise ValueError(
            "predictions and references must have the same ids "
            f"({len(missing)} ids only in references, {len(extra)} only in predictions)."
        )
    ids = list(predictions)
    for i in ids:
        if not isinstance(predictions[i], str):
            raise TypeError(f"prediction {i!r} is a {type(predictions[i]).__name__}, not a caption (str).")
        refs = references[i]
        if isinstance(refs, str) or not all(isinstance(r, str) for r in refs):
            raise TypeError(f"references[{i!r}] must be a list of captions (str), got {refs!r}.")
    empty = [i for i in ids if not references[i]]
    if empty:
        raise ValueError(f"{len(empty)} images have no reference caption (first: {empty[0]!r}).")
    return ids


def caption_scores(predictions: dict, references: dict, *, tokenizer: str = "ptb") -> tuple:
    """Corpus and per-image COCO caption scores, computed by pycocoevalcap.

    Args:
        predictions: `{id: caption}`.
        references: `{id: [reference captions]}` with the same ids.
        tokenizer: "ptb" (pycocoevalcap's Stanford PTB tokenizer: the published numbers; needs Java) or
            "simple" (Java-free, not comparable: BLEU, ROUGE-L and CIDEr-D only).

    Returns:
        `(corpus, per_image)`. `corpus` = `{"bleu1".."bleu4", "meteor", "rouge_l", "cider", ["spice",]
        "exact_match", "images", "tokenizer", "notes"}`: BLEU is corpus level (as COCO reports it, not the mean
        of the per-image values); METEOR is METEOR 1.5's corpus score; ROUGE-L, CIDEr-D, SPICE and exact match
        are means over images. `per_image` = `{id: {the same metric keys, "exact_match"}}`.
    """
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {', '.join(TOKENIZERS)}, got {tokenizer!r}")
    ids = _check(predictions, references)
    official = tokenizer == "ptb"
    names = METRICS if official else SIMPLE_METRICS
    notes = [] if official else [NOT_COMPARABLE]
    if official and not spice_models_present():
        notes.append(SPICE_NOTE)
    if not ids:
        return {
            **dict.fromkeys(names, 0.0),
            "exact_match": 0.0,
            "images": 0,
            "tokenizer": tokenizer,
            "notes": notes,
        }, {}
    if official:  # references, then candidates, in two runs of the tokenizer: as COCOEvalCap.evaluate does
        gts = ptb_tokenize({i: references[i] for i in ids})
        res = ptb_tokenize({i: [predictions[i]] for i in ids})
    else:
        gts = {i: [tokenize_caption(r) for r in references[i]] for i in ids}
        res = {i: [tokenize_caption(predictions[i])] for i in ids}

    corpus, per = {}, {}
    bleu, bleu_per_image = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        corpus[f"bleu{n + 1}"], per[f"bleu{n + 1}"] = bleu[n], bleu_per_image[n]
    if official:
        corpus["meteor"], per["meteor"] = _meteor_scores(gts, res)
    corpus["rouge_l"], per["rouge_l"] = Rouge().compute_score(gts, res)
    corpus["cider"], per["cider"] = Cider().compute_score(gts, res)
    if official and spice_models_present():
        corpus["spice"], per["spice"] = _spice_scores(gts, res)

    exact = {i: float(normalize_caption(predictions[i]) in {normalize_caption(r) for r in references[i]}) for i in ids}
    per_image = {i: {name: float(per[name][k]) for name in per} | {"exact_match": exact[i]} for k, i in enumerate(ids)}
    corpus = {name: float(value) for name, value in corpus.items()}
    corpus.update(exact_match=sum(exact.values()) / len(ids), images=len(ids), tokenizer=tokenizer, notes=notes)
    return corpus, per_image
