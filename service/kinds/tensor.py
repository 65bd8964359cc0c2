"""Kind `tensor`: an ONNX graph served as it is, through KServe v2 only.

`TensorModel` is also every single-graph kind's KServe view (a classifier takes its uint8 image
batch and answers logits) and the view of a captioner's parts: `TensorJob` checks a request's
tensors against the graph, decodes them, runs them through the batcher and picks the outputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np

from service.codecs import tensors
from service.codecs.cost import INLINE, Codec, Work
from service.contract.manifest import Manifest
from service.domain import InferRequest, InferResult, InputTensor, OutputRequest
from service.engine.batching import BatchingOptions, CheckFunction, DynamicBatcher
from service.engine.sessions import ModelSession, TensorSpec
from service.errors import ECHO_CHARS, InvalidArgument, clip, clip_list, clip_message
from service.kinds.base import MODEL_FILE, LoadContext, LoadedModel, Signature, Task, TaskName
from service.observability.statistics import RequestTimes, VersionStatistics


class TensorModel:
    """A graph, its batcher and statistics, answering KServe v2 inference requests."""

    def __init__(
        self,
        name: str,
        session: ModelSession,
        batcher: DynamicBatcher,
        stats: VersionStatistics,
        signature: Signature,
        max_elements: int,
    ) -> None:
        self.name = name
        self.session = session
        self.batcher = batcher
        self.stats = stats
        self.signature = signature
        self.provider = session.provider
        self.max_elements = max_elements
        self.parts: Mapping[str, LoadedModel] = {}
        self.tasks: dict[type, Task] = {InferRequest: self.infer}
        #: class labels of an output, for the classification extension ("score:index:label")
        self.labels: dict[str, Sequence[str]] = {}

    @property
    def batching(self) -> BatchingOptions:
        return self.batcher.options

    def infer(self, request: InferRequest) -> TensorJob:
        return TensorJob(request, self.session, self.batcher, self.max_elements, self.labels)

    async def close(self) -> None:
        await self.batcher.close()


class TensorJob:
    """A KServe v2 request to one graph: checked headers, decoded tensors, the outputs asked for."""

    finish_work = INLINE

    def __init__(
        self,
        request: InferRequest,
        session: ModelSession,
        batcher: DynamicBatcher,
        max_elements: int,
        labels: Mapping[str, Sequence[str]],
    ) -> None:
        self._request = request
        self._names = session.output_names
        self._wanted = requested_outputs(request.outputs, self._names)
        self._batched = session.batchable
        self._labels = labels
        self._classes = {
            o.name: o.parameters["classification"]
            for o in request.outputs
            if o.parameters and "classification" in o.parameters
        }
        for name in self._classes:
            spec = session.outputs[self._names.index(name)]
            if spec.dtype.kind not in "fiu" or len(spec.shape) < (2 if self._batched else 1):
                raise InvalidArgument(
                    f"output {clip(name)}: classification needs a numeric output with a class axis"
                )
        self.rows = check_headers(request.inputs, session.inputs, session.batchable)
        self.batcher = batcher
        self._max_elements = max_elements
        # raw data is wrapped, not copied: cheap on the event loop unless it must be parsed
        self.prepare_work = Work(Codec.TENSOR, sum(t.size for t in request.inputs))
        self._feeds: dict[str, np.ndarray] = {}
        self._outputs: Sequence[np.ndarray] = ()

    def prepare(self) -> None:
        self._feeds = tensors.decode_tensors(self._request.inputs, max_elements=self._max_elements)

    async def run(self, deadline: float | None, times: RequestTimes) -> None:
        self._outputs = await self.batcher.submit(self._feeds, deadline, times)

    def finish(self) -> InferResult:
        if self._wanted is self._names and not self._classes:  # every output, as it came: no lookup
            outputs = list(zip(self._names, self._outputs, strict=True))
            return InferResult(outputs=outputs, id=self._request.id)
        by_name = dict(zip(self._names, self._outputs, strict=True))
        for name, count in self._classes.items():
            by_name[name] = top_classes(by_name[name], int(count), self._labels.get(name), self._batched)
        return InferResult(outputs=[(name, by_name[name]) for name in self._wanted], id=self._request.id)


def top_classes(values: np.ndarray, count: int, labels: Sequence[str] | None, batched: bool) -> np.ndarray:
    """Triton's classification extension: the `count` largest values of each batch item (all of its
    elements, flattened), best first, as BYTES "score:index" or "score:index:label" (score as C's %f)."""
    rows = values.reshape(len(values), -1) if batched else values.reshape(1, -1)
    count = min(count, rows.shape[1])
    order = np.argsort(-rows, axis=1, kind="stable")[:, :count]
    out = np.empty(order.shape, dtype=object)
    for r, indices in enumerate(order):
        for c, index in enumerate(indices):
            text = f"{float(rows[r, index]):f}:{index}"
            if labels is not None and index < len(labels):
                text += f":{labels[index]}"
            out[r, c] = text.encode()
    return out if batched else out[0]


class TensorKind:
    """Kind `tensor`: one model.onnx, no task API."""

    name = "tensor"
    # Every kind's models answer InferRequest; a model that does not is "not a KServe v2 model".
    answers: ClassVar[Mapping[type, TaskName]] = {InferRequest: TaskName("KServe v2 model")}

    def load(self, manifest: Manifest, version_dir: Path, context: LoadContext) -> TensorModel:
        session = context.session(version_dir, MODEL_FILE)
        context.warm_up(session.warmup)
        return tensor_model(context.model, manifest, session, context, context.stats)


def tensor_model(
    name: str,
    manifest: Manifest,
    session: ModelSession,
    context: LoadContext,
    stats: VersionStatistics,
    model_file: str = MODEL_FILE,
    check: CheckFunction | None = None,
) -> TensorModel:
    """A graph served as a tensor model, with its own batcher (`check`: the kind's value checks)."""
    return TensorModel(
        name,
        session,
        context.batcher(manifest, session, stats, check),
        stats,
        Signature.of_session(session, model_file),
        context.settings.max_message_bytes,  # every element costs at least a byte on the wire
    )


def check_headers(inputs: Sequence[InputTensor], specs: Sequence[TensorSpec], batchable: bool) -> int:
    """Names, datatypes and shapes against the graph, before any data is read; returns the rows."""
    if len(inputs) == 1 == len(specs):  # the common case, checked without building sets
        return _check_one(inputs[0], specs[0], batchable)
    expected = {spec.name: spec for spec in specs}
    given = [tensor.name for tensor in inputs]
    unknown = sorted(set(given) - set(expected))
    if unknown:
        raise InvalidArgument(f"unknown input(s) {clip_list(unknown)}; the model takes {sorted(expected)}")
    missing = sorted(set(expected) - set(given))
    if missing:
        raise InvalidArgument(f"missing input(s) {clip_list(missing)}; the model takes {sorted(expected)}")
    for tensor in inputs:
        _check_type_and_shape(tensor, expected[tensor.name])
    if not batchable:
        return 1
    first = {tensor.shape[0] for tensor in inputs}
    if len(first) != 1:
        raise InvalidArgument("inputs must share their first (batch) dimension")
    return first.pop()


def _check_one(tensor: InputTensor, spec: TensorSpec, batchable: bool) -> int:
    """check_headers for a graph of one input, and its messages."""
    if tensor.name != spec.name:
        raise InvalidArgument(f"unknown input(s) {clip_list([tensor.name])}; the model takes {[spec.name]}")
    _check_type_and_shape(tensor, spec)
    return tensor.shape[0] if batchable else 1


def _check_type_and_shape(tensor: InputTensor, spec: TensorSpec) -> None:
    want = tensors.datatype_from_onnx(spec.onnx_type)
    if tensor.datatype != want:
        given = clip_message(tensor.datatype, ECHO_CHARS)
        raise InvalidArgument(f"input {clip(tensor.name)}: expected datatype {want}, got {given}")
    shape, wanted = tensor.shape, spec.shape
    if len(shape) != len(wanted) or any(w != -1 and w != g for w, g in zip(wanted, shape, strict=True)):
        raise InvalidArgument(
            f"input {clip(tensor.name)}: expected shape {list(wanted)} (-1: any), "
            f"got {clip_list(list(shape))}"
        )


def requested_outputs(outputs: Sequence[OutputRequest], names: Sequence[str]) -> Sequence[str]:
    """The outputs a request asks for, by name (all of them when it names none)."""
    if not outputs:
        return names  # all of them, in the graph's order
    wanted = [o.name for o in outputs]
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise InvalidArgument(f"unknown output(s) {clip_list(unknown)}; the model answers {list(names)}")
    return wanted
