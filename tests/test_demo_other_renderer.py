"""The second test set's renderer: the same grammar, independent drawing, settings training never uses."""

import numpy as np
import pytest

from mqwen.demo.other_renderer import IMAGE_SIZES, draw_example, draw_set
from mqwen.demo.shapes import COLOURS, parse_caption


def test_deterministic_per_seed_and_index():
    a, b = draw_example(3, seed=1), draw_example(3, seed=1)
    assert a.caption == b.caption and np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert [e.caption for e in draw_set(8, seed=1)] != [e.caption for e in draw_set(8, seed=2)]


def test_captions_parse_and_name_what_is_drawn():
    for example in draw_set(80, seed=0):
        parsed = parse_caption(example.caption)
        assert parsed == [(s.colour, s.shape) for s in example.shapes]
        image = np.asarray(example.image).astype(int)
        size = image.shape[0]
        assert image.shape == (size, size, 3) and size in IMAGE_SIZES
        xs = [s.centre[0] for s in example.shapes]
        assert xs == sorted(xs)
        for shape, nxt in zip(example.shapes, example.shapes[1:]):  # disjoint horizontal bands
            assert shape.centre[0] + shape.side / 2 < nxt.centre[0] - nxt.side / 2
        for shape in example.shapes:
            cx, cy, half = shape.centre[0], shape.centre[1], shape.side / 2
            # A point well inside the shape has its colour (jitter <= 30, noise ~2); a square fills the corner
            # of its bounding box, a circle and a triangle leave it background.
            inside = image[int(cy + 0.25 * half), int(cx)]
            assert np.abs(inside - np.array(COLOURS[shape.colour])).max() <= 45, (example.caption, shape)
            if shape.side >= 8:
                corner = image[int(cy - 0.8 * half), int(cx - 0.8 * half)]
                near = np.abs(corner - np.array(COLOURS[shape.colour])).max() <= 45
                assert near == (shape.shape == "square"), (example.caption, shape, corner)


def test_settings_differ_from_training():
    examples = draw_set(200, seed=0)
    assert 64 not in {e.image.size[0] for e in examples}
    assert {len(e.shapes) for e in examples} == {1, 2, 3}
    relative = [s.side / e.image.size[0] for e in examples for s in e.shapes]
    alone = [s.side / e.image.size[0] for e in examples if len(e.shapes) == 1 for s in e.shapes]
    assert min(relative) < 0.12 and max(alone) > 0.6 and max(relative) <= 0.75


@pytest.mark.parametrize("index", range(6))
def test_triangles_point_up(index):
    """The grammar's triangles are upright in both renderers: the apex row is narrower than the base row."""
    from mqwen.demo.other_renderer import DrawnShape, _coverage

    triangle = DrawnShape("triangle", "red", (32.0, 32.0), 20.0 + index)
    cover = _coverage(triangle, 64)
    top, bottom = round(32 - triangle.side / 2 + 2), round(32 + triangle.side / 2 - 2)
    assert 0 < cover[top].sum() < cover[bottom].sum()
