"""The Prometheus collector: the hot-path counters turned into metric families at scrape.

Theory of operation
-------------------
The hot path only ever touches plain ints, dicts and lists (``proxy.metrics.stats``);
nothing here runs per request. ``METRICS`` names every family once (name, type, labels,
help): the collector builds its families from it and ``docs/metrics.md`` is generated
from it (``python -m proxy.docs``). When ``/metrics`` is scraped,
``ProxyCollector.collect`` walks the server's state once and yields one family per
metric:

- ``aiolb_requests_total``: the server's ``stats`` (responses made before a pool was
  chosen: ``pool=""``, ``upstream=""``), each pool's ``stats`` (``upstream=""``) and each
  upstream's ``stats``. Samples with the same labels are summed, so a label set is never
  emitted twice.
- ``aiolb_request_duration_seconds``: per pool, the pool's own histogram plus those of
  all its upstreams (so ``_count`` is the number of requests for that pool); the
  server's histogram is ``pool=""``, once it has counted a request. Buckets are made
  cumulative here.
- ``aiolb_grpc_responses_total``: each pool's ``stats.grpc`` (``grpc-status`` number ->
  calls), numbers named here (``grpc_label``; every number outside 0-16 summed as
  ``OTHER``).
- gauges and counters read straight off ``Upstream`` (availability, in-flight,
  connect errors, ejections, probe results, open tunnels), ``Pool`` (retries, retries
  the budget denied, circuit-breaker overflows, requests waiting for a connection), the
  rate limits' counters (``ProxyServer.filters.counts``: by route and filter name, from
  the config that names them on), the listeners (connections, failed TLS handshakes)
  and ``ProxyServer.reloads``.

The registry is built per server (``build_registry``): the one piece of metrics state
that is not a plain counter, and no module-level global.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Final, Literal

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from proxy.metrics.stats import BUCKETS, Histogram, Stats, grpc_label, method_label

if TYPE_CHECKING:
    from proxy.metrics.source import Source, UpstreamView

REQUEST_LABELS = ("listener", "pool", "upstream", "method", "code")
UPSTREAM_LABELS = ("pool", "upstream")
#: ``le`` label values, formatted once (``+Inf`` last)
LE = [repr(float(b)) for b in BUCKETS] + ["+Inf"]

Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class MetricSpec:
    """One metric family: its name (without ``_total``), type, labels and help text."""

    name: str
    kind: Kind
    labels: tuple[str, ...]
    help: str

    @property
    def exposed(self) -> str:
        """The name in the exposition: counters get ``_total``."""
        return f"{self.name}_total" if self.kind == "counter" else self.name


#: Every family aiolb exposes, in exposition order (the design's metrics contract and
#: the additions since); ``docs/metrics.md`` is generated from it.
METRICS: Final = (
    MetricSpec("aiolb_requests", "counter", REQUEST_LABELS,
               'Requests answered, by upstream and status (upstream "": the proxy answered '
               "itself)."),
    MetricSpec("aiolb_request_duration_seconds", "histogram", ("pool",),
               "Time from the request head to the end of the response, per pool."),
    MetricSpec("aiolb_grpc_responses", "counter", ("pool", "grpc_status"),
               "gRPC calls finished with a status, by pool and status (the upstream's, or the "
               "proxy's own answer for the pool: UNAVAILABLE, DEADLINE_EXCEEDED, ...); a "
               "call no route took (no pool) is not counted."),
    MetricSpec("aiolb_upstream_up", "gauge", UPSTREAM_LABELS,
               "1 if the upstream is available (healthy, enabled, not ejected), else 0."),
    MetricSpec("aiolb_upstream_active_requests", "gauge", UPSTREAM_LABELS,
               "Requests in flight to the upstream."),
    MetricSpec("aiolb_upstream_connect_errors", "counter", UPSTREAM_LABELS,
               "Failed connection attempts to the upstream."),
    MetricSpec("aiolb_upstream_connections_opened", "counter", UPSTREAM_LABELS,
               "Connections established to the upstream (steady load reuses them: a rate "
               "above zero under steady load means the idle pool closes what it needs)."),
    MetricSpec("aiolb_upstream_ejections", "counter", UPSTREAM_LABELS,
               "Times passive outlier detection ejected the upstream."),
    MetricSpec("aiolb_health_checks", "counter", (*UPSTREAM_LABELS, "result"),
               "Active health check probes, by result."),
    MetricSpec("aiolb_retries", "counter", ("pool",), "Requests sent to an upstream again."),
    MetricSpec("aiolb_retries_denied", "counter", ("pool",),
               "Retries the retry budget refused."),
    MetricSpec("aiolb_circuit_breaker_overflows", "counter", ("pool",),
               "Requests refused with 503 by the circuit breaker (max_pending or "
               "queue_timeout)."),
    MetricSpec("aiolb_pending_requests", "gauge", ("pool",),
               "Requests waiting: for an upstream connection (max_connections), or held "
               "for an upstream to become ready (scale_from_zero). KEDA's scaler reads it."),
    MetricSpec("aiolb_pool_active_requests", "gauge", ("pool",),
               "Requests in flight on the pool's upstreams (the sum of "
               "aiolb_upstream_active_requests; add aiolb_pending_requests for the demand)."),
    MetricSpec("aiolb_scale_actions", "counter", ("pool", "action", "result"),
               "scale_from_zero: pool wakes (action wake), idle stops (stop), and requests "
               "refused because max_pending were held (hold, result overflow)."),
    MetricSpec("aiolb_tunnels_active", "gauge", ("pool",),
               "Open Upgrade tunnels (WebSocket) to the pool's upstreams; each also counts "
               "as an active request of its upstream."),
    MetricSpec("aiolb_rate_limited", "counter", ("route", "filter"),
               "Requests a rate_limit filter refused (429)."),
    MetricSpec("aiolb_rate_limit_store_errors", "counter", ("route", "filter"),
               "Rate-limit decisions the store (Redis) could not make: admitted with "
               "fail_open, else answered 503."),
    MetricSpec("aiolb_split_requests", "counter", ("route", "pool"),
               "Requests a route with a traffic split (pools) sent to each of its pools."),
    MetricSpec("aiolb_mirror_requests", "counter", ("route", "pool", "outcome"),
               "Copies of a route's requests for its mirror pool, by outcome: answered "
               "(the mirror pool answered), failed (no answer: error, timeout, 503), "
               "dropped (max_in_flight copies were in flight, or an Upgrade), skipped "
               "(the body streamed, not read whole: not copied)."),
    MetricSpec("aiolb_cache_requests", "counter", ("cache", "result"),
               "Requests of routes with a cache, by what the cache did: hit (fresh), stale "
               "(served stale: stale-while-revalidate, stale-if-error, use_stale), "
               "revalidated (a 304 confirmed the stored response), miss (forwarded: nothing usable "
               "stored, or a revalidation answered with a new response), bypass."),
    MetricSpec("aiolb_cache_bytes", "gauge", ("cache",),
               "Bytes of heads and bodies a memory store holds (the workers' sum)."),
    MetricSpec("aiolb_cache_entries", "gauge", ("cache",),
               "Responses a memory store holds (the workers' sum)."),
    MetricSpec("aiolb_cache_errors", "counter", ("cache",),
               "Cache store operations that failed (Redis down or slow): the request "
               "bypassed the cache."),
    MetricSpec("aiolb_trace_spans_exported", "counter", (),
               "Spans the OTLP collector accepted (0 without tracing)."),
    MetricSpec("aiolb_trace_spans_dropped", "counter", (),
               "Spans lost: the export queue was full, or an export failed."),
    MetricSpec("aiolb_client_connections", "gauge", ("listener",), "Open client connections."),
    MetricSpec("aiolb_tls_handshake_errors", "counter", ("listener", "reason"),
               "TLS handshakes with clients that failed, by reason."),
    MetricSpec("aiolb_proxy_protocol_errors", "counter", ("listener", "reason"),
               "Client connections closed for their PROXY protocol header: untrusted, "
               "malformed, incomplete or timeout."),
    MetricSpec("aiolb_config_reloads", "counter", ("result",),
               "Configuration reloads, by result."),
)  # fmt: skip
_SPECS: Final = {spec.name: spec for spec in METRICS}

#: What each label holds (bounded whatever clients send).
LABELS: Final[Mapping[str, str]] = MappingProxyType({
    "listener": "the listener's `name`",
    "pool": 'the pool\'s name; `""` for responses made before a route chose a pool (404, '
            "400, 408, ...)",
    "upstream": 'the upstream\'s `host:port`; `""` when the proxy answered itself (502, 503, '
                "504, or no pool)",
    "method": "GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, CONNECT, TRACE, or OTHER",
    "code": "the status the client got",
    "grpc_status": "the `grpc-status` the client got, by name: `OK`, `CANCELLED`, "
                   "`UNKNOWN`, `INVALID_ARGUMENT`, ... `UNAUTHENTICATED` (0-16), else `OTHER`",
    "result": "`success` or `failure`; for `aiolb_cache_requests_total`: `hit`, `stale`, "
              "`revalidated`, `miss` or `bypass`; for `aiolb_scale_actions_total`: also "
              "`overflow`",
    "reason": "why a TLS handshake failed: `plaintext` (HTTP on a TLS port), `timeout` "
              "(`timeouts.header`), `reset`, `version`, `cipher`, `client_certificate`, "
              "`unknown_ca`, `protocol` or `other`",
    "route": "the route's `name`, else `LISTENER/INDEX` (`public/0`)",
    "cache": "the cache's name (a key of `caches`)",
    "filter": "the rate_limit filter's `name` (default `rate_limit`)",
    "action": "`wake`, `stop` or `hold`",
    "le": "histogram bucket bound in seconds: 0.001 to 10, and +Inf",
})  # fmt: skip


def _spec(name: str, kind: Kind) -> MetricSpec:
    spec = _SPECS[name]
    assert spec.kind == kind, f"{name} is a {spec.kind}"
    return spec


def counter(name: str) -> CounterMetricFamily:
    """The empty counter family ``name`` of ``METRICS`` (named without ``_total``)."""
    spec = _spec(name, "counter")
    return CounterMetricFamily(spec.name, spec.help, labels=list(spec.labels))


def gauge(name: str) -> GaugeMetricFamily:
    spec = _spec(name, "gauge")
    return GaugeMetricFamily(spec.name, spec.help, labels=list(spec.labels))


def histogram(name: str) -> HistogramMetricFamily:
    spec = _spec(name, "histogram")
    return HistogramMetricFamily(spec.name, spec.help, labels=list(spec.labels))


def add_requests(
    totals: dict[tuple[str, str, str, str, str], int], stats: Stats, pool: str, upstream: str
) -> None:
    """Fold ``stats.requests`` into ``totals`` keyed by the full label tuple."""
    for (listener, method, status), n in stats.requests.items():
        key = (listener, pool, upstream, method_label(method), str(status))
        totals[key] = totals.get(key, 0) + n


def merged(histograms: Iterable[Histogram]) -> tuple[list[int], float]:
    """Summed non-cumulative buckets and sum of several histograms."""
    buckets = [0] * (len(BUCKETS) + 1)
    total = 0.0
    for h in histograms:
        for i, n in enumerate(h.buckets):
            buckets[i] += n
        total += h.sum
    return buckets, total


def cumulative(buckets: list[int]) -> list[tuple[str, float]]:
    """Prometheus ``(le, cumulative count)`` pairs from non-cumulative buckets."""
    out, running = [], 0
    for le, n in zip(LE, buckets, strict=True):
        running += n
        out.append((le, float(running)))
    return out


class ProxyCollector(Collector):
    """Every metric of the contract, read from a live ``ProxyServer`` at scrape time
    (what it reads: ``proxy.metrics.source.Source``)."""

    def __init__(self, server: Source) -> None:
        self.server = server

    def describe(self) -> list[Metric]:
        """Nothing: the families are dynamic and the registry is ours alone."""
        return []

    def collect(self) -> Iterator[Metric]:
        yield self._requests()
        yield self._durations()
        yield self._grpc()
        yield from self._upstream_families()
        yield from self._retries()
        yield from self._rate_limits()
        yield from self._traffic()
        yield from self._caches()
        yield from self._traces()
        yield self._client_connections()
        yield self._handshake_errors()
        yield self._proxy_protocol_errors()
        yield self._reloads()

    def _requests(self) -> Metric:
        totals: dict[tuple[str, str, str, str, str], int] = {}
        add_requests(totals, self.server.stats, "", "")
        for name, pool in self.server.pools.items():
            add_requests(totals, pool.stats, name, "")
            for up in pool.upstreams:
                add_requests(totals, up.stats, name, up.address)
        family = counter("aiolb_requests")
        for labels, n in sorted(totals.items()):
            family.add_metric(list(labels), n)
        return family

    def _durations(self) -> Metric:
        family = histogram("aiolb_request_duration_seconds")
        if self.server.stats.duration.count:  # responses made before a pool was chosen
            buckets, total = merged([self.server.stats.duration])
            family.add_metric([""], cumulative(buckets), total)
        for name, pool in self.server.pools.items():
            parts = [pool.stats.duration, *(up.stats.duration for up in pool.upstreams)]
            buckets, total = merged(parts)
            family.add_metric([name], cumulative(buckets), total)
        return family

    def _grpc(self) -> Metric:
        family = counter("aiolb_grpc_responses")
        for name, pool in self.server.pools.items():
            by_name: dict[str, int] = {}
            for code, n in pool.stats.grpc.items():
                label = grpc_label(code)
                by_name[label] = by_name.get(label, 0) + n
            for label, n in sorted(by_name.items()):
                family.add_metric([name, label], n)
        return family

    def _upstream_families(self) -> Iterator[Metric]:
        up = gauge("aiolb_upstream_up")
        active = gauge("aiolb_upstream_active_requests")
        errors = counter("aiolb_upstream_connect_errors")
        opened = counter("aiolb_upstream_connections_opened")
        ejections = counter("aiolb_upstream_ejections")
        checks = counter("aiolb_health_checks")
        for name, pool in self.server.pools.items():
            for upstream in pool.upstreams:
                labels = [name, upstream.address]
                up.add_metric(labels, 1.0 if upstream.available else 0.0)
                active.add_metric(labels, upstream.active)
                errors.add_metric(labels, upstream.stats.connect_errors)
                opened.add_metric(labels, upstream.stats.connections_opened)
                ejections.add_metric(labels, upstream.ejections)
                _add_checks(checks, labels, upstream)
        yield from (up, active, errors, opened, ejections, checks)

    def _retries(self) -> Iterator[Metric]:
        retries = counter("aiolb_retries")
        denied = counter("aiolb_retries_denied")
        overflows = counter("aiolb_circuit_breaker_overflows")
        pending = gauge("aiolb_pending_requests")
        active = gauge("aiolb_pool_active_requests")
        actions = counter("aiolb_scale_actions")
        tunnels = gauge("aiolb_tunnels_active")
        for name, pool in self.server.pools.items():
            retries.add_metric([name], pool.retries)
            denied.add_metric([name], pool.retry.budget.denied)
            overflows.add_metric([name], pool.overflows)
            pending.add_metric([name], pool.pending + pool.held)
            active.add_metric([name], sum(u.active for u in pool.upstreams))
            tunnels.add_metric([name], sum(u.tunnels for u in pool.upstreams))
            for (action, result), n in pool.scale_actions.items():
                actions.add_metric([name, action, result], n)
        yield from (retries, denied, overflows, pending, active, actions, tunnels)

    def _rate_limits(self) -> Iterator[Metric]:
        limited = counter("aiolb_rate_limited")
        errors = counter("aiolb_rate_limit_store_errors")
        for (route, name), counts in sorted(self.server.filters.counts.items()):
            limited.add_metric([route, name], counts.limited)
            errors.add_metric([route, name], counts.store_errors)
        yield from (limited, errors)

    def _traffic(self) -> Iterator[Metric]:
        splits = counter("aiolb_split_requests")
        mirrors = counter("aiolb_mirror_requests")
        for labels, tally in sorted(self.server.filters.traffic.items()):
            family = splits if labels[0] == "split" else mirrors
            family.add_metric(list(labels[1:]), tally.n)
        yield from (splits, mirrors)

    def _caches(self) -> Iterator[Metric]:
        requests = counter("aiolb_cache_requests")
        size = gauge("aiolb_cache_bytes")
        entries = gauge("aiolb_cache_entries")
        errors = counter("aiolb_cache_errors")
        for name, cache in sorted(self.server.caches.items()):
            counts = cache.report()
            for result, n in counts["results"].items():
                requests.add_metric([name, result], n)
            if counts["bytes"] is not None:
                size.add_metric([name], counts["bytes"])
                entries.add_metric([name], counts["entries"])
            errors.add_metric([name], counts["errors"])
        yield from (requests, size, entries, errors)

    def _traces(self) -> Iterator[Metric]:
        tracer = self.server.tracer  # without tracing: 0, as every family is always there
        counts = tracer.counts() if tracer is not None else {"exported": 0, "dropped": 0}
        exported = counter("aiolb_trace_spans_exported")
        exported.add_metric([], counts["exported"])
        dropped = counter("aiolb_trace_spans_dropped")
        dropped.add_metric([], counts["dropped"])
        yield from (exported, dropped)

    def _client_connections(self) -> Metric:
        family = gauge("aiolb_client_connections")
        for name, n in self.server.client_connection_counts().items():
            family.add_metric([name], n)
        return family

    def _handshake_errors(self) -> Metric:
        family = counter("aiolb_tls_handshake_errors")
        counts = self.server.handshake_errors()
        if self.server.handshake_totals is not None:  # the workers' sum
            counts = self.server.handshake_totals
        for (listener, reason), n in sorted(counts.items()):
            family.add_metric([listener, reason], n)
        return family

    def _proxy_protocol_errors(self) -> Metric:
        family = counter("aiolb_proxy_protocol_errors")
        counts = self.server.proxy_protocol_errors()
        if self.server.proxy_protocol_totals is not None:  # the workers' sum
            counts = self.server.proxy_protocol_totals
        for (listener, reason), n in sorted(counts.items()):
            family.add_metric([listener, reason], n)
        return family

    def _reloads(self) -> Metric:
        family = counter("aiolb_config_reloads")
        for result in ("success", "failure"):
            family.add_metric([result], self.server.reloads.get(result, 0))
        return family


def _add_checks(family: CounterMetricFamily, labels: list[str], upstream: UpstreamView) -> None:
    """Samples from ``upstream.health_checks`` (result -> count)."""
    for result, n in sorted(upstream.health_checks.items()):
        family.add_metric([*labels, result], n)


def build_registry(server: Source) -> CollectorRegistry:
    """A registry of its own for ``server``: aiolb's families plus process, platform, GC."""
    registry = CollectorRegistry()
    registry.register(ProxyCollector(server))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry
