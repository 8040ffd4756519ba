"""A ``pools`` entry: its upstreams, balancer, timeouts and the bounds on what it holds.

``PoolSpec`` gathers the sections a pool has; those with more to say live in their
own modules: ``balancer`` (``proxy.config.balancer``), ``health_check``
(``proxy.config.health_check``), ``retries`` (``proxy.config.retries``) and ``tls``
(``proxy.config.tls``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, model_validator

from proxy.config.balancer import BalancerSpec
from proxy.config.base import BindAddress, ConfigModel, Duration, Name, Timeout, UpstreamURL
from proxy.config.health_check import HealthCheckSpec
from proxy.config.providers import ScaleFromZeroSpec
from proxy.config.proxy_protocol import SendProxyProtocol
from proxy.config.retries import RetriesSpec
from proxy.config.tls import UpstreamTLSSpec
from proxy.config.values import format_address, is_dns_url, is_https_url, parse_upstream_url


def _http_version(value: object) -> object:
    """YAML reads ``2``, ``2.0`` and ``1.1`` as numbers: the strings ``"2"`` and
    ``"1.1"`` they stand for; anything else is left for the ``Literal`` to refuse."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value == 2:
            return "2"
        if value == 1.1:
            return "1.1"
        return str(value)
    return value


#: The HTTP version a pool speaks to its upstreams: ``"1.1"`` or ``"2"``.
HttpVersion = Annotated[Literal["1.1", "2"], BeforeValidator(_http_version)]


class PoolTimeoutsSpec(ConfigModel):
    """Upstream-side timeouts, in seconds.

    ``connect``: TCP connect, and the TLS handshake for https upstreams (then 502 or a
    retry). ``response_header``: from the request
    sent to the complete response head (then 504). ``idle``: how long an idle keep-alive
    connection stays pooled. ``read``: longest gap between two upstream reads once the
    response started.
    """

    connect: Timeout = 3.0
    """TCP connect to an upstream (then 502, or a retry)."""
    response_header: Timeout = 30.0
    """From the request sent to the complete response head (then 504)."""
    idle: Timeout = 60.0
    """How long an idle keep-alive upstream connection stays pooled."""
    read: Timeout = 60.0
    """Longest gap between two upstream reads once the response started."""
    send: Timeout = 60.0
    """Longest an upstream may take none of a request body (its connection's write
    buffer full) before the request fails (504, or closed mid-response): nginx's
    ``proxy_send_timeout``."""
    tunnel_idle: Timeout = 3600.0
    """An Upgrade tunnel (WebSocket) with no traffic either way for this long is
    closed."""


class CircuitBreakerSpec(ConfigModel):
    """Bounds on what one pool may hold (Envoy's circuit breakers, HAProxy's
    ``maxconn``/``timeout queue``): ``max_connections`` open connections per upstream
    (an upstream's own ``max_connections`` overrides it); requests beyond wait, at most
    ``max_pending`` per pool for at most ``queue_timeout``; more answer 503 at once."""

    max_connections: Annotated[int, Field(ge=1)] = 1024
    """Open connections per upstream."""
    max_pending: Annotated[int, Field(ge=0)] = 1024
    """Requests waiting for a connection, per pool; more get 503 at once."""
    queue_timeout: Timeout = 5.0
    """The longest a request waits for a connection (then 503)."""


class UpstreamSpec(ConfigModel):
    """One upstream server. ``backup`` ones serve only when no primary is available."""

    url: UpstreamURL
    """``http://host:port`` (``http://host``: port 80), ``https://host:port`` (TLS;
    ``https://host``: port 443), or ``dns://name:port`` for one upstream per address
    ``name`` resolves to."""
    name: Name | None = None
    """What the dashboard and ``/api/pools`` call this upstream; null: its
    ``host:port``."""
    weight: Annotated[int, Field(ge=1)] = 1
    """Share of the traffic, relative to the pool's other upstreams."""
    backup: bool = False
    """Serve only while no primary upstream is available."""
    max_connections: Annotated[int, Field(ge=1)] | None = None
    """Open connections to this upstream; null: the pool's
    ``circuit_breaker.max_connections``."""

    @property
    def host(self) -> str:
        """Lower-case host; an IPv6 literal without brackets (ready for ``connect``)."""
        return parse_upstream_url(self.url)[0]

    @property
    def port(self) -> int:
        return parse_upstream_url(self.url)[1]

    @property
    def address(self) -> str:
        """``host:port`` (``[::1]:80`` for IPv6): the upstream's identity and metric label."""
        return format_address(*parse_upstream_url(self.url))

    @property
    def label(self) -> str:
        """The upstream's display name: ``name``, else its address."""
        return self.name or self.address

    @property
    def dns(self) -> bool:
        """``url: dns://name:port``: this entry stands for every address ``name`` has."""
        return is_dns_url(self.url)

    @property
    def https(self) -> bool:
        """``url: https://...``: the proxy talks TLS to this upstream."""
        return is_https_url(self.url)

    def resolved(self, host: str) -> UpstreamSpec:
        """This entry for one address ``name`` resolved to (same weight, backup, limits)."""
        return self.model_copy(update={"url": f"http://{format_address(host, self.port)}"})


class PoolSpec(ConfigModel):
    """A set of upstreams behind one balancer.

    ``max_idle_connections``: idle keep-alive connections kept per upstream; None (the
    default) keeps every connection that ends a response cleanly, up to the upstream's
    ``max_connections``, and ``timeouts.idle`` trims the ones not used (HAProxy's and
    Envoy's unbounded idle pools). A lower cap closes connections a steady load needs
    again a moment later.
    """

    balancer: BalancerSpec = BalancerSpec()
    """``NAME`` or ``{name: NAME, ...options}``: ``round_robin``,
    ``weighted_round_robin``, ``least_connections``, ``random``, ``power_of_two``,
    ``ip_hash``, ``consistent_hash`` (option ``key``), ``peak_ewma`` (option ``decay``)."""
    upstreams: list[UpstreamSpec]
    """The servers behind the pool; ``[]`` only when a provider (``providers.docker``)
    fills it."""
    http_version: HttpVersion = "1.1"
    """The HTTP version spoken to the pool's upstreams: ``"1.1"``, or ``"2"``: HTTP/2,
    with prior knowledge (h2c) to ``http://`` upstreams and ALPN ``h2`` to ``https://``
    ones (nginx's ``proxy_http_version``, Envoy's ``http2_protocol_options``)."""
    send_proxy_protocol: SendProxyProtocol | None = None
    """``v1`` or ``v2``: write a PROXY protocol header with the client's address first on
    each upstream connection (HAProxy's ``send-proxy`` / ``send-proxy-v2``), before TLS
    for ``https://`` upstreams; health checks send ``LOCAL`` (v2) or ``UNKNOWN`` (v1).
    Such a connection carries one client's address: it is reused only for requests that
    would send the same header (the same client connection), and an HTTP/2 one carries
    one stream. null: none."""
    timeouts: PoolTimeoutsSpec = PoolTimeoutsSpec()
    """Upstream-side timeouts."""
    max_idle_connections: Annotated[int, Field(ge=0)] | None = None
    """Idle keep-alive connections kept per upstream; null: every connection that ends a
    response cleanly, up to the upstream's ``max_connections`` (``timeouts.idle`` trims
    the ones not used)."""
    slow_start: Annotated[Duration, Field(gt=0)] | None = None
    """Time over which an upstream that became available ramps its weight from 10% to
    100% (HAProxy's ``slowstart``); null: at once."""
    health_check: HealthCheckSpec = HealthCheckSpec()
    """Active probes and passive outlier detection."""
    retries: RetriesSpec = RetriesSpec()
    """Trying a failed request again on another upstream."""
    circuit_breaker: CircuitBreakerSpec = CircuitBreakerSpec()
    """Bounds on connections and waiting requests."""
    dns_refresh: Timeout = 5.0
    """How often ``dns://`` upstreams are resolved again (sooner when a record's TTL is
    shorter and the resolver reports it)."""
    dns_resolver: BindAddress | None = None
    """``host:port`` of a DNS server to ask directly (honours TTLs); null: the system
    resolver (``/etc/hosts``, search domains)."""
    tls: UpstreamTLSSpec | None = None
    """TLS to the pool's ``https://`` upstreams; null: verified against the system's CA
    store, SNI from each url's host."""
    scale_from_zero: ScaleFromZeroSpec | None = None
    """While no upstream is ready, requests wait (rather than 503) and the pool is woken;
    null: 503 at once."""

    @model_validator(mode="after")
    def _tls_needs_https(self) -> PoolSpec:
        if self.tls is not None and self.upstreams and not any(
            spec.https for spec in self.upstreams
        ):
            raise ValueError("tls applies to https:// upstreams; this pool has none")
        return self
