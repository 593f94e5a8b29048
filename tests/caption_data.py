"""Image datasets for the dataset-captioning tests: the same images as WebDataset tar shards and as Parquet,
some of them broken in each way `caption/inputs.py` must turn into an error row."""

import io
import json
import tarfile

from conftest import random_image

# key index -> what is wrong with it (the same in the tars and the Parquet file)
BROKEN = {3: "zero-byte", 10: "truncated", 17: "corrupt", 24: "oversized", 31: "no image member"}
OVERSIZED = (300, 300)  # over the tests' max_image_pixels
MAX_IMAGE_PIXELS = 200 * 200


def image_bytes(i):
    """A small random image, JPEG or PNG by turns; broken ones as BROKEN says."""
    kind = BROKEN.get(i)
    size = OVERSIZED if kind == "oversized" else (36 + i % 11, 44 + i % 5)
    buffer = io.BytesIO()
    random_image(i, size=size).save(buffer, format="PNG" if i % 2 else "JPEG")
    data = buffer.getvalue()
    if kind == "zero-byte":
        return b""
    if kind == "truncated":
        return data[: len(data) // 3]
    if kind == "corrupt":
        return b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    return data


def key(i):
    return f"{i:09d}"


def write_tars(folder, n_images, n_shards):
    """img2dataset's layout: shards/{00000..N}.tar, each sample KEY.jpg|png + KEY.json + KEY.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    per_shard = -(-n_images // n_shards)
    for shard in range(n_shards):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i in range(shard * per_shard, min(n_images, (shard + 1) * per_shard)):
                members = [("json", json.dumps({"key": key(i)}).encode()), ("txt", f"image {i}".encode())]
                if BROKEN.get(i) != "no image member":
                    members.insert(0, ("png" if i % 2 else "jpg", image_bytes(i)))
                for ext, data in members:
                    info = tarfile.TarInfo(f"{key(i)}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return [folder / f"{shard:05d}.tar" for shard in range(n_shards)]


def write_parquet(path, n_images, row_group_size):
    """The same images as a Parquet table (key, image bytes); the "no image member" row is a null cell."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cells = [None if BROKEN.get(i) == "no image member" else image_bytes(i) for i in range(n_images)]
    table = pa.table({"key": [key(i) for i in range(n_images)], "image": pa.array(cells, pa.binary())})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def check_rows(rows, n_images):
    """Every key exactly once; the broken ones error rows (caption null), the others captions (error null)."""
    keys = [row["key"] for row in rows]
    assert sorted(keys) == [key(i) for i in range(n_images)], "each key exactly once"
    by_key = {row["key"]: row for row in rows}
    for i in range(n_images):
        row = by_key[key(i)]
        if i in BROKEN:
            assert row["caption"] is None and row["error"], (i, row)
        else:
            assert row["error"] is None and isinstance(row["caption"], str), (i, row)
    return {k: row["caption"] for k, row in by_key.items()}
