"""The synthetic shapes-captioning task: seeded images of coloured shapes and their exact captions.

Images: a plain light background with 1 to 3 non-overlapping shapes (each count equally often), each a
`circle`, `square` or `triangle` in `red`, `green`, `blue` or `yellow`, with random positions and sizes from
about 12 % of the image side up to 75 % for a shape alone (as much as the width allows for two or three). The
shapes occupy disjoint horizontal bands, so "left to right" is never ambiguous.

Caption grammar (nothing else, no trailing period)::

    caption := phrase
             | phrase " and " phrase
             | phrase ", " phrase " and " phrase
    phrase  := "a " colour " " shape
    colour  := "red" | "green" | "blue" | "yellow"
    shape   := "circle" | "square" | "triangle"

with the phrases in the left-to-right order of the shapes, e.g. "a red circle, a blue square and a green
triangle". `parse_caption` inverts `caption_for` and rejects anything outside the grammar.

Splits: every split draws from its own seed stream (`numpy.random.default_rng([seed, split_id, index])`),
so example `i` of a split is the same whatever the split's length.

Held-out arrangements: an image's arrangement is its left-to-right sequence of (colour, shape) pairs, i.e.
its caption. About one in six arrangements of two or three shapes is held out (`is_held_out`: a fixed
CRC-32 rule on the caption). `train` and `validation` never contain a held-out arrangement; every `test`
image with two or three shapes is one, so it shows colour-shape combinations in positions never seen
together in training, while every colour-shape pair in every position, and every pair of neighbours, is
still seen (`tests/test_demo_shapes.py` checks this over all 1,884 arrangements). A third of the test images
show a single shape (new images of the 12 single-shape captions), as in training. Test accuracy therefore
measures whether the model composes what it has seen, not whether it recalls captions.

`other_renderer.py` draws the same grammar with independent code and settings this module never uses: a
second test set, for whether the model learnt the task rather than this drawing.
"""

import json
import os
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

COLOURS = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (240, 200, 20),
}
SHAPES = ("circle", "square", "triangle")
MAX_SHAPES = 3

HELD_OUT_ONE_IN = 6
MIN_SIZE, MAX_SIZE_ALONE = 0.12, 0.75  # a shape's side, as a fraction of the image side


SPLITS = {"train": 0, "validation": 1, "test": 2}

_PHRASE = r"a (red|green|blue|yellow) (circle|square|triangle)"
_CAPTION_RE = re.compile(rf"^{_PHRASE}(?:(?:, {_PHRASE})? and {_PHRASE})?$")

# --augment: drawing sizes (none of other_renderer.py's 48/80/96/128), the most pixel noise, and the most each
# background channel is darkened on its own (a tinted light background; the plain task's channels differ by 11
# levels at most, and a model trained on that alone reads a tinted background as an extra shape)
AUGMENT_CANVASES = (56, 64, 72, 88, 104, 120)
AUGMENT_NOISE = 4.0
AUGMENT_TINT = 40
# Late in training (`DemoSettings.small_shapes_from_step`), augmented images may also draw every shape smaller about
# its centre, by one factor per image from [scale, 1] (drawn from its own random stream, so the rest of the image
# is the same): with 0.7, shapes reach down to 8.75 % of the side, under the task's 12.5 %, as real inputs and the
# other renderer's do (10 %). Early in training such shapes hold the model on its plateau (demo/EXPERIMENTS.md).
_SHRINK_STREAM = 99

_SUPERSAMPLE = 2  # shapes are drawn at 2x and each pixel averages its 2 x 2 samples, for anti-aliased edges
# (cheap on purpose: the one data-loader worker takes its time from the two cores that train)


@dataclass(frozen=True)
class ShapeSpec:
    """One shape: its kind, colour name, and bounding box (x0, y0, x1, y1) in pixels of the final image."""

    shape: str
    colour: str
    box: tuple


@dataclass
class Example:
    image: Image.Image
    caption: str
    shapes: tuple  # ShapeSpec, left to right


def caption_for(objects: Iterable[tuple[str, str] | ShapeSpec]) -> str:
    """The caption of shapes given left to right, as (colour, shape) pairs or `ShapeSpec`s."""
    phrases = [f"a {o.colour} {o.shape}" if isinstance(o, ShapeSpec) else f"a {o[0]} {o[1]}" for o in objects]
    if not 1 <= len(phrases) <= MAX_SHAPES:
        raise ValueError(f"A caption describes 1 to {MAX_SHAPES} shapes, got {len(phrases)}")
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def parse_caption(text: str) -> list[tuple[str, str]]:
    """[(colour, shape), ...] left to right; ValueError if `text` is not exactly in the caption grammar."""
    match = _CAPTION_RE.match(text)
    if match is None:
        raise ValueError(f"Not a shapes caption: {text!r} (expected e.g. 'a red circle and a blue square')")
    groups = [g for g in match.groups() if g is not None]
    return [(groups[i], groups[i + 1]) for i in range(0, len(groups), 2)]


def is_held_out(caption: str) -> bool:
    """Whether the arrangement with this caption is held out of training (only for 2 or 3 shapes)."""
    return " and " in caption and zlib.crc32(caption.encode()) % HELD_OUT_ONE_IN == 0


def sample_layout(
    rng: np.random.Generator, image_size: int, n: int | None = None
) -> tuple[tuple[ShapeSpec, ...], tuple[int, int, int]]:
    """Random shapes in disjoint horizontal bands, left to right, and a light background colour.

    `n` shapes (default: 1, 2 or 3, equally often). A shape's side is drawn uniformly from about 12 % of the
    image side up to 75 % for a shape alone, or up to what the width leaves for two or three.
    """
    n = int(rng.integers(1, MAX_SHAPES + 1)) if n is None else n
    margin, gap = max(1, image_size // 32), max(2, image_size // 16)
    smin = max(8, round(MIN_SIZE * image_size))
    smax = min(round(MAX_SIZE_ALONE * image_size), (image_size - 2 * margin - (n - 1) * gap) // n)
    sizes = rng.integers(smin, smax + 1, size=n)
    # Spread the leftover width randomly over the n + 1 spaces around the shapes.
    free = image_size - 2 * margin - (n - 1) * gap - int(sizes.sum())
    cuts = np.sort(rng.integers(0, free + 1, size=n))
    shapes, x = [], margin
    for i, size in enumerate(sizes):
        x0 = x + int(cuts[i] - (cuts[i - 1] if i else 0))
        y0 = int(rng.integers(margin, image_size - margin - size + 1))
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        shapes.append(ShapeSpec(shape, colour, (x0, y0, x0 + int(size), y0 + int(size))))
        x = x0 + int(size) + gap
    background = tuple(int(v) for v in 255 - rng.integers(0, 30) - rng.integers(0, 12, size=3))
    return tuple(shapes), background


def render(
    shapes: Sequence[ShapeSpec],
    background: tuple[int, int, int],
    image_size: int,
    rng: np.random.Generator | None = None,
    canvas: int | None = None,
    noise: float = 0.0,
    shrink: float = 1.0,
) -> Image.Image:
    """Draw `shapes` (ShapeSpecs, laid out for `image_size`) on a plain background.

    Colours get a small jitter when `rng` is given. `canvas` draws the same layout at another size (the
    processor resizes it to the vision tower's); `noise` adds uniform pixel noise of up to that many levels;
    `shrink` draws each shape at that fraction of its side, about its box's centre.
    """
    canvas = canvas or image_size
    s = _SUPERSAMPLE
    scale = s * canvas / image_size
    image = Image.new("RGB", (canvas * s, canvas * s), background)
    draw = ImageDraw.Draw(image)
    for spec in shapes:
        colour = np.array(COLOURS[spec.colour])
        if rng is not None:
            colour = np.clip(colour + rng.integers(-20, 21, size=3), 0, 255)
        fill = tuple(int(c) for c in colour)
        x0, y0, x1, y1 = (v * scale for v in spec.box)
        if shrink != 1.0:
            cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, shrink * (x1 - x0) / 2
            x0, y0, x1, y1 = cx - half, cy - half, cx + half, cy + half
        x1, y1 = x1 - 1, y1 - 1
        if spec.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif spec.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    image = image.reduce(s)  # each pixel the mean of its s x s samples
    if noise and rng is not None:
        pixels = np.asarray(image, dtype=np.float32) + (rng.random((canvas, canvas, 3), np.float32) * 2 - 1) * noise
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    return image


def _layout(split, index, seed, image_size):
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose one of {list(SPLITS)}")
    rng = np.random.default_rng([seed, SPLITS[split], index])
    n = int(rng.integers(1, MAX_SHAPES + 1))  # drawn first: every split has 1, 2 and 3 shapes equally often
    while True:  # rejection sampling keeps each split's distribution otherwise uniform
        shapes, background = sample_layout(rng, image_size, n)
        caption = caption_for(shapes)
        if n == 1 or is_held_out(caption) == (split == "test"):
            return shapes, background, rng


def make_example(
    split: str, index: int, seed: int = 0, image_size: int = 64, augment: bool = False, shrink_to: float = 1.0
) -> Example:
    """Example `index` of `split` ("train", "validation" or "test"), a pure function of its arguments.

    `augment` draws the image at a random size from `AUGMENT_CANVASES` with up to `AUGMENT_NOISE` levels of
    pixel noise, on a background whose channels are each darkened by up to `AUGMENT_TINT` levels (for
    training: the processor resizes every image, and real inputs come at any size and on any light ground).
    With `augment`, `shrink_to` < 1 also draws every shape at a random fraction in [shrink_to, 1] of its side,
    about its centre: the layout and the caption stay the same.
    """
    shapes, background, rng = _layout(split, index, seed, image_size)
    canvas, noise = None, 0.0
    if augment:
        canvas, noise = int(rng.choice(AUGMENT_CANVASES)), float(rng.uniform(0, AUGMENT_NOISE))
        background = tuple(int(v) for v in np.array(background) - rng.integers(0, AUGMENT_TINT + 1, size=3))
    shrink = 1.0
    if augment and shrink_to < 1.0:
        shrink = float(np.random.default_rng([seed, _SHRINK_STREAM, index]).uniform(shrink_to, 1.0))
    return Example(render(shapes, background, image_size, rng, canvas, noise, shrink), caption_for(shapes), shapes)


class LazyExample:
    """Example `index` of `split` with its caption known now and its image drawn only when called.

    A training set of a hundred thousand images then costs memory for captions only; the image is drawn
    (about half a millisecond) each time the data loader asks for it, identical every time. `shrink_to`
    (`make_example`) may be set before training starts, for the examples it will draw late.
    """

    __slots__ = ("split", "index", "seed", "image_size", "augment", "caption", "shrink_to")

    def __init__(self, split: str, index: int, seed: int = 0, image_size: int = 64, augment: bool = False):
        self.split, self.index, self.seed, self.image_size, self.augment = split, index, seed, image_size, augment
        self.caption = caption_for(_layout(split, index, seed, image_size)[0])
        self.shrink_to = 1.0

    def __call__(self):
        return make_example(self.split, self.index, self.seed, self.image_size, self.augment, self.shrink_to).image


def lazy_split(
    split: str, n: int, seed: int = 0, image_size: int = 64, progress: bool = False, augment: bool = False
) -> list:
    """The first `n` examples of `split` as `LazyExample`s (captions only, images on demand)."""
    indices = tqdm(range(n), desc=f"sampling {split} captions", unit="img", disable=not progress, leave=False)
    return [LazyExample(split, i, seed, image_size, augment) for i in indices]


def make_split(split: str, n: int, seed: int = 0, image_size: int = 64, progress: bool = False) -> list:
    """The first `n` examples of `split`."""
    indices = tqdm(range(n), desc=f"generating {split}", unit="img", disable=not progress, leave=False)
    return [make_example(split, i, seed, image_size) for i in indices]


def write_split(examples: Sequence[Example], out_dir: str | os.PathLike) -> Path:
    """Save a split as `NNNNN.png` files plus `captions.jsonl` ({"file", "caption"} per line); returns the dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "captions.jsonl", "w") as f:
        for i, example in enumerate(examples):
            name = f"{i:05d}.png"
            example.image.save(out_dir / name)
            f.write(json.dumps({"file": name, "caption": example.caption}) + "\n")
    return out_dir
