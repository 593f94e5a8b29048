"""`caption_dataset` / `mqwen-caption --output` in one process: every input format, error rows, resume, the
manifest check, and bad inputs refused before any work (the Ray engine: test_caption_ray.py)."""

import json

import pytest
import torch
from caption_data import BROKEN, MAX_IMAGE_PIXELS, check_rows, image_bytes, key, write_parquet, write_tars

pytest.importorskip("webdataset", reason="the caption extra is not installed")

from mqwen.caption.cli import main  # noqa: E402
from mqwen.caption.dataset import caption_dataset  # noqa: E402
from mqwen.caption.inputs import InputError, decode_image  # noqa: E402
from mqwen.caption.shards import MANIFEST, OutputError, read_output, read_shard  # noqa: E402

N = 36  # every kind of BROKEN image, and 31 good ones
SETTINGS = dict(max_new_tokens=6, batch_size=4, max_image_pixels=MAX_IMAGE_PIXELS, progress=False, device="cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("caption-data")
    write_tars(root / "shards", N, 3)
    write_parquet(root / "images.parquet", N, row_group_size=5)
    return root


@pytest.fixture(scope="module")
def one_by_one(tiny_dir):
    """key -> caption of each good image generated alone with `generate` (the reference)."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(tiny_dir, trust_remote_code=True)
    captions = {}
    for i in range(N):
        if i not in BROKEN:
            inputs = processor(images=[decode_image(image_bytes(i))], return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
            captions[key(i)] = processor.decode_captions(out, inputs["input_ids"].shape[1])[0]
    assert len(set(captions.values())) > 1, "the reference captions should depend on the image"
    return captions


def good(captions):
    return {k: c for k, c in captions.items() if int(k) not in BROKEN}


def test_tars_parquet_and_datasets_folder_give_the_one_by_one_captions(tiny_dir, data, one_by_one, tmp_path):
    import datasets

    cells = [None if BROKEN.get(i) == "no image member" else {"bytes": image_bytes(i), "path": None} for i in range(N)]
    features = datasets.Features({"key": datasets.Value("string"), "image": datasets.Image()})
    table = datasets.Dataset.from_dict({"key": [key(i) for i in range(N)], "image": cells}, features=features)
    table.save_to_disk(str(tmp_path / "hf"))

    inputs = {"tars": [str(data / "shards" / "{00000..00002}.tar")], "parquet": [str(data / "images.parquet")]}
    inputs["datasets"] = [str(tmp_path / "hf")]
    for name, paths in inputs.items():
        report = caption_dataset(paths, str(tiny_dir), tmp_path / name, shard_size=10, **SETTINGS)
        rows = read_output(tmp_path / name)
        assert good(check_rows(rows, N)) == one_by_one, name
        assert (report.captioned, report.errors, report.already_done) == (N, len(BROKEN), 0), name
    errors = {row["key"]: row["error"] for row in read_output(tmp_path / "tars") if row["error"]}
    assert "0 bytes" in errors[key(3)] and "truncated" in errors[key(10)] and "PIL" in errors[key(17)]
    assert "over the limit" in errors[key(24)] and "no image member" in errors[key(31)]
    assert len(read_output(tmp_path / "tars")) == N and len(list((tmp_path / "tars").glob("part-*"))) == 3
    assert len(list((tmp_path / "parquet").glob("part-*"))) == 4  # row groups of 5 gathered into units of >= 10


def test_resume_captions_only_what_no_completed_shard_holds(tiny_dir, data, tmp_path):
    out = tmp_path / "captions"
    first = caption_dataset([str(data / "images.parquet")], str(tiny_dir), out, shard_size=5, **SETTINGS)
    shards = sorted(out.glob("part-*.parquet"))
    assert len(shards) == len(first.shards) == 8
    lost = shards[2]
    lost_keys = {row["key"] for row in read_shard(lost)}
    lost.unlink()  # as if the job had been killed before that shard was renamed into place
    stale = out / ".part-r001-00009.parquet.99999.tmp.parquet"
    stale.write_bytes(b"half a shard")
    kept = {shard.name: shard.read_bytes() for shard in out.glob("part-*")}

    second = caption_dataset([str(data / "images.parquet")], str(tiny_dir), out, shard_size=5, **SETTINGS)
    assert (second.already_done, second.captioned) == (N - len(lost_keys), len(lost_keys))
    assert {row["key"] for row in read_shard(second.shards[0])} == lost_keys
    assert second.shards[0].name.startswith("part-r002-"), "a rerun numbers its shards after the last run's"
    assert {name: (out / name).read_bytes() for name in kept} == kept and not stale.exists()
    check_rows(read_output(out), N)

    third = caption_dataset([str(data / "images.parquet")], str(tiny_dir), out, shard_size=5, **SETTINGS)
    assert (third.already_done, third.captioned, third.shards) == (N, 0, [])


def test_a_folder_of_other_settings_is_refused_and_overwrite_starts_over(tiny_dir, data, tmp_path):
    out = tmp_path / "captions"
    tar = [str(data / "shards" / "00000.tar")]
    caption_dataset(tar, str(tiny_dir), out, **SETTINGS)
    with pytest.raises(OutputError, match="prompt=None, not prompt='Describe it.'.*--overwrite"):
        caption_dataset(tar, str(tiny_dir), out, prompt="Describe it.", **SETTINGS)
    with pytest.raises(OutputError, match="max_new_tokens"):
        caption_dataset(tar, str(tiny_dir), out, **dict(SETTINGS, max_new_tokens=3))
    report = caption_dataset(tar, str(tiny_dir), out, prompt="Describe it.", overwrite=True, **SETTINGS)
    assert report.already_done == 0 and [p.name for p in out.glob("part-*")] == ["part-r001-00001.parquet"]
    assert json.loads((out / MANIFEST).read_text())["prompt"] == "Describe it."

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not written by mqwen-caption"):
        caption_dataset(tar, str(tiny_dir), foreign, overwrite=True, **SETTINGS)


def test_bad_inputs_are_refused_before_any_work(tiny_dir, data, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "never-made"
    (tmp_path / "broken.tar").write_bytes(b"this is not a tar file" * 40)
    pq.write_table(pa.table({"key": [key(0)], "image": [image_bytes(0)]}), tmp_path / "again.parquet")
    pq.write_table(pa.table({"id": ["a"], "pixels": [b"x"]}), tmp_path / "odd.parquet")
    cases = {
        "no such file or folder": [str(tmp_path / "missing.tar")],
        "matches nothing": [str(tmp_path / "shards-*.tar")],
        r"shards-3.tar \(no such file": [str(tmp_path / "shards-{0..3}.tar")],
        "cannot read the tar shard": [str(tmp_path / "broken.tar")],
        "appears twice": [str(data / "images.parquet"), str(tmp_path / "again.parquet")],
        "no image column": [str(tmp_path / "odd.parquet")],
    }
    for message, inputs in cases.items():
        with pytest.raises(InputError, match=message):
            caption_dataset(inputs, str(tiny_dir), out, **SETTINGS)
    with pytest.raises(InputError, match="no column 'name'"):
        caption_dataset(
            [str(tmp_path / "odd.parquet")], str(tiny_dir), out, image_column="pixels", key_column="name", **SETTINGS
        )
    assert not out.exists(), "nothing is written for inputs that cannot be captioned"


def test_cli_output_folder_jsonl_and_stdout_refuses_datasets(tiny_dir, data, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in (0, 1, 2, 3):  # 3 is a zero-byte file
        (folder / f"{key(i)}.{'png' if i % 2 else 'jpg'}").write_bytes(image_bytes(i))
    argv = [str(folder), "--model", str(tiny_dir), "--max-new-tokens", "6", "--no-progress", "--device", "cpu"]
    assert main([*argv, "--output", str(tmp_path / "out"), "--format", "jsonl"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "4 rows written" in err and "1 images could not be read" in err
    rows = read_output(tmp_path / "out")
    assert [row["key"] for row in rows] == sorted(str(p) for p in folder.iterdir())
    assert rows[3]["error"] == "the image is empty (0 bytes)" and rows[3]["caption"] is None
    assert all(isinstance(row["caption"], str) for row in rows[:3])

    assert main([str(data / "shards" / "00000.tar"), "--model", str(tiny_dir)]) == 2
    assert "add --output DIR" in capsys.readouterr().err
    assert main([*argv, "--output", str(tmp_path / "out"), "--prompt", "Other"]) == 2
    assert "--overwrite" in capsys.readouterr().err
