"""One listening socket, its router and its client connections.

The listener owns what every connection on it shares (router, limits, timeouts) and
sweeps its connections' deadlines on each clock tick. Draining stops accepting, lets
in-flight requests finish with keep-alive off, and closes idle connections.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING

from proxy.filters import FilterContext, build_chain
from proxy.forwarding.router import Route, Router
from proxy.server.protocol import ClientConnection

if TYPE_CHECKING:
    from proxy.clock import Clock
    from proxy.config import Listener as ListenerConfig
    from proxy.http.headers import RequestIds
    from proxy.metrics.access_log import AccessLog
    from proxy.metrics.stats import Stats
    from proxy.upstream.pool import Pool


def build_router(
    lc: ListenerConfig, pools: Mapping[str, Pool], filters: FilterContext
) -> Router[Route]:
    """The router of a listener config over ``pools``: each route with its pool and its
    filter chain (None without filters), built once per config."""
    routes = []
    for name, rc in zip(lc.route_names(), lc.routes, strict=True):
        pool = pools[rc.pool]
        chain = build_chain(name, rc.filters, pool, filters) if rc.filters else None
        routes.append((rc.match.host, rc.match.path_prefix, Route(name, pool, chain)))
    return Router(routes)


class Listener:
    __slots__ = (
        "access_log",
        "clock",
        "config",
        "connections",
        "draining",
        "loop",
        "name",
        "record",
        "request_ids",
        "router",
        "server",
        "stats",
    )

    def __init__(
        self,
        config: ListenerConfig,
        pools: Mapping[str, Pool],
        loop: asyncio.AbstractEventLoop,
        clock: Clock,
        request_ids: RequestIds,
        stats: Stats,
        record: bool = True,
        access_log: AccessLog | None = None,
        filters: FilterContext | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.loop = loop
        self.clock = clock
        self.request_ids = request_ids
        self.stats = stats
        self.record = record  # metrics enabled
        self.access_log = access_log
        self.router = build_router(config, pools, filters or FilterContext())
        self.connections: set[ClientConnection] = set()
        self.server: asyncio.Server | None = None
        self.draining = False

    async def start(self, sock: socket.socket | None = None) -> None:
        """Bind (or adopt ``sock``) and start accepting."""
        if sock is not None:
            self.server = await self.loop.create_server(
                lambda: ClientConnection(self), sock=sock, backlog=2048
            )
        else:
            self.server = await self.loop.create_server(
                lambda: ClientConnection(self),
                self.config.host,
                self.config.port,
                reuse_address=True,
                backlog=2048,
            )

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self.server is not None and self.server.sockets
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    def sweep(self, now: float) -> None:
        for conn in tuple(self.connections):
            conn.check_timeouts(now)

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

    def __repr__(self) -> str:
        state = "draining" if self.draining else "serving"
        return f"<Listener {self.name} {self.config.bind} [{state}, {len(self.connections)} conns]>"
