"""What the filters of one server share, across reloads: one explicit object.

``FilterContext`` holds the rate-limit buckets (one table per process, or the shared
table of an instance's workers), the Redis stores (one per url and timeout, reused by
every chain and every reload that names them) and the counters behind
``aiolb_rate_limited_total`` and ``aiolb_rate_limit_store_errors_total`` (by route and
filter name, so that they stay monotonic when a reload rebuilds the chains). Chains
are rebuilt on reload; this object is not (STYLE 7: shared state is one object
handed down, here from ``ProxyServer``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from proxy.filters.buckets import LocalBuckets, SharedBuckets

if TYPE_CHECKING:
    from proxy.filters.redis_store import RedisBuckets
    from proxy.upstream.pool import Pool


class Counts:
    """One rate limit's counters: requests refused (429), and decisions its store could
    not make (Redis down: admitted with ``fail_open``, else 503)."""

    __slots__ = ("limited", "store_errors")

    def __init__(self) -> None:
        self.limited = 0
        self.store_errors = 0


class Tally:
    """One monotonic count (a traffic split's choices of a pool, a mirror's outcomes),
    kept here so that a reload, which rebuilds the routes, does not reset it."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


class FilterContext:
    """The buckets, Redis stores and counters of one server's filters."""

    def __init__(
        self, buckets: LocalBuckets | SharedBuckets | None = None, folder: str | None = None
    ) -> None:
        self.buckets = buckets if buckets is not None else LocalBuckets()
        #: the config file's folder, where ``python:`` filter modules are looked for too
        self.folder = folder
        self.counts: dict[tuple[str, str], Counts] = {}
        #: the routes' traffic counts (``proxy.forwarding.traffic``) by label values:
        #: ``("split", route, pool)`` and ``("mirror", route, pool, outcome)``
        self.traffic: dict[tuple[str, ...], Tally] = {}
        self._redis: dict[tuple[str, float], RedisBuckets] = {}

    def counter(self, route: str, name: str) -> Counts:
        """The counters of rate limit ``name`` on ``route`` (made on first use)."""
        counts = self.counts.get((route, name))
        if counts is None:
            counts = self.counts[(route, name)] = Counts()
        return counts

    def tally(self, *labels: str) -> Tally:
        """The traffic count of ``labels`` (made on first use)."""
        tally = self.traffic.get(labels)
        if tally is None:
            tally = self.traffic[labels] = Tally()
        return tally

    def redis(self, url: str, timeout: float) -> RedisBuckets:
        """The store for this Redis (one client and connection pool per url)."""
        store = self._redis.get((url, timeout))
        if store is None:
            from proxy.filters.redis_store import RedisBuckets

            store = self._redis[(url, timeout)] = RedisBuckets(url, timeout)
        return store

    def snapshot(self) -> list[list[Any]]:
        """The counters as plain data (``proxy.runtime.totals``)."""
        return [[route, name, c.limited, c.store_errors]
                for (route, name), c in self.counts.items()]  # fmt: skip

    def traffic_snapshot(self) -> list[list[Any]]:
        """The traffic counts as plain data: ``[*labels, n]`` rows."""
        return [[*labels, t.n] for labels, t in self.traffic.items()]

    def absorb_traffic(self, snapshots: list[list[list[Any]]]) -> None:
        """Replace the traffic counts by the sum of several workers' snapshots."""
        self.traffic = {}
        for snapshot in snapshots:
            for row in snapshot:
                self.tally(*row[:-1]).n += row[-1]

    def absorb(self, snapshots: list[list[list[Any]]]) -> None:
        """Replace the counters by the sum of several workers' ``snapshot()``."""
        self.counts = {}
        for snapshot in snapshots:
            for route, name, limited, errors in snapshot:
                counts = self.counter(route, name)
                counts.limited += limited
                counts.store_errors += errors

    async def close(self) -> None:
        for store in self._redis.values():
            await store.close()
        self._redis.clear()


class Site:
    """Where a built-in filter is built: its route's name and pool, and the context."""

    __slots__ = ("context", "pool", "route")

    def __init__(self, route: str, pool: Pool, context: FilterContext) -> None:
        self.route = route
        self.pool = pool
        self.context = context
