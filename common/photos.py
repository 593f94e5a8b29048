"""Deterministic random photos: inputs for timing and for comparing two paths on the same pixels."""

import numpy as np
from PIL import Image


def random_photos(n: int, size: tuple[int, int], seed: int = 0) -> list[Image.Image]:
    """`n` deterministic random RGB photos of (height, width) `size`, as PIL images."""
    rng = np.random.RandomState(seed)
    return [Image.fromarray(rng.randint(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(n)]
