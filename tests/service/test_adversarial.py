"""An adversarial table: malformed, hostile and edge-case requests to every RPC, with the status each gets.

Against the real server of the session (`server`: lenet5 only). Every case names its RPC, the
request and the status code it must get; the parametrize ids read "Rpc: case -> CODE", so
`pytest -v` prints the table. Nothing here changes the server's state (no load or unload that
succeeds), and after every case the server still answers a good request.

ModelStreamInfer answers errors in-band (error_message, the stream itself ends OK); its cases
expect "OK+error" for that, "OK" for a clean answer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import RunningServer, start_server
from drawing import draw_digit, png_bytes

from service._proto.convserve.v1 import vision_pb2 as vpb
from service._proto.convserve.v1 import vision_pb2_grpc as vpb_grpc
from service._proto.inference import grpc_predict_v2_pb2 as kpb
from service._proto.inference import grpc_predict_v2_pb2_grpc as kpb_grpc
from service.codecs import tensors

OK, INVALID, NOT_FOUND, UNAVAILABLE = "OK", "INVALID_ARGUMENT", "NOT_FOUND", "UNAVAILABLE"
IN_BAND = "OK+error"

GOOD_PNG = png_bytes(draw_digit("3"))
ONE = np.zeros((1, 1, 32, 32), np.uint8)
PARAM = kpb.InferParameter


@dataclass(frozen=True)
class Case:
    rpc: str  # "Vision/Classify", "KServe/ModelInfer", ...
    name: str
    request: object  # a message; a list of messages for ModelStreamInfer; bytes: sent as they are
    expected: str

    @property
    def id(self) -> str:
        return f"{self.rpc}: {self.name} -> {self.expected}"


def _image(data: bytes) -> vpb.Image:
    return vpb.Image(encoded=data)


def _raw(data: bytes, height: int, width: int, channels: int) -> vpb.Image:
    return vpb.Image(raw=vpb.RawImage(data=data, height=height, width=width, channels=channels))


def _infer(
    images: np.ndarray | None = ONE,
    *,
    datatype: str = "UINT8",
    shape: list[int] | None = None,
    raw: bytes | None = None,
    typed: kpb.InferTensorContents | None = None,
    **fields: object,
) -> kpb.ModelInferRequest:
    """A lenet5 request: one `image` input, raw unless `typed` (both when both are given)."""
    fields.setdefault("model_name", "lenet5")
    request = kpb.ModelInferRequest(**fields)
    assert images is not None
    tensor = request.inputs.add(
        name="image", datatype=datatype, shape=list(images.shape) if shape is None else shape
    )
    if typed is not None:
        tensor.contents.CopyFrom(typed)
    if typed is None or raw is not None:
        request.raw_input_contents.append(images.tobytes() if raw is None else raw)
    return request


def _png_header(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def _with_non_utf8_id(request: kpb.ModelInferRequest) -> bytes:
    """The request serialized with `id` (field 3, a proto3 string) set to bytes that are not UTF-8."""
    return request.SerializeToString() + b"\x1a\x02\xff\xfe"


NON_UTF8 = "non-UTF-8 id"  # grpc cannot parse it: the server parses requests itself to say so
_many_images = [_image(GOOD_PNG)] * 1025  # one more than the default max_images_per_request

CASES = [
    # --- Vision.Classify ---
    Case(
        "Vision/Classify", "good request", vpb.ClassifyRequest(model="lenet5", images=[_image(GOOD_PNG)]), OK
    ),
    Case("Vision/Classify", "empty request", vpb.ClassifyRequest(), INVALID),
    Case("Vision/Classify", "no images", vpb.ClassifyRequest(model="lenet5"), INVALID),
    Case(
        "Vision/Classify",
        "unknown model",
        vpb.ClassifyRequest(model="nope", images=[_image(GOOD_PNG)]),
        NOT_FOUND,
    ),
    Case(
        "Vision/Classify",
        "unknown version",
        vpb.ClassifyRequest(model="lenet5", version="99", images=[_image(GOOD_PNG)]),
        NOT_FOUND,
    ),
    Case(
        "Vision/Classify",
        "non-numeric version",
        vpb.ClassifyRequest(model="lenet5", version="../1", images=[_image(GOOD_PNG)]),
        NOT_FOUND,
    ),
    Case(
        "Vision/Classify",
        "top_k 0",
        vpb.ClassifyRequest(model="lenet5", images=[_image(GOOD_PNG)], top_k=0),
        INVALID,
    ),
    Case(
        "Vision/Classify",
        "top_k negative",
        vpb.ClassifyRequest(model="lenet5", images=[_image(GOOD_PNG)], top_k=-1),
        INVALID,
    ),
    Case(
        "Vision/Classify",
        "top_k 2**31-1 (capped)",
        vpb.ClassifyRequest(model="lenet5", images=[_image(GOOD_PNG)], top_k=2**31 - 1),
        OK,
    ),
    Case(
        "Vision/Classify",
        "image with no data",
        vpb.ClassifyRequest(model="lenet5", images=[vpb.Image()]),
        INVALID,
    ),
    Case(
        "Vision/Classify",
        "garbage bytes",
        vpb.ClassifyRequest(model="lenet5", images=[_image(b"\0garbage")]),
        INVALID,
    ),
    Case(
        "Vision/Classify",
        "truncated PNG",
        vpb.ClassifyRequest(model="lenet5", images=[_image(GOOD_PNG[:100])]),
        INVALID,
    ),
    Case(
        "Vision/Classify",
        "PNG claiming 50000x50000",
        vpb.ClassifyRequest(model="lenet5", images=[_image(_png_header(50_000, 50_000))]),
        INVALID,
    ),
    Case(
        "Vision/Classify",
        "raw 2**32-1 x 2**32-1, no data",
        vpb.ClassifyRequest(model="lenet5", images=[_raw(b"", 2**32 - 1, 2**32 - 1, 1)]),
        INVALID,
    ),
    Case(
        "Vision/Classify",
        "raw length off by one",
        vpb.ClassifyRequest(model="lenet5", images=[_raw(b"\0" * 15, 4, 4, 1)]),
        INVALID,
    ),
    Case(
        "Vision/Classify",
        "raw 2 channels",
        vpb.ClassifyRequest(model="lenet5", images=[_raw(b"\0" * 32, 4, 4, 2)]),
        INVALID,
    ),
    Case(
        "Vision/Classify",
        "raw 1x1 RGBA",
        vpb.ClassifyRequest(model="lenet5", images=[_raw(b"\xff" * 4, 1, 1, 4)]),
        OK,
    ),
    Case(
        "Vision/Classify",
        "one bad image among good ones",
        vpb.ClassifyRequest(model="lenet5", images=[_image(GOOD_PNG), _image(b"x")]),
        INVALID,
    ),
    Case(
        "Vision/Classify",
        "more images than one request may carry",
        vpb.ClassifyRequest(model="lenet5", images=_many_images),
        INVALID,
    ),
    # --- Vision.Generate ---
    Case("Vision/Generate", "empty request", vpb.GenerateRequest(), INVALID),
    Case("Vision/Generate", "classifier is not a generator", vpb.GenerateRequest(model="lenet5"), INVALID),
    Case("Vision/Generate", "unknown model", vpb.GenerateRequest(model="nope"), NOT_FOUND),
    Case("Vision/Generate", "count 0", vpb.GenerateRequest(model="lenet5", count=0), INVALID),
    Case("Vision/Generate", "count 10**6", vpb.GenerateRequest(model="lenet5", count=10**6), INVALID),
    Case("Vision/Generate", "count negative", vpb.GenerateRequest(model="lenet5", count=-1), INVALID),
    Case("Vision/Generate", "labels negative", vpb.GenerateRequest(model="lenet5", labels=[-1]), INVALID),
    # --- Vision.Caption ---
    Case("Vision/Caption", "empty request", vpb.CaptionRequest(), INVALID),
    Case("Vision/Caption", "no images", vpb.CaptionRequest(model="lenet5"), INVALID),
    Case(
        "Vision/Caption",
        "classifier is not a captioner",
        vpb.CaptionRequest(model="lenet5", images=[_image(GOOD_PNG)]),
        INVALID,
    ),
    Case(
        "Vision/Caption",
        "unknown model",
        vpb.CaptionRequest(model="nope", images=[_image(GOOD_PNG)]),
        NOT_FOUND,
    ),
    Case(
        "Vision/Caption",
        "beam_size 0",
        vpb.CaptionRequest(model="lenet5", images=[_image(GOOD_PNG)], beam_size=0),
        INVALID,
    ),
    Case(
        "Vision/Caption",
        "max_length negative",
        vpb.CaptionRequest(model="lenet5", images=[_image(GOOD_PNG)], max_length=-5),
        INVALID,
    ),
    # --- Vision.ListModels ---
    Case("Vision/ListModels", "empty request", vpb.ListModelsRequest(), OK),
    Case("Vision/ListModels", "unknown fields on the wire", b"\x08\x01\x12\x03abc\xf8\x07\x05", OK),
    # --- KServe health and metadata ---
    Case("KServe/ServerLive", "empty request", kpb.ServerLiveRequest(), OK),
    Case("KServe/ServerReady", "empty request", kpb.ServerReadyRequest(), OK),
    Case("KServe/ServerMetadata", "unknown fields on the wire", b"\x0a\x02hi", OK),
    Case("KServe/ModelReady", "unknown model (ready=false)", kpb.ModelReadyRequest(name="nope"), OK),
    Case("KServe/ModelReady", "empty name (ready=false)", kpb.ModelReadyRequest(), OK),
    Case("KServe/ModelMetadata", "good request", kpb.ModelMetadataRequest(name="lenet5"), OK),
    Case("KServe/ModelMetadata", "empty request", kpb.ModelMetadataRequest(), NOT_FOUND),
    Case(
        "KServe/ModelMetadata",
        "unknown version",
        kpb.ModelMetadataRequest(name="lenet5", version="-1"),
        NOT_FOUND,
    ),
    Case("KServe/ModelConfig", "unknown model", kpb.ModelConfigRequest(name="nope"), NOT_FOUND),
    Case(
        "KServe/ModelConfig", "unknown version", kpb.ModelConfigRequest(name="lenet5", version="0"), NOT_FOUND
    ),
    Case("KServe/ModelStatistics", "all models", kpb.ModelStatisticsRequest(), OK),
    Case("KServe/ModelStatistics", "unknown model", kpb.ModelStatisticsRequest(name="nope"), NOT_FOUND),
    Case(
        "KServe/ModelStatistics",
        "unknown captioner part",
        kpb.ModelStatisticsRequest(name="nope.decoder"),
        NOT_FOUND,
    ),
    Case("KServe/RepositoryIndex", "empty request", kpb.RepositoryIndexRequest(ready=True), OK),
    Case(
        "KServe/RepositoryModelLoad",
        "unknown model",
        kpb.RepositoryModelLoadRequest(model_name="nope"),
        NOT_FOUND,
    ),
    Case(
        "KServe/RepositoryModelLoad",
        "config override parameter",
        kpb.RepositoryModelLoadRequest(
            model_name="lenet5", parameters={"config": kpb.ModelRepositoryParameter(string_param="{}")}
        ),
        INVALID,
    ),
    Case(
        "KServe/RepositoryModelUnload",
        "unknown model",
        kpb.RepositoryModelUnloadRequest(model_name="nope"),
        NOT_FOUND,
    ),
    Case(
        "KServe/RepositoryModelUnload",
        "parameter it does not honour",
        kpb.RepositoryModelUnloadRequest(
            model_name="lenet5",
            parameters={"file:model.onnx": kpb.ModelRepositoryParameter(bytes_param=b"x")},
        ),
        INVALID,
    ),
    Case(
        "KServe/RepositoryModelUnload",
        "unload_dependents not a bool",
        kpb.RepositoryModelUnloadRequest(
            model_name="lenet5",
            parameters={"unload_dependents": kpb.ModelRepositoryParameter(string_param="yes")},
        ),
        INVALID,
    ),
    # --- KServe ModelInfer ---
    Case("KServe/ModelInfer", "good raw request", _infer(), OK),
    Case(
        "KServe/ModelInfer",
        "good typed request",
        _infer(typed=kpb.InferTensorContents(uint_contents=[0] * 1024)),
        OK,
    ),
    Case("KServe/ModelInfer", "empty request", kpb.ModelInferRequest(), NOT_FOUND),
    Case("KServe/ModelInfer", "no inputs", kpb.ModelInferRequest(model_name="lenet5"), INVALID),
    Case("KServe/ModelInfer", "unknown model", _infer(model_name="nope"), NOT_FOUND),
    Case("KServe/ModelInfer", "unknown version", _infer(model_version="7"), NOT_FOUND),
    Case("KServe/ModelInfer", "wrong datatype", _infer(ONE.astype(np.float32), datatype="FP32"), INVALID),
    Case("KServe/ModelInfer", "unknown datatype", _infer(datatype="UINT128"), INVALID),
    Case("KServe/ModelInfer", "wrong rank", _infer(shape=[1, 32, 32]), INVALID),
    Case("KServe/ModelInfer", "wrong image size", _infer(np.zeros((1, 1, 28, 28), np.uint8)), INVALID),
    Case("KServe/ModelInfer", "raw length one short", _infer(raw=ONE.tobytes()[:-1]), INVALID),
    Case("KServe/ModelInfer", "raw length one long", _infer(raw=ONE.tobytes() + b"\0"), INVALID),
    Case("KServe/ModelInfer", "batch dim negative", _infer(shape=[-1, 1, 32, 32]), INVALID),
    Case("KServe/ModelInfer", "batch dim 0 (an empty answer)", _infer(shape=[0, 1, 32, 32], raw=b""), OK),
    Case("KServe/ModelInfer", "batch dim 2**62, no data", _infer(shape=[2**62, 1, 32, 32], raw=b""), INVALID),
    Case("KServe/ModelInfer", "batch dim 2**63-1", _infer(shape=[2**63 - 1, 1, 32, 32], raw=b""), INVALID),
    Case(
        "KServe/ModelInfer",
        "batch 1000: product over the limit of rows",
        _infer(shape=[1000, 1, 32, 32], raw=b"\0" * 1024),
        INVALID,
    ),
    Case(
        "KServe/ModelInfer",
        "mixed raw and typed contents",
        _infer(raw=ONE.tobytes(), typed=kpb.InferTensorContents(uint_contents=[0] * 1024)),
        INVALID,
    ),
    Case(
        "KServe/ModelInfer",
        "typed count off by one",
        _infer(typed=kpb.InferTensorContents(uint_contents=[0] * 1023)),
        INVALID,
    ),
    Case(
        "KServe/ModelInfer",
        "typed value out of UINT8 range",
        _infer(typed=kpb.InferTensorContents(uint_contents=[256] + [0] * 1023)),
        INVALID,
    ),
    Case(
        "KServe/ModelInfer",
        "typed contents in the wrong field",
        _infer(typed=kpb.InferTensorContents(fp32_contents=[0.0] * 1024)),
        INVALID,
    ),
    Case(
        "KServe/ModelInfer",
        "two raw_input_contents for one input",
        kpb.ModelInferRequest(
            model_name="lenet5",
            inputs=[
                kpb.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8", shape=[1, 1, 32, 32])
            ],
            raw_input_contents=[ONE.tobytes(), b""],
        ),
        INVALID,
    ),
    Case(
        "KServe/ModelInfer",
        "input given twice",
        kpb.ModelInferRequest(
            model_name="lenet5",
            inputs=[
                kpb.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8", shape=[1, 1, 32, 32])
            ]
            * 2,
            raw_input_contents=[ONE.tobytes()] * 2,
        ),
        INVALID,
    ),
    Case(
        "KServe/ModelInfer",
        "unknown input name",
        kpb.ModelInferRequest(
            model_name="lenet5",
            inputs=[kpb.ModelInferRequest.InferInputTensor(name="x", datatype="UINT8", shape=[1, 1, 32, 32])],
            raw_input_contents=[ONE.tobytes()],
        ),
        INVALID,
    ),
    Case(
        "KServe/ModelInfer",
        "unknown output requested",
        _infer(outputs=[kpb.ModelInferRequest.InferRequestedOutputTensor(name="nope")]),
        INVALID,
    ),
    Case(
        "KServe/ModelInfer",
        "unknown parameters with NaN and infinite values (refused by name)",
        _infer(parameters={"nan": PARAM(double_param=math.nan), "inf": PARAM(double_param=-math.inf)}),
        INVALID,
    ),
    Case(
        "KServe/ModelInfer",
        "timeout parameter NaN",
        _infer(parameters={"timeout": PARAM(double_param=math.nan)}),
        INVALID,
    ),
    Case(
        "KServe/ModelInfer",
        "timeout parameter of 60 s",
        _infer(parameters={"timeout": PARAM(int64_param=60_000_000)}),
        OK,
    ),
    Case(
        "KServe/ModelInfer",
        "priority parameter",
        _infer(parameters={"priority": PARAM(uint64_param=1)}),
        INVALID,
    ),
    Case("KServe/ModelInfer", NON_UTF8, _with_non_utf8_id(_infer()), INVALID),
    Case("KServe/ModelInfer", "id of 64 KiB", _infer(id="i" * 65536), OK),
    # --- KServe ModelStreamInfer: errors in-band, the stream goes on ---
    Case("KServe/ModelStreamInfer", "good request", [_infer(id="a")], OK),
    Case("KServe/ModelStreamInfer", "empty message", [kpb.ModelInferRequest()], IN_BAND),
    Case("KServe/ModelStreamInfer", "raw length one short", [_infer(raw=ONE.tobytes()[:-1])], IN_BAND),
    Case(
        "KServe/ModelStreamInfer", "huge declared shape", [_infer(shape=[2**62, 1, 32, 32], raw=b"")], IN_BAND
    ),
    Case("KServe/ModelStreamInfer", "empty stream", [], OK),
]


_UNARY: dict[str, tuple[str, Callable[[bytes], object]]] = {}


def _method(rpc: str) -> tuple[str, type]:
    """The full gRPC method path of a case's RPC, and its response type."""
    service, name = rpc.split("/")
    if service == "Vision":
        descriptor = vpb.DESCRIPTOR.services_by_name["Vision"]
        module = vpb
    else:
        descriptor = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
        module = kpb
    method = descriptor.methods_by_name[name]
    return f"/{descriptor.full_name}/{name}", getattr(module, method.output_type.name)


def _call(channel: grpc.Channel, case: Case) -> str:
    path, response_type = _method(case.rpc)
    raw = case.request if isinstance(case.request, bytes) else None
    serialize = (lambda m: m) if raw is not None else (lambda m: m.SerializeToString())
    try:
        if case.rpc == "KServe/ModelStreamInfer":
            call = channel.stream_stream(path, serialize, response_type.FromString)
            answers = list(call(iter(case.request), timeout=60))
            assert len(answers) == len(case.request)
            return IN_BAND if any(a.error_message for a in answers) else OK
        call = channel.unary_unary(path, serialize, response_type.FromString)
        call(case.request, timeout=60)
        return OK
    except grpc.RpcError as error:
        return error.code().name


@pytest.fixture(scope="module")
def control_server(trained_lenet: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Repository control on (off by default), so the load/unload rows reach their own checks."""
    running = start_server(
        trained_lenet,
        tmp_path_factory.mktemp("adversarial") / "server.log",
        {"CONVSERVE_REPOSITORY_CONTROL": "enabled"},
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def channel(control_server: RunningServer) -> Iterator[grpc.Channel]:
    options = [("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(control_server.target, options=options) as ch:
        yield ch


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_adversarial_request_gets_its_status(channel: grpc.Channel, case: Case) -> None:
    result = _call(channel, case)
    print(f"| {case.rpc} | {case.name} | {case.expected} | {result} |")
    assert result == case.expected, f"{case.id}: got {result}"


def test_server_still_serves_after_the_table(channel: grpc.Channel) -> None:
    stub = kpb_grpc.GRPCInferenceServiceStub(channel)
    response = stub.ModelInfer(_infer(id="after"), timeout=60)
    assert response.id == "after" and tensors.decode_output(
        response.outputs[0], response.raw_output_contents[0]
    ).shape == (1, 10)
    vision = vpb_grpc.VisionStub(channel)
    answer = vision.Classify(
        vpb.ClassifyRequest(model="lenet5", images=[_image(GOOD_PNG)], top_k=1), timeout=60
    )
    assert answer.results[0].predictions[0].label == "3"


def test_the_table_is_large_and_covers_every_rpc() -> None:
    assert len(CASES) >= 40
    rpcs = {c.rpc for c in CASES}
    every = {f"Vision/{m.name}" for m in vpb.DESCRIPTOR.services_by_name["Vision"].methods}
    every |= {f"KServe/{m.name}" for m in kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods}
    assert every <= rpcs, sorted(every - rpcs)
