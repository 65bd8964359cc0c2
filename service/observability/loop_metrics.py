"""Counters, gauges and histograms for the request path: written on the event loop, without a lock.

prometheus_client's metrics take a lock for every update (a histogram observation takes two and
walks its buckets): about 2 µs each, and the request path makes a dozen per request. These keep
plain numbers, written by one thread (the event loop, where every request-path update happens),
and turn them into the same exposition when scraped: same names, types, labels, buckets and
`_created` series. A scrape that reads them from another thread may see an update that is half
done (a histogram's `_sum` one observation ahead of its buckets), never a torn number.

Metrics written from other threads (the caption decode loop, the decode pool) stay
prometheus_client's.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString


class CounterChild:
    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        self.value += amount


class GaugeChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = float(value)


class HistogramChild:
    __slots__ = ("_bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # one per bucket, not cumulative; the last is +Inf
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        # bisect_left: the first bucket whose upper bound is >= value (Prometheus' `le`)
        self.counts[bisect_left(self._bounds, value)] += 1
        self.sum += value


class _Family(Collector):
    """A labelled metric: one child per label values, created on first use and never removed."""

    kind = ""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], object] = {}
        if registry is not None:
            registry.register(self)

    def _child(self, values: tuple[object, ...], make: Callable[[], object]) -> object:
        if len(values) != len(self._labelnames):
            raise ValueError(f"{self._name} takes labels {self._labelnames}, got {values}")
        key = tuple(str(v) for v in values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = make()
        return found

    def describe(self) -> Iterator[Metric]:
        """The family without samples: registration learns the names from it."""
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for labels, child in list(self._children.items()):
            self._add(family, list(labels), child)
        yield family

    @abstractmethod
    def _family(self) -> Metric:
        """An empty metric family of this type."""

    @abstractmethod
    def _add(self, family: Metric, labels: list[str], child: object) -> None:
        """One child's samples."""


class LoopCounter(_Family):
    def labels(self, *values: object) -> CounterChild:
        return self._child(values, CounterChild)  # type: ignore[return-value]

    def _family(self) -> Metric:
        return CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def _add(self, family: Metric, labels: list[str], child: object) -> None:
        assert isinstance(child, CounterChild) and isinstance(family, CounterMetricFamily)
        family.add_metric(labels, child.value, created=child.created)


class LoopGauge(_Family):
    def labels(self, *values: object) -> GaugeChild:
        return self._child(values, GaugeChild)  # type: ignore[return-value]

    def _family(self) -> Metric:
        return GaugeMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def _add(self, family: Metric, labels: list[str], child: object) -> None:
        assert isinstance(child, GaugeChild) and isinstance(family, GaugeMetricFamily)
        family.add_metric(labels, child.value)


class LoopHistogram(_Family):
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        bounds = tuple(float(b) for b in buckets)
        if list(bounds) != sorted(set(bounds)):
            raise ValueError(f"{name}: buckets must be increasing, got {buckets}")
        if bounds and bounds[-1] == float("inf"):
            bounds = bounds[:-1]  # +Inf is always there
        self._bounds = bounds
        super().__init__(name, documentation, labelnames, registry)

    def labels(self, *values: object) -> HistogramChild:
        return self._child(values, lambda: HistogramChild(self._bounds))  # type: ignore[return-value]

    def _family(self) -> Metric:
        return HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def _add(self, family: Metric, labels: list[str], child: object) -> None:
        assert isinstance(child, HistogramChild) and isinstance(family, HistogramMetricFamily)
        counts, total = list(child.counts), child.sum  # a copy first: the loop may write meanwhile
        buckets = []
        cumulative = 0
        for bound, count in zip((*self._bounds, float("inf")), counts, strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        family.add_metric(labels, buckets, total)
        family.samples.append(
            Sample(f"{self._name}_created", dict(zip(self._labelnames, labels, strict=True)), child.created)
        )
