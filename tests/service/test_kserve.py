"""KServe v2 over gRPC: tritonclient unmodified, raw and typed tensors, errors, streaming, the repository."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from conftest import start_server
from drawing import draw_digit, png_bytes
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from onnx import TensorProto, helper

from service._proto.inference import grpc_predict_v2_pb2 as pb
from service._proto.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from service.client import VisionClient
from service.codecs.kserve import model_config, model_config_json, model_statistics, model_statistics_json
from service.domain import Duration, ModelConfig, ModelStatistics, TensorMetadata
from training.data.digits import load_digit_splits

HERE = Path(__file__).parent


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _image_request(images: np.ndarray, **fields: object) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="lenet5", **fields)
    request.inputs.add(name="image", datatype="UINT8", shape=images.shape)
    request.raw_input_contents.append(images.tobytes())
    return request


def _logits(response: pb.ModelInferResponse) -> np.ndarray:
    (output,) = response.outputs
    assert (output.name, output.datatype) == ("logits", "FP32")
    return np.frombuffer(response.raw_output_contents[0], np.float32).reshape(output.shape)


def test_tritonclient_unmodified(server, tmp_path) -> None:
    """Live/ready, metadata, config, infer with raw inputs: same classes as Classify."""
    test = load_digit_splits().test
    images = np.ascontiguousarray(test.images[:16])
    np.save(tmp_path / "images.npy", images)
    done = subprocess.run(
        [sys.executable, str(HERE / "tritonclient_calls.py"), server.target, str(tmp_path / "images.npy")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert [seen[k] for k in ("live", "ready", "model_ready", "unknown_ready")] == [True, True, True, False]
    assert seen["server"]["name"] == "convserve"
    image = {"name": "image", "datatype": "UINT8", "shape": ["-1", "1", "32", "32"]}
    assert seen["metadata"]["inputs"] == [image]
    assert seen["config"]["max_batch_size"] == 64
    assert seen["config"]["input"][0]["dims"] == ["1", "32", "32"]
    assert seen["logits_shape"] == [16, 10]
    assert seen["id"] == "triton-1"
    with VisionClient(server.target) as client:
        classify = client.classify(list(test.native[:16]), top_k=1)
    assert seen["classes"] == [r.predictions[0].index for r in classify.results]
    (stats,) = seen["statistics"]["model_stats"]
    assert int(stats["inference_count"]) >= 16
    assert {"name": "lenet5", "version": "1", "state": "READY"}.items() <= seen["index"]["models"][0].items()


def test_typed_contents_and_raw_give_the_same_logits(stub) -> None:
    images = load_digit_splits().test.images[:3]
    raw = _logits(stub.ModelInfer(_image_request(images)))
    typed_request = pb.ModelInferRequest(model_name="lenet5", id="abc")
    tensor = typed_request.inputs.add(name="image", datatype="UINT8", shape=images.shape)
    tensor.contents.uint_contents.extend(images.ravel().tolist())
    response = stub.ModelInfer(typed_request)
    assert response.id == "abc"
    assert (response.model_name, response.model_version) == ("lenet5", "1")
    np.testing.assert_array_equal(_logits(response), raw)


@pytest.mark.parametrize(
    "shape, datatype, data, expected",
    [
        ([1, 1, 32, 32], "UINT8", b"\x00" * 1000, "needs 1024 bytes, got 1000"),
        ([1, 1, 28, 28], "UINT8", b"\x00" * 784, "expected shape [-1, 1, 32, 32] (-1: any), got [1, 1, 28"),
        ([1, 1, 32, 32], "FP32", b"\x00" * 4096, "expected datatype UINT8, got FP32"),
        ([1_000_000_000, 1, 32, 32], "UINT8", b"\x00" * 16, "request has 1000000000 rows"),
        ([-1, 1, 32, 32], "UINT8", b"\x00" * 16, "negative dimension"),
        ([1, 1, 32, 32], "NOPE", b"\x00" * 1024, "NOPE"),
    ],
)
def test_tensor_mismatches_name_the_input(stub, shape, datatype, data, expected) -> None:
    request = pb.ModelInferRequest(model_name="lenet5")
    request.inputs.add(name="image", datatype=datatype, shape=shape)
    request.raw_input_contents.append(data)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=10)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert expected in info.value.details()
    assert "image" in info.value.details() or datatype == "NOPE"


def test_unknown_input_and_model(stub) -> None:
    request = pb.ModelInferRequest(model_name="lenet5")
    request.inputs.add(name="picture", datatype="UINT8", shape=[1])
    request.raw_input_contents.append(b"\x00")
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown input(s) ['picture']; the model takes ['image']" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(_image_request(np.zeros((1, 1, 32, 32), np.uint8), model_version="7"))
    assert info.value.code() is grpc.StatusCode.NOT_FOUND


def test_metadata_calls_are_not_counted_as_inferences(stub) -> None:
    def successes() -> int:
        (stats,) = stub.ModelStatistics(pb.ModelStatisticsRequest(name="lenet5")).model_stats
        return stats.inference_stats.success.count

    before = successes()
    for _ in range(3):
        stub.ModelConfig(pb.ModelConfigRequest(name="lenet5"))
        stub.ModelMetadata(pb.ModelMetadataRequest(name="lenet5"))
    assert successes() == before
    stub.ModelInfer(_image_request(np.zeros((2, 1, 32, 32), np.uint8)))
    assert successes() == before + 1


def test_stream_answers_in_order_and_reports_errors_in_band(stub) -> None:
    good = _image_request(np.zeros((1, 1, 32, 32), np.uint8), id="first")
    bad = pb.ModelInferRequest(model_name="nope", id="second")
    last = _image_request(np.zeros((2, 1, 32, 32), np.uint8), id="third")
    responses = {r.infer_response.id: r for r in stub.ModelStreamInfer(iter([good, bad, last]))}
    assert sorted(responses) == ["first", "second", "third"]
    assert "model 'nope' not found" in responses["second"].error_message
    assert responses["first"].error_message == ""
    assert responses["third"].infer_response.outputs[0].shape == [2, 10]


def _message_json(message: Message) -> dict:
    """A message as the REST binding writes it, read field by field from protobuf (what the HTTP
    routes answered before they wrote the JSON themselves): set fields in field-number order,
    enums by name, numbers as numbers."""

    def value(field: FieldDescriptor, item: object) -> object:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            return _message_json(item)  # type: ignore[arg-type]
        if field.type == FieldDescriptor.TYPE_ENUM:
            return field.enum_type.values_by_number[item].name
        return item

    return {
        field.name: [value(field, i) for i in item] if field.is_repeated else value(field, item)
        for field, item in message.ListFields()
    }


_TENSORS = [TensorMetadata("image", "UINT8", [1, 32, 32]), TensorMetadata("text", "BYTES", [])]
_CONFIGS = [
    ModelConfig("lenet5", "onnxruntime_onnx", "onnxruntime", 64, _TENSORS, _TENSORS[:1], 2, False,
                "model.onnx", 500, 256),
    ModelConfig("adder", "onnxruntime_onnx", "onnxruntime", 0, [], [], 1, True, "", 0, 0),
    ModelConfig("c", "convserve_captioner", "", 8, _TENSORS, [], 0, False, "", 0, 0),
]  # fmt: skip
_ZERO = Duration(0, 0)
_STATISTICS = [
    ModelStatistics("lenet5", "1", 1700000000000, 12, 3, Duration(3, 10**12), _ZERO, Duration(3, 7),
                    Duration(2, 0), Duration(3, 9), Duration(0, 5), [(1, Duration(1, 2)), (64, _ZERO)]),
    ModelStatistics("", "", 0, 0, 0, _ZERO, _ZERO, _ZERO, _ZERO, _ZERO, _ZERO, []),
]  # fmt: skip


@pytest.mark.parametrize("found", _CONFIGS, ids=lambda c: c.name)
def test_http_config_json_is_the_grpc_message(found: ModelConfig) -> None:
    """Same fields, values and order (the bytes on the wire), whichever transport answers."""
    assert json.dumps(model_config_json(found)) == json.dumps(_message_json(model_config(found)))


@pytest.mark.parametrize("found", _STATISTICS, ids=lambda s: s.name or "empty")
def test_http_statistics_json_is_the_grpc_message(found: ModelStatistics) -> None:
    assert json.dumps(model_statistics_json(found)) == json.dumps(_message_json(model_statistics(found)))


def _adder_onnx(path: Path, batch_axis: bool) -> None:
    """A plain ONNX model, y = a + b, with a free batch axis or a fixed shape."""
    first = "batch" if batch_axis else 2
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [first, 3])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [first, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [first, 3])
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "adder", [a, b], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True)
    onnx.save(model, str(path))


@pytest.mark.parametrize("batch_axis", [True, False])
def test_plain_onnx_model_with_a_minimal_config(model_repository, tmp_path, batch_axis) -> None:
    _adder_onnx(model_repository / "adder" / "1" / "model.onnx", batch_axis)
    (model_repository / "adder" / "config.yaml").write_text("name: adder\nkind: tensor\n")
    server = start_server(model_repository, tmp_path / "log")
    try:
        with grpc.insecure_channel(server.target) as channel:
            kserve = pb_grpc.GRPCInferenceServiceStub(channel)
            request = pb.ModelInferRequest(model_name="adder")
            for name, value in (("a", 1.5), ("b", 2.0)):
                request.inputs.add(name=name, datatype="FP32", shape=[2, 3])
                request.raw_input_contents.append(np.full((2, 3), value, np.float32).tobytes())
            response = kserve.ModelInfer(request)
            total = np.frombuffer(response.raw_output_contents[0], np.float32)
            np.testing.assert_array_equal(total, [3.5] * 6)
            config = kserve.ModelConfig(pb.ModelConfigRequest(name="adder")).config
            assert config.max_batch_size == (64 if batch_axis else 0)
            assert list(config.input[0].dims) == ([3] if batch_axis else [2, 3])
        with VisionClient(server.target) as client, pytest.raises(grpc.RpcError) as info:
            client.classify([png_bytes(draw_digit("1"))], model="adder")
        assert "not a classifier" in info.value.details()
    finally:
        server.stop()


def test_repository_unload_and_load(model_repository, tmp_path) -> None:
    env = {"CONVSERVE_REPOSITORY_POLL_SECONDS": "0.2", "CONVSERVE_REPOSITORY_CONTROL": "enabled"}
    server = start_server(model_repository, tmp_path / "log", env)
    try:
        with grpc.insecure_channel(server.target) as channel, VisionClient(server.target) as client:
            kserve = pb_grpc.GRPCInferenceServiceStub(channel)
            # as tritonclient sends it: unload_dependents is honoured (a model's parts go with it)
            dependents = {"unload_dependents": pb.ModelRepositoryParameter(bool_param=False)}
            kserve.RepositoryModelUnload(
                pb.RepositoryModelUnloadRequest(model_name="lenet5", parameters=dependents)
            )
            assert not kserve.ModelReady(pb.ModelReadyRequest(name="lenet5")).ready
            assert client.health("lenet5") == "NOT_SERVING"
            (entry,) = kserve.RepositoryIndex(pb.RepositoryIndexRequest()).models
            assert (entry.state, entry.reason) == ("UNAVAILABLE", "unloaded by request")
            time.sleep(0.6)  # polling must not bring it back
            assert not kserve.ModelReady(pb.ModelReadyRequest(name="lenet5")).ready
            kserve.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="lenet5"))
            assert kserve.ModelReady(pb.ModelReadyRequest(name="lenet5")).ready
            answer = client.classify([png_bytes(draw_digit("8"))], top_k=1)
            assert answer.results[0].predictions[0].label == "8"
            for name, code in (
                ("../lenet5", grpc.StatusCode.INVALID_ARGUMENT),  # not a plain name (service/auth.py)
                ("nope", grpc.StatusCode.NOT_FOUND),
                (".hidden", grpc.StatusCode.INVALID_ARGUMENT),
            ):
                with pytest.raises(grpc.RpcError) as info:
                    kserve.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name))
                assert info.value.code() is code
            config = model_repository / "lenet5" / "config.yaml"
            good = config.read_text()
            config.write_text("name: lenet5\nkind: teapot\n")
            with pytest.raises(grpc.RpcError) as info:
                kserve.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="lenet5"))
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "invalid config.yaml" in info.value.details()
            assert "keep serving" in info.value.details()
            assert client.classify([png_bytes(draw_digit("8"))], top_k=1).version == "1"
            config.write_text(good)
            override = pb.RepositoryModelLoadRequest(model_name="lenet5")
            override.parameters["config"].string_param = "{}"
            with pytest.raises(grpc.RpcError) as info:
                kserve.RepositoryModelLoad(override)
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        for action in ("load", "unload"):  # over HTTP, their bodies hold parameters and nothing else
            request = urllib.request.Request(
                f"{server.http_url}/v2/repository/models/lenet5/{action}",
                data=b'{"parameters": {}, "unload_dependents": true}',
                headers={"Content-Type": "application/json"},
            )
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=30)
            expected = f"the {action} request takes only 'parameters', not ['unload_dependents']"
            assert (refused.value.code, json.loads(refused.value.read())["error"]) == (400, expected)
    finally:
        server.stop()
