"""Kind `captioner`: images in, captions out (Caption), with beam search in the server.

A version has two graphs. The encoder runs once per image through the version's batcher; the
decoder runs once per step for every hypothesis in flight, in the version's `DecodeLoop`. Over
KServe v2 the captioner takes encoded images (BYTES, N x 1) and answers its best captions, and its
graphs are tensor models of their own: `<captioner>.encoder` (sharing the version's batcher and
statistics) and `<captioner>.decoder` (its own batcher; its statistics also count the decode
loop's steps).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np

from service.codecs import tensors
from service.codecs.cost import INLINE, Codec, Work
from service.codecs.images import decode_images, image_work
from service.contract.manifest import Manifest
from service.domain import (
    AttentionMap,
    Caption,
    CaptionRequest,
    CaptionResult,
    EncodedImage,
    ImageInput,
    InferRequest,
    InferResult,
    Region,
)
from service.engine.batching import BatchingOptions, DynamicBatcher
from service.errors import InvalidArgument
from service.kinds.base import LoadContext, LoadedModel, Signature, Task, TaskName
from service.kinds.captioner.beam_search import DecodeLoop, DecodingOptions, Hypothesis
from service.kinds.captioner.pipeline import (
    KSERVE_INPUT,
    KSERVE_OUTPUT,
    CaptionerPipeline,
    CaptionOptions,
    caption,
    caption_options,
)
from service.kinds.checks import require_image_count
from service.kinds.tensor import TensorModel, check_headers, requested_outputs, tensor_model
from service.observability.statistics import RequestTimes, VersionStatistics
from service.settings import Settings

#: The captioner as a whole, in KServe metadata and ModelConfig: the beam search is in the server.
CAPTIONER_PLATFORM = "convserve_captioner"
CAPTIONER_BACKEND = "convserve"


class CaptionerKind:
    name = "captioner"
    answers: ClassVar[Mapping[type, TaskName]] = {CaptionRequest: TaskName("captioner", "captioner")}

    def load(self, manifest: Manifest, version_dir: Path, context: LoadContext) -> CaptionerModel:
        assert manifest.captioner is not None, "the manifest validator requires it"
        spec = manifest.captioner
        encoder = context.session(version_dir, spec.encoder_file)
        decoder = context.session(version_dir, spec.decoder_file)
        pipeline = CaptionerPipeline(manifest, encoder, decoder)
        context.warm_up(pipeline.warmup)
        model = context.model
        encoder_part = tensor_model(
            f"{model}.encoder", manifest, encoder, context, context.stats, model_file=spec.encoder_file
        )
        decoder_stats = context.statistics(f"{model}.decoder")
        decoder_part = tensor_model(
            f"{model}.decoder",
            manifest,
            decoder,
            context,
            decoder_stats,
            model_file=spec.decoder_file,
            check=pipeline.check_decoder_feeds,
        )
        pipeline.loop = DecodeLoop(
            decoder.run,
            decoder.output_names,
            _decoding(context.settings),
            model,
            context.version,
            on_step=decoder_stats.ran,
            by_image=pipeline.by_image,
        )
        return CaptionerModel(model, pipeline, encoder_part, decoder_part, context.settings)


class CaptionerModel:
    def __init__(
        self,
        name: str,
        pipeline: CaptionerPipeline,
        encoder: TensorModel,
        decoder: TensorModel,
        settings: Settings,
    ) -> None:
        self.name = name
        self.pipeline = pipeline
        self.batcher: DynamicBatcher = encoder.batcher  # Caption requests run their images through it
        self.stats: VersionStatistics = encoder.stats
        self.provider = encoder.provider
        self.signature = Signature(
            [KSERVE_INPUT], [KSERVE_OUTPUT], True, CAPTIONER_PLATFORM, CAPTIONER_BACKEND, model_file=""
        )
        self.parts: Mapping[str, LoadedModel] = {"encoder": encoder, "decoder": decoder}
        self._settings = settings
        self.tasks: dict[type, Task] = {CaptionRequest: self.caption, InferRequest: self.infer}

    @property
    def batching(self) -> BatchingOptions:
        return self.batcher.options

    def caption(self, request: CaptionRequest) -> CaptionJob:
        require_image_count(len(request.images), self._settings)
        options = self._options(request.beam_size, request.max_length, request.count, request.attention)
        return CaptionJob(self.pipeline, self.batcher, request.images, options, self._settings)

    def infer(self, request: InferRequest) -> KServeCaptionJob:
        requested_outputs(request.outputs, [KSERVE_OUTPUT.name])  # it has one: refuse any other
        if any("classification" in o.parameters for o in request.outputs):
            raise InvalidArgument(
                f"output {KSERVE_OUTPUT.name!r} holds captions: classification does not apply"
            )
        rows = check_headers(request.inputs, [KSERVE_INPUT], True)
        if rows == 0:
            raise InvalidArgument(f"input {KSERVE_INPUT.name!r} holds no images")
        options = self._options(None, None, None, False)
        return KServeCaptionJob(self.pipeline, self.batcher, request, rows, options, self._settings)

    def _options(
        self, beam_size: int | None, max_length: int | None, count: int | None, attention: bool
    ) -> CaptionOptions:
        settings = self._settings
        return caption_options(
            self.pipeline,
            beam_size,
            max_length,
            count,
            attention,
            settings.max_beam_size,
            settings.max_caption_length,
        )

    async def close(self) -> None:
        await self.pipeline.close()
        for part in self.parts.values():
            await part.close()  # the encoder's batcher is the version's own


class CaptionJob:
    """Decode and pre-process the images, encode them in a batch, beam-search each."""

    finish_work = INLINE

    def __init__(
        self,
        pipeline: CaptionerPipeline,
        batcher: DynamicBatcher,
        images: Sequence[ImageInput],
        options: CaptionOptions,
        settings: Settings,
    ) -> None:
        self._pipeline = pipeline
        self._images = images
        self._options = options
        self._limits = settings.max_image_pixels, settings.max_request_pixels
        self.batcher = batcher
        self.rows = len(images)
        self.prepare_work = image_work(images)
        self._batch = np.empty(0)
        self._results: list[list[Hypothesis]] = []

    def prepare(self) -> None:
        pipeline = self._pipeline
        self._batch = np.stack(
            [pipeline.prepare(image) for image in decode_images(self._images, *self._limits)]
        )

    async def run(self, deadline: float | None, times: RequestTimes) -> None:
        self._results = await caption(
            self._pipeline, self.batcher, self._batch, self._options, deadline, times
        )

    def finish(self) -> CaptionResult:
        return CaptionResult(
            results=[[self._caption(h) for h in found] for found in self._results],
            regions=[_regions(found) for found in self._results],
        )

    def _caption(self, hypothesis: Hypothesis) -> Caption:
        pipeline = self._pipeline
        rows, columns = pipeline.spec.grid or (pipeline.cells, 1)
        return Caption(
            text=pipeline.text(hypothesis),
            words=pipeline.words(hypothesis),
            tokens=list(hypothesis.tokens),
            log_prob=hypothesis.log_prob,
            mean_log_prob=hypothesis.mean_log_prob,
            attention=[AttentionMap(rows, columns, a.tolist()) for a in hypothesis.attention],
        )


def _decoding(settings: Settings) -> DecodingOptions:
    """The decode loop's options: the captioner reads its own server settings, so generic loading
    code carries nothing of it."""
    return DecodingOptions(
        max_rows=settings.max_decode_batch,
        batching=settings.caption_batching,
        max_queue=settings.max_decode_queue,
    )


def _regions(hypotheses: list[Hypothesis]) -> list[Region]:
    """The boxes a region captioner attended over (the same for every caption of an image)."""
    if not hypotheses or hypotheses[0].regions is None:
        return []
    return [Region(*box) for box in hypotheses[0].regions.tolist()]


class KServeCaptionJob(CaptionJob):
    """`captioner` over KServe v2: encoded images (BYTES, N x 1) in, the best captions (BYTES, N x 1) out."""

    def __init__(
        self,
        pipeline: CaptionerPipeline,
        batcher: DynamicBatcher,
        request: InferRequest,
        rows: int,
        options: CaptionOptions,
        settings: Settings,
    ) -> None:
        super().__init__(pipeline, batcher, [], options, settings)
        self._request = request
        self._max_elements = settings.max_message_bytes
        self.rows = rows
        self.prepare_work = Work(Codec.IMAGE, sum(t.size for t in request.inputs))

    def prepare(self) -> None:
        feeds = tensors.decode_tensors(self._request.inputs, max_elements=self._max_elements)
        images = [EncodedImage(bytes(data)) for data in feeds[KSERVE_INPUT.name].ravel()]
        pipeline = self._pipeline
        self._batch = np.stack([pipeline.prepare(image) for image in decode_images(images, *self._limits)])

    def finish(self) -> InferResult:  # type: ignore[override]
        texts = np.array([[self._pipeline.text(best[0]).encode()] for best in self._results], dtype=object)
        return InferResult(outputs=[(KSERVE_OUTPUT.name, texts)], id=self._request.id)
