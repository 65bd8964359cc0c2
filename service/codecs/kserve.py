"""Triton's model configuration and statistics from the data plane's types: the gRPC messages, and
the JSON the HTTP binding answers with (protobuf's field names, enums by name, numbers as numbers),
written from the same domain objects without building a message."""

from __future__ import annotations

from typing import Any

from service._proto.inference import grpc_predict_v2_pb2 as pb
from service._proto.inference import model_config_pb2 as config_pb
from service.codecs import tensors
from service.domain import Duration, ModelConfig, ModelStatistics, TensorMetadata


def model_config(found: ModelConfig) -> config_pb.ModelConfig:
    """Triton's ModelConfig message, for gRPC."""

    def dtype(spec: TensorMetadata) -> int:
        return tensors.config_datatype(spec.datatype)

    kind = config_pb.ModelInstanceGroup.KIND_GPU if found.on_gpu else config_pb.ModelInstanceGroup.KIND_CPU
    config = config_pb.ModelConfig(
        name=found.name,
        platform=found.platform,
        backend=found.backend,
        max_batch_size=found.max_batch_size,
        input=[config_pb.ModelInput(name=s.name, data_type=dtype(s), dims=s.shape) for s in found.inputs],
        output=[config_pb.ModelOutput(name=s.name, data_type=dtype(s), dims=s.shape) for s in found.outputs],
        instance_group=[config_pb.ModelInstanceGroup(count=found.instances, kind=kind)],
        default_model_filename=found.default_model_filename,
    )
    if found.max_batch_size > 0:
        config.dynamic_batching.max_queue_delay_microseconds = found.max_queue_delay_microseconds
        config.dynamic_batching.default_queue_policy.max_queue_size = found.max_queue_size
    return config


def model_statistics(found: ModelStatistics) -> pb.ModelStatistics:
    def duration(d: Duration) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=d.count, ns=d.ns)

    return pb.ModelStatistics(
        name=found.name,
        version=found.version,
        last_inference=found.last_inference,
        inference_count=found.inference_count,
        execution_count=found.execution_count,
        inference_stats=pb.InferStatistics(
            success=duration(found.success),
            fail=duration(found.fail),
            queue=duration(found.queue),
            compute_input=duration(found.compute_input),
            compute_infer=duration(found.compute_infer),
            compute_output=duration(found.compute_output),
        ),
        batch_stats=[
            pb.InferBatchStatistics(batch_size=size, compute_infer=duration(d)) for size, d in found.batches
        ],
    )


def model_config_json(found: ModelConfig) -> dict[str, Any]:
    """The ModelConfig message's JSON as the REST binding writes it, straight from the domain
    object: protobuf's field names in field-number order, enums by name, numbers as numbers, and
    fields at their default (0, "", empty) left out, as protobuf's own serialisation does. A test
    holds it equal to `model_config`'s message, so the two transports cannot drift."""
    kind = "KIND_GPU" if found.on_gpu else "KIND_CPU"
    config = _set(
        name=found.name,
        platform=found.platform,
        max_batch_size=found.max_batch_size,
        input=[_tensor_json(s) for s in found.inputs],
        output=[_tensor_json(s) for s in found.outputs],
        instance_group=[_set(count=found.instances, kind=kind)],
        default_model_filename=found.default_model_filename,
    )
    if found.max_batch_size > 0:  # a touched sub-message is present, even with default fields
        config["dynamic_batching"] = _set(max_queue_delay_microseconds=found.max_queue_delay_microseconds)
        config["dynamic_batching"]["default_queue_policy"] = _set(max_queue_size=found.max_queue_size)
    return config | _set(backend=found.backend)  # field 17: last


def model_statistics_json(found: ModelStatistics) -> dict[str, Any]:
    """One version's statistics message as the REST binding writes it (see model_config_json)."""
    stats = _set(
        name=found.name,
        version=found.version,
        last_inference=found.last_inference,
        inference_count=found.inference_count,
        execution_count=found.execution_count,
    )
    stats["inference_stats"] = {
        "success": _duration_json(found.success),
        "fail": _duration_json(found.fail),
        "queue": _duration_json(found.queue),
        "compute_input": _duration_json(found.compute_input),
        "compute_infer": _duration_json(found.compute_infer),
        "compute_output": _duration_json(found.compute_output),
    }
    batches = [_set(batch_size=size) | {"compute_infer": _duration_json(d)} for size, d in found.batches]
    return stats | _set(batch_stats=batches)


def _tensor_json(spec: TensorMetadata) -> dict[str, Any]:
    value = tensors.config_datatype(spec.datatype)  # 0 (TYPE_INVALID) is a default: left out
    return _set(name=spec.name, data_type=value and config_pb.DataType.Name(value), dims=spec.shape)


def _duration_json(d: Duration) -> dict[str, int]:
    return _set(count=d.count, ns=d.ns)


def _set(**fields: Any) -> dict[str, Any]:
    """The fields not at their default, in the order given (protobuf leaves defaults out)."""
    return {key: value for key, value in fields.items() if value not in (0, "", [], False)}
