"""The most iteration-level batching can gain on this machine: a captioner's decoder graph alone.

Batching the decode steps of N requests into one decoder run pays only as far as one run over N
images is cheaper than N runs over one. On a CPU the decoder's work grows with its rows, so that
ceiling is low; on a GPU a step of a hundred rows costs little more than one of three. This module
times one decoder step, in this process, over 1, 2, 4, ... images with a beam's worth of live
hypotheses each (real encoder outputs, one real step in), and reports the gain in images per
second over one image per step, so `convserve-bench --compare --api caption` can put the served
ratio beside the graph's own.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from service.contract.manifest import load_manifest
from service.contract.tensor_names import DECODER_OUTPUTS
from service.engine.sessions import CPU, ModelLoadError, ModelSession, SessionOptions
from service.kinds.captioner.beam_search import BeamSearch, merge
from service.kinds.captioner.pipeline import CaptionerPipeline


class DecoderBenchError(Exception):
    """The captioner cannot be timed in this process (missing files, not a captioner)."""


@dataclass(frozen=True)
class DecoderStep:
    repeat: int
    images: int  # images whose hypotheses go through one decoder run
    rows: int  # their live hypotheses: the decoder's batch
    seconds: float  # median wall time of one run


def image_counts(largest: int) -> list[int]:
    """1, 2, 4, ... up to `largest`, which is always included."""
    counts = [1]
    while counts[-1] * 2 < largest:
        counts.append(counts[-1] * 2)
    if largest > 1:
        counts.append(largest)
    return counts


class DecoderTimer:
    """The served captioner's encoder and decoder in this process (CPU provider, default threads)."""

    def __init__(self, repository: Path, model: str, version: str) -> None:
        model_dir = repository / model
        try:
            manifest = load_manifest(model_dir)
        except (OSError, ValueError, yaml.YAMLError) as exc:  # ValueError: pydantic's
            raise DecoderBenchError(f"cannot read {model_dir}'s manifest: {exc}") from exc
        if manifest.captioner is None:
            raise DecoderBenchError(f"{model} is not a captioner")
        spec = manifest.captioner
        paths = [model_dir / version / name for name in (spec.encoder_file, spec.decoder_file)]
        for path in paths:
            if not path.is_file():
                raise DecoderBenchError(f"no {path}: timing the decoder needs the files the server serves")
        options = SessionOptions(providers=(CPU,))
        try:
            encoder, decoder = (ModelSession(path, options) for path in paths)
            self.pipeline = CaptionerPipeline(manifest, encoder, decoder)
        except ModelLoadError as exc:
            raise DecoderBenchError(str(exc)) from exc
        self.beam_size = spec.default_beam_size
        self.max_length = spec.max_length

    def searches_one_step_in(self, images: np.ndarray) -> list[BeamSearch]:
        """Beam searches over (N, H, W, 3) RGB images after their first step: a beam's worth of
        live hypotheses each, as most steps of a search have."""
        pipeline = self.pipeline
        batch = np.stack([pipeline.prepare(image) for image in images])
        encoded = pipeline.encoder.run(pipeline.feeds(batch))
        searches = pipeline.searches(encoded, self.beam_size, self.max_length, keep_attention=False)
        names = pipeline.decoder.output_names
        for search in searches:
            outputs = pipeline.decoder.run(merge([search], pipeline.by_image))
            search.advance(*(outputs[names.index(name)] for name in DECODER_OUTPUTS))
        return [search for search in searches if not search.done]

    def step_seconds(self, searches: list[BeamSearch], seconds: float) -> float:
        """Median time of back-to-back decoder runs over `searches`' hypotheses, for about `seconds`."""
        feeds = merge(searches, self.pipeline.by_image)
        decoder = self.pipeline.decoder
        decoder.run(feeds)  # a new shape: onnxruntime allocates on its first run
        times: list[float] = []
        deadline = time.perf_counter() + seconds
        while len(times) < 5 or time.perf_counter() < deadline:
            started = time.perf_counter()
            decoder.run(feeds)
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    def sweep(
        self, searches: list[BeamSearch], counts: list[int], seconds: float, repeat: int
    ) -> list[DecoderStep]:
        """One timed step per image count, `seconds` in all."""
        each = seconds / len(counts)
        steps = []
        for count in counts:
            chosen = searches[:count]
            rows = sum(search.rows for search in chosen)
            steps.append(DecoderStep(repeat, len(chosen), rows, self.step_seconds(chosen, each)))
        return steps


def gains(steps: Sequence[DecoderStep]) -> dict[int, list[float]]:
    """Images -> per repeat, images/s with that many images per step over images/s with one."""
    one = {step.repeat: step.seconds for step in steps if step.images == 1}
    by_images: dict[int, list[float]] = {}
    for step in steps:
        if step.repeat in one:
            by_images.setdefault(step.images, []).append(step.images * one[step.repeat] / step.seconds)
    return by_images
