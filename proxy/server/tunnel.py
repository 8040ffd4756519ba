"""An Upgrade tunnel (WebSocket): after a ``101``, bytes both ways until either side ends.

Theory of operation
-------------------
When an upstream answers an Upgrade request with ``101 Switching Protocols``, the
exchange relays the head and builds a ``Tunnel``. The tunnel puts one ``_Side`` on
each transport in place of its HTTP protocol (``transport.set_protocol``): from then
on every read from one side is written to the other as it is, with nothing parsed.
What the client sent after its request (held by the client connection) and what the
upstream sent after its ``101`` are written first.

Back-pressure is explicit both ways: a side whose write buffer passes the high-water
mark pauses reading from the other side, and resumes it when it drains. An end of
file is passed on as one (a half-close) when both transports are plain TCP; with TLS
on either side it closes the tunnel. When either transport closes, the other is
closed after what is buffered for it has been written (an upstream that dies closes
the client), and the bookkeeping is done once: the upstream's in-flight count (a
tunnel counts as a request for ``least_connections`` and ``peak_ewma`` while open),
its open connections (the tunnel held one out of the idle pool) and its tunnel count
(``aiolb_tunnels_active``); the request's access log line is written then, with the
bytes each side sent through the tunnel and the time until the close.

The client connection stays in its listener's set with phase TUNNEL: its deadline is
the tunnel's idle deadline (``timeouts.tunnel_idle``, refreshed from the time of the
last read either way), a drain leaves it open, and the shutdown closes it only at
``shutdown_timeout``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.clock import Clock
    from proxy.forwarding.exchange import Exchange
    from proxy.server.protocol import ClientConnection
    from proxy.upstream.connection import UpstreamConnection
    from proxy.upstream.pool import Upstream

log = logging.getLogger("aiolb")

#: Write buffer above which a side stops reading from the other (low water a quarter).
TUNNEL_HIGH_WATER = 256 * 1024


class _Side(asyncio.Protocol):
    """The protocol of one transport of a tunnel: what it reads goes to ``peer``."""

    __slots__ = ("clock", "eof", "peer", "received", "transport", "tunnel")

    def __init__(self, tunnel: Tunnel, transport: asyncio.Transport, clock: Clock) -> None:
        self.tunnel = tunnel
        self.transport = transport
        self.clock = clock
        self.peer: _Side = self
        self.eof = False
        self.received = 0  # bytes read from this side (for the access log)

    def data_received(self, data: bytes) -> None:
        self.peer.transport.write(data)
        self.received += len(data)
        self.tunnel.last = self.clock.now

    def pause_writing(self) -> None:
        _pause(self.peer.transport)

    def resume_writing(self) -> None:
        _resume(self.peer.transport)

    def eof_received(self) -> bool:
        tunnel = self.tunnel
        self.eof = True
        if tunnel.half_close and not self.peer.eof:
            self.peer.transport.write_eof()
            return True  # the other direction may go on
        tunnel.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.tunnel.lost(self, exc)


class Tunnel:
    """The client and upstream transports of one Upgrade, joined."""

    __slots__ = (
        "client",
        "client_side",
        "closed",
        "conn",
        "exchange",
        "half_close",
        "idle",
        "last",
        "protocol",
        "upstream",
        "upstream_side",
    )

    def __init__(
        self, client: ClientConnection, conn: UpstreamConnection, protocol: str, idle: float,
        exchange: Exchange | None = None,
    ) -> None:  # fmt: skip
        self.client = client
        #: the request that became this tunnel: logged when the tunnel closes
        self.exchange = exchange
        self.conn = conn
        self.upstream: Upstream = conn.upstream
        self.protocol = protocol
        self.idle = idle
        self.closed = False
        clock = client.clock
        self.last = clock.now
        client_t, upstream_t = client.transport, conn.transport
        assert upstream_t is not None
        self.client_side = _Side(self, client_t, clock)
        self.upstream_side = _Side(self, upstream_t, clock)
        self.client_side.peer, self.upstream_side.peer = self.upstream_side, self.client_side
        self.half_close = client_t.can_write_eof() and upstream_t.can_write_eof()

    def start(self, from_upstream: bytes) -> None:
        """Take both transports over; ``from_upstream``: what followed the ``101``."""
        client, conn = self.client, self.conn
        self.upstream.tunnels += 1
        held = client.become_tunnel(self, self.last + self.idle)
        conn.detach()
        client_t, upstream_t = self.client_side.transport, self.upstream_side.transport
        client_t.set_protocol(self.client_side)
        upstream_t.set_protocol(self.upstream_side)
        for transport in (client_t, upstream_t):
            transport.set_write_buffer_limits(TUNNEL_HIGH_WATER)
        if from_upstream:
            client_t.write(from_upstream)
        if held:
            upstream_t.write(held)
        _resume(client_t)
        _resume(upstream_t)
        if client.write_paused:  # the client is slow already: hold the upstream back
            _pause(upstream_t)

    def check_idle(self, now: float) -> None:
        """The client connection's deadline passed: close if nothing moved for
        ``idle`` seconds, else move the deadline to ``idle`` after the last read."""
        due = self.last + self.idle
        if due > now:
            self.client.deadline = due
            return
        log.info(
            "%s tunnel to %s idle for %gs; closing", self.protocol, self.upstream.address,
            self.idle,
        )  # fmt: skip
        self.close()

    def close(self) -> None:
        """Close both transports (each after writing what is buffered for it)."""
        for side in (self.client_side, self.upstream_side):
            if not side.transport.is_closing():
                side.transport.close()

    def lost(self, side: _Side, exc: Exception | None) -> None:
        """One transport closed: close the other; count the tunnel closed (once)."""
        if side is self.upstream_side:
            self.upstream.connection_closed()
        else:
            self.client.connection_lost(exc)
        if not self.closed:
            self.closed = True
            upstream = self.upstream
            upstream.tunnels -= 1
            upstream.end_request()
            self.close()
            exchange = self.exchange
            if exchange is not None and self.client.record:
                exchange.log_tunnel(self.client_side.received, self.upstream_side.received)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        where = f"{self.client.client_ip} -> {self.upstream.address}"
        return f"<Tunnel {self.protocol} {where} [{state}]>"


def _pause(transport: asyncio.BaseTransport) -> None:
    try:
        transport.pause_reading()  # type: ignore[attr-defined]
    except (RuntimeError, AttributeError):  # closing already
        pass


def _resume(transport: asyncio.BaseTransport) -> None:
    try:
        transport.resume_reading()  # type: ignore[attr-defined]
    except (RuntimeError, AttributeError):
        pass
