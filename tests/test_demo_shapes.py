"""The synthetic shapes data: deterministic per seed, captions exactly in the grammar and true to the pixels."""

import itertools
import re

import numpy as np
import pytest

from mqwen.demo.shapes import (
    COLOURS,
    SHAPES,
    caption_for,
    is_held_out,
    lazy_split,
    make_example,
    make_split,
    parse_caption,
)

# The grammar written out independently of the module under test.
PHRASE = r"a (?:red|green|blue|yellow) (?:circle|square|triangle)"
GRAMMAR = re.compile(rf"^(?:{PHRASE}|{PHRASE} and {PHRASE}|{PHRASE}, {PHRASE} and {PHRASE})$")


def _pixels(example):
    return np.asarray(example.image).copy()


def test_same_seed_same_data_other_seed_other_data():
    first = make_split("train", 12, seed=7)
    again = make_split("train", 12, seed=7)
    other = make_split("train", 12, seed=8)
    assert [e.caption for e in first] == [e.caption for e in again]
    assert all(np.array_equal(_pixels(a), _pixels(b)) for a, b in zip(first, again))
    assert [e.caption for e in first] != [e.caption for e in other]
    assert not all(np.array_equal(_pixels(a), _pixels(b)) for a, b in zip(first, other))


def test_lazy_examples_draw_the_same_images():
    eager, lazy = make_split("test", 6, seed=2), lazy_split("test", 6, seed=2)
    assert [e.caption for e in eager] == [e.caption for e in lazy]
    assert all(np.array_equal(_pixels(e), np.asarray(drawn())) for e, drawn in zip(eager, lazy))


def test_example_does_not_depend_on_split_length_and_splits_differ():
    short, longer = make_split("validation", 3, seed=1), make_split("validation", 9, seed=1)
    assert all(np.array_equal(_pixels(a), _pixels(b)) for a, b in zip(short, longer))
    train, validation = make_split("train", 10, seed=1), make_split("validation", 10, seed=1)
    assert [e.caption for e in train] != [e.caption for e in validation]


def test_captions_follow_the_grammar_and_parse_back():
    examples = make_split("train", 150, seed=0) + make_split("test", 50, seed=0)
    counts = set()
    for example in examples:
        assert GRAMMAR.match(example.caption), example.caption
        parsed = parse_caption(example.caption)
        assert parsed == [(s.colour, s.shape) for s in example.shapes]
        assert caption_for(parsed) == example.caption
        counts.add(len(parsed))
    assert counts == {1, 2, 3}
    assert caption_for([("red", "circle")]) == "a red circle"
    assert caption_for([("red", "circle"), ("blue", "square")]) == "a red circle and a blue square"
    assert (
        caption_for([("red", "circle"), ("blue", "square"), ("green", "triangle")])
        == "a red circle, a blue square and a green triangle"
    )


@pytest.mark.parametrize(
    "bad",
    [
        "a red circle.",
        "A red circle",
        "a purple circle",
        "a red circle, a blue square",
        "a red circle and a blue square and a green triangle",
        "a red circle,a blue square and a green triangle",
        "a red circle ",
        "",
        "a red circle, a blue square, a green triangle and a red square",
    ],
)
def test_parse_rejects_anything_outside_the_grammar(bad):
    with pytest.raises(ValueError, match="Not a shapes caption"):
        parse_caption(bad)


def test_shapes_are_left_to_right_disjoint_and_drawn_as_captioned():
    for example in make_split("train", 60, seed=3) + make_split("test", 20, seed=3):
        image = _pixels(example).astype(int)
        size = image.shape[0]
        boxes = [s.box for s in example.shapes]
        for (x0, y0, x1, y1), nxt in zip(boxes, boxes[1:] + [None]):
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
            if nxt is not None:
                assert x1 < nxt[0], "shapes must be separated horizontally, in caption order"
        for spec in example.shapes:  # the centre of every box lies inside its shape, in its colour
            x0, y0, x1, y1 = spec.box
            pixel = image[(y0 + y1) // 2, (x0 + x1) // 2]
            assert np.abs(pixel - np.array(COLOURS[spec.colour])).max() <= 30, (example.caption, spec, pixel)
        corner = image[0, 0]
        assert corner.min() >= 200, "the background is light"
        # A square fills its box corner; a circle and a triangle leave it background.
        for spec in example.shapes:
            x0, y0, x1, y1 = spec.box
            inset = 1 if x1 - x0 >= 12 else 0  # in a small circle, the pixel one in from the corner is covered
            inner_corner = image[y0 + inset, x0 + inset]
            filled = np.abs(inner_corner - np.array(COLOURS[spec.colour])).max() <= 40
            assert filled == (spec.shape == "square"), (example.caption, spec, inner_corner)


def _all_arrangements():
    pairs = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    return [list(a) for n in (1, 2, 3) for a in itertools.product(pairs, repeat=n)]


def test_held_out_arrangements_only_in_test():
    train = make_split("train", 300, seed=0)
    validation = make_split("validation", 100, seed=0)
    test = make_split("test", 100, seed=0)
    assert not any(is_held_out(e.caption) for e in train + validation)
    several = [e for e in test if len(e.shapes) > 1]
    assert all(is_held_out(e.caption) for e in several)
    assert not {e.caption for e in several} & {e.caption for e in train + validation}
    # Single shapes are never held out (every one-shape caption is trained on) but are tested too.
    assert {len(e.shapes) for e in test} == {1, 2, 3}


def test_held_out_arrangements_are_made_of_parts_seen_in_training():
    """Over every possible arrangement: what is held out is the combination, never a part of it."""
    arrangements = _all_arrangements()
    assert len(arrangements) == 12 + 12**2 + 12**3
    held = [a for a in arrangements if is_held_out(caption_for(a))]
    seen = [a for a in arrangements if not is_held_out(caption_for(a))]
    assert 0.1 < len(held) / (len(arrangements) - 12) < 0.25
    assert all(len(a) >= 2 for a in held)
    seen_in_slot = {(n, k, obj) for a in seen for n in [len(a)] for k, obj in enumerate(a)}
    seen_neighbours = {(k, a[k], a[k + 1]) for a in seen for k in range(len(a) - 1)}
    for a in held:
        n = len(a)
        assert all((n, k, obj) in seen_in_slot for k, obj in enumerate(a))
        assert all((k, a[k], a[k + 1]) in seen_neighbours for k in range(n - 1))  # in 2- or 3-shape images


def test_unknown_split_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown split 'dev'"):
        make_example("dev", 0)


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_split_has_one_two_and_three_shapes_equally_often(split):
    counts = np.bincount([len(parse_caption(e.caption)) for e in lazy_split(split, 600, seed=0)], minlength=4)[1:]
    assert counts.sum() == 600 and counts.min() > 150, counts  # 200 each expected; 150 is > 4 sigma below


def test_shape_sizes_span_small_to_three_quarters_of_the_image_alone():
    """Sizes reach from about 12 % of the side to 75 % for a shape alone (bounded by the width for more)."""
    examples = make_split("train", 400, seed=5)
    sides = {n: [s.box[2] - s.box[0] for e in examples if len(e.shapes) == n for s in e.shapes] for n in (1, 2, 3)}
    assert min(min(v) for v in sides.values()) == 8  # 12 % of 64 px
    assert 44 <= max(sides[1]) <= 48
    assert max(sides[2]) <= 28 and max(sides[3]) <= 17  # what the width leaves, with margins and gaps
    assert all(s.box[3] - s.box[1] == s.box[2] - s.box[0] for e in examples for s in e.shapes)


def test_augmented_examples_keep_caption_and_layout_at_another_size_with_noise():
    """--augment: the same caption and layout, drawn at a size from AUGMENT_CANVASES with bounded noise on a
    background whose channels are each darkened by at most AUGMENT_TINT; each shape's centre pixel, scaled to
    the drawing's size, is still its colour; deterministic per index."""
    from mqwen.demo.shapes import AUGMENT_CANVASES, AUGMENT_NOISE, AUGMENT_TINT

    sizes, tints = set(), []
    for index in range(40):
        plain, augmented = make_example("train", index, seed=4), make_example("train", index, seed=4, augment=True)
        again = make_example("train", index, seed=4, augment=True)
        assert augmented.caption == plain.caption and augmented.shapes == plain.shapes
        assert np.array_equal(_pixels(augmented), _pixels(again))
        size = augmented.image.size[0]
        assert augmented.image.size == (size, size) and size in AUGMENT_CANVASES
        sizes.add(size)
        image = _pixels(augmented).astype(int)
        darkening = _pixels(plain)[0, 0].astype(int) - image[0, 0]  # a corner: background in every layout
        assert (darkening >= -AUGMENT_NOISE - 1).all() and (darkening <= AUGMENT_TINT + AUGMENT_NOISE + 1).all()
        tints.append(int(image[0, 0].max() - image[0, 0].min()))
        scale = size / 64
        for spec in augmented.shapes:
            x0, y0, x1, y1 = (v * scale for v in spec.box)
            pixel = image[int((y0 + y1) / 2), int((x0 + x1) / 2)]
            assert np.abs(pixel - np.array(COLOURS[spec.colour])).max() <= 20 + AUGMENT_NOISE + 1, (spec, pixel)
    assert len(sizes) >= 4
    assert max(tints) >= 25, "some backgrounds are tinted, beyond the plain task's 11 levels between channels"
    assert not set(AUGMENT_CANVASES) & {48, 80, 96, 128}, "sizes the other renderer draws stay out of training"
    lazy = lazy_split("train", 3, seed=4, augment=True)
    assert all(
        np.array_equal(np.asarray(drawn()), _pixels(make_example("train", i, 4, augment=True)))
        for i, drawn in enumerate(lazy)
    )


def test_shrunk_shapes_keep_caption_layout_and_centres_and_cover_less():
    """`shrink_to` (late training images): the same caption, layout and background, each shape drawn about its
    centre at one random fraction in [shrink_to, 1] of its side; the rest of the image's random draws unchanged;
    nothing changes without --augment or at shrink_to=1."""
    areas = []
    for index in range(30):
        full = make_example("train", index, seed=6, augment=True)
        small = make_example("train", index, seed=6, augment=True, shrink_to=0.7)
        assert small.caption == full.caption and small.shapes == full.shapes
        assert np.array_equal(_pixels(small), _pixels(make_example("train", index, 6, augment=True, shrink_to=0.7)))
        assert np.array_equal(_pixels(make_example("train", index, 6, augment=True, shrink_to=1.0)), _pixels(full))
        plain = make_example("train", index, 6)
        assert np.array_equal(_pixels(make_example("train", index, 6, shrink_to=0.7)), _pixels(plain))
        image, background = _pixels(small).astype(int), _pixels(full)[0, 0].astype(int)
        assert np.abs(image[0, 0] - background).max() <= 8, "the background (and its noise) is drawn as before"
        scale = small.image.size[0] / 64
        for spec in small.shapes:
            x0, y0, x1, y1 = (v * scale for v in spec.box)
            pixel = image[int((y0 + y1) / 2), int((x0 + x1) / 2)]
            assert np.abs(pixel - np.array(COLOURS[spec.colour])).max() <= 25, (spec, pixel)
        # pixels far from the background colour: the shapes' area
        covered = [int((np.abs(_pixels(e).astype(int) - background).max(axis=2) > 60).sum()) for e in (small, full)]
        areas.append(covered[0] / covered[1])
    assert all(0.7**2 - 0.1 <= a <= 1.0 for a in areas), areas
    assert min(areas) < 0.7 and max(areas) > 0.85, "the factor is drawn per image over [0.7, 1]"
