"""Captioner checkpoint -> encoder.onnx + decoder.onnx -> parity checks -> publish.

A captioner is served as two graphs so that the server can run the encoder once per image
and batch single decoder steps across every caption in flight. Parity is checked per graph
(random and real inputs, batch 1 and 64) and end to end: greedy captions decoded with the two
ONNX graphs must equal those decoded in torch, word for word.

Both captioners export this way: `captioner` (show, attend and tell) attends over a grid;
`captioner-butd` (bottom-up top-down) over regions, whose boxes its encoder graph also outputs.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from service.contract.manifest import CaptionerSpec, InputSpec, Manifest, ResizeAdaptation
from service.contract.tensor_names import (
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
    REGION_BOXES,
)
from training.caption_decoding import CaptionModel, greedy_decode, repeat_mask
from training.data.scenes import DATA_DESCRIPTION as SCENES_DESCRIPTION
from training.data.scenes import load_scene_split
from training.models.butd import BottomUpTopDown, BottomUpTopDownConfig
from training.models.captioner import END, START, Captioner, CaptionerConfig, DecoderState

ENCODER_FILE, DECODER_FILE = "encoder.onnx", "decoder.onnx"
#: Largest |onnxruntime - torch| allowed on any output of either graph.
PARITY_TOLERANCE = 1e-4
PARITY_BATCHES = (1, 64)
GREEDY_PARITY_IMAGES = 64


def encoder_outputs(model: CaptionModel) -> tuple[str, ...]:
    """The encoder graph's outputs: the region boxes too for a model that attends over regions."""
    return (*ENCODER_OUTPUTS, REGION_BOXES) if isinstance(model, BottomUpTopDown) else ENCODER_OUTPUTS


class EncoderGraph(nn.Module):
    """image -> features, projected features, h0, c0 (and region boxes): all that is once per image."""

    def __init__(self, model: CaptionModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if isinstance(self.model, BottomUpTopDown):
            features, boxes = self.model.encoder.detect(image)
            projected, state = self.model.decoder.prepare(features)
            return features, projected, state.h, state.c, boxes
        features = self.model.encoder(image)
        projected, state = self.model.decoder.prepare(features)
        return features, projected, state.h, state.c


class DecoderGraph(nn.Module):
    """One step: token, h, c, features, projected, image_index -> log-probabilities, next h, c, attention.

    token, h, c and image_index have one row per hypothesis; features and projected one row per
    image, gathered in the graph by image_index. A beam search of k hypotheses over one image then
    sends that image's features once, not k times: copying them per hypothesis cost as much as
    the step itself on a CPU.
    """

    def __init__(self, model: CaptionModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        token: torch.Tensor,
        h: torch.Tensor,
        c: torch.Tensor,
        features: torch.Tensor,
        projected: torch.Tensor,
        image_index: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        features, projected = features[image_index], projected[image_index]
        logits, state, alpha = self.model.decoder.step(token, DecoderState(h, c), features, projected)
        return torch.log_softmax(logits, dim=1), state.h, state.c, alpha


def example_inputs(
    config: CaptionerConfig | BottomUpTopDownConfig, n: int
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """An encoder input and decoder inputs of n images with two hypotheses each, as the graphs expect."""
    cells = config.positions
    image = torch.zeros(n, 3, config.image_size, config.image_size, dtype=torch.uint8)
    rows = 2 * n  # more hypotheses than images, so the two batch axes are traced apart
    step = (
        torch.full((rows,), START, dtype=torch.int64),
        torch.zeros(rows, config.state_dim),
        torch.zeros(rows, config.state_dim),
        torch.zeros(n, cells, config.feature_dim),
        torch.zeros(n, cells, config.attention_dim),
        torch.arange(n, dtype=torch.int64).repeat_interleave(2),
    )
    return image, step


def export_graphs(model: CaptionModel, directory: Path) -> None:
    """Write encoder.onnx and decoder.onnx with a dynamic batch axis on every input."""
    from training.export import OPSET  # the classifiers' opset, one place

    model.eval()
    image, step = example_inputs(model.config, 2)
    batch, images = torch.export.Dim("batch"), torch.export.Dim("images")
    with warnings.catch_warnings():  # torch-internal deprecation noise, nothing a caller can act on
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r"# The axis name: \w+ will not be used")
        torch.onnx.export(
            EncoderGraph(model).eval(),
            (image,),
            str(directory / ENCODER_FILE),
            input_names=list(ENCODER_INPUTS),
            output_names=list(encoder_outputs(model)),
            dynamic_shapes={"image": {0: batch}},
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
        torch.onnx.export(
            DecoderGraph(model).eval(),
            step,
            str(directory / DECODER_FILE),
            input_names=list(DECODER_INPUTS),
            output_names=list(DECODER_OUTPUTS),
            dynamic_shapes={
                "token": {0: batch},
                "h": {0: batch},
                "c": {0: batch},
                "features": {0: images},
                "projected": {0: images},
                "image_index": {0: batch},
            },
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )


def check_graphs(directory: Path, model: CaptionModel) -> None:
    """Both files are valid ONNX with the expected names and a dynamic batch axis."""
    from training.export import ExportError

    for file, inputs, outputs in (
        (ENCODER_FILE, ENCODER_INPUTS, encoder_outputs(model)),
        (DECODER_FILE, DECODER_INPUTS, DECODER_OUTPUTS),
    ):
        path = directory / file
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except onnx.checker.ValidationError as e:
            raise ExportError(f"{path}: invalid ONNX: {e}") from e
        graph = onnx.load(str(path)).graph
        got = ([i.name for i in graph.input], [o.name for o in graph.output])
        if got != (list(inputs), list(outputs)):
            raise ExportError(
                f"{path}: expected I/O {list(inputs)} -> {list(outputs)}, got {got[0]} -> {got[1]}"
            )
        for value in graph.input:
            if not value.type.tensor_type.shape.dim[0].dim_param:
                raise ExportError(f"{path}: the batch axis of {value.name} is fixed")


class OnnxCaptioner:
    """The two exported graphs on onnxruntime, with the greedy decode the server's search starts from."""

    def __init__(self, directory: Path, max_length: int, max_repeats: int | None = None) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        self.encoder = ort.InferenceSession(str(directory / ENCODER_FILE), options, providers=providers)
        self.decoder = ort.InferenceSession(str(directory / DECODER_FILE), options, providers=providers)
        self.max_length = max_length
        self.max_repeats = max_repeats

    def encode(self, images: np.ndarray) -> list[np.ndarray]:
        """features, projected, h, c (and boxes, for a region model)."""
        return self.encoder.run(None, {"image": images})

    def step(self, token: np.ndarray, *state_and_features: np.ndarray) -> list[np.ndarray]:
        """token, then h, c, features, projected, image_index, as the decoder graph takes them."""
        feeds = dict(zip(DECODER_INPUTS, (token, *state_and_features), strict=True))
        return self.decoder.run(list(DECODER_OUTPUTS), feeds)

    def greedy(self, images: np.ndarray) -> list[list[int]]:
        features, projected, h, c = self.encode(images)[:4]
        tokens = np.full(len(images), START, dtype=np.int64)
        one_each = np.arange(len(images), dtype=np.int64)  # one hypothesis per image
        captions: list[list[int]] = [[] for _ in images]
        done = np.zeros(len(images), dtype=bool)
        for _ in range(self.max_length):  # as greedy_decode: at most max_length words
            log_probs, h, c, _ = self.step(tokens, h, c, features, projected, one_each)
            log_probs = log_probs + repeat_mask(captions, log_probs.shape[1], self.max_repeats).numpy()
            tokens = log_probs.argmax(axis=1).astype(np.int64)
            for i in np.flatnonzero(~done & (tokens != END)):
                captions[i].append(int(tokens[i]))
            done |= tokens == END
            if done.all():
                break
        return captions


def parity(model: CaptionModel, directory: Path) -> tuple[float, float]:
    """(max |onnxruntime - torch| over every output of both graphs, fraction of greedy captions equal)."""
    config = model.config
    runtime = OnnxCaptioner(directory, config.max_length, config.max_repeats)
    real = load_scene_split("test", 0, GREEDY_PARITY_IMAGES).images
    rng = np.random.default_rng(0)
    worst = 0.0
    with torch.no_grad():
        for n in PARITY_BATCHES:
            noise = rng.integers(0, 256, (n, 3, config.image_size, config.image_size), dtype=np.uint8)
            for images in (np.ascontiguousarray(real[:n]), noise):
                ours = runtime.encode(images)
                theirs = EncoderGraph(model)(torch.tensor(images))
                worst = max(worst, _max_diff(ours, theirs))
                features, projected, h, c = ours[:4]
                index = rng.integers(0, n, 3 * n).astype(np.int64)  # hypotheses in any order, any count
                token = rng.integers(0, len(config.vocabulary), len(index)).astype(np.int64)
                step_inputs = (token, h[index], c[index], features, projected, index)
                ours_step = runtime.step(*step_inputs)
                theirs_step = DecoderGraph(model)(*(torch.tensor(x) for x in step_inputs))
                worst = max(worst, _max_diff(ours_step, theirs_step))
    torch_captions = greedy_decode(model, torch.tensor(real))
    onnx_captions = runtime.greedy(np.ascontiguousarray(real))
    same = float(np.mean([a == b for a, b in zip(torch_captions, onnx_captions, strict=True)]))
    return worst, same


def _max_diff(ours: list[np.ndarray], theirs: tuple[torch.Tensor, ...]) -> float:
    diffs = [
        float(np.max(np.abs(a.astype(np.float64) - b.numpy()))) for a, b in zip(ours, theirs, strict=True)
    ]
    return float("nan") if any(np.isnan(diffs)) else max(diffs)


def build_manifest(
    checkpoint: dict, config: CaptionerConfig | BottomUpTopDownConfig, worst: float
) -> Manifest:
    """The captioner's manifest: input adaptation, vocabulary, graphs and the evaluation results."""
    from training.export import provenance

    if isinstance(config, BottomUpTopDownConfig):
        what = (
            "bottom-up top-down captioner (a detector's factored region features, two-LSTM decoder "
            "with attention over the regions)"
        )
        positions: dict = {"regions": config.regions}
        trainer = "train_butd"
    else:
        what = "show-attend-tell captioner (residual CNN encoder, LSTM decoder with soft attention)"
        positions = {"grid": (config.grid_size, config.grid_size)}
        trainer = "train_captioner"
    return Manifest(
        name=checkpoint["model"],
        kind="captioner",
        description=(f"{what} trained on generated scenes; " + checkpoint.get("selection", "")).strip("; "),
        input=InputSpec(
            name=ENCODER_INPUTS[0],
            channels=3,
            height=config.image_size,
            width=config.image_size,
            color_mode="RGB",
        ),
        output_name=DECODER_OUTPUTS[0],
        adaptation=ResizeAdaptation(),
        captioner=CaptionerSpec(
            encoder_file=ENCODER_FILE,
            decoder_file=DECODER_FILE,
            vocabulary=list(config.vocabulary),
            start_token=START,
            end_token=END,
            max_length=config.max_length,
            max_repeats=config.max_repeats,
            **positions,
        ),
        metrics={**{k: float(v) for k, v in checkpoint["metrics"].items()}, "parity_max_abs_diff": worst},
        provenance=provenance(checkpoint, trainer, SCENES_DESCRIPTION),
    )


def load_captioner(checkpoint: dict) -> CaptionModel:
    """The model a captioner or captioner-butd checkpoint describes, in eval mode."""
    if checkpoint["model"] == "captioner-butd":
        model: CaptionModel = BottomUpTopDown(BottomUpTopDownConfig(**checkpoint["config"]))
    else:
        model = Captioner(CaptionerConfig(**checkpoint["config"]))
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def captioner_stage(model: CaptionModel, checkpoint: dict, tolerance: float):
    """The publishing stage (see training.export.publish): export, check, build the manifest."""
    from training.export import ExportError, check_parity

    def stage(staging: Path) -> tuple[Manifest, float]:
        export_graphs(model, staging)
        check_graphs(staging, model)
        worst, same = parity(model, staging)
        check_parity(checkpoint["model"], worst, tolerance)
        print(f"{checkpoint['model']}: greedy captions equal in torch and onnxruntime: {same:.1%}")
        if same < 1.0:
            raise ExportError(
                f"greedy captions differ between torch and onnxruntime on {1 - same:.1%} of images"
            )
        return build_manifest(checkpoint, model.config, worst), worst

    return stage
