"""evaluation/lmms_model.py: MQwen as an lmms-eval model (the `lmms_eval.models` entry point), offline.

The end-to-end test runs the `lmms-eval` command on a local task over the shapes demo's test split
(`evaluation/lmms_shapes_task.py`, scored by lmms-eval's own COCO code) and checks that its captions and scores
equal `mqwen-eval`'s on the same images.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if os.environ.get("MQWEN_REQUIRE_LMMS_EVAL") != "1":
    pytest.importorskip("lmms_eval", reason='lmms-eval is not installed (pip install "mqwen[eval]")')

from lmms_eval.api.instance import Instance  # noqa: E402

from mqwen.evaluation.lmms_model import MQwenLMMS  # noqa: E402
from mqwen.evaluation.lmms_shapes_task import TASK, task_yaml, write_shapes_task  # noqa: E402
from mqwen.runtime import caption_images  # noqa: E402
from mqwen.train.eval import eval_main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["Describe this image.", "Describe this image in a few words, please."]  # different lengths: padding


@pytest.fixture(scope="module")
def lmm(tiny_dir):
    model = MQwenLMMS(pretrained=str(tiny_dir), batch_size=3, device="cpu")
    return model


def _prompt(i):
    """Request i's prompt: pairs of requests alternate, so that requests with even and odd indices (two groups of
    generation settings below) each mix both prompt lengths within one batch."""
    return PROMPTS[(i // 2) % 2]


def _docs(make_image, n):
    return {"t": {"test": [{"image": make_image(seed, size=(56, 60))} for seed in range(n)]}}


def _requests(n, gen_kwargs, kind="generate_until"):
    return [
        Instance(
            request_type=kind,
            arguments=(
                _prompt(i),
                dict(gen_kwargs[i % len(gen_kwargs)]),
                lambda doc: [doc["image"]],
                i,
                "t",
                "test",
            ),
            idx=0,
            metadata={"task": "t", "doc_id": i, "repeats": 1},
        )
        for i in range(n)
    ]


def _single(lmm, docs, i, max_new_tokens):
    image = docs["t"]["test"][i]["image"]
    prompt = _prompt(i)
    return next(caption_images(lmm.model, lmm.processor, [image], prompt=prompt, max_new_tokens=max_new_tokens))


def test_entry_point_registers_mqwen():
    from lmms_eval.models import get_model

    assert get_model("mqwen") is MQwenLMMS


def test_batched_answers_equal_single_image_captions(lmm, make_image):
    docs = _docs(make_image, 7)
    lmm.task_dict = docs
    settings = [{"max_new_tokens": 6, "temperature": 0}, {"max_new_tokens": 3, "temperature": 0, "do_sample": False}]
    batched = lmm.generate_until(_requests(7, settings))  # two groups of settings, batches of 3 mixing prompts
    single = [_single(lmm, docs, i, 6 if i % 2 == 0 else 3) for i in range(7)]
    assert batched == single  # request order kept, left padding, each request's max_new_tokens
    assert len(set(single)) > 1
    lmm.batch_size_per_gpu = 1
    try:
        assert lmm.generate_until(_requests(7, settings)) == single
    finally:
        lmm.batch_size_per_gpu = 3


def test_until_cuts_and_stops_each_answer(lmm, make_image):
    docs = _docs(make_image, 4)
    lmm.task_dict = docs
    full = [_single(lmm, docs, i, 10) for i in range(4)]
    stop = full[0][3:5]
    assert stop and len(full[0]) > 5
    answers = lmm.generate_until(_requests(4, [{"max_new_tokens": 10, "until": [stop, "never-generated"]}]))
    expected = [text[: text.find(stop)] if stop in text else text for text in full]
    assert answers == expected and answers[0] == full[0][:3]
    string_until = lmm.generate_until(_requests(4, [{"max_new_tokens": 10, "until": stop}]))
    assert string_until == expected
    with pytest.raises(ValueError, match="until"):
        lmm.generate_until(_requests(1, [{"until": 3}]))


def test_generation_settings_reach_generate(lmm, make_image, monkeypatch):
    lmm.task_dict = _docs(make_image, 2)
    seen = []
    real_generate = lmm.model.generate

    def spy(**kwargs):
        seen.append({k: kwargs.get(k) for k in ("do_sample", "temperature", "top_p", "max_new_tokens", "num_beams")})
        return real_generate(**kwargs)

    monkeypatch.setattr(lmm.model, "generate", spy)
    lmm.generate_until(_requests(2, [{"max_new_tokens": 4, "temperature": 0.7, "top_p": 0.9}]))
    assert seen[-1] == {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 4, "num_beams": 1}
    lmm.generate_until(_requests(2, [{"temperature": 0, "top_p": 1.0}]))  # lmms-eval's greedy spelling
    assert seen[-1] == {"do_sample": False, "temperature": None, "top_p": None, "max_new_tokens": 128, "num_beams": 1}


def _forced_scores(lmm, image, continuation):
    """(log p(continuation), greedy) by `generate` forced onto the continuation's tokens, one step at a time with
    the cache: another computation than loglikelihood's single forward pass."""
    batch = lmm._inputs([PROMPTS[0]], [[image]])
    tokens = lmm.tokenizer(continuation, add_special_tokens=False)["input_ids"]
    prompt_length = batch["input_ids"].shape[1]
    force = lambda _, ids: [tokens[len(ids) - prompt_length]]  # noqa: E731
    with torch.inference_mode():
        out = lmm.model.generate(
            **batch,
            max_new_tokens=len(tokens),
            min_new_tokens=len(tokens),
            do_sample=False,
            prefix_allowed_tokens_fn=force,
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert out.sequences[0, prompt_length:].tolist() == tokens
    logprob = sum(torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens))
    return logprob, all(int(step[0].argmax()) == t for step, t in zip(out.logits, tokens))


def test_loglikelihood_matches_forced_generation(lmm, make_image):
    docs = _docs(make_image, 1)
    lmm.task_dict = docs
    image = docs["t"]["test"][0]["image"]
    greedy_text = _single(lmm, docs, 0, 4)
    continuations = [greedy_text, " a red circle"]
    requests = [
        Instance(
            request_type="loglikelihood",
            arguments=(PROMPTS[0], cont, lambda doc: [doc["image"]], 0, "t", "test"),
            idx=i,
            metadata={"task": "t", "doc_id": 0, "repeats": 1},
        )
        for i, cont in enumerate(continuations)
    ]
    results = lmm.loglikelihood(requests)
    for (logprob, greedy), continuation in zip(results, continuations):
        expected_logprob, expected_greedy = _forced_scores(lmm, image, continuation)
        assert logprob == pytest.approx(expected_logprob, abs=1e-3) and greedy is expected_greedy
    assert results[1][1] is False and results[1][0] < 0


def test_multi_round_feeds_each_answer_to_the_next_round(lmm, make_image):
    docs = _docs(make_image, 2)
    lmm.task_dict = docs
    calls = []

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        calls.append((round_idx, list(previous_output), previous_round_info))
        if round_idx == 2:
            return None, None, True, previous_output, None
        return [doc["image"]], PROMPTS[1], False, previous_output, {"round": round_idx}

    requests = [
        Instance(
            request_type="generate_until_multi_round",
            arguments=(PROMPTS[0], {"max_new_tokens": 4}, lambda doc: [doc["image"]], doc_to_text, i, "t", "test"),
            idx=0,
            metadata={"task": "t", "doc_id": i, "repeats": 1},
        )
        for i in range(2)
    ]
    answers = lmm.generate_until_multi_round(requests)
    for i, rounds in enumerate(answers):
        image = docs["t"]["test"][i]["image"]
        first = next(caption_images(lmm.model, lmm.processor, [image], prompt=PROMPTS[0], max_new_tokens=4))
        second = next(caption_images(lmm.model, lmm.processor, [image], prompt=PROMPTS[1], max_new_tokens=4))
        assert rounds == [first, second]
    assert (1, [answers[0][0]], None) in calls and (2, answers[0], {"round": 1}) in calls


def test_bad_model_args_are_clear_errors(tiny_dir):
    with pytest.raises(ValueError, match="does not take the model_args.*colour"):
        MQwenLMMS(pretrained=str(tiny_dir), colour="red")
    with pytest.raises(ValueError, match="batch_size must be a whole number"):
        MQwenLMMS(pretrained=str(tiny_dir), batch_size="auto")
    # lmms-eval passes its own --batch_size (default 1) beside model_args: model_args win, no TypeError
    model = MQwenLMMS.create_from_arg_string(f"pretrained={tiny_dir},batch_size=4", {"batch_size": 1, "device": None})
    assert model.batch_size == 4


@pytest.fixture
def printable_tiny_dir(tiny_dir, tiny, tmp_path):
    """The tiny checkpoint with every token that does not decode to printable text suppressed (its generation
    config), so that its captions hold no control characters: pycocoevalcap's COCOEvalCap, which lmms-eval's COCO
    task calls, shifts captions onto other images at Java's line breaks (form feed, \\r, U+2028, ...), and MQwen's
    scores (which put every caption on one line first) would then rightly differ from lmms-eval's."""
    folder = tmp_path / "printable-tiny"
    shutil.copytree(tiny_dir, folder)
    tokenizer = tiny[1].tokenizer
    special = set(tokenizer.all_special_ids)
    bad = [
        i
        for i in range(len(tokenizer))
        if i not in special and not all(c.isprintable() and c != "\ufffd" for c in tokenizer.decode([i]))
    ]
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "suppress_tokens": bad}))
    return folder


def test_task_writer_command(tmp_path):
    out = tmp_path / "task"
    command = [sys.executable, "-m", "mqwen.evaluation.lmms_shapes_task", str(out), "--n", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "doc_to_text: !function mqwen.evaluation.lmms_shapes_task.doc_to_text" in (out / f"{TASK}.yaml").read_text()
    assert len((out / "images" / "captions.jsonl").read_text().splitlines()) == 2
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "--overwrite" in again.stderr + again.stdout


def test_lmms_eval_command_scores_equal_mqwen_eval(printable_tiny_dir, tmp_path):
    """`lmms-eval --model mqwen` on the local shapes task: the same captions and COCO scores as `mqwen-eval`."""
    tiny_dir = printable_tiny_dir
    task = write_shapes_task(tmp_path / "task", n=5)
    import datasets

    data = datasets.load_from_disk(str(task / "data"))
    question = data["test"][0]["question"]
    rows = [json.loads(line) for line in (task / "images" / "captions.jsonl").read_text().splitlines()]
    # The tiny random model's captions share nothing with shape captions, so each image also gets the model's own
    # single-image caption as a reference: the scores are then non-zero and any changed caption changes them.
    first = tmp_path / "first.json"
    base = ["--model", str(tiny_dir), "--max-new-tokens", "64", "--instruction", question, "--no-progress"]
    jsonl = task / "images" / "captions.jsonl"
    assert (
        eval_main([*base, "--data", str(jsonl), "--image-column", "file", "--batch-size", "1", "--out", str(first)])
        == 0
    )
    own = [entry["caption"] for entry in json.loads(first.read_text())["per_image"]]
    assert not any("\n\n" in caption for caption in own)  # the task's default `until` would cut there
    refs = [[row["caption"], caption] if caption else [row["caption"]] for row, caption in zip(rows, own)]
    data["test"] = data["test"].remove_columns("answer").add_column("answer", refs)
    data.save_to_disk(str(tmp_path / "data-with-own-captions"))
    (task / f"{TASK}.yaml").write_text(task_yaml(tmp_path / "data-with-own-captions"))
    both = task / "images" / "both.jsonl"
    both.write_text("\n".join(json.dumps({"file": r["file"], "caption": c}) for r, c in zip(rows, refs)))
    ours = tmp_path / "ours.json"
    assert eval_main([*base, "--data", str(both), "--image-column", "file", "--out", str(ours)]) == 0
    ours = json.loads(ours.read_text())

    out = tmp_path / "lmms"
    command = [str(Path(sys.executable).with_name("lmms-eval")), "--model", "mqwen", "--tasks", TASK]
    command += ["--model_args", f"pretrained={tiny_dir},batch_size=3,device=cpu", "--include_path", str(task)]
    command += ["--output_path", str(out), "--log_samples"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    samples = [json.loads(line) for line in next(out.rglob(f"*_samples_{TASK}.jsonl")).read_text().splitlines()]
    captions = [s["filtered_resps"] for s in sorted(samples, key=lambda s: s["doc_id"])]
    assert captions == own  # batches of 3 with left padding, the same prompt: mqwen-eval's captions
    assert [e["caption"] for e in ours["per_image"]] == own
    (results_file,) = [p for p in out.rglob("*_results.json") if p.parent.name != "submissions"]
    results = json.loads(results_file.read_text())["results"][TASK]
    names = {"Bleu_1": "bleu1", "Bleu_2": "bleu2", "Bleu_3": "bleu3", "Bleu_4": "bleu4", "METEOR": "meteor"}
    names.update({"ROUGE_L": "rouge_l", "CIDEr": "cider"})
    for theirs, mine in names.items():
        assert results[f"coco_{theirs},none"] == pytest.approx(ours["metrics"][mine], abs=1e-9), theirs
    assert ours["metrics"]["cider"] > 0.5
