"""captioner-butd's detector targets, region features, factored decoder and two-graph export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from service.contract.manifest import load_manifest
from training.data.scenes import generate_split
from training.models.butd import ATTRIBUTE_DIM, ATTRIBUTES, BottomUpTopDown, BottomUpTopDownConfig
from training.models.captioner import START
from training.train_butd import detection_targets
from training.train_captioner import build_vocabulary


def _model(seed: int = 0) -> tuple[BottomUpTopDown, list[str]]:
    torch.manual_seed(seed)
    vocabulary = build_vocabulary(generate_split("train", 200).captions)
    return BottomUpTopDown(BottomUpTopDownConfig(vocabulary=vocabulary, max_length=17)).eval(), vocabulary


def test_detection_targets_mark_each_objects_centre_box_and_attributes() -> None:
    split = generate_split("train", 20)
    config, _ = _model()
    targets = detection_targets(split, config.config)
    for i, (layout, boxes) in enumerate(zip(split.layouts, split.boxes, strict=True)):
        assert int(targets.centre[i].sum()) == len(layout.objects) == int((targets.heat[i] == 1).sum())
        for obj, (x0, y0, x1, y1) in zip(layout.objects, boxes, strict=True):
            column, row = int((x0 + x1) / 2 / 4), int((y0 + y1) / 2 / 4)
            assert targets.centre[i, row, column]
            assert targets.size[i, :, row, column].tolist() == pytest.approx([(x1 - x0) / 64, (y1 - y0) / 64])
            assert ATTRIBUTES["colour"][int(targets.attributes["colour"][i, row, column])] == obj.colour
            assert ATTRIBUTES["shape"][int(targets.attributes["shape"][i, row, column])] == obj.shape
        assert (targets.attributes["size"][i] >= 0).sum() >= len(layout.objects)  # near centres only
        assert (targets.attributes["size"][i] < 0).sum() > 200


def test_regions_features_boxes_and_a_decoder_step() -> None:
    model, vocabulary = _model()
    images = torch.tensor(generate_split("test", 3).images)
    features, boxes = model.encoder.detect(images)
    assert features.shape == (3, 4, model.config.feature_dim) and boxes.shape == (3, 4, 4)
    assert bool(((boxes >= 0) & (boxes <= 1)).all()) and bool((boxes[..., :2] <= boxes[..., 2:]).all())
    for name, start in (("colour", 0), ("shape", 4), ("size", 7)):  # each factor a distribution
        width = len(ATTRIBUTES[name])
        assert torch.allclose(features[..., start : start + width].sum(-1), torch.ones(3, 4), atol=1e-5)
    projected, state = model.decoder.prepare(features)
    assert state.h.shape == (3, 2 * model.config.hidden_dim)
    logits, state, alpha = model.decoder.step(torch.full((3,), START), state, features, projected)
    assert logits.shape == (3, len(vocabulary)) and alpha.shape == (3, 4)
    assert torch.allclose(alpha.sum(1), torch.ones(3), atol=1e-5)


def test_what_a_region_is_reaches_only_the_words_that_name_it() -> None:
    """The LSTMs see where regions are, never what they are: changing a region's colour belief moves
    the colour words' scores and nothing else, this step and the next."""
    model, vocabulary = _model(1)
    features = model.encoder(torch.tensor(generate_split("test", 2).images))
    other = features.clone()
    other[..., :4] = torch.tensor([0.05, 0.05, 0.85, 0.05])  # every region now looks blue
    colours = [vocabulary.index(c) for c in ATTRIBUTES["colour"]]
    rest = [i for i in range(len(vocabulary)) if i not in colours]
    tokens = torch.full((2,), START)
    outputs = []
    for f in (features, other):
        projected, state = model.decoder.prepare(f)
        first, state, _ = model.decoder.step(tokens, state, f, projected)
        second, state, alpha = model.decoder.step(
            torch.full((2,), vocabulary.index("red")), state, f, projected
        )
        outputs.append((first, second, state.h, alpha))
    for a, b in zip(*outputs, strict=True):
        if a.shape[-1] == len(vocabulary):
            assert torch.allclose(a[:, rest], b[:, rest], atol=1e-6)
            assert not torch.allclose(a[:, colours], b[:, colours])
        else:
            assert torch.allclose(a, b, atol=1e-6)  # states and attention: untouched
    # and having said "red" reads the same as having said "blue"
    projected, state = model.decoder.prepare(features)
    said = [
        model.decoder.step(torch.full((2,), vocabulary.index(c)), state, features, projected)[0]
        for c in ("red", "blue")
    ]
    assert torch.allclose(said[0], said[1], atol=1e-6)


def test_the_trunk_learns_shapes_from_shuffled_colours_the_colour_branch_from_the_image() -> None:
    model, _ = _model()
    detector = model.encoder.detector
    images = torch.tensor(generate_split("test", 2).images)
    plain = detector(images)
    shuffled = detector(images, torch.tensor([[2, 0, 1], [1, 2, 0]]))
    assert torch.equal(plain.attributes["colour"], shuffled.attributes["colour"])
    assert not torch.allclose(plain.attributes["shape"], shuffled.attributes["shape"])
    assert ATTRIBUTE_DIM == 9


def test_quick_run_publishes_two_graphs_with_regions(trained_butd: tuple[Path, dict]) -> None:
    root, metrics = trained_butd
    table = metrics["evaluation"]
    assert set(table) == {"test", "compositional", "style-shift"} and set(table["test"]) == {
        "greedy",
        "beam3",
    }
    assert set(metrics["detector"]["test"]) == {"recall", "precision", "attributes_right"}
    version = root / "models" / "captioner-butd" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["decoder.onnx", "encoder.onnx"]
    manifest = load_manifest(root / "models" / "captioner-butd")
    assert (
        manifest.kind == "captioner" and manifest.captioner.regions == 4 and manifest.captioner.grid is None
    )
    assert (manifest.captioner.max_length, manifest.captioner.max_repeats) == (17, 3)
    assert manifest.metrics["parity_max_abs_diff"] < 1e-4
    assert "bottom-up top-down" in manifest.description
    assert np.isfinite(metrics["train_seconds"])
