"""Caption data: every supported source becomes a list of `CaptionRecord`s behind one `CaptionDataset`.

Sources (`load_caption_dataset(spec)`):

- COCO captions JSON (`{"images": [...], "annotations": [...]}`) with an image folder;
- LLaVA-style conversation JSON (`[{"image": ..., "conversations": [{"from": "human", "value": "<image>..."},
  {"from": "gpt", "value": ...}]}]`);
- JSONL or CSV/TSV with an image-path column and a caption column;
- a Hugging Face `datasets` dataset with an image column and a caption column: a `Dataset` object, a
  `save_to_disk` folder, or a Hub id (`hf://owner/name`);
- in Python, a list of `(image, caption)` pairs (PIL image, array, path or a zero-argument callable that
  returns one) or of dicts with image and caption keys.

Images load lazily, in `__getitem__`. A missing or unreadable image never stops a run: the dataset moves on
to the next example and reports what it skipped with the example (`"skipped"`), so the trainer can count
skips in the main process even when images load in DataLoader workers.
"""

import csv
import io
import json
import os
import random
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from PIL import Image
from torch.utils.data import Dataset

from ..processing_mqwen import to_rgb_image

if TYPE_CHECKING:
    from PIL import Image

from .config import CAPTION_INSTRUCTIONS

IMAGE_COLUMNS = ("image", "image_path", "img", "file_name", "filename", "image_file", "path", "file")
CAPTION_COLUMNS = ("caption", "captions", "text", "sentence", "sentences", "description", "raw")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
HF_PREFIX = "hf://"


@dataclass
class CaptionRecord:
    """One image and what should be said about it.

    `image` is anything `load_image` reads (path, PIL image, array, bytes, `{"bytes", "path"}` dict, or a
    zero-argument callable). `captions` are the reference captions (COCO has about five per image); each is
    one training example. `conversation`, for LLaVA-style data, replaces the sampled caption prompt: a list of
    `{"role": "user"|"assistant"|"system", "content": str}` where `<image>` marks the image.
    """

    id: str
    image: Any
    captions: list = field(default_factory=list)
    conversation: Optional[list] = None


class ImageLoadError(Exception):
    """An image could not be loaded; `kind` is "missing" or "corrupt"."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def load_image(source: Any) -> "Image.Image":
    """Any image source of a `CaptionRecord` as an RGB PIL image, or `ImageLoadError`."""
    try:
        if callable(source) and not hasattr(source, "convert"):
            source = source()
        if isinstance(source, _HFImageRef):
            source = source.fetch()
        if isinstance(source, dict):
            source = source.get("bytes") or source.get("path")
        if source is None:
            raise FileNotFoundError("the example has no image")
        if isinstance(source, (bytes, bytearray)):
            with Image.open(io.BytesIO(source)) as opened:
                opened.load()
                source = opened.copy()
        return to_rgb_image(source)
    except FileNotFoundError as error:
        raise ImageLoadError("missing", str(error)) from error
    except Exception as error:  # truncated file, not an image, unreadable array...
        raise ImageLoadError("corrupt", f"{type(error).__name__}: {error}") from error


class SkipReport:
    """Images that could not be loaded, by kind ("missing" / "corrupt"), each counted once by record id."""

    def __init__(self):
        self.skipped = {"missing": {}, "corrupt": {}}
        self.occurrences = 0

    def add(self, kind: str, record_id: object, detail: str) -> None:
        self.skipped.setdefault(kind, {})[str(record_id)] = detail
        self.occurrences += 1

    def update(self, entries: Iterable[tuple[str, object, str]] | None) -> None:
        """Add `(kind, record_id, detail)` triples (the `"skipped"` entries of examples and batches)."""
        for kind, record_id, detail in entries or ():
            self.add(kind, record_id, detail)

    def merge(self, other: "SkipReport") -> None:
        for kind, entries in other.skipped.items():
            self.skipped.setdefault(kind, {}).update(entries)
        self.occurrences += other.occurrences

    @property
    def missing(self) -> int:
        return len(self.skipped["missing"])

    @property
    def corrupt(self) -> int:
        return len(self.skipped["corrupt"])

    def __len__(self):
        return sum(len(v) for v in self.skipped.values())

    def to_dict(self, max_listed: int = 50) -> dict:
        return {
            "missing": self.missing,
            "corrupt": self.corrupt,
            "skipped_loads": self.occurrences,
            "examples": {k: dict(list(v.items())[:max_listed]) for k, v in self.skipped.items() if v},
        }

    def summary(self) -> str:
        if not len(self):
            return "All images loaded."
        lines = [
            f"Skipped {len(self)} unreadable images ({self.missing} missing, {self.corrupt} corrupt; "
            f"{self.occurrences} skipped loads in all):"
        ]
        for kind, entries in self.skipped.items():
            for record_id, detail in list(entries.items())[:5]:
                lines.append(f"  {kind}: {record_id}: {detail}")
        return "\n".join(lines)


class CaptionDataset(Dataset):
    """Training examples over `CaptionRecord`s: one per (record, caption), one per conversation record.

    `__getitem__` returns `{"index", "id", "image" (RGB PIL), "caption", "instruction", "conversation",
    "references", "skipped"}`. With `resample_bad=True` (training) an unreadable image is replaced by the next
    readable example and listed in `"skipped"`; with `False` it raises `ImageLoadError`.

    The instruction is drawn from `instructions` with a generator seeded by `(seed, index)`: the same example
    always gets the same phrasing, so a resumed run sees exactly the data an uninterrupted one would.
    """

    def __init__(self, records, instructions=CAPTION_INSTRUCTIONS, seed=0, resample_bad=True, source=None, dropped=0):
        self.records = list(records)
        self.instructions = tuple(instructions)
        self.seed = seed
        self.resample_bad = resample_bad
        self.source = source
        self.dropped = dropped  # records without any image reference, dropped when loading
        self._examples = []
        for r, record in enumerate(self.records):
            if record.conversation is not None:
                self._examples.append((r, -1))
            else:
                self._examples.extend((r, c) for c in range(len(record.captions)))
        if not self._examples:
            raise ValueError(f"No examples with both an image and a caption in {source or 'the data'}.")

    def __len__(self):
        return len(self._examples)

    def __repr__(self):
        return (
            f"CaptionDataset({len(self.records)} images, {len(self)} examples"
            + (f", from {self.source}" if self.source else "")
            + ")"
        )

    def with_options(self, **kwargs) -> "CaptionDataset":
        """A copy with other `instructions`, `seed` or `resample_bad` (the records are shared)."""
        options = dict(
            instructions=self.instructions,
            seed=self.seed,
            resample_bad=self.resample_bad,
            source=self.source,
            dropped=self.dropped,
        )
        options.update(kwargs)
        return CaptionDataset(self.records, **options)

    def caption_words(self) -> list:
        """Words in each example's caption (for a conversation, in its assistant turns), in dataset order,
        without loading any image: what `ShortCaptionsFirstSampler` sorts by."""
        counts = []
        for r, c in self._examples:
            record = self.records[r]
            if c >= 0:
                counts.append(len(record.captions[c].split()))
            else:
                counts.append(
                    sum(
                        len(str(turn.get("content", "")).split())
                        for turn in record.conversation
                        if turn.get("role") == "assistant"
                    )
                )
        return counts

    def instruction_for(self, index: int) -> str:
        return random.Random(self.seed * 1_000_003 + index).choice(self.instructions)

    def __getitem__(self, index):
        skipped = []
        n = len(self)
        for attempt in range(n):
            position = (index + attempt) % n
            r, c = self._examples[position]
            record = self.records[r]
            try:
                image = load_image(record.image)
            except ImageLoadError as error:
                if not self.resample_bad:
                    raise
                skipped.append((error.kind, record.id, str(error)))
                continue
            return {
                "index": position,
                "id": record.id,
                "image": image,
                "caption": record.captions[c] if c >= 0 else None,
                "instruction": self.instruction_for(position),
                "conversation": record.conversation,
                "references": list(record.captions),
                "skipped": skipped,
            }
        raise RuntimeError(f"None of the {len(self.records)} images of {self.source or 'the data'} could be read.")


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------


def load_caption_dataset(
    spec: Any,
    image_root: Optional[str] = None,
    image_column: Optional[str] = None,
    caption_column: Optional[str] = None,
    split: Optional[str] = None,
    instructions: tuple = CAPTION_INSTRUCTIONS,
    seed: int = 0,
    resample_bad: bool = True,
) -> CaptionDataset:
    """Read caption data from any supported source (see the module docstring) into a `CaptionDataset`.

    Args:
        spec: a path (COCO/LLaVA `.json`, `.jsonl`, `.csv`, `.tsv`, a `datasets.save_to_disk` folder), a
            Hub dataset id (`hf://owner/name`), a `datasets.Dataset`/`DatasetDict`, a list of
            `(image, caption)` pairs or dicts, or a `CaptionDataset` (returned with the given options).
        image_root: folder relative image paths are resolved against (default: the data file's folder).
        image_column, caption_column: column names of tabular and `datasets` sources (default: detected).
        split: split of a `DatasetDict` / Hub dataset (default "train", or the only split).
        instructions, seed: caption instructions and the seed of their per-example sampling.
        resample_bad: skip unreadable images by moving to the next example (training), or raise (False).
    """
    options = dict(instructions=instructions, seed=seed, resample_bad=resample_bad)
    if isinstance(spec, CaptionDataset):
        return spec.with_options(**options)
    if _is_hf_dataset(spec):
        return _from_hf(spec, image_root, image_column, caption_column, split, options, source="datasets object")
    if isinstance(spec, (list, tuple)):
        records, dropped = _from_items(spec, image_root, image_column, caption_column)
        return CaptionDataset(records, source=f"list of {len(spec)}", dropped=dropped, **options)
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(
            f"Unsupported data spec of type {type(spec).__name__}: pass a path, a Hub dataset id "
            "('hf://owner/name'), a datasets.Dataset, or a list of (image, caption) pairs."
        )
    text = str(spec)
    if text.startswith(HF_PREFIX):
        import datasets  # optional: the train extra

        dataset = datasets.load_dataset(text[len(HF_PREFIX) :], split=split or "train")
        return _from_hf(dataset, image_root, image_column, caption_column, None, options, source=text)
    path = Path(text).expanduser()
    if path.is_dir():
        return _from_saved_dataset(path, image_root, image_column, caption_column, split, options)
    if not path.is_file():
        raise FileNotFoundError(
            f"Data {text!r} not found. Pass a COCO or LLaVA .json, a .jsonl/.csv/.tsv, a datasets folder, or a "
            "Hub dataset as 'hf://owner/name'."
        )
    root = Path(image_root) if image_root is not None else path.parent
    records, dropped = _records_from_file(path, root, image_column, caption_column)
    return CaptionDataset(records, source=str(path), dropped=dropped, **options)


def _from_saved_dataset(path: Path, image_root, image_column, caption_column, split, options) -> CaptionDataset:
    """A `datasets.save_to_disk` folder; any other folder is an error that says what to pass instead."""
    if not any((path / marker).exists() for marker in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise ValueError(
            f"{str(path)!r} is a folder but not a `datasets.save_to_disk` folder. Pass the annotation file "
            "instead (COCO/LLaVA .json, .jsonl, .csv) and the image folder with --image-root."
        )
    import datasets  # optional: the train extra

    dataset = datasets.load_from_disk(str(path))
    return _from_hf(dataset, image_root or path, image_column, caption_column, split, options, source=str(path))


def _records_from_file(path: Path, root: Path, image_column, caption_column) -> tuple:
    """(records, dropped) from an annotation file, by its suffix and, for .json, its shape (COCO, LLaVA, rows)."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        content = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(content, dict) and "annotations" in content and "images" in content:
            return _from_coco(content, root)
        if isinstance(content, list) and content and isinstance(content[0], dict) and "conversations" in content[0]:
            return _from_llava(content, root)
        if isinstance(content, list):
            return _from_rows(content, root, image_column, caption_column, str(path))
        raise ValueError(
            f"{str(path)!r} is neither COCO captions JSON (with 'images' and 'annotations'), LLaVA JSON "
            "(a list of entries with 'conversations'), nor a list of {image, caption} rows."
        )
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return _from_rows(rows, root, image_column, caption_column, str(path))
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ","))
        return _from_rows(rows, root, image_column, caption_column, str(path))
    raise ValueError(f"Unsupported data file {str(path)!r}: use .json (COCO or LLaVA), .jsonl, .csv or .tsv.")


def _resolve(image, root):
    if isinstance(image, (str, os.PathLike)):
        image = Path(image).expanduser()
        return str(image if image.is_absolute() or root is None else Path(root) / image)
    return image


def _pick_column(columns, requested, candidates, what, flag, source):
    if requested is not None:
        if requested not in columns:
            raise ValueError(f"{source} has no {what} column {requested!r}; its columns are {sorted(columns)}.")
        return requested
    for name in candidates:
        if name in columns:
            return name
    raise ValueError(f"Could not find the {what} column of {source} (columns: {sorted(columns)}); name it with {flag}.")


def _as_captions(value):
    if value is None:
        return []
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    if isinstance(value, dict):  # {"raw": ...} style
        value = value.get("raw") or value.get("caption") or value.get("text")
        return _as_captions(value)
    return [c for item in value for c in _as_captions(item)]


def _from_coco(content, root):
    images = {image["id"]: image for image in content["images"]}
    grouped = OrderedDict()
    for annotation in content["annotations"]:
        grouped.setdefault(annotation["image_id"], []).extend(_as_captions(annotation.get("caption")))
    records = [
        CaptionRecord(id=str(image_id), image=_resolve(images[image_id]["file_name"], root), captions=captions)
        for image_id, captions in grouped.items()
        if image_id in images and captions
    ]
    return records, len(grouped) - len(records)


def _from_llava(entries, root):
    records, dropped = [], 0
    for position, entry in enumerate(entries):
        image = entry.get("image")
        turns = [
            {"role": ROLES.get(turn.get("from", turn.get("role"))), "content": turn.get("value", turn.get("content"))}
            for turn in entry.get("conversations", [])
        ]
        if image is None or not any(t["role"] == "assistant" for t in turns):
            dropped += 1
            continue
        bad = [t for t in turns if t["role"] is None or not isinstance(t["content"], str)]
        if bad:
            raise ValueError(
                f"LLaVA entry {entry.get('id', position)!r} has a turn that is not "
                f"{{'from': human|gpt|system, 'value': str}}: {bad[0]}"
            )
        captions = [t["content"].strip() for t in turns if t["role"] == "assistant"]
        records.append(
            CaptionRecord(
                id=str(entry.get("id", position)),
                image=_resolve(image, root),
                captions=captions[:1],
                conversation=turns,
            )
        )
    return records, dropped


def _from_rows(rows, root, image_column, caption_column, source):
    if not rows:
        raise ValueError(f"{source} holds no rows.")
    columns = set().union(*(row.keys() for row in rows if isinstance(row, dict)))
    image_key = _pick_column(columns, image_column, IMAGE_COLUMNS, "image", "--image-column", source)
    caption_key = _pick_column(columns, caption_column, CAPTION_COLUMNS, "caption", "--caption-column", source)
    grouped, dropped = OrderedDict(), 0
    for row in rows:
        image, captions = row.get(image_key), _as_captions(row.get(caption_key))
        if image in (None, "") or not captions:
            dropped += 1
            continue
        grouped.setdefault(str(image), []).extend(captions)
    records = [CaptionRecord(id=key, image=_resolve(key, root), captions=caps) for key, caps in grouped.items()]
    return records, dropped


def _from_items(items, image_root, image_column, caption_column):
    records, dropped = [], 0
    for position, item in enumerate(items):
        if isinstance(item, CaptionRecord):
            records.append(item)
            continue
        if isinstance(item, dict):
            keys = set(item)
            image = item[_pick_column(keys, image_column, IMAGE_COLUMNS, "image", "image_column", "the item")]
            caption = item[_pick_column(keys, caption_column, CAPTION_COLUMNS, "caption", "caption_column", "the item")]
            record_id = str(item.get("id", position))
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            image, caption = item
            record_id = str(image) if isinstance(image, (str, os.PathLike)) else str(position)
        else:
            raise ValueError(
                f"Data item {position} is {type(item).__name__}; pass (image, caption) pairs or dicts with "
                "image and caption keys."
            )
        captions = _as_captions(caption)
        if image is None or not captions:
            dropped += 1
            continue
        records.append(CaptionRecord(id=record_id, image=_resolve(image, image_root), captions=captions))
    return records, dropped


# -- datasets ----------------------------------------------------------------------------------------------


def _is_hf_dataset(obj) -> bool:
    module = type(obj).__module__ or ""
    return module.startswith("datasets") and type(obj).__name__ in ("Dataset", "DatasetDict")


class _HFImageRef:
    """A lazy reference to one image cell of a `datasets.Dataset` (decoded only when loaded)."""

    __slots__ = ("dataset", "row", "column", "root")

    def __init__(self, dataset, row, column, root):
        self.dataset, self.row, self.column, self.root = dataset, row, column, root

    def fetch(self) -> "Image.Image | str":
        value = self.dataset[self.row][self.column]
        if isinstance(value, dict) and not value.get("bytes") and value.get("path"):
            return _resolve(value["path"], self.root)
        return _resolve(value, self.root) if isinstance(value, str) else value


def _from_hf(dataset, image_root, image_column, caption_column, split, options, source):
    import datasets  # optional: the train extra

    if isinstance(dataset, datasets.DatasetDict):
        if split is None:
            split = "train" if "train" in dataset else (next(iter(dataset)) if len(dataset) == 1 else None)
        if split not in dataset:
            raise ValueError(f"{source} has splits {sorted(dataset)}; choose one with --split.")
        source = f"{source}[{split}]"
        dataset = dataset[split]
    columns = set(dataset.column_names)
    image_key = _pick_column(columns, image_column, IMAGE_COLUMNS, "image", "--image-column", source)
    caption_key = _pick_column(columns, caption_column, CAPTION_COLUMNS, "caption", "--caption-column", source)
    if isinstance(dataset.features[image_key], datasets.Image):
        # Decode in load_image (inside its error handling), not when the row is read.
        dataset = dataset.cast_column(image_key, datasets.Image(decode=False))
    captions = dataset[caption_key]
    records, dropped = [], 0
    image_only = dataset.select_columns([image_key])
    for row, caption in enumerate(captions):
        caps = _as_captions(caption)
        if not caps:
            dropped += 1
            continue
        records.append(
            CaptionRecord(id=str(row), image=_HFImageRef(image_only, row, image_key, image_root), captions=caps)
        )
    return CaptionDataset(records, source=source, dropped=dropped, **options)
