"""The last minute of one model version's requests: how many, how many failed, p50 and p99 latency.

Prometheus histograms are cumulative since the process started: a rate or a quantile over a
window needs a scraper and PromQL, on another port. `RecentWindow` answers them from the process
itself, for the web console and any HTTP client.

The window is a ring of one-second slots. Each slot counts its requests and failures and keeps a
histogram of its successful requests' latencies in log-spaced bins, four per doubling, so a
quantile read from it is within about 9 % of the true one. Recording a request costs a clock
read, a logarithm and three list updates; reading sums at most one histogram per second of the
window, when a client asks. Only whole seconds are reported: the current one is still filling.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

#: The window, in seconds.
WINDOW_SECONDS = 60
#: Histogram bins per doubling of the latency (bin edges at LOWEST * 2 ** (i / BINS_PER_OCTAVE)).
BINS_PER_OCTAVE = 4
#: The lower edge of the second bin; anything faster falls into the first.
LOWEST_SECONDS = 1e-5
#: About 24 doublings: the last bin starts at about two minutes and takes anything slower.
BINS = 24 * BINS_PER_OCTAVE


_log2 = math.log2
_SCALE = 1 / LOWEST_SECONDS


@dataclass(frozen=True)
class WindowSummary:
    """The complete seconds of the window, oldest first, and what they add up to."""

    seconds: int
    requests: int
    failures: int
    p50: float | None  # seconds, over successful requests; None without any
    p99: float | None
    per_second: list[int]  # requests answered in each second, oldest first


def bin_of(seconds: float) -> int:
    """The histogram bin of a latency."""
    if seconds <= LOWEST_SECONDS:
        return 0
    return min(BINS - 1, 1 + int(_log2(seconds * _SCALE) * BINS_PER_OCTAVE))


def bin_middle(index: int) -> float:
    """The latency a bin stands for: the geometric middle of its edges (its upper edge for bin 0)."""
    if index == 0:
        return LOWEST_SECONDS
    return LOWEST_SECONDS * 2 ** ((index - 0.5) / BINS_PER_OCTAVE)


class RecentWindow:
    """Requests of the last `seconds` seconds; `record` on every answer, `summary` when asked.

    Every caller runs on the event loop (as VersionStatistics' do), so no lock.
    """

    __slots__ = ("_bins", "_clock", "_counts", "_failures", "_seconds", "_stamps")

    def __init__(self, seconds: int = WINDOW_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self._seconds = seconds
        self._clock = clock
        self._stamps = [-1] * seconds  # the whole second each slot holds now
        self._counts = [0] * seconds
        self._failures = [0] * seconds
        self._bins: list[list[int] | None] = [None] * seconds  # allocated when a slot is first used

    def record(self, seconds: float, ok: bool) -> None:
        """One answered request that took `seconds`; failures are counted, not timed."""
        now = int(self._clock())
        slot = now % self._seconds
        if self._stamps[slot] != now:
            self._stamps[slot] = now
            self._counts[slot] = 0
            self._failures[slot] = 0
            self._bins[slot] = None
        self._counts[slot] += 1
        if not ok:
            self._failures[slot] += 1
            return
        bins = self._bins[slot]
        if bins is None:
            bins = self._bins[slot] = [0] * BINS
        # bin_of(seconds), inlined: this runs for every request
        index = 0 if seconds <= LOWEST_SECONDS else 1 + int(_log2(seconds * _SCALE) * BINS_PER_OCTAVE)
        bins[index if index < BINS else BINS - 1] += 1

    def summary(self) -> WindowSummary:
        """The last `seconds` complete seconds."""
        now = int(self._clock())
        oldest = now - self._seconds
        per_second = [0] * self._seconds
        merged = [0] * BINS
        failures = 0
        for slot, stamp in enumerate(self._stamps):
            if not oldest <= stamp < now:
                continue
            per_second[stamp - oldest] = self._counts[slot]
            failures += self._failures[slot]
            bins = self._bins[slot]
            if bins is not None:
                merged = [a + b for a, b in zip(merged, bins, strict=True)]
        return WindowSummary(
            seconds=self._seconds,
            requests=sum(per_second),
            failures=failures,
            p50=quantile(merged, 0.5),
            p99=quantile(merged, 0.99),
            per_second=per_second,
        )


def quantile(bins: list[int], q: float) -> float | None:
    """The `q` quantile of a histogram, as the middle of the bin it falls into; None when empty."""
    total = sum(bins)
    if total == 0:
        return None
    rank = math.ceil(q * total)  # the rank-th smallest value, 1-based
    seen = 0
    for index, count in enumerate(bins):
        seen += count
        if seen >= rank:
            return bin_middle(index)
    raise AssertionError("unreachable: the ranks add up to the total")
