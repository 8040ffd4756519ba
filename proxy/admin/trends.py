"""Per-pool trends for the dashboard's charts: requests/s and p99 over the last minutes.

Each time the admin's sampler runs (once a second, ``RecentStats.run``), ``Trends``
takes every pool's totals (its upstreams' counters plus the responses the proxy made
for it) and stores one point per pool: the request rate, the 5xx share and the p99
latency between this sample and the one before. ``points`` of them are kept (five
minutes at one a second); ``GET /api/trends`` answers them as columns. A pool that a
reload removes goes with its points; one whose counters went down (upstreams removed)
starts again from the new totals, like ``RecentStats``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from proxy.admin.recent import Sample, compare
from proxy.metrics.collector import merged

if TYPE_CHECKING:
    from proxy.upstream.pool import Pool

POINTS = 300  # five minutes at one sample a second


class Point(NamedTuple):
    at: float  # Unix time
    rate: float
    error_rate: float
    p99_ms: float | None


def pool_sample(pool: Pool) -> Sample:
    """A pool's totals: every upstream's requests plus the responses the proxy made."""
    parts = [pool.stats, *(upstream.stats for upstream in pool.upstreams)]
    buckets, _ = merged(stats.duration for stats in parts)
    return Sample(sum(s.total for s in parts), sum(s.errors for s in parts), tuple(buckets))


class Trends:
    """The last ``points`` points of every pool."""

    def __init__(self, points: int = POINTS, clock: Callable[[], float] = time.time) -> None:
        self.points = points
        self.clock = clock
        self._last: dict[str, tuple[float, Sample]] = {}
        self._series: dict[str, deque[Point]] = {}

    def sample(self, pools: Mapping[str, Pool]) -> None:
        """One point per pool for the time since the previous sample."""
        now = self.clock()
        for name in set(self._series) - set(pools):
            del self._series[name]
            self._last.pop(name, None)
        for name, pool in pools.items():
            current = pool_sample(pool)
            previous = self._last.get(name)
            self._last[name] = (now, current)
            if previous is None or now <= previous[0]:
                continue
            recent = compare(previous[1], current, now - previous[0])
            series = self._series.setdefault(name, deque(maxlen=self.points))
            series.append(Point(now, recent["rate"], recent["error_rate"], recent["p99_ms"]))

    def view(self) -> dict[str, Any]:
        """``GET /api/trends``: per pool, the points as columns (oldest first)."""
        pools = {
            name: {
                "t": [round(p.at, 3) for p in series],
                "rate": [p.rate for p in series],
                "error_rate": [p.error_rate for p in series],
                "p99_ms": [p.p99_ms for p in series],
            }
            for name, series in self._series.items()
        }
        return {"points": self.points, "pools": pools}

    def __repr__(self) -> str:
        return f"<Trends [{len(self._series)} pools, up to {self.points} points]>"
