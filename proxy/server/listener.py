"""One listening socket, its router and its client connections.

The listener owns what every connection on it shares (router, limits, timeouts, TLS)
and sweeps its connections' deadlines on each clock tick. Draining stops accepting,
lets in-flight requests finish with keep-alive off, and closes idle connections
(Upgrade tunnels stay until the shutdown deadline).

TLS: the listener itself wraps each accepted connection in the event loop's own
``SSLProtocol`` (C in uvloop), with a future of its own that reports how the
handshake ended, instead of handing ``ssl=`` to ``create_server``. So each connection
takes the certificates in force when it is accepted (a reload changes them without a
restart), and every failed handshake (plaintext HTTP, a stall past ``timeouts.header``,
a reset, a refused client certificate) is counted by reason in ``handshake_errors``
and logged in one line, never a traceback.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import logging
import socket
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from proxy.balancing.consistent_hash import key_reader
from proxy.config.routing import HeaderRegexSpec
from proxy.filters import FilterContext, build_chain
from proxy.forwarding.matching import Conditions, HeaderRule
from proxy.forwarding.router import Route, Router
from proxy.forwarding.traffic import Mirror, Split
from proxy.http.headers import head_template
from proxy.server.negotiate import connection_class
from proxy.server.protocol import ClientConnection
from proxy.server.proxied import HeaderReader, Network
from proxy.tls import ServerTLS, handshake_reason

if TYPE_CHECKING:
    from proxy.cache import Cache
    from proxy.clock import Clock
    from proxy.config import ListenerSpec
    from proxy.config.listeners import MatchSpec, RouteSpec
    from proxy.http.headers import RequestIds
    from proxy.metrics.access_log import AccessLog
    from proxy.metrics.stats import Stats
    from proxy.server.h2 import H2Server
    from proxy.tracing import Tracer
    from proxy.upstream.pool import Pool

log = logging.getLogger("aiolb")


def build_router(
    lc: ListenerSpec,
    pools: Mapping[str, Pool],
    filters: FilterContext,
    caches: Mapping[str, Cache],
) -> Router[Route]:
    """The router of a listener config over ``pools``: each route with its pool (or its
    split and mirror), its filter chain, its cache (None without) and its conditions,
    built once per config. A listener that redirects to https with no routes gets one
    catch-all redirecting route."""
    routes: list[tuple[str | None, str, Route]] = []
    conditions: list[Conditions | None] = []
    for name, rc in zip(lc.route_names(), lc.routes, strict=True):
        redirect = lc.redirect_https if rc.redirect_https is None else rc.redirect_https
        names = rc.pool_names()
        pool = pools[names[0]] if names and not redirect else None
        chain = build_chain(name, rc.filters, pool, filters) if rc.filters and pool else None
        cache = caches[rc.cache] if rc.cache is not None and pool else None
        split = _split(name, rc, pools, filters) if pool is not None else None
        mirror = None
        if rc.mirror is not None and pool is not None:
            spec = rc.mirror
            target = pools[spec.pool]
            mirror = Mirror(name, target, spec.fraction, spec.max_in_flight, filters)
            split = split or Split([pool], [1])
        route = Route(name, pool, chain, cache, rc.upgrades, redirect, split, mirror)
        routes.append((rc.match.host, rc.match.path_prefix, route))
        conditions.append(_conditions(rc.match))
    if not routes:
        routes.append((None, "/", Route(f"{lc.name}/0", None, redirect=lc.redirect_https)))
        conditions.append(None)
    return Router(routes, conditions)


def _split(
    name: str, rc: RouteSpec, pools: Mapping[str, Pool], filters: FilterContext
) -> Split | None:
    """A route's traffic split (None without ``pools``), its choices counted."""
    if rc.pools is None:
        return None
    chosen = [pools[p.pool] for p in rc.pools]
    tallies = [filters.tally("split", name, p.pool) for p in rc.pools]
    key = key_reader(rc.sticky) if rc.sticky is not None else None
    return Split(chosen, [p.weight for p in rc.pools], key, tallies)


def _conditions(match: MatchSpec) -> Conditions | None:
    """A route's conditions beyond host and path prefix (None: it has none)."""
    if match.is_plain():
        return None
    headers: dict[str, HeaderRule] = {}
    for header, rule in match.headers.items():
        if isinstance(rule, str):
            headers[header] = rule
        elif isinstance(rule, HeaderRegexSpec):
            headers[header] = ("regex", rule.regex)
        else:
            headers[header] = ("present", rule.present)
    return Conditions(match.methods, headers, match.query, match.path, match.path_regex)


def alpn(lc: ListenerSpec) -> tuple[str, ...]:
    """What a TLS listener offers with ALPN: its protocols but ``h2c``, in their order."""
    return tuple(p for p in lc.effective_protocols() if p != "h2c")


class Listener:
    __slots__ = (
        "_ssl_protocol",
        "access_log",
        "clock",
        "config",
        "connection_type",
        "connections",
        "draining",
        "filters",
        "handshake_errors",
        "head_template",
        "loop",
        "name",
        "proxy_errors",
        "proxy_trusted",
        "readers",
        "record",
        "request_ids",
        "router",
        "server",
        "stats",
        "tls",
        "tracer",
    )

    def __init__(
        self,
        config: ListenerSpec,
        pools: Mapping[str, Pool],
        loop: asyncio.AbstractEventLoop,
        clock: Clock,
        request_ids: RequestIds,
        stats: Stats,
        record: bool = True,
        access_log: AccessLog | None = None,
        filters: FilterContext | None = None,
        caches: Mapping[str, Cache] | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.loop = loop
        self.clock = clock
        self.request_ids = request_ids
        self.stats = stats
        self.record = record  # metrics enabled
        self.access_log = access_log
        #: ``tracing``'s tracer (None: trace headers pass through, no spans)
        self.tracer = tracer
        #: what the route filters share across reloads (buckets, Redis stores, counters)
        self.filters = filters if filters is not None else FilterContext()
        self.router = build_router(config, pools, self.filters, caches or {})
        #: the certificates (None: plain HTTP); raises ``TLSFileError`` on a bad file
        self.tls = ServerTLS(config.tls, alpn(config)) if config.tls is not None else None
        #: the upstream request head's format for this listener's connections
        self.head_template = head_template(self.tls is not None, _parent(tracer))
        #: failed TLS handshakes by reason, for ``aiolb_tls_handshake_errors_total``
        self.handshake_errors: dict[str, int] = {}
        self.connections: set[ClientConnection | H2Server] = set()
        #: ``proxy_protocol.trusted`` as networks (None: no PROXY header accepted), the
        #: connections whose header is being read, and the ones refused, by reason
        self.proxy_trusted = _trusted(config)
        self.readers: set[HeaderReader] = set()
        self.proxy_errors: dict[str, int] = {}
        #: what an accepted connection starts as (``proxy.server.negotiate``)
        self.connection_type = connection_class(self, config.effective_protocols())
        self.server: asyncio.Server | None = None
        self.draining = False
        self._ssl_protocol = _ssl_protocol_class(loop)

    def apply(
        self,
        config: ListenerSpec,
        pools: Mapping[str, Pool],
        tls: ServerTLS | None,
        caches: Mapping[str, Cache],
    ) -> None:
        """A reload kept this listener: the new config, router and certificates (new
        connections get them; open ones keep theirs)."""
        self.router = build_router(config, pools, self.filters, caches)
        self.config, self.name, self.tls = config, config.name, tls
        self.head_template = head_template(tls is not None, _parent(self.tracer))
        self.proxy_trusted = _trusted(config)
        self.connection_type = connection_class(self, config.effective_protocols())

    def accept(self) -> asyncio.BaseProtocol:
        """The protocol of a connection just accepted: a ``ClientConnection``, wrapped
        in TLS on a TLS listener (``connection_made`` comes after the handshake); on a
        ``proxy_protocol`` listener, a ``HeaderReader`` first (``proxy.server.proxied``)."""
        if self.proxy_trusted is not None:
            return HeaderReader(self)
        return self.wrap(self.connection_type(self), self.config.timeouts.header)

    def wrap(self, conn: ClientConnection, handshake_timeout: float) -> asyncio.BaseProtocol:
        """``conn``, wrapped in the event loop's TLS protocol on a TLS listener (the
        handshake within ``handshake_timeout``)."""
        tls = self.tls
        if tls is None:
            return conn
        loop = self.loop
        waiter = loop.create_future()
        waiter.add_done_callback(lambda done: self._handshake_done(conn, done))
        protocol: asyncio.BaseProtocol = self._ssl_protocol(
            loop, conn, tls.context, waiter, server_side=True,
            ssl_handshake_timeout=handshake_timeout,
        )  # fmt: skip
        return protocol

    def _handshake_done(self, conn: asyncio.Protocol, done: asyncio.Future[Any]) -> None:
        exc = None if done.cancelled() else done.exception()
        if exc is None and getattr(conn, "transport", None) is not None:
            return  # the handshake succeeded: the connection was made
        reason = handshake_reason(exc)
        self.handshake_errors[reason] = self.handshake_errors.get(reason, 0) + 1
        detail = str(exc).splitlines()[0][:200] if exc is not None else "connection closed"
        log.info("listener %s: TLS handshake failed (%s): %s", self.name, reason, detail)

    async def start(self, sock: socket.socket | None = None) -> None:
        """Bind (or adopt ``sock``) and start accepting."""
        if sock is not None:
            self.server = await self.loop.create_server(self.accept, sock=sock, backlog=2048)
        else:
            self.server = await self.loop.create_server(
                self.accept, self.config.host, self.config.port, reuse_address=True,
                backlog=2048,
            )  # fmt: skip

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self.server is not None and self.server.sockets
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    def sweep(self, now: float) -> None:
        for conn in tuple(self.connections):
            try:
                conn.check_timeouts(now)
            except Exception as exc:  # one connection's bug must not stop the others' timers
                log.error("bug in the timeouts of %r", conn, exc_info=exc)
                conn.transport.abort()

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()

    def drain(self) -> None:
        """Stop accepting; keep-alive off; idle connections close now, busy ones when done."""
        self.draining = True
        self.stop_accepting()
        for conn in tuple(self.connections):
            conn.drain()

    def close_all(self) -> None:
        for conn in tuple(self.connections):
            conn.transport.abort()
        for reader in tuple(self.readers):
            reader.close()

    @property
    def bind(self) -> str:
        """The address it listens on, as configured."""
        return self.config.bind

    def __repr__(self) -> str:
        state = "draining" if self.draining else "serving"
        return f"<Listener {self.name} {self.config.bind} [{state}, {len(self.connections)} conns]>"


def _trusted(config: ListenerSpec) -> tuple[Network, ...] | None:
    spec = config.proxy_protocol
    return spec.networks() if spec is not None else None


def _parent(tracer: Tracer | None) -> bytes | None:
    """The parent id a listener's heads name under ``tracing`` (``head_template``)."""
    return None if tracer is None else tracer.parent


def _ssl_protocol_class(loop: asyncio.AbstractEventLoop) -> Callable[..., asyncio.BaseProtocol]:
    """The event loop's own TLS protocol: uvloop's (C) on uvloop, asyncio's otherwise.
    Both take ``(loop, app_protocol, context, waiter, server_side, ...)``."""
    module = type(loop).__module__
    if module.startswith("uvloop"):
        import uvloop.loop

        cls: Callable[..., asyncio.BaseProtocol] = uvloop.loop.SSLProtocol  # type: ignore[attr-defined]
        return cls
    return asyncio.sslproto.SSLProtocol
