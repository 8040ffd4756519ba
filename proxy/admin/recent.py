"""Recent per-upstream rates and latencies for ``/api/pools`` and the dashboard.

Theory of operation
-------------------
The hot-path counters only ever grow. Once a second a background task copies each
upstream's totals (requests, 5xx, histogram buckets) into a small ring that holds
about ``window`` seconds of samples. A question about "recent" compares the live
counters with the oldest sample of that upstream in the ring: the deltas give the
request rate, the error rate and a delta histogram whose quantiles are p50 and p99
over the last ~10 s. Nothing here runs per request; a sample costs one pass over the
upstreams' small dicts.

Samples are keyed by ``(pool name, upstream address)``. A reload keeps an upstream
that stays in its pool as the same object with the same counters, so its rates carry
on; a counter that went down (an upstream removed and added back fresh) restarts its
window.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, NamedTuple, TypedDict

from proxy.metrics.stats import Histogram, Stats

if TYPE_CHECKING:
    from proxy.upstream.pool import Pool

log = logging.getLogger("aiolb.admin")

Key = tuple[str, str]  # (pool name, upstream address)


class Sample(NamedTuple):
    """An upstream's totals at one moment."""

    requests: int
    errors: int
    buckets: tuple[int, ...]

    @classmethod
    def of(cls, stats: Stats) -> Sample:
        return cls(stats.total, stats.errors, tuple(stats.duration.buckets))


class Recent(TypedDict):
    """Rates over the window: requests/s, the fraction of them that were 5xx, latency."""

    rate: float
    error_rate: float
    p50_ms: float | None
    p99_ms: float | None


def quantile_ms(buckets: list[int], q: float) -> float | None:
    """The ``q`` quantile, in milliseconds, of a non-cumulative bucket list."""
    histogram = Histogram()
    histogram.buckets = buckets
    histogram.count = sum(buckets)
    seconds = histogram.quantile(q)
    return None if seconds is None else round(seconds * 1000, 3)


def compare(then: Sample, now: Sample, span: float) -> Recent:
    """What happened between two samples ``span`` seconds apart."""
    if now.requests < then.requests:  # counters restarted: nothing to compare with
        then = Sample(0, 0, (0,) * len(now.buckets))
    requests = now.requests - then.requests
    errors = max(0, now.errors - then.errors)
    delta = [max(0, b - a) for a, b in zip(then.buckets, now.buckets, strict=True)]
    return {
        "rate": round(requests / span, 3) if span > 0 else 0.0,
        "error_rate": round(errors / requests, 4) if requests else 0.0,
        "p50_ms": quantile_ms(delta, 0.5),
        "p99_ms": quantile_ms(delta, 0.99),
    }


class RecentStats:
    """A ring of per-upstream samples taken every ``interval`` seconds over ``window``."""

    def __init__(
        self,
        interval: float = 1.0,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self.clock = clock
        self._ring: deque[tuple[float, dict[Key, Sample]]] = deque(
            maxlen=max(2, round(window / interval) + 1)
        )

    def sample(self, pools: Mapping[str, Pool]) -> None:
        """Record every upstream's totals now."""
        samples = {
            (name, up.address): Sample.of(up.stats)
            for name, pool in pools.items()
            for up in pool.upstreams
        }
        self._ring.append((self.clock(), samples))

    @property
    def span(self) -> float:
        """Seconds from the oldest sample to now (0 before the first sample)."""
        return self.clock() - self._ring[0][0] if self._ring else 0.0

    def recent(self, pool: str, address: str, stats: Stats) -> Recent:
        """Rates of one upstream from its oldest sample in the window up to now."""
        key = (pool, address)
        now = self.clock()
        for taken, samples in self._ring:
            then = samples.get(key)
            if then is not None:
                return compare(then, Sample.of(stats), now - taken)
        return {"rate": 0.0, "error_rate": 0.0, "p50_ms": None, "p99_ms": None}

    async def run(
        self,
        pools: Callable[[], Mapping[str, Pool]],
        refresh: Callable[[], Awaitable[None]] | None = None,
        also: Callable[[Mapping[str, Pool]], None] | None = None,
    ) -> None:
        """Sample ``pools()`` every ``interval`` seconds until cancelled (after
        ``refresh()``, which brings worker processes' counters in); ``also`` samples
        the same pools at the same moment (``Trends.sample``)."""
        while True:
            try:
                if refresh is not None:
                    await refresh()
                current = pools()
                self.sample(current)
                if also is not None:
                    also(current)
            except Exception:  # a bug here must not end the sampling for good
                log.exception("sampling upstream statistics failed")
            await asyncio.sleep(self.interval)

    def __repr__(self) -> str:
        return f"<RecentStats [{len(self._ring)} samples over {self.span:.1f}s]>"
