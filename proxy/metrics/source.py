"""What the metrics read of the running proxy, as Protocols this package owns.

``proxy.metrics`` sits below the packages whose objects it reads (``upstream``,
``filters``, ``cache``, ``tracing``, ``runtime``: see ``.importlinter``), so it names
the attributes it reads here rather than importing their classes (STYLE.md 15). The
classes match without naming these: ``runtime.server.ProxyServer`` is a ``Source``,
``upstream.pool.Pool`` a ``PoolView``, ``upstream.pool.Upstream`` an ``UpstreamView``;
mypy checks that where they are handed over (``build_registry``, ``AccessLog.record``).

Every member is read-only (a property here): the metrics never write what they read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from proxy.metrics.stats import Stats


class PoolRef(Protocol):
    """A pool as an access log line names it."""

    @property
    def name(self) -> str: ...


class UpstreamRef(Protocol):
    """An upstream as an access log line names it: ``host:port`` and its ``name``
    (the config's, else the address)."""

    @property
    def address(self) -> str: ...

    @property
    def name(self) -> str: ...


class UpstreamView(UpstreamRef, Protocol):
    """An upstream's counters and state, for the collector."""

    @property
    def stats(self) -> Stats: ...

    @property
    def available(self) -> bool:
        """Healthy, enabled and not ejected (``aiolb_upstream_up``)."""
        ...

    @property
    def active(self) -> int: ...

    @property
    def tunnels(self) -> int: ...

    @property
    def ejections(self) -> int: ...

    @property
    def health_checks(self) -> Mapping[str, int]:
        """Active probes by result (``success``, ``failure``)."""
        ...


class BudgetView(Protocol):
    @property
    def denied(self) -> int:
        """Retries the retry budget refused."""
        ...


class RetryView(Protocol):
    @property
    def budget(self) -> BudgetView: ...


class PoolView(PoolRef, Protocol):
    """A pool's counters and its upstreams, for the collector."""

    @property
    def stats(self) -> Stats: ...

    @property
    def upstreams(self) -> Sequence[UpstreamView]: ...

    @property
    def retries(self) -> int: ...

    @property
    def retry(self) -> RetryView: ...

    @property
    def overflows(self) -> int:
        """Requests the circuit breaker refused."""
        ...

    @property
    def pending(self) -> int:
        """Requests waiting for a connection now."""
        ...

    @property
    def held(self) -> int:
        """Requests held for an upstream to become ready (``scale_from_zero``)."""
        ...

    @property
    def scale_actions(self) -> Mapping[tuple[str, str], int]:
        """``scale_from_zero`` actions by (action, result)."""
        ...


class LimitCounts(Protocol):
    """One rate limit's counters."""

    @property
    def limited(self) -> int: ...

    @property
    def store_errors(self) -> int: ...


class FilterCounts(Protocol):
    """The route filters' shared state: the rate limits' counters by (route, name), and
    the routes' traffic counts."""

    @property
    def counts(self) -> Mapping[tuple[str, str], LimitCounts]: ...

    @property
    def traffic(self) -> Mapping[tuple[str, ...], Tally]:
        """The routes' split and mirror counts by label values (``FilterContext``)."""
        ...


class Tally(Protocol):
    """One traffic count."""

    @property
    def n(self) -> int: ...


class CacheView(Protocol):
    def report(self) -> Mapping[str, Any]:
        """``results`` (by result), ``bytes`` and ``entries`` (None for Redis),
        ``stored``, ``errors``: the workers' sum when there are workers."""
        ...


class TraceCounts(Protocol):
    def counts(self) -> Mapping[str, int]:
        """Spans ``exported`` and ``dropped``."""
        ...


class Source(Protocol):
    """The running proxy, as the collector reads it at each scrape."""

    @property
    def stats(self) -> Stats:
        """Responses made before a pool was chosen."""
        ...

    @property
    def pools(self) -> Mapping[str, PoolView]: ...

    @property
    def filters(self) -> FilterCounts: ...

    @property
    def caches(self) -> Mapping[str, CacheView]: ...

    @property
    def tracer(self) -> TraceCounts | None: ...

    @property
    def handshake_totals(self) -> Mapping[tuple[str, str], int] | None:
        """The workers' failed TLS handshakes (on a supervisor), else None."""
        ...

    @property
    def proxy_protocol_totals(self) -> Mapping[tuple[str, str], int] | None:
        """The workers' refused PROXY headers (on a supervisor), else None."""
        ...

    @property
    def reloads(self) -> Mapping[str, int]:
        """Reloads by result (``success``, ``failure``)."""
        ...

    def client_connection_counts(self) -> Mapping[str, int]:
        """Open client connections per listener (the workers' sum on a supervisor)."""
        ...

    def handshake_errors(self) -> Mapping[tuple[str, str], int]:
        """This process's failed TLS handshakes by (listener, reason)."""
        ...

    def proxy_protocol_errors(self) -> Mapping[tuple[str, str], int]:
        """This process's connections closed for their PROXY header, by (listener,
        reason)."""
        ...
