"""`convserve.v1.Vision`: the task API."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from service._proto.convserve.v1 import vision_pb2 as pb
from service._proto.convserve.v1 import vision_pb2_grpc as pb_grpc
from service.codecs import images as codecs
from service.errors import InvalidArgument
from service.kinds import CaptionerPipeline, ClassifierPipeline
from service.kinds.captioner.pipeline import caption, caption_options
from service.kinds.generator import GeneratorPipeline, grid_png, to_png
from service.repository import ModelEntry, ModelRepository, ModelVersion, VersionState
from service.settings import Settings
from service.transports.calls import current_call
from service.transports.grpc.common import deadline_of, request_times, resolve

#: Requests with at most this many bytes of images are decoded on the event loop: for small images the
#: hand-off to a thread costs more than the work (measured with `convserve bench`).
INLINE_BYTES = 16 * 1024

_STATES = {
    VersionState.LOADING: pb.MODEL_STATE_LOADING,
    VersionState.READY: pb.MODEL_STATE_READY,
    VersionState.FAILED: pb.MODEL_STATE_FAILED,
    VersionState.UNLOADED: pb.MODEL_STATE_UNLOADED,
}


class VisionServicer(pb_grpc.VisionServicer):
    def __init__(self, repository: ModelRepository, settings: Settings) -> None:
        self._repository = repository
        self._settings = settings

    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        return await self.classify(request, deadline_of(context))

    async def classify(self, request: pb.ClassifyRequest, deadline: float | None) -> pb.ClassifyResponse:
        """Classify, for any transport; `deadline` on the event loop's clock."""
        top_k = request.top_k if request.HasField("top_k") else self._settings.default_top_k
        if top_k <= 0:
            raise InvalidArgument(f"top_k must be > 0, got {top_k}")
        if not request.model:
            raise InvalidArgument("model is required, e.g. 'lenet5'")
        self._check_image_count(len(request.images))
        served = resolve(self._repository, request.model, request.version)
        with served.in_use():
            return await self._classify(served, request, top_k, deadline)

    def _check_image_count(self, count: int) -> None:
        if count == 0:
            raise InvalidArgument("no images in the request")
        limit = self._settings.max_images_per_request
        if count > limit:
            raise InvalidArgument(f"{count} images in one request; at most {limit} (max_images_per_request)")

    async def _classify(
        self, served: ModelVersion, request: pb.ClassifyRequest, top_k: int, deadline: float | None
    ) -> pb.ClassifyResponse:
        pipeline, batcher = served.pipeline, served.batcher
        if not isinstance(pipeline, ClassifierPipeline) or batcher is None:
            raise InvalidArgument(f"model {served.model!r} is not a classifier; call it through KServe v2")
        current_call().images = len(request.images)
        stats, times = served.stats, request_times()
        assert stats is not None
        with stats.input_stage(times):
            batcher.admit(len(request.images))  # refuse before decoding what cannot be queued
            if sum(len(i.encoded) + len(i.raw.data) for i in request.images) <= INLINE_BYTES:
                batch = self._prepare_batch(pipeline, request.images)
            else:
                batch = await asyncio.to_thread(self._prepare_batch, pipeline, request.images)
        with stats.pending.track_inprogress():
            outputs = await batcher.submit(pipeline.feeds(batch), deadline, times)
        with stats.output_stage(times):
            ranked = pipeline.rank(pipeline.logits(outputs), top_k)
            return pb.ClassifyResponse(
                model=served.model,
                version=served.version,
                results=[
                    pb.Classification(
                        predictions=[pb.Prediction(label=p.label, index=p.index, score=p.score) for p in row]
                    )
                    for row in ranked
                ],
            )

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        return await self.generate(request, deadline_of(context))

    async def generate(self, request: pb.GenerateRequest, deadline: float | None) -> pb.GenerateResponse:
        """Generate, for any transport; `deadline` on the event loop's clock."""
        count = request.count if request.HasField("count") else 1
        limit = self._settings.max_generate_count
        if not 1 <= count <= limit:
            raise InvalidArgument(f"count must be 1..{limit}, got {count}")
        if not request.model:
            raise InvalidArgument("model is required, e.g. 'dcgan'")
        seed = request.seed if request.HasField("seed") else secrets.randbits(63)
        served = resolve(self._repository, request.model, request.version)
        with served.in_use():
            pipeline, batcher, stats = served.pipeline, served.batcher, served.stats
            if not isinstance(pipeline, GeneratorPipeline) or batcher is None or stats is None:
                raise InvalidArgument(f"model {served.model!r} is not a generator")
            current_call().images = count
            times = request_times()
            with stats.input_stage(times):
                batcher.admit(count)
                plan = pipeline.plan(count, list(request.labels), seed)
            with stats.pending.track_inprogress():
                outputs = await batcher.submit(pipeline.feeds(plan), deadline, times)
            with stats.output_stage(times):
                images = pipeline.images(outputs)
                encoded = await asyncio.to_thread(_encode_images, images, request.grid)
            labels = pipeline.labels
            return pb.GenerateResponse(
                model=served.model,
                version=served.version,
                seed=seed,
                images=[
                    pb.GeneratedImage(png=png, label_index=int(i), label=labels[int(i)])
                    for png, i in zip(encoded.pngs, plan.labels, strict=True)
                ],
                grid_png=encoded.grid,
            )

    async def Caption(
        self, request: pb.CaptionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CaptionResponse:
        return await self.caption(request, deadline_of(context))

    async def caption(self, request: pb.CaptionRequest, deadline: float | None) -> pb.CaptionResponse:
        """Caption, for any transport; `deadline` on the event loop's clock."""
        if not request.model:
            raise InvalidArgument("model is required, e.g. 'captioner'")
        self._check_image_count(len(request.images))
        served = resolve(self._repository, request.model, request.version)
        with served.in_use():
            pipeline, batcher, stats = served.pipeline, served.batcher, served.stats
            if not isinstance(pipeline, CaptionerPipeline) or batcher is None or stats is None:
                kind = served.manifest.kind if served.manifest is not None else "model"
                raise InvalidArgument(f"model {served.model!r} is a {kind}, not a captioner")
            settings = self._settings
            options = caption_options(
                pipeline,
                request.beam_size if request.HasField("beam_size") else None,
                request.max_length if request.HasField("max_length") else None,
                request.count if request.HasField("count") else None,
                request.return_attention,
                settings.max_beam_size,
                settings.max_caption_length,
            )
            current_call().images = len(request.images)
            times = request_times()
            with stats.input_stage(times):
                batcher.admit(len(request.images))
                if sum(len(i.encoded) + len(i.raw.data) for i in request.images) <= INLINE_BYTES:
                    batch = self._prepare_batch(pipeline, request.images)
                else:
                    batch = await asyncio.to_thread(self._prepare_batch, pipeline, request.images)
            with stats.pending.track_inprogress():
                results = await caption(pipeline, batcher, batch, options, deadline, times)
            with stats.output_stage(times):
                rows, columns = pipeline.spec.grid
                return pb.CaptionResponse(
                    model=served.model,
                    version=served.version,
                    results=[
                        pb.Captions(
                            captions=[
                                pb.GeneratedCaption(
                                    text=pipeline.text(h),
                                    words=pipeline.words(h),
                                    tokens=h.tokens,
                                    log_prob=h.log_prob,
                                    attention=[
                                        pb.AttentionMap(rows=rows, columns=columns, weights=a.tolist())
                                        for a in h.attention
                                    ],
                                )
                                for h in hypotheses
                            ]
                        )
                        for hypotheses in results
                    ],
                )

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[_model_info(entry) for entry in self._repository.entries()])

    def _prepare_batch(
        self, pipeline: ClassifierPipeline | CaptionerPipeline, images: Sequence[pb.Image]
    ) -> np.ndarray:
        """Decode and pre-process every image; blocking (PIL), so it runs off the event loop."""
        return np.stack([pipeline.prepare(self._decode(image, i)) for i, image in enumerate(images)])

    def _decode(self, image: pb.Image, index: int) -> np.ndarray:
        limit = self._settings.max_image_pixels
        try:
            which = image.WhichOneof("data")
            if which == "encoded":
                return codecs.decode_encoded(image.encoded, limit)
            if which == "raw":
                raw = image.raw
                return codecs.decode_raw(raw.data, raw.height, raw.width, raw.channels, limit)
            raise InvalidArgument("image has neither encoded bytes nor a raw array")
        except InvalidArgument as exc:
            raise InvalidArgument(f"image {index}: {exc}") from None


@dataclass(frozen=True)
class _Encoded:
    pngs: list[bytes]
    grid: bytes


def _encode_images(images: np.ndarray, grid: bool) -> _Encoded:
    """PNG encoding is CPU work: it runs off the event loop."""
    if grid:
        return _Encoded(pngs=[b""] * len(images), grid=grid_png(images))
    return _Encoded(pngs=[to_png(image) for image in images], grid=b"")


def _model_info(entry: ModelEntry) -> pb.ModelInfo:
    versions = [
        pb.ModelVersion(version=v.version, state=_STATES[v.state], reason=v.reason, provider=v.provider)
        for v in entry.newest_first()
    ]
    manifest = entry.manifest
    if manifest is None:
        versions = versions or [pb.ModelVersion(state=pb.MODEL_STATE_FAILED, reason=entry.error)]
        return pb.ModelInfo(name=entry.name, versions=versions)
    spec = manifest.input
    return pb.ModelInfo(
        name=entry.name,
        kind=manifest.kind,
        versions=versions,
        input=None
        if spec is None
        else pb.InputSpec(
            name=spec.name,
            height=spec.height,
            width=spec.width,
            channels=spec.channels,
            color_mode=spec.color_mode,
        ),
        labels=manifest.labels or [],
    )
