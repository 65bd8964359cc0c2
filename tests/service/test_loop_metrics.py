"""The request path's lock-free metrics expose exactly what prometheus_client's would."""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from service.observability import metrics
from service.observability.loop_metrics import LoopCounter, LoopGauge, LoopHistogram

BUCKETS = (0.001, 0.01, 0.1, 1.0)
VALUES = (0.0, 0.0005, 0.001, 0.0011, 0.01, 0.5, 1.0, 3.0, 100.0)


def exposition(registry: CollectorRegistry) -> str:
    """The text format with the `_created` timestamps (which differ by construction) masked."""
    return re.sub(r"(_created\{[^}]*\}) \S+", r"\1 T", generate_latest(registry).decode())


def test_the_exposition_is_the_same_as_prometheus_clients() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    histograms = (
        LoopHistogram("d_seconds", "a duration", ["model", "version"], buckets=BUCKETS, registry=ours),
        Histogram("d_seconds", "a duration", ["model", "version"], buckets=BUCKETS, registry=theirs),
    )
    counters = (
        LoopCounter("calls", "calls made", ["model", "code"], registry=ours),
        Counter("calls", "calls made", ["model", "code"], registry=theirs),
    )
    gauges = (
        LoopGauge("pending", "waiting", ["model"], registry=ours),
        Gauge("pending", "waiting", ["model"], registry=theirs),
    )
    for histogram in histograms:
        for value in VALUES:
            histogram.labels("lenet5", "1").observe(value)
        histogram.labels("other", "2").observe(0.02)
    for counter in counters:
        counter.labels("lenet5", "OK").inc()
        counter.labels("lenet5", "OK").inc(2.5)
        counter.labels("lenet5", "NOT_FOUND").inc()
    for gauge in gauges:
        gauge.labels("lenet5").inc(3)
        gauge.labels("lenet5").dec()
        gauge.labels("idle").set(0)
    text = exposition(ours)
    assert text == exposition(theirs)
    assert 'd_seconds_bucket{le="0.001",model="lenet5",version="1"} 3.0' in text  # `le`: inclusive
    assert 'calls_total{code="OK",model="lenet5"} 3.5' in text


def test_label_values_are_counted_and_checked() -> None:
    registry = CollectorRegistry()
    counter = LoopCounter("c", "c", ["a", "b"], registry=registry)
    assert counter.labels("x", 1) is counter.labels("x", "1")  # one child per label values, as text
    with pytest.raises(ValueError, match="takes labels"):
        counter.labels("x")
    with pytest.raises(ValueError, match="only go up"):
        counter.labels("x", "1").inc(-1)


def test_the_servers_request_metrics_are_registered_once_with_their_names() -> None:
    text = generate_latest().decode()
    names = ("convserve_requests_total", "convserve_queue_duration_seconds", "convserve_pending_requests")
    for name in names:
        assert f"# TYPE {name} " in text
    assert metrics.PENDING._name == "convserve_pending_requests"
