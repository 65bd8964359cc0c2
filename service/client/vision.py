"""Python clients for the Vision API, synchronous and asyncio, each with a default deadline.

with VisionClient("127.0.0.1:8001") as client:
    response = client.classify([Path("digit.png")], model="lenet5", top_k=3)

TLS: `tls_ca=` (PEM path or bytes; implies TLS), `tls=True` (system roots), `tls_cert=`/`tls_key=`
(mutual TLS); bearer token: `token=` (sent as `authorization: Bearer ...` metadata on every call).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._proto.convserve.v1 import vision_pb2 as pb
from service._proto.convserve.v1 import vision_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:8001"
DEFAULT_TIMEOUT_SECONDS = 10.0

#: An image as a caller has it: a file path, encoded bytes, a uint8 array (H, W[, C]) or a proto.
ImageLike = Path | str | bytes | np.ndarray | pb.Image


def to_image(image: ImageLike) -> pb.Image:
    """Wrap a path, encoded bytes or a uint8 array as a request image."""
    if isinstance(image, pb.Image):
        return image
    if isinstance(image, (str, Path)):
        return pb.Image(encoded=Path(image).read_bytes())
    if isinstance(image, bytes):
        return pb.Image(encoded=image)
    array = np.ascontiguousarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"a raw image must be uint8 (H, W) or (H, W, C), got {array.dtype} {array.shape}")
    height, width = array.shape[:2]
    channels = 1 if array.ndim == 2 else array.shape[2]
    return pb.Image(raw=pb.RawImage(data=array.tobytes(), height=height, width=width, channels=channels))


def classify_request(
    images: Sequence[ImageLike], model: str, version: str = "", top_k: int | None = None
) -> pb.ClassifyRequest:
    request = pb.ClassifyRequest(model=model, version=version, images=[to_image(i) for i in images])
    if top_k is not None:
        request.top_k = top_k
    return request


def generate_request(
    model: str, count: int | None, labels: Sequence[int], seed: int | None, grid: bool, version: str = ""
) -> pb.GenerateRequest:
    request = pb.GenerateRequest(model=model, version=version, labels=list(labels), grid=grid)
    if count is not None:
        request.count = count
    if seed is not None:
        request.seed = seed
    return request


def caption_request(
    images: Sequence[ImageLike],
    model: str,
    version: str = "",
    beam_size: int | None = None,
    max_length: int | None = None,
    count: int | None = None,
    attention: bool = False,
) -> pb.CaptionRequest:
    request = pb.CaptionRequest(
        model=model, version=version, images=[to_image(i) for i in images], return_attention=attention
    )
    if beam_size is not None:
        request.beam_size = beam_size
    if max_length is not None:
        request.max_length = max_length
    if count is not None:
        request.count = count
    return request


PemLike = Path | str | bytes


def _pem(value: PemLike | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def channel_credentials(
    tls: bool = False,
    tls_ca: PemLike | None = None,
    tls_cert: PemLike | None = None,
    tls_key: PemLike | None = None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials when any TLS option is given (None: plaintext); cert and key go together."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("a client certificate needs its key, and the key its certificate")
    if not (tls or tls_ca is not None or tls_cert is not None):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(tls_ca), private_key=_pem(tls_key), certificate_chain=_pem(tls_cert)
    )


def _auth_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None


def _channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


class _VisionCalls:
    """The calls of both clients. Each returns what the stub returns: the response for
    VisionClient, an awaitable of it for AsyncVisionClient."""

    _channels: ModuleType  # grpc or grpc.aio, whose insecure_channel / secure_channel open the channel

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        max_message_bytes: int = 64 * 1024 * 1024,
        *,
        token: str | None = None,
        tls: bool = False,
        tls_ca: PemLike | None = None,
        tls_cert: PemLike | None = None,
        tls_key: PemLike | None = None,
    ) -> None:
        credentials = channel_credentials(tls, tls_ca, tls_cert, tls_key)
        self.timeout = timeout
        self._metadata = _auth_metadata(token)
        options = _channel_options(max_message_bytes)
        self._channel = (
            self._channels.insecure_channel(target, options=options)
            if credentials is None
            else self._channels.secure_channel(target, credentials, options=options)
        )
        self._vision = pb_grpc.VisionStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def classify(
        self,
        images: Sequence[ImageLike],
        model: str = "lenet5",
        version: str = "",
        top_k: int | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Top-k labels per image (pb.ClassifyResponse)."""
        request = classify_request(images, model, version, top_k)
        return self._vision.Classify(request, timeout=timeout or self.timeout, metadata=self._metadata)

    def generate(
        self,
        model: str = "dcgan",
        count: int | None = None,
        labels: Sequence[int] = (),
        seed: int | None = None,
        grid: bool = False,
        version: str = "",
        timeout: float | None = None,
    ) -> Any:
        """Generated images (pb.GenerateResponse); the same seed gives the same pixels."""
        request = generate_request(model, count, labels, seed, grid, version)
        return self._vision.Generate(request, timeout=timeout or self.timeout, metadata=self._metadata)

    def caption(
        self,
        images: Sequence[ImageLike],
        model: str = "captioner",
        version: str = "",
        beam_size: int | None = None,
        max_length: int | None = None,
        count: int | None = None,
        attention: bool = False,
        timeout: float | None = None,
    ) -> Any:
        """The `count` best captions per image (pb.CaptionResponse; server-side beam search);
        unset: the model's defaults."""
        request = caption_request(images, model, version, beam_size, max_length, count, attention)
        return self._vision.Caption(request, timeout=timeout or self.timeout, metadata=self._metadata)

    def list_models(self, timeout: float | None = None) -> Any:
        """Every model and its versions (pb.ListModelsResponse)."""
        request = pb.ListModelsRequest()
        return self._vision.ListModels(request, timeout=timeout or self.timeout, metadata=self._metadata)

    def _check_health(self, service: str, timeout: float | None) -> Any:
        request = health_pb2.HealthCheckRequest(service=service)
        return self._health.Check(request, timeout=timeout or self.timeout, metadata=self._metadata)


def _status_name(response: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


class VisionClient(_VisionCalls):
    """Blocking client. Errors arrive as grpc.RpcError with the server's status code and message."""

    _channels = grpc

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """The status name of a health entry: "SERVING", "NOT_SERVING", ..."""
        return _status_name(self._check_health(service, timeout))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> VisionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncVisionClient(_VisionCalls):
    """asyncio client with the same calls as VisionClient (await each)."""

    _channels = grpc.aio

    async def health(self, service: str = "", timeout: float | None = None) -> str:
        return _status_name(await self._check_health(service, timeout))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncVisionClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
