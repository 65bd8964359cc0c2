"""The captioner's modules, decoding, loss and two-graph export, on tiny untrained or quick models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from service.contract.manifest import load_manifest
from service.contract.tensor_names import DECODER_INPUTS, DECODER_OUTPUTS, ENCODER_INPUTS, ENCODER_OUTPUTS
from training.caption_decoding import beam_search, greedy_decode
from training.data.scenes import COLOURS, SHAPES, SIZES, generate_split, grammar_limits
from training.export import export_checkpoint
from training.models.captioner import END, PAD, SPECIAL_TOKENS, START, Captioner, CaptionerConfig
from training.train_captioner import build_vocabulary, caption_loss, encode, object_loss, object_targets, run


def _model(seed: int = 0) -> Captioner:
    torch.manual_seed(seed)
    vocabulary = [*SPECIAL_TOKENS, "a", "small", "red", "circle", "left", "of"]
    return Captioner(CaptionerConfig(vocabulary=vocabulary, max_length=6)).eval()


def test_shapes_of_encoder_step_and_teacher_forcing() -> None:
    model = _model()
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    features = model.encoder(images)
    assert features.shape == (3, 64, model.config.feature_dim)  # an 8x8 grid
    tokens = torch.tensor([[START, 4, 5, END, PAD], [START, 4, END, PAD, PAD], [START, 6, 7, 8, END]])
    logits, alphas = model(images, tokens)
    assert logits.shape == (3, 4, len(model.config.vocabulary)) and alphas.shape == (3, 4, 64)
    assert torch.allclose(alphas.sum(dim=2), torch.ones(3, 4), atol=1e-5)  # a distribution per step


def test_loss_ignores_padding_and_penalises_uneven_attention() -> None:
    tokens = torch.tensor([[START, 4, END, PAD]])
    logits = torch.zeros(1, 3, 10)
    uniform = torch.full((1, 3, 4), 0.25)
    peaked = torch.tensor([[[1.0, 0, 0, 0]] * 3])
    ce, flat = caption_loss(logits, uniform, tokens, penalty=1.0)
    assert ce.item() == pytest.approx(np.log(10))  # two real targets, the pad ignored
    _, sharp = caption_loss(logits, peaked, tokens, penalty=1.0)
    # two real steps: uniform covers each cell 0.5 (4 x 0.25 penalty); peaked covers one twice
    assert flat.item() == pytest.approx(1.0) and sharp.item() == pytest.approx(4.0)


def test_object_targets_mark_each_objects_centre_cell_with_its_attributes() -> None:
    split = generate_split("train", 30)
    config = CaptionerConfig(vocabulary=[*SPECIAL_TOKENS, "a"], objects_head=True)
    targets = object_targets(split, config)
    assert targets.centre.shape == (30, 64) and targets.attributes.shape == (30, 64, 3)
    for i, (layout, boxes) in enumerate(zip(split.layouts, split.boxes, strict=True)):
        assert int(targets.centre[i].sum()) == len(layout.objects)  # one cell each: they never share one
        for obj, (x0, y0, x1, y1) in zip(layout.objects, boxes, strict=True):
            cell = int((y0 + y1) / 2 / 8) * 8 + int((x0 + x1) / 2 / 8)
            assert targets.centre[i, cell] == 1.0
            colour, shape, size = targets.attributes[i, cell].tolist()
            assert (list(COLOURS)[colour], SHAPES[shape], list(SIZES)[size]) == (
                obj.colour,
                obj.shape,
                obj.size,
            )
        assert bool((targets.attributes[i][targets.centre[i] == 0] == -1).all())
    logits = torch.zeros(30, 64, 10, requires_grad=True)
    loss = object_loss(logits, targets)
    loss.backward()
    assert loss.item() > 0 and logits.grad is not None and logits.grad[..., 1:].abs().sum() > 0


def test_vocabulary_and_encoding() -> None:
    vocabulary = build_vocabulary((("a red circle", "a blue square"),))
    assert vocabulary[:4] == list(SPECIAL_TOKENS) and vocabulary[4:] == sorted(set(vocabulary[4:]))
    index = {w: i for i, w in enumerate(vocabulary)}
    ids = encode("a green circle", index, 5)
    assert ids[0] == START and ids[2] == 3 and ids[4] == END and ids[5:] == [PAD, PAD]  # green: unknown


def test_beam_of_one_is_greedy_and_beams_come_best_first() -> None:
    model = _model(1)
    images = torch.tensor(generate_split("test", 4).images)
    greedy = greedy_decode(model, images)
    for image, expected in zip(images, greedy, strict=True):
        assert list(beam_search(model, image, 1)[0].tokens) == expected
        beams = beam_search(model, image, 4)
        assert 1 <= len(beams) <= 4
        scores = [b.log_prob for b in beams]
        assert (
            scores == sorted(scores, reverse=True) and scores[0] >= beam_search(model, image, 1)[0].log_prob
        )
        assert all(len(b.tokens) <= model.config.max_length for b in beams)


def test_quick_run_evaluates_and_publishes_two_graphs_that_agree_with_torch(tmp_path: Path) -> None:
    metrics = run(
        quick=True, epochs=1, run_dir=tmp_path / "run", repository=tmp_path / "models", progress=False
    )
    table = metrics["evaluation"]
    assert set(table) == {"test", "compositional", "style-shift"} and set(table["test"]) == {
        "greedy",
        "beam3",
    }
    assert {"bleu1", "bleu4", "cider_d", "semantic_accuracy"} <= set(table["test"]["greedy"])
    assert all(row["longest"] <= 17 for rows in table.values() for row in rows.values())
    version = tmp_path / "models" / "captioner" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["decoder.onnx", "encoder.onnx"]
    for graph, inputs, outputs in [
        ("encoder.onnx", ENCODER_INPUTS, ENCODER_OUTPUTS),
        ("decoder.onnx", DECODER_INPUTS, DECODER_OUTPUTS),
    ]:  # the names the server runs the graphs by (service.contract)
        session = ort.InferenceSession(str(version / graph), providers=["CPUExecutionProvider"])
        assert tuple(i.name for i in session.get_inputs()) == inputs
        assert tuple(o.name for o in session.get_outputs()) == outputs
    manifest = load_manifest(tmp_path / "models" / "captioner")
    assert manifest.kind == "captioner" and manifest.captioner.grid == (8, 8)
    assert (manifest.captioner.max_length, manifest.captioner.max_repeats) == grammar_limits() == (17, 3)
    assert manifest.metrics["parity_max_abs_diff"] < 1e-4
    assert manifest.metrics["test_greedy_bleu4"] == table["test"]["greedy"]["bleu4"]
    # a second export of the same checkpoint becomes version 2, checked the same way
    result = export_checkpoint(tmp_path / "run" / "checkpoint.pt", tmp_path / "models")
    assert result.version == 2 and (tmp_path / "models" / "captioner" / "2" / "decoder.onnx").is_file()
