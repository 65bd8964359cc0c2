"""Captioner pipeline: images -> encoder (dynamic batcher) -> beam search (the decode loop) -> captions.

Two graphs (see `CaptionerSpec`): the encoder runs once per image, through the version's dynamic
batcher; the decoder runs once per step for every hypothesis of every caption in flight, in the
version's `DecodeLoop` (service/kinds/captioner/beam_search.py).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np

from service.contract import preprocessing as imaging
from service.contract.manifest import CaptionerSpec, Manifest
from service.contract.tensor_names import (
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    ENCODER_OUTPUTS,
    PER_HYPOTHESIS_DECODER_INPUTS,
    REGION_BOXES,
)
from service.engine.batching import DynamicBatcher
from service.engine.sessions import ModelLoadError, ModelSession, TensorSpec
from service.errors import InvalidArgument
from service.kinds.captioner.beam_search import BeamSearch, DecodeLoop, Hypothesis, merge
from service.kinds.checks import require_finite, require_within
from service.observability.statistics import RequestTimes

#: What `captioner` itself takes and answers through KServe v2: encoded images in, best captions out.
KSERVE_INPUT = TensorSpec("image", "tensor(string)", np.dtype(object), (-1, 1))
KSERVE_OUTPUT = TensorSpec("caption", "tensor(string)", np.dtype(object), (-1, 1))


class CaptionerPipeline:
    """Pre-processing for the encoder, and beam searches over its outputs."""

    def __init__(self, manifest: Manifest, encoder: ModelSession, decoder: ModelSession) -> None:
        assert manifest.input is not None and manifest.captioner is not None, "the manifest validator says so"
        self.manifest = manifest
        self.spec: CaptionerSpec = manifest.captioner
        self.input = manifest.input
        self.encoder = encoder
        self.decoder = decoder
        self.vocabulary = self.spec.vocabulary
        self.loop: DecodeLoop | None = None  # attached on the event loop once the version loads
        _require(encoder, [self.input.name], ENCODER_OUTPUTS, self.spec.encoder_file)
        # Decoders exported before image_index take the features once per hypothesis.
        self.by_image = "image_index" in decoder.input_names
        expected = DECODER_INPUTS if self.by_image else PER_HYPOTHESIS_DECODER_INPUTS
        _require(decoder, expected, DECODER_OUTPUTS, self.spec.decoder_file)
        words = len(self.vocabulary)
        for token, what in ((self.spec.start_token, "start_token"), (self.spec.end_token, "end_token")):
            if not 0 <= token < words:
                raise ModelLoadError(f"{what} {token} is outside the vocabulary of {words} words")
        self._encoder_outputs = [encoder.output_names.index(name) for name in ENCODER_OUTPUTS]
        self._boxes: int | None = None
        if self.spec.regions is not None:
            _require(encoder, [self.input.name], [REGION_BOXES], self.spec.encoder_file)
            self._boxes = encoder.output_names.index(REGION_BOXES)

    @property
    def cells(self) -> int:
        """The positions attended over: grid cells or regions."""
        return self.spec.positions

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """One decoded image -> (3, H, W) uint8 at the encoder's input size."""
        spec = self.input
        image = imaging.resize(imaging.to_color_mode(image, spec.color_mode), spec.height, spec.width)
        return image[np.newaxis] if image.ndim == 2 else image.transpose(2, 0, 1)

    def feeds(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """The encoder's inputs for a (N, C, H, W) batch."""
        return {self.input.name: batch}

    def searches(
        self,
        encoded: list[np.ndarray],
        beam_size: int,
        max_length: int,
        keep_attention: bool,
    ) -> list[BeamSearch]:
        """One beam search per image from the encoder's outputs (in the graph's output order)."""
        features, projected, h, c = (encoded[i] for i in self._encoder_outputs)
        boxes = None if self._boxes is None else encoded[self._boxes]
        return [
            BeamSearch(
                features[i : i + 1],
                projected[i : i + 1],
                h[i : i + 1],
                c[i : i + 1],
                beam_size=beam_size,
                max_length=max_length,
                start_token=self.spec.start_token,
                end_token=self.spec.end_token,
                keep_attention=keep_attention,
                max_repeats=self.spec.max_repeats,
                regions=None if boxes is None else boxes[i],
            )
            for i in range(len(features))
        ]

    def check_decoder_feeds(self, feeds: dict[str, np.ndarray]) -> None:
        """A KServe v2 request to the decoder graph alone: tokens in the vocabulary, each
        hypothesis' image among the features given, finite states and features."""
        words = len(self.vocabulary)
        require_within(feeds["token"], "token", 0, words - 1, f"the vocabulary's {words} words")
        for name in ("h", "c", "features", "projected"):
            require_finite(feeds[name], name)
        if self.by_image:
            images = len(feeds["features"])
            require_within(feeds["image_index"], "image_index", 0, images - 1, f"the {images} images given")

    def words(self, hypothesis: Hypothesis) -> list[str]:
        return [self.vocabulary[t] for t in hypothesis.tokens]

    def text(self, hypothesis: Hypothesis) -> str:
        return " ".join(self.words(hypothesis))

    def warmup(self) -> None:
        """One encoder and one decoder run on a blank image; checks vocabulary and grid against the graphs."""
        spec = self.input
        blank = np.zeros((1, spec.channels, spec.height, spec.width), np.uint8)
        (search,) = self.searches(self.encoder.run(self.feeds(blank)), 1, 1, False)
        outputs = self.decoder.run(merge([search], self.by_image))
        log_probs, alpha = (outputs[self.decoder.output_names.index(name)] for name in ("log_probs", "alpha"))
        if log_probs.shape[1] != len(self.vocabulary):
            raise ModelLoadError(
                f"the decoder scores {log_probs.shape[1]} words, the manifest's vocabulary has "
                f"{len(self.vocabulary)}"
            )
        if alpha.shape[1] != self.cells:
            grid = self.spec.grid
            layout = f"{self.cells} regions" if grid is None else f"grid {grid[0]}x{grid[1]} has {self.cells}"
            raise ModelLoadError(f"the decoder attends over {alpha.shape[1]} cells, the manifest's {layout}")

    async def close(self) -> None:
        if self.loop is not None:
            await self.loop.close()


def _require(session: ModelSession, inputs: object, outputs: object, file: str) -> None:
    missing_in = sorted(set(inputs) - set(session.input_names))  # type: ignore[call-overload]
    missing_out = sorted(set(outputs) - set(session.output_names))  # type: ignore[call-overload]
    if missing_in or missing_out:
        raise ModelLoadError(
            f"{file} lacks input(s) {missing_in} / output(s) {missing_out} "
            f"(it has inputs {session.input_names}, outputs {session.output_names})"
        )


@dataclass(frozen=True)
class CaptionOptions:
    beam_size: int
    max_length: int
    count: int
    attention: bool


def caption_options(
    pipeline: CaptionerPipeline,
    beam_size: int | None,
    max_length: int | None,
    count: int | None,
    attention: bool,
    max_beam_size: int,
    max_caption_length: int,
) -> CaptionOptions:
    """A request's options with their defaults, checked against the model and the server's limits."""
    spec = pipeline.spec
    beam = spec.default_beam_size if beam_size is None else beam_size
    if not 1 <= beam <= max_beam_size:
        raise InvalidArgument(f"beam_size must be 1..{max_beam_size}, got {beam}")
    ceiling = min(spec.max_length, max_caption_length)
    length = ceiling if max_length is None else max_length
    if not 1 <= length <= ceiling:
        raise InvalidArgument(
            f"max_length must be 1..{ceiling} (the model's max_length {spec.max_length}, "
            f"the server's max_caption_length {max_caption_length}), got {length}"
        )
    wanted = 1 if count is None else count
    if not 1 <= wanted <= beam:
        raise InvalidArgument(f"count must be 1..beam_size ({beam}), got {wanted}")
    return CaptionOptions(beam, length, wanted, attention)


async def caption(
    pipeline: CaptionerPipeline,
    batcher: DynamicBatcher,
    batch: np.ndarray,
    options: CaptionOptions,
    deadline: float | None,
    times: RequestTimes | None = None,
) -> list[list[Hypothesis]]:
    """The `count` best captions of every image of a (N, C, H, W) batch: encoder, then beam searches.

    `times` gets the encoder's queue and run time, and the beam searches' time as infer time too.
    """
    loop = pipeline.loop
    assert loop is not None, "a READY captioner has a decode loop"
    encoded = await batcher.submit(pipeline.feeds(batch), deadline, times)
    searches = pipeline.searches(encoded, options.beam_size, options.max_length, options.attention)
    started = time.perf_counter()
    if len(searches) == 1:  # the common case: no task per image to create and gather
        results = [await loop.decode(searches[0], deadline)]
    else:
        tasks = [asyncio.ensure_future(loop.decode(search, deadline)) for search in searches]
        try:
            results = await asyncio.gather(*tasks)
        finally:
            for task in tasks:  # one image failed: the others leave the loop at its next step
                task.cancel()
    if times is not None:
        times.infer += time.perf_counter() - started
    return [hypotheses[: options.count] for hypotheses in results]
