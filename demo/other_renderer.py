"""A second, independent drawing of the shapes task: the same caption grammar, other code and other settings.

A model that learnt the task (which shape, which colour, in which order) captions these as well as the main
test split; a model that learnt `shapes.py`'s drawing does not. Nothing here is shared with `shapes.py` but
the grammar (`caption_for`) and the colour names. What differs from the training data:

- the rasteriser: shapes are coverage masks computed here with numpy (4 x 4 samples per pixel, centred
  geometry), not PIL's polygon and ellipse filling, downsampled;
- image sizes 48, 80, 96 and 128 px (training uses 64; the processor resizes);
- sizes from 10 % of the side (training: 12 %) up to 75 % for a shape alone;
- background: each channel drawn in 200-255 independently (the task: 214-255, channels within 11 levels of
  each other; training's `--augment` then darkens each channel by up to 40, so the ranges overlap), plus a
  faint left-to-right brightness ramp and Gaussian pixel noise (training: uniform); shape colours jittered by
  up to 30 per channel (training: 20);
- every arrangement may appear (the held-out rule of the main test split does not apply: this set tests the
  drawing, not composition).
"""

from dataclasses import dataclass

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .shapes import COLOURS, MAX_SHAPES, SHAPES, caption_for

IMAGE_SIZES = (48, 80, 96, 128)
_SAMPLES = 4  # coverage samples per pixel along each axis
_SEED_STREAM = 7  # keeps this set's random stream apart from shapes.py's splits (0, 1, 2)


@dataclass(frozen=True)
class DrawnShape:
    shape: str
    colour: str
    centre: tuple  # (x, y) in pixels
    side: float  # the bounding square's side in pixels


@dataclass
class OtherExample:
    image: Image.Image
    caption: str
    shapes: tuple


def _coverage(shape: DrawnShape, size: int) -> np.ndarray:
    """Fraction of each pixel inside `shape` ((size, size), in [0, 1])."""
    offsets = (np.arange(_SAMPLES) + 0.5) / _SAMPLES
    axis = (np.arange(size)[:, None] + offsets[None, :]).reshape(-1)  # sample coordinates along one axis
    x, y = axis[None, :], axis[:, None]
    cx, cy = shape.centre
    half = shape.side / 2
    if shape.shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    elif shape.shape == "square":
        inside = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    else:  # an upright isosceles triangle in the bounding square: apex at the top centre
        depth = (y - (cy - half)) / shape.side  # 0 at the apex, 1 at the base
        inside = (depth >= 0) & (depth <= 1) & (np.abs(x - cx) <= half * depth)
    return inside.reshape(size, _SAMPLES, size, _SAMPLES).mean(axis=(1, 3))


def _layout(rng: np.random.Generator, size: int):
    n = int(rng.integers(1, MAX_SHAPES + 1))
    edge, spacing = 0.04 * size, 0.06 * size
    widest = min(0.75 * size, (size - 2 * edge - (n - 1) * spacing) / n)
    sides = rng.uniform(0.10 * size, widest, size=n)
    slack = size - 2 * edge - (n - 1) * spacing - sides.sum()
    shares = rng.dirichlet(np.ones(n + 1)) * slack  # leftover width spread over the n + 1 gaps
    shapes, left = [], edge
    for i in range(n):
        left += shares[i]
        top = rng.uniform(edge, size - edge - sides[i])
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        shapes.append(
            DrawnShape(
                SHAPES[int(rng.integers(len(SHAPES)))],
                colour,
                (left + sides[i] / 2, top + sides[i] / 2),
                float(sides[i]),
            )
        )
        left += sides[i] + spacing
    return shapes


def draw_example(index: int, seed: int = 0) -> OtherExample:
    """Example `index` of the second test set for `seed`: a pure function of its arguments."""
    rng = np.random.default_rng([seed, _SEED_STREAM, index])
    size = int(rng.choice(IMAGE_SIZES))
    shapes = _layout(rng, size)
    background = rng.uniform(200, 255, size=3)
    ramp = np.linspace(-6, 6, size)[None, :, None] * rng.choice([-1, 1])
    canvas = np.broadcast_to(background, (size, size, 3)) + ramp
    for shape in shapes:
        colour = np.clip(np.array(COLOURS[shape.colour]) + rng.integers(-30, 31, size=3), 0, 255)
        alpha = _coverage(shape, size)[..., None]
        canvas = alpha * colour + (1 - alpha) * canvas
    canvas = canvas + rng.normal(0, 2.0, size=canvas.shape)
    image = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB")
    return OtherExample(image, caption_for([(s.colour, s.shape) for s in shapes]), tuple(shapes))


def draw_set(n: int, seed: int = 0, progress: bool = False) -> list:
    """The first `n` examples of the second test set."""
    indices = tqdm(range(n), desc="drawing the other renderer's set", unit="img", disable=not progress, leave=False)
    return [draw_example(i, seed) for i in indices]
