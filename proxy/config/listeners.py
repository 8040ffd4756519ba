"""A ``listeners`` entry: its address, timeouts, limits and TLS, and its ``routes``.

``ListenerSpec`` is one address clients connect to; ``RouteSpec`` sends the requests
that ``match`` (a ``MatchSpec``) to a pool, through the route's filters
(``proxy.config.filters``) and cache. The TLS a listener terminates is
``proxy.config.tls.ListenerTLSSpec``.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field, field_validator, model_validator

from proxy.config.base import BindAddress, ConfigModel, Kind, Name, Size, Timeout
from proxy.config.filters import FilterSpec, RateLimitOptions
from proxy.config.keys import parse_key
from proxy.config.proxy_protocol import ProxyProtocolSpec
from proxy.config.routing import (
    HeaderMatch,
    MirrorSpec,
    Regex,
    Text,
    WeightedPoolSpec,
    check_header_name,
    check_method,
)
from proxy.config.tls import ListenerTLSSpec
from proxy.config.values import split_host_port
from proxy.http.target import normal_target

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?"
_HOST = re.compile(rf"(?:\*\.)?(?:{_LABEL}\.)*{_LABEL}")


class ListenerTimeoutsSpec(ConfigModel):
    """Client-side timeouts, in seconds.

    ``header``: time to receive a complete request header (then 408). ``idle``: time a
    keep-alive connection may sit between requests. ``body``: longest gap between two
    reads of a request body.
    """

    header: Timeout = 10.0
    """Time to receive a complete request head (then 408)."""
    idle: Timeout = 60.0
    """Time a keep-alive connection may wait for its next request."""
    body: Timeout = 60.0
    """Longest gap between two reads of a request body (then 408); also how long an
    upstream may take none of a request body before the request fails (504)."""
    send: Timeout = 60.0
    """How long a client may read nothing of a response while the proxy has more to
    send (its write buffer full); then the connection is closed, freeing its upstream
    connection (nginx's ``send_timeout``)."""


class LimitsSpec(ConfigModel):
    """Request size limits, in bytes (ints or sizes such as ``64KiB``, see ``parse_size``).

    ``max_header_size``: the whole request head (else 431). ``max_uri_size``: the request
    target (else 414). ``max_body_size``: the request body (else 413); None = unlimited,
    since bodies stream and nothing is buffered. ``max_requests_per_connection``: the
    response to the last one says ``Connection: close`` (nginx's ``keepalive_requests``),
    which also re-spreads long-lived clients over the workers; None = unlimited.
    """

    max_header_size: Annotated[Size, Field(ge=1)] = 65536
    """Largest request head (then 431)."""
    max_uri_size: Annotated[Size, Field(ge=1)] = 8192
    """Longest request target (then 414)."""
    max_body_size: Annotated[Size, Field(ge=0)] | None = None
    """Largest request body (then 413); null: unlimited (bodies stream)."""
    max_requests_per_connection: Annotated[int, Field(ge=1)] | None = 1000
    """Requests per client connection; the last answer says ``Connection: close``
    (nginx's ``keepalive_requests``). null: unlimited."""
    body_buffer_size: Annotated[Size, Field(ge=0, le=16 * 1024 * 1024)] = 65536
    """A request body up to this size is read whole before an upstream connection is
    taken, so a client that sends it slowly holds no upstream connection (nginx's
    ``proxy_request_buffering`` with ``client_body_buffer_size``, in memory only);
    larger bodies stream. 0: every body streams at once."""
    max_headers: Annotated[int, Field(ge=1)] = 100
    """Most header lines in a request head (then 431): Envoy's ``max_headers_count``."""
    underscores_in_headers: bool = False
    """Forward request headers whose names contain ``_``. Off (nginx's default): they
    are dropped, since CGI and WSGI read ``X_Forwarded_Proto`` as the proxy's own
    ``X-Forwarded-Proto``."""


#: What a listener speaks: HTTP/1.1, HTTP/2 over TLS (ALPN), HTTP/2 in clear (prior knowledge).
Protocol = Literal["http/1.1", "h2", "h2c"]


class Http2Spec(ConfigModel):
    """HTTP/2 to clients: the limits of one connection (nginx's and Envoy's names in
    ``docs/config.md``). The header list is bounded by ``limits.max_header_size`` and
    the request target by ``limits.max_uri_size``, as for HTTP/1.1."""

    max_concurrent_streams: Annotated[int, Field(ge=1, le=2**31 - 1)] = 128
    """Streams one client connection may have open at once (``SETTINGS_MAX_CONCURRENT_
    STREAMS``; nginx's ``http2_max_concurrent_streams``, Envoy's
    ``max_concurrent_streams``)."""
    initial_window_size: Annotated[Size, Field(ge=65535, le=2**31 - 1)] = 65535
    """How much of a request body a client may send on one stream before the proxy
    acknowledges it (``SETTINGS_INITIAL_WINDOW_SIZE``; Envoy's
    ``initial_stream_window_size``). The proxy acknowledges a stream's bytes as its
    upstream takes them, so this bounds what a slow upstream makes the proxy hold per
    stream."""
    connection_window_size: Annotated[Size, Field(ge=65535, le=2**31 - 1)] = 16 * 1024 * 1024
    """The request bytes of all streams of a connection not yet acknowledged (Envoy's
    ``initial_connection_window_size``): large enough that a stream whose upstream is
    slow does not stall the others."""
    max_resets_per_second: Annotated[int, Field(ge=1)] = 100
    """Requests a client may cancel (``RST_STREAM``) per second before the connection is
    closed with ``GOAWAY ENHANCE_YOUR_CALM``: the Rapid Reset attack (CVE-2023-44487)
    makes each cancelled request cost the proxy and its upstream work."""
    max_control_frames_per_second: Annotated[int, Field(ge=1)] = 1000
    """Frames that ask the proxy for work but carry no request (PING, SETTINGS, PRIORITY,
    WINDOW_UPDATE, empty DATA, unknown types) per second, before the connection is
    closed with ``GOAWAY ENHANCE_YOUR_CALM`` (the PING, SETTINGS and empty-frame floods:
    CVE-2019-9512, -9515, -9518)."""


class MatchSpec(ConfigModel):
    """What a request must look like to take a route; every part given must match.

    ``host``: an exact host (``api.example.com``) or a wildcard (``*.example.com``, which
    matches any subdomain but not ``example.com`` itself), stored lower-case, without a
    port; None matches every host. ``path_prefix``: the request's normalised target
    (``proxy.http.target``) starts with it, so it must be written normalised itself.
    ``methods``, ``headers``, ``query``, ``path`` and ``path_regex`` are optional
    (``proxy.forwarding.matching`` checks them, cheapest first).
    """

    host: str | None = None
    """``api.example.com`` or ``*.example.com`` (subdomains only); null: any host."""
    path_prefix: str = "/"
    """The request path starts with this, after normalisation (RFC 3986: `%61` is `a`,
    other escapes in upper case, `//`, `/./` and `/x/../` merged or removed)."""

    methods: list[Annotated[str, AfterValidator(check_method)]] | None = None
    """Request methods (``[GET, HEAD]``), upper case; null: any method."""
    headers: dict[Annotated[str, AfterValidator(check_header_name)], HeaderMatch] = {}
    """Request headers by name (case-insensitive), each an exact value, ``{regex:
    PATTERN}`` (searched in the value) or ``{present: true|false}``. Repeated header
    lines are compared as one value, joined with ``, `` (RFC 9110 5.3). Regexes as for
    ``path_regex``."""
    query: dict[str, Text] = {}
    """Query parameters and their exact values, percent-decoded (``+`` is a space). A
    repeated parameter: its first occurrence is compared. A parameter whose name or
    value is not valid percent-encoding is taken as absent."""
    path: str | None = None
    """The request path (normalised, without the query) equals this exactly."""
    path_regex: Regex | None = None
    """A regex searched in the normalised path without the query (``^/api/v[0-9]+/``).
    Refused: patterns that could backtrack exponentially (``(a+)+``, ``(a|ab)*``,
    backreferences), and those whose worst case is above quadratic (two unbounded
    repeats unanchored, three anchored with ``^``). A quadratic one (``a.*b``, ``^a.*b.*c``)
    never matches a value over 2 KiB, which bounds its cost to a few ms."""

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith("/") or "?" in value:
            raise ValueError(f"must start with '/' and have no query, got {value!r}")
        if normal_target(value.encode()) != value.encode():
            normal = normal_target(value.encode())
            written = "" if normal is None else f"; write {normal.decode()!r}"
            raise ValueError(f"{value!r} can never match a normalised request path{written}")
        return value

    @field_validator("methods")
    @classmethod
    def _check_methods(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("methods is empty: list methods, or leave it out for any")
        return value

    def is_plain(self) -> bool:
        """True when only ``host`` and ``path_prefix`` are given (the fast router)."""
        return (self.methods is None and not self.headers and not self.query
                and self.path is None and self.path_regex is None)  # fmt: skip

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host = value.strip().lower()
        if host.startswith("[") and host.endswith("]"):
            return host
        if ":" in host:
            raise ValueError(f"host must not include a port: {value!r}")
        if not _HOST.fullmatch(host):
            raise ValueError(f"invalid host {value!r}; use a name such as api.example.com "
                             "or a wildcard such as *.example.com")  # fmt: skip
        return host

    @field_validator("path_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"must start with '/', got {value!r}")
        if not value.isascii() or not value.isprintable() or " " in value:
            raise ValueError(f"must be printable ASCII without spaces, got {value!r}")
        normal = normal_target(value.encode() + b"x")  # "x": a prefix may end in a segment
        if normal != value.encode() + b"x":
            written = "" if normal is None else f"; write {normal[:-1].decode()!r}"
            raise ValueError(f"{value!r} can never match a normalised request path{written}")
        return value


#: ``Upgrade`` protocols a route may tunnel (RFC 9110 7.8): lower-case tokens.
_UPGRADE_TOKEN = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")


def _check_upgrades(value: list[str]) -> tuple[str, ...]:
    out: list[str] = []
    for item in value:
        token = item.strip().lower()
        if token == "h2c":
            raise ValueError("h2c upgrades are never forwarded (aiolb speaks HTTP/1.1 to "
                             "upstreams); remove 'h2c'")  # fmt: skip
        if not _UPGRADE_TOKEN.fullmatch(token):
            raise ValueError(f"invalid upgrade protocol {item!r}; use a token such as websocket")
        out.append(token)
    return tuple(out)


#: Upgrade protocols (``websocket``), lower-case; ``h2c`` is refused.
Upgrades = Annotated[
    tuple[str, ...],
    BeforeValidator(list),
    AfterValidator(_check_upgrades),
    Kind("list of protocols"),
]
#: ``true`` (redirect to ``https://host/...``), a port (``https://host:PORT/...``), or false.
RedirectHTTPS = bool | Annotated[int, Field(ge=1, le=65535)]


class RouteSpec(ConfigModel):
    """Send requests that ``match`` to the pool named ``pool``, through ``filters`` and
    its ``cache``.

    ``upgrades``: the ``Upgrade`` protocols this route tunnels (a ``101`` from the
    upstream turns the connection into a byte tunnel); a request for another one gets
    403. ``redirect_https``: answer with ``308`` to the same URL on https (true: the
    default port, a number: that port) instead of forwarding; no pool is needed then.
    None: the listener's ``redirect_https``.
    """

    name: Name | None = None
    """The route's name: the ``route`` label of ``aiolb_rate_limited_total``, the
    dashboard, log lines and rate-limit keys; unique in the config. null:
    ``LISTENER/INDEX`` (``public/0``: the listener's first route)."""
    match: MatchSpec = MatchSpec()
    """What a request must look like to take this route (both parts must match)."""
    pool: str | None = None
    """The pool that serves the requests this route matches (required unless the route
    redirects to https or names ``pools``)."""
    pools: list[WeightedPoolSpec] | None = None
    """A traffic split instead of ``pool``: ``[{pool: stable, weight: 95}, {pool:
    canary, weight: 5}]``. Each request goes to one of them in proportion to the
    weights (smooth weighted round robin: exact shares, evenly spread), or by
    ``sticky``."""
    sticky: str | None = None
    """With ``pools``: choose the pool from a request key (``client_ip``,
    ``cookie:NAME``, ``header:NAME``, ``query:NAME``, ``path``) hashed onto the
    weights, so the same client keeps the same pool while the weights stay; a request
    without the key is split as if not sticky. null: not sticky."""
    mirror: MirrorSpec | None = None
    """Send a copy of ``fraction`` of this route's requests to another pool, fire and
    forget (its answers are discarded; it never delays or fails the real request).
    Only requests whose body is read whole first (``limits.body_buffer_size``) or that
    have none are copied; ``Host`` is kept as the client sent it and the copy's
    ``X-Request-ID`` ends in ``-mirror``."""
    upgrades: Upgrades = ("websocket",)
    """``Upgrade`` protocols tunnelled after a ``101`` (others get 403; ``h2c`` is never
    forwarded); ``[]`` refuses every Upgrade."""
    redirect_https: RedirectHTTPS | None = None
    """``true`` or a port: answer ``308`` to the same URL on https instead of
    forwarding; ``false``: forward; null: the listener's ``redirect_https``."""
    cache: str | None = None
    """A cache (``caches``) for the responses of this route; null: none, nothing of the
    cache runs."""
    filters: list[FilterSpec] = []
    """Traffic policy, in order: ``rate_limit``, ``headers``, ``rewrite``, ``redirect``,
    ``sticky``, ``access``, ``python`` (see "Filters" below); [] runs none."""

    @model_validator(mode="after")
    def _check_split(self) -> RouteSpec:
        if self.pools is None:
            if self.sticky is not None:
                raise ValueError("sticky applies to a traffic split: add pools")
            return self
        if self.pool is not None:
            raise ValueError("give either pool or pools, not both")
        if not self.pools:
            raise ValueError("pools is empty: list {pool: NAME, weight: N} entries")
        if sum(p.weight for p in self.pools) <= 0:
            raise ValueError("the weights of pools sum to 0: give one a weight above 0")
        names = [p.pool for p in self.pools]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"pool {name!r} is listed twice in pools")
        if self.sticky is not None:
            parse_key(self.sticky)
        return self

    def pool_names(self) -> list[str]:
        """The pools this route may send a request to: ``pool`` or those of ``pools``."""
        if self.pools is not None:
            return [p.pool for p in self.pools]
        return [self.pool] if self.pool is not None else []

    @model_validator(mode="after")
    def _distinct_rate_limits(self) -> RouteSpec:
        names = [f.name for f in self.filters if isinstance(f, RateLimitOptions)]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"two rate_limit filters named {name!r}: give each its own "
                                 "name (the filter label)")  # fmt: skip
        return self


class ListenerSpec(ConfigModel):
    """One address clients connect to, with its routes (the first match wins).

    ``tls``: terminate HTTPS here (None: plain HTTP). ``redirect_https`` (plain-HTTP
    listeners only): every route answers ``308`` to the https URL unless it says
    otherwise; such a listener needs no routes.
    """

    name: Name
    """Used in logs and in the ``listener`` metric label."""
    bind: BindAddress
    """``host:port`` clients connect to: ``0.0.0.0:8080`` for every IPv4 address,
    ``[::]:8080`` for IPv6, port 0 for any free port."""
    routes: list[RouteSpec] = []
    """Where requests go; the first match wins, none answers 404. Required unless the
    listener redirects to https."""
    timeouts: ListenerTimeoutsSpec = ListenerTimeoutsSpec()
    """Client-side timeouts."""
    limits: LimitsSpec = LimitsSpec()
    """Request size limits."""
    tls: ListenerTLSSpec | None = None
    """Terminate HTTPS here; null: plain HTTP."""
    redirect_https: RedirectHTTPS = False
    """Plain-HTTP listeners: ``true`` (or a port) makes every route answer ``308`` to the
    https URL unless the route says otherwise."""
    protocols: list[Protocol] | None = None
    """What clients may speak: ``http/1.1``, ``h2`` (HTTP/2 over TLS, by ALPN), ``h2c``
    (HTTP/2 in clear with prior knowledge, beside HTTP/1.1 on the same port: the
    connection preface tells them apart). null: ``[h2, http/1.1]`` on a TLS listener,
    ``[http/1.1]`` on a plain one. ``Upgrade: h2c`` is never accepted (RFC 9113
    deprecates it)."""
    http2: Http2Spec = Http2Spec()
    """HTTP/2 limits per client connection (when ``protocols`` has ``h2`` or ``h2c``)."""
    forwarded: Literal["drop", "replace", "append"] = "drop"
    """The RFC 7239 ``Forwarded`` request header. ``drop``: the client's is removed and
    none is sent (``X-Forwarded-*`` say the same); ``replace``: the client's is removed
    and aiolb sends ``Forwarded: for=CLIENT;proto=SCHEME``; ``append``: the client's is
    kept and aiolb's element follows it (only behind a proxy you trust to set it, like
    ``X-Forwarded-For``). Never passed on unchecked: an application that prefers
    ``Forwarded`` would trust a client's spoofed one."""
    proxy_protocol: ProxyProtocolSpec | None = None
    """``{trusted: [CIDR, ...]}``: accept a PROXY protocol header (v1 or v2) from the load
    balancers in those ranges, whose client address it carries; null: none accepted."""

    @model_validator(mode="after")
    def _check_protocols(self) -> ListenerSpec:
        given = self.protocols
        if given is None:
            return self
        if not given:
            raise ValueError("protocols is empty: list http/1.1, h2 or h2c")
        if len(set(given)) != len(given):
            raise ValueError("protocols lists a protocol twice")
        if self.tls is not None and "h2c" in given:
            raise ValueError("h2c is HTTP/2 without TLS; on a TLS listener write h2")
        if self.tls is None and "h2" in given:
            raise ValueError("h2 is HTTP/2 over TLS (ALPN) and this listener has no tls; "
                             "for HTTP/2 in clear write h2c")  # fmt: skip
        return self

    def effective_protocols(self) -> tuple[str, ...]:
        """``protocols``, or the default for this listener."""
        if self.protocols is not None:
            return tuple(self.protocols)
        return ("h2", "http/1.1") if self.tls is not None else ("http/1.1",)

    @property
    def host(self) -> str:
        """The host to bind; an IPv6 literal without brackets."""
        return split_host_port(self.bind)[0]

    @property
    def port(self) -> int:
        """The configured port; 0 means the system picks one."""
        return split_host_port(self.bind)[1]

    def route_names(self) -> list[str]:
        """Each route's ``name``, else ``LISTENER/INDEX``."""
        return [r.name or f"{self.name}/{i}" for i, r in enumerate(self.routes)]
