"""train/: data sources, lazy images, skipped images, and the label masking of the collator."""

import csv
import json

import numpy as np
import pytest

from mqwen.train import CaptionCollator, load_caption_dataset
from mqwen.train.collator import IGNORE_INDEX, example_messages
from mqwen.train.data import ImageLoadError

CAPTIONS = ["a red circle", "a blue square and a green triangle", "a yellow square", "two green circles"]


@pytest.fixture
def image_folder(tmp_path, make_image):
    """Four PNGs under tmp/images/, a missing one and a corrupt one; returns (folder, names, images)."""
    folder = tmp_path / "images"
    folder.mkdir()
    images = [make_image(seed, size=(40 + seed, 50)) for seed in range(4)]
    names = [f"img{i}.png" for i in range(4)]
    for image, name in zip(images, names):
        image.save(folder / name)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    return folder, names, images


def _pixels(image):
    return np.asarray(image.convert("RGB"))


def test_coco_json_groups_captions_by_image(tmp_path, image_folder):
    folder, names, images = image_folder
    coco = {
        "images": [{"id": 10 + i, "file_name": name} for i, name in enumerate(names)],
        "annotations": [{"image_id": 10 + i, "id": i, "caption": c} for i, c in enumerate(CAPTIONS)]
        + [{"image_id": 10, "id": 99, "caption": "a circle that is red"}],
    }
    path = tmp_path / "annotations" / "captions.json"
    path.parent.mkdir()
    path.write_text(json.dumps(coco))
    dataset = load_caption_dataset(path, image_root=folder)
    assert [r.id for r in dataset.records] == ["10", "11", "12", "13"]
    assert dataset.records[0].captions == ["a red circle", "a circle that is red"]
    assert len(dataset) == 5  # one training example per caption
    first, second = dataset[0], dataset[1]
    assert first["caption"] == "a red circle" and second["caption"] == "a circle that is red"
    assert np.array_equal(_pixels(first["image"]), _pixels(images[0]))
    assert first["instruction"] in dataset.instructions


def test_llava_json_keeps_the_conversation(tmp_path, image_folder):
    folder, names, _ = image_folder
    entries = [
        {
            "id": "a",
            "image": names[0],
            "conversations": [
                {"from": "human", "value": "<image>\nWhat shapes are there?"},
                {"from": "gpt", "value": "A red circle."},
                {"from": "human", "value": "And the colour?"},
                {"from": "gpt", "value": "Red."},
            ],
        },
        {"id": "text-only", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    ]
    path = folder / "llava.json"
    path.write_text(json.dumps(entries))
    dataset = load_caption_dataset(path)  # image paths relative to the JSON's folder
    assert len(dataset) == 1 and dataset.dropped == 1
    example = dataset[0]
    assert example["caption"] is None and example["references"] == ["A red circle."]
    messages = example_messages(example)
    assert messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "What shapes are there?"}]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]


def test_jsonl_and_csv_rows(tmp_path, image_folder):
    folder, names, images = image_folder
    rows = [{"file_name": f"images/{n}", "text": c} for n, c in zip(names, CAPTIONS)]
    rows.append({"file_name": "images/img0.png", "text": "another caption of image 0"})
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    csv_path = tmp_path / "data.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "description"])
        writer.writeheader()
        writer.writerows({"path": r["file_name"], "description": r["text"]} for r in rows)
    for path in (jsonl, csv_path):
        dataset = load_caption_dataset(path)
        assert len(dataset.records) == 4 and len(dataset) == 5
        assert dataset.records[0].captions == ["a red circle", "another caption of image 0"]
        assert np.array_equal(_pixels(dataset[2]["image"]), _pixels(images[1]))
    with pytest.raises(ValueError, match="no caption column .nope.; its columns are"):
        load_caption_dataset(jsonl, caption_column="nope")


def test_datasets_object_and_saved_folder(tmp_path, make_image):
    datasets = pytest.importorskip("datasets")
    images = [make_image(seed, size=(32, 32)) for seed in range(3)]
    hf = datasets.Dataset.from_dict({"image": images, "caption": CAPTIONS[:3]})
    hf = hf.cast_column("image", datasets.Image())
    in_memory = load_caption_dataset(hf)
    assert len(in_memory) == 3
    assert np.array_equal(_pixels(in_memory[2]["image"]), _pixels(images[2]))
    datasets.DatasetDict({"train": hf, "validation": hf.select([0])}).save_to_disk(str(tmp_path / "hf"))
    saved = load_caption_dataset(tmp_path / "hf", split="validation")
    assert len(saved) == 1 and saved[0]["caption"] == CAPTIONS[0]
    assert np.array_equal(_pixels(saved[0]["image"]), _pixels(images[0]))


def test_in_memory_pairs_accept_images_paths_and_callables(image_folder, make_image):
    folder, names, images = image_folder
    dataset = load_caption_dataset(
        [
            (images[0], CAPTIONS[0]),
            (folder / names[1], CAPTIONS[1]),
            (lambda: make_image(7, size=(20, 20)), CAPTIONS[2]),
            {"image": str(folder / names[3]), "caption": [CAPTIONS[3], "four"]},
        ]
    )
    assert len(dataset) == 5
    assert np.array_equal(_pixels(dataset[2]["image"]), _pixels(make_image(7, size=(20, 20))))
    with pytest.raises(ValueError, match="pairs"):
        load_caption_dataset([("only one",)])
    with pytest.raises(FileNotFoundError, match="not found"):
        load_caption_dataset("/nonexistent/captions.jsonl")


def test_missing_and_corrupt_images_are_skipped_and_reported(image_folder, tiny):
    folder, names, _ = image_folder
    pairs = [
        (folder / names[0], "zero"),
        (folder / "gone.png", "missing"),
        (folder / "corrupt.png", "corrupt"),
        (folder / names[1], "one"),
    ]
    dataset = load_caption_dataset(pairs)
    example = dataset[1]  # missing -> corrupt -> the next readable example
    assert example["caption"] == "one" and example["index"] == 3
    assert [(kind, record_id) for kind, record_id, _ in example["skipped"]] == [
        ("missing", str(folder / "gone.png")),
        ("corrupt", str(folder / "corrupt.png")),
    ]
    strict = load_caption_dataset(pairs, resample_bad=False)
    with pytest.raises(ImageLoadError) as error:
        strict[2]
    assert error.value.kind == "corrupt"
    batch = CaptionCollator(tiny[1])([dataset[i] for i in range(4)])
    assert len(batch["skipped"]) == 3 and batch["input_ids"].shape[0] == 4  # the batch stays full


# ----------------------------------------------------------------------------------------------------------
# Label masking
# ----------------------------------------------------------------------------------------------------------


def test_labels_token_by_token_against_the_chat_template(tiny, make_image):
    _, processor = tiny
    tokenizer = processor.tokenizer
    image, caption = make_image(0), "a blue square and a green triangle"
    dataset = load_caption_dataset([(image, caption), (make_image(1), "a dot")], seed=3)
    example = dataset[0]
    batch = CaptionCollator(processor)([example, dataset[1]])
    assert batch["input_ids"].shape[0] == 2 and batch["skipped"] == []

    # Reference: the processor on the chat template's rendering of the same conversation.
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": example["instruction"]}]},
        {"role": "assistant", "content": caption},
    ]
    full_text = processor.apply_chat_template(messages, tokenize=False)
    prompt_text = processor.caption_prompt(example["instruction"])  # the inference prompt
    assert full_text.startswith(prompt_text)
    full = processor(images=[image], text=[full_text])["input_ids"][0].tolist()
    prompt = processor(images=[image], text=[prompt_text])["input_ids"][0].tolist()
    assert full[: len(prompt)] == prompt
    answer = tokenizer(caption + "<|im_end|>", add_special_tokens=False)["input_ids"]
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert full[len(prompt) :] == answer + newline

    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    mask = batch["attention_mask"][0].tolist()
    assert ids[: len(full)] == full and mask == [1] * len(full) + [0] * (len(ids) - len(full))
    expected = [IGNORE_INDEX] * len(prompt) + answer + [IGNORE_INDEX] * len(newline)
    expected += [IGNORE_INDEX] * (len(ids) - len(full))  # right padding
    for position, (token, label, want) in enumerate(zip(ids, labels, expected)):
        assert label == want, f"token {position} {tokenizer.decode([token])!r}: label {label}, expected {want}"
    assert labels[len(prompt) + len(answer) - 1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all(label == IGNORE_INDEX for token, label in zip(ids, labels) if token == processor.image_token_id)
    assert processor.image_seq_length == sum(token == processor.image_token_id for token in ids)
    # Right padding: the shorter sample's labels end in -100 padding, its text is left-aligned.
    assert batch["attention_mask"][1, 0] == 1


def test_every_assistant_turn_is_learnt_in_a_conversation(tiny, make_image):
    _, processor = tiny
    tokenizer = processor.tokenizer
    turns = [
        {"role": "user", "content": "<image>\nWhat shapes?"},
        {"role": "assistant", "content": "A circle."},
        {"role": "user", "content": "Colour?"},
        {"role": "assistant", "content": "Red."},
    ]
    example = {"image": make_image(2), "conversation": turns, "skipped": []}
    batch = CaptionCollator(processor)([example])
    learnt = [t for t, label in zip(batch["input_ids"][0].tolist(), batch["labels"][0].tolist()) if label != -100]
    assert learnt == tokenizer("A circle.<|im_end|>Red.<|im_end|>", add_special_tokens=False)["input_ids"]


def test_max_length_cuts_answers_but_never_image_tokens(tiny, make_image):
    _, processor = tiny
    dataset = load_caption_dataset([(make_image(0), "a red circle and a blue square and more words")])
    full = CaptionCollator(processor)([dataset[0]])["input_ids"].shape[1]
    cut = CaptionCollator(processor, max_length=full - 3)([dataset[0]])
    assert cut["input_ids"].shape[1] == cut["labels"].shape[1] == full - 3
    with pytest.raises(ValueError, match="image placeholders"):
        CaptionCollator(processor, max_length=processor.image_seq_length)([dataset[0]])


def test_instruction_sampling_is_seeded_per_example(make_image):
    pairs = [(make_image(0), "x")] * 30
    first, again = load_caption_dataset(pairs, seed=1), load_caption_dataset(pairs, seed=1)
    phrasings = [first[i]["instruction"] for i in range(30)]
    assert phrasings == [again[i]["instruction"] for i in reversed(range(30))][::-1]
    assert len(set(phrasings)) > 1
    assert phrasings != [load_caption_dataset(pairs, seed=2)[i]["instruction"] for i in range(30)]
