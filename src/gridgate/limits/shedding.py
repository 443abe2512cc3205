"""Shedding by commit latency (the seed's "average RT > 800 ms" rule, with a
percentile): while the sink's commit p99 over the last ``window_s`` passes
the threshold, new connections are refused; connected devices go on under
backpressure.

Commits are kept in one-second slots (count per latency bucket), so the
window costs a fixed amount of memory whatever the commit rate.
"""
from __future__ import annotations

import bisect
from collections import deque

__all__ = ["CommitLatency"]

# Upper bounds of the latency buckets, seconds; the threshold is added as
# one more, so "p99 above the threshold" is exact though the p99 reported
# is the upper bound of its bucket.
_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.8, 1.0, 2.5, 5.0, 10.0, float("inf"))


class CommitLatency:
    def __init__(self, threshold_ms: float, window_s: float = 10.0) -> None:
        self.threshold_s = threshold_ms / 1000.0
        self.window_s = window_s
        self._bounds = tuple(sorted({*_BOUNDS, self.threshold_s})) if self.enabled else _BOUNDS
        self._slots: deque[tuple[int, list[int]]] = deque()   # (second, counts per bucket)

    @property
    def enabled(self) -> bool:
        return self.threshold_s > 0

    def record(self, seconds: float, now: float) -> None:
        if not self.enabled:
            return
        second = int(now)
        if not self._slots or self._slots[-1][0] != second:
            self._slots.append((second, [0] * len(self._bounds)))
            self._expire(now)
        self._slots[-1][1][bisect.bisect_left(self._bounds, seconds)] += 1

    def _expire(self, now: float) -> None:
        while self._slots and self._slots[0][0] <= now - self.window_s - 1:
            self._slots.popleft()

    def p99(self, now: float) -> float:
        """The commit p99 over the window (0.0 with no commits in it)."""
        self._expire(now)
        totals = [0] * len(self._bounds)
        for second, counts in self._slots:
            if second > now - self.window_s - 1:
                for i, c in enumerate(counts):
                    totals[i] += c
        n = sum(totals)
        if not n:
            return 0.0
        rank = n - n // 100          # the 99th percentile's rank, 1-based
        seen = 0
        for bound, c in zip(self._bounds, totals, strict=True):
            seen += c
            if seen >= rank:
                return bound
        return self._bounds[-1]  # pragma: no cover - the loop always reaches rank

    def shedding(self, now: float) -> bool:
        return self.enabled and self.p99(now) > self.threshold_s
