"""The generated scenes: deterministic, captions that parse back, held-out pairs, clear relations."""

from __future__ import annotations

import numpy as np
import pytest

from training.data.scenes import (
    CLASS_LABELS,
    COLOURS,
    HELD_OUT_PAIRS,
    SceneLayout,
    SceneObject,
    caption_variants,
    generate_split,
    load_classification_split,
    parse_caption,
    render,
)


def test_same_seed_same_scenes_other_seed_other_scenes() -> None:
    a, b, c = (
        generate_split("test", 20, seed=0),
        generate_split("test", 20, seed=0),
        generate_split("test", 20, seed=1),
    )
    assert np.array_equal(a.images, b.images) and a.captions == b.captions
    assert not np.array_equal(a.images, c.images)


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


def _centroid(image: np.ndarray, colour: str) -> np.ndarray:
    target = np.array(COLOURS[colour]).reshape(3, 1, 1)
    mask = np.abs(image.astype(int) - target).sum(axis=0) < 90
    assert mask.sum() > 10, f"no {colour} pixels found"
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


@pytest.mark.parametrize("axis", ["horizontal", "vertical"])
def test_the_relation_a_caption_states_is_what_the_image_shows(axis: str) -> None:
    rng = np.random.default_rng(7)
    layout = SceneLayout(
        axis, (SceneObject("small", "red", "circle"), SceneObject("large", "blue", "triangle"))
    )
    for _ in range(20):
        image = render(layout, rng)
        first, second = _centroid(image, "red"), _centroid(image, "blue")
        along, across = (0, 1) if axis == "horizontal" else (1, 0)
        assert second[along] - first[along] > 10  # clearly after it along the axis
        assert abs(second[across] - first[across]) < 8  # and roughly level across it


def test_classification_split_labels_name_the_one_large_object() -> None:
    images, labels = load_classification_split("test", 0, 40)
    assert images.shape == (40, 3, 64, 64) and labels.shape == (40,)
    assert set(labels.tolist()) <= set(range(len(CLASS_LABELS))) and len(set(labels.tolist())) > 5
    with pytest.raises(ValueError, match="unknown split"):
        load_classification_split("compositional")
