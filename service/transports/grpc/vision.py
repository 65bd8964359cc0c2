"""`convserve.v1.Vision`: the task API. A translator: protobuf messages to the data plane's types
and back, nothing more."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from service._proto.convserve.v1 import vision_pb2 as pb
from service._proto.convserve.v1 import vision_pb2_grpc as pb_grpc
from service.dataplane import DataPlane
from service.domain import (
    CaptionRequest,
    ClassifyRequest,
    EncodedImage,
    GenerateRequest,
    ImageInput,
    ModelInfo,
    RawImage,
)
from service.transports.grpc.registration import timeout_of

_STATES = {
    "loading": pb.MODEL_STATE_LOADING,
    "ready": pb.MODEL_STATE_READY,
    "failed": pb.MODEL_STATE_FAILED,
    "unloaded": pb.MODEL_STATE_UNLOADED,
}


class VisionServicer(pb_grpc.VisionServicer):
    def __init__(self, plane: DataPlane) -> None:
        self._plane = plane

    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        found = await self._plane.classify(
            ClassifyRequest(
                model=request.model,
                version=request.version,
                images=_images(request.images),
                top_k=request.top_k if request.HasField("top_k") else None,
            ),
            timeout_of(context),
        )
        return pb.ClassifyResponse(
            model=found.model,
            version=found.version,
            results=[
                pb.Classification(
                    predictions=[pb.Prediction(label=p.label, index=p.index, score=p.score) for p in row]
                )
                for row in found.results
            ],
        )

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        found = await self._plane.generate(
            GenerateRequest(
                model=request.model,
                version=request.version,
                count=request.count if request.HasField("count") else None,
                labels=list(request.labels),
                seed=request.seed if request.HasField("seed") else None,
                grid=request.grid,
            ),
            timeout_of(context),
        )
        return pb.GenerateResponse(
            model=found.model,
            version=found.version,
            seed=found.seed,
            images=[
                pb.GeneratedImage(png=i.png, label_index=i.label_index, label=i.label) for i in found.images
            ],
            grid_png=found.grid_png,
        )

    async def Caption(
        self, request: pb.CaptionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CaptionResponse:
        found = await self._plane.caption(
            CaptionRequest(
                model=request.model,
                version=request.version,
                images=_images(request.images),
                beam_size=request.beam_size if request.HasField("beam_size") else None,
                max_length=request.max_length if request.HasField("max_length") else None,
                count=request.count if request.HasField("count") else None,
                attention=request.return_attention,
            ),
            timeout_of(context),
        )
        return pb.CaptionResponse(
            model=found.model,
            version=found.version,
            results=[
                pb.Captions(
                    captions=[
                        pb.GeneratedCaption(
                            text=c.text,
                            words=c.words,
                            tokens=c.tokens,
                            log_prob=c.log_prob,
                            mean_log_prob=c.mean_log_prob,
                            attention=[
                                pb.AttentionMap(rows=a.rows, columns=a.columns, weights=a.weights)
                                for a in c.attention
                            ],
                        )
                        for c in captions
                    ],
                    regions=[
                        pb.Region(left=r.left, top=r.top, right=r.right, bottom=r.bottom) for r in regions
                    ],
                )
                for captions, regions in zip(found.results, found.regions, strict=True)
            ],
        )

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[_model_info(m) for m in self._plane.models()])


def _images(images: Sequence[pb.Image]) -> list[ImageInput]:
    return [_image(image) for image in images]


def _image(image: pb.Image) -> ImageInput:
    which = image.WhichOneof("data")
    if which == "encoded":
        return EncodedImage(image.encoded)
    if which == "raw":
        raw = image.raw
        return RawImage(raw.data, raw.height, raw.width, raw.channels)
    return None


def _model_info(found: ModelInfo) -> pb.ModelInfo:
    versions = [
        pb.ModelVersion(version=v.version, state=_STATES[v.state], reason=v.reason, provider=v.provider)
        for v in found.versions
    ]
    spec = found.input
    return pb.ModelInfo(
        name=found.name,
        kind=found.kind,
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
        labels=found.labels,
    )
