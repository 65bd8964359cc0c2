"""The last minute of a model version's requests (service/observability/recent.py), on a clock of our own."""

from __future__ import annotations

import numpy as np
import pytest

from service.observability.recent import (
    BINS,
    LOWEST_SECONDS,
    RecentWindow,
    bin_middle,
    bin_of,
    quantile,
)
from service.observability.statistics import VersionStatistics


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_only_complete_seconds_are_reported_oldest_first() -> None:
    clock = Clock(1000.2)
    window = RecentWindow(seconds=5, clock=clock)
    window.record(0.01, ok=True)
    assert window.summary().requests == 0  # second 1000 is still filling
    clock.now = 1001.5
    window.record(0.02, ok=True)
    window.record(0.03, ok=False)
    clock.now = 1002.0
    summary = window.summary()
    assert summary.per_second == [0, 0, 0, 1, 2]  # seconds 997..1001
    assert (summary.requests, summary.failures, summary.seconds) == (3, 1, 5)


def test_seconds_older_than_the_window_drop_out_and_slots_are_reused() -> None:
    clock = Clock(1000.0)
    window = RecentWindow(seconds=3, clock=clock)
    for _ in range(4):
        window.record(0.5, ok=True)
    clock.now = 1003.0  # 1000 is the oldest second still reported
    assert window.summary().per_second == [4, 0, 0]
    clock.now = 1004.0  # now it is gone
    assert window.summary().requests == 0
    clock.now = 1006.9  # slot of 1000 taken again by 1006: its old counts are not added
    window.record(0.5, ok=False)
    clock.now = 1007.0
    summary = window.summary()
    assert (summary.per_second, summary.failures, summary.p50) == ([0, 0, 1], 1, None)


def test_quantiles_are_within_nine_percent_and_count_successes_only() -> None:
    clock = Clock(50.0)
    window = RecentWindow(clock=clock)
    latencies = np.random.default_rng(0).lognormal(mean=np.log(0.004), sigma=0.8, size=2000)
    for seconds in latencies:
        window.record(float(seconds), ok=True)
    for _ in range(500):
        window.record(30.0, ok=False)  # slow failures would move p99 a long way if they counted
    clock.now = 51.0
    summary = window.summary()
    for found, q in ((summary.p50, 50), (summary.p99, 99)):
        true = np.percentile(latencies, q, method="inverted_cdf")
        assert found is not None and abs(found / true - 1) <= 0.0905, (q, found, true)
    assert (summary.requests, summary.failures) == (2500, 500)


def test_bins_cover_every_latency() -> None:
    assert bin_of(0.0) == 0 and bin_of(LOWEST_SECONDS) == 0
    assert bin_of(1e6) == BINS - 1
    edges = [LOWEST_SECONDS * 2 ** (i / 4) for i in range(BINS - 1)]
    for index, low in enumerate(edges, start=1):  # bin i holds [edge i-1, edge i)
        assert bin_of(low * 1.0001) == index
        assert bin_of(low * 2 ** (1 / 4) * 0.9999) == index
        assert low < bin_middle(index) < low * 2 ** (1 / 4)


@pytest.mark.parametrize(
    ("bins", "q", "index"),
    [([0, 3, 0, 1], 0.5, 1), ([0, 3, 0, 1], 0.99, 3), ([0, 0, 2, 2], 0.5, 2), ([1], 0.99, 0)],
)
def test_quantile_takes_the_bin_of_the_rank(bins: list[int], q: float, index: int) -> None:
    assert quantile(bins, q) == bin_middle(index)
    assert quantile([0, 0], 0.5) is None


def test_every_answered_request_reaches_its_versions_window() -> None:
    clock = Clock(7.0)
    stats = VersionStatistics("recent-test", "1")
    stats.recent = RecentWindow(clock=clock)
    stats.answered(True, 0.002)
    stats.answered(False, 0.5)
    clock.now = 8.0
    summary = stats.recent.summary()
    assert (summary.requests, summary.failures, summary.p50) == (2, 1, bin_middle(bin_of(0.002)))
