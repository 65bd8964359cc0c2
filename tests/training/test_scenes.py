"""The generated scenes: deterministic, captions that parse back, held-out pairs, clear relations."""

from __future__ import annotations

import colorsys
import dataclasses
import itertools

import numpy as np
import pytest
from PIL import Image, ImageColor

from training.data.scenes import (
    AXES,
    CLASS_LABELS,
    COLOURS,
    HELD_OUT_PAIRS,
    MAX_CROSS_OFFSET,
    MIN_GAP,
    SceneLayout,
    SceneObject,
    caption_variants,
    generate_split,
    load_classification_split,
    parse_caption,
    render,
)
from training.data.styles import CLASSIFICATION_STYLE, HUES, SHIFTED_STYLE, TRAINING_STYLE, VALUES, Style


def test_same_seed_same_scenes_other_seed_other_scenes() -> None:
    a, b, c = (
        generate_split("test", 20, seed=0),
        generate_split("test", 20, seed=0),
        generate_split("test", 20, seed=1),
    )
    assert np.array_equal(a.images, b.images) and a.captions == b.captions
    assert not np.array_equal(a.images, c.images)


def test_a_larger_split_begins_with_the_scenes_of_a_smaller_one() -> None:
    """The captioner trains on more scenes than the standard split: those are its first ones."""
    small, large = generate_split("train", 6), generate_split("train", 15, progress=True)
    assert np.array_equal(large.images[:6], small.images) and large.captions[:6] == small.captions
    assert len(large.images) == 15


def test_splits_do_not_share_scenes() -> None:
    train, test = generate_split("train", 50), generate_split("test", 50)
    assert not any(np.array_equal(x, y) for x in train.images for y in test.images)


def test_images_are_rgb_uint8_with_several_references_each() -> None:
    split = generate_split("validation", 30)
    assert split.images.shape == (30, 3, 64, 64) and split.images.dtype == np.uint8
    assert all(len(refs) >= 3 for refs in split.captions)
    assert all(
        set(canonical) <= set(caption_variants(layout)[0])
        for canonical, layout in zip(split.canonical, split.layouts, strict=True)
    )


def test_every_caption_of_every_scene_parses_back_to_its_layout() -> None:
    split = generate_split("train", 300)
    for layout in split.layouts:
        every, canonical = caption_variants(layout)
        assert len(set(every)) == len(every) and canonical
        assert all(parse_caption(caption) == layout for caption in every)


def test_parse_understands_either_word_order_and_rejects_other_sentences() -> None:
    red, blue = SceneObject("small", "red", "circle"), SceneObject("large", "blue", "square")
    left_to_right = SceneLayout("horizontal", (red, blue))
    assert parse_caption("a small red circle to the left of a large blue square") == left_to_right
    assert parse_caption("There is a large blue square right of a small red circle.") == left_to_right
    assert parse_caption("a large blue square to the left of a small red circle") != left_to_right
    assert parse_caption("a small red circle above a large blue square") == SceneLayout(
        "vertical", (red, blue)
    )
    assert parse_caption("a small red circle near a large blue square") is None
    assert parse_caption("a small red circle a small red circle") is None
    assert parse_caption("") is None


def test_held_out_pairs_only_in_the_compositional_split() -> None:
    def pairs(split: str) -> list[set[tuple[str, str]]]:
        return [{o.pair for o in layout.objects} for layout in generate_split(split, 400).layouts]

    assert all(not (scene & HELD_OUT_PAIRS) for scene in pairs("train"))
    assert all(scene & HELD_OUT_PAIRS for scene in pairs("compositional"))
    seen_colours = {c for scene in pairs("train") for c, _ in scene}
    seen_shapes = {s for scene in pairs("train") for _, s in scene}
    assert seen_colours == set(COLOURS) and len(seen_shapes) == 3  # each part on its own is seen


def _hue_share(pixels: np.ndarray, colour: str) -> float:
    """Share of (N, 3) RGB pixels whose hue is within 10 degrees of the colour's range, saturated."""
    hsv = np.array([colorsys.rgb_to_hsv(*(p / 255.0)) for p in pixels.astype(float)])
    low, high = HUES[colour]
    hue = (hsv[:, 0] * 360.0 - low + 10.0) % 360.0  # 0 at 10 degrees below the range
    return float(np.mean((hue <= high - low + 20.0) & (hsv[:, 1] > 0.25)))


def _core_and_ring(image: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) pixels of the middle of an object's box, and of a ring 2-4 px outside the box."""
    pixels = image.transpose(1, 2, 0)
    ys, xs = np.mgrid[0:64, 0:64] + 0.5
    x0, y0, x1, y1 = box
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, min(x1 - x0, y1 - y0) / 2
    core = (np.abs(xs - cx) <= 0.35 * half) & (np.abs(ys - cy) <= 0.35 * half)
    outside = np.maximum(np.maximum(x0 - xs, xs - x1), np.maximum(y0 - ys, ys - y1))
    ring = (outside >= 2) & (outside <= 4)
    return pixels[core], pixels[ring]


@pytest.mark.parametrize("split", ["train", "style-shift"])
def test_every_object_shows_its_colour_size_and_place_in_any_style(split: str) -> None:
    scenes = generate_split(split, 150, seed=3)
    small, large = [], []
    for image, layout, boxes in zip(scenes.images, scenes.layouts, scenes.boxes, strict=True):
        for obj, box in zip(layout.objects, boxes, strict=True):
            assert 0 <= box[0] < box[2] <= 64 and 0 <= box[1] < box[3] <= 64
            core, ring = _core_and_ring(image, box)
            assert _hue_share(core, obj.colour) >= 0.6, f"a {obj.colour} object that does not look it"
            if len(ring):  # it stands out from the background around it
                contrast = np.linalg.norm(core.mean(axis=0) - np.median(ring, axis=0))
                assert contrast > 40, f"a {obj.colour} {obj.shape} that barely shows ({contrast:.0f})"
            (small if obj.size == "small" else large).append(max(box[2] - box[0], box[3] - box[1]))
        along = 0 if layout.axis == "horizontal" else 1  # x0/x1 or y0/y1
        across = 1 - along
        for first, second in itertools.pairwise(boxes):  # in reading order, apart, roughly level
            assert second[along] - first[along + 2] >= MIN_GAP - 1e-4
            first_mid = (first[across] + first[across + 2]) / 2
            second_mid = (second[across] + second[across + 2]) / 2
            assert abs(first_mid - second_mid) < 2 * MAX_CROSS_OFFSET + 4
    assert max(small) < min(large)  # the size words never overlap


@pytest.mark.parametrize("background", CLASSIFICATION_STYLE.backgrounds)
def test_every_training_background_keeps_objects_true_and_visible(background: str) -> None:
    ranges = dataclasses.replace(CLASSIFICATION_STYLE, backgrounds=(background,))
    rng = np.random.default_rng(11)
    obj = SceneObject("small", "red", "circle")
    for colour in COLOURS:
        layout = SceneLayout("horizontal", (dataclasses.replace(obj, colour=colour),) * 3)
        for _ in range(4):
            drawing = render(layout, rng, ranges)
            for box in drawing.boxes:
                core, ring = _core_and_ring(drawing.image, box)
                assert _hue_share(core, colour) >= 0.6, f"a {colour} object that does not look it"
                if len(ring):
                    assert np.linalg.norm(core.mean(axis=0) - np.median(ring, axis=0)) > 40


def test_objects_stay_inside_their_boxes() -> None:
    style = Style(
        background="white",
        saturation=TRAINING_STYLE.saturation,
        canvas=128,
        supersample=4,
        resample=Image.Resampling.BOX,
        outline=1.0,
        outline_darkness=0.5,
        noise=0.0,
        jpeg_quality=None,
    )
    rng = np.random.default_rng(5)
    for axis in AXES:
        layout = SceneLayout(
            axis,
            (
                SceneObject("small", "red", "triangle"),
                SceneObject("large", "blue", "square"),
                SceneObject("small", "green", "circle"),
            ),
        )
        for _ in range(10):
            drawing = render(layout, rng, style)
            pixels = drawing.image.transpose(1, 2, 0).astype(int)
            ys, xs = np.mgrid[0:64, 0:64] + 0.5
            inside = np.zeros((64, 64), bool)
            for x0, y0, x1, y1 in drawing.boxes:
                inside |= (xs > x0 - 1) & (xs < x1 + 1) & (ys > y0 - 1) & (ys < y1 + 1)
            background = np.median(pixels[~inside], axis=0)
            assert np.abs(pixels[~inside] - background).max() <= 2  # nothing drawn outside the boxes
            for box in drawing.boxes:  # and every box holds something drawn
                core, _ = _core_and_ring(drawing.image, box)
                assert np.abs(core - background).sum(axis=1).min() > 60


@pytest.mark.parametrize("name", ["red", "green", "lime", "blue", "yellow"])
def test_the_colours_drawing_programs_name_are_shades_scenes_draw(name: str) -> None:
    hue, saturation, value = colorsys.rgb_to_hsv(*(c / 255 for c in ImageColor.getrgb(name)))
    colour = "green" if name == "lime" else name
    low, high = HUES[colour]
    assert (hue * 360 - low) % 360 <= high - low and VALUES[colour][0] <= value <= VALUES[colour][1]
    assert TRAINING_STYLE.saturation[0] <= saturation <= TRAINING_STYLE.saturation[1]


def test_style_shift_uses_no_style_that_training_uses() -> None:
    assert min(TRAINING_STYLE.canvas[0], SHIFTED_STYLE.canvas[0]) >= 64  # scenes are only scaled down
    assert not set(SHIFTED_STYLE.backgrounds) & set(TRAINING_STYLE.backgrounds)
    assert not set(SHIFTED_STYLE.backgrounds) & set(CLASSIFICATION_STYLE.backgrounds)
    assert dataclasses.replace(CLASSIFICATION_STYLE, backgrounds=TRAINING_STYLE.backgrounds) == TRAINING_STYLE
    for ranges in ("saturation", "canvas", "jpeg_quality"):
        (a_low, a_high), (b_low, b_high) = getattr(TRAINING_STYLE, ranges), getattr(SHIFTED_STYLE, ranges)
        assert a_high < b_low or b_high < a_low, f"{ranges} ranges overlap"
    hues = sorted(HUES.values())  # and the named colours keep 20 degrees apart, all round the circle
    assert all(a[1] + 20 < b[0] for a, b in itertools.pairwise([*hues, (hues[0][0] + 360, 0)]))


def test_classification_split_labels_name_the_one_large_object() -> None:
    images, labels = load_classification_split("test", 0, 40)
    assert images.shape == (40, 3, 64, 64) and labels.shape == (40,)
    assert set(labels.tolist()) <= set(range(len(CLASS_LABELS))) and len(set(labels.tolist())) > 5
    with pytest.raises(ValueError, match="unknown split"):
        load_classification_split("compositional")
