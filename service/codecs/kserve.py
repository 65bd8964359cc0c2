"""Triton's model configuration and statistics messages from the data plane's types, and the JSON
form the HTTP binding answers with (protobuf's field names, enums by name, numbers as numbers)."""

from __future__ import annotations

import base64
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from service._proto.inference import grpc_predict_v2_pb2 as pb
from service._proto.inference import model_config_pb2 as config_pb
from service.codecs import tensors
from service.domain import Duration, ModelConfig, ModelStatistics, TensorMetadata


def model_config(found: ModelConfig) -> config_pb.ModelConfig:
    """Triton's ModelConfig message (also the JSON the HTTP route answers)."""

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


def plain(message: Message) -> dict[str, Any]:
    """A message as the REST binding writes it: numbers as numbers (protobuf's JSON quotes int64)."""
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {key: _scalar(value_field, item) for key, item in value.items()}
        elif field.is_repeated:
            out[field.name] = [_scalar(field, item) for item in value]
        else:
            out[field.name] = _scalar(field, value)
    return out


def _scalar(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return plain(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values_by_number[value].name
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode()
    return value
