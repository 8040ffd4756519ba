"""A listener's PROXY protocol: the header read before anything else, TLS included.

Theory of operation
-------------------
On a listener with ``proxy_protocol: {trusted: [...]}`` every accepted connection
starts as a ``HeaderReader`` (plain TCP, whatever the listener speaks): it reads until
it knows what the connection is, then hands the transport over (``set_protocol``) to
what the listener would have accepted in the first place: the connection class
(``proxy.server.negotiate``) on a plain listener, or the event loop's TLS protocol
wrapping it on a TLS one (``Listener.wrap``), fed the bytes that followed the header.
So the header precedes the ClientHello, as HAProxy and nginx read it.

- A peer in ``trusted`` must send a header (v1 or v2, ``proxy.proxy_protocol.parse``)
  within ``timeouts.header``; its addresses become the connection's ``proxied``, and
  so its ``client_ip`` (``take_address``: the one place a client connection learns its
  address). ``LOCAL`` / ``UNKNOWN`` keeps the peer's own address.
- Any other peer speaks HTTP (or TLS) at once: its first bytes are looked at only to
  refuse a PROXY header (a client pretending to be a load balancer); one that sends
  nothing within ``timeouts.header`` is closed quietly, as it would be without the key.
- A malformed header, one from an untrusted peer, or none in time closes the
  connection without a byte in answer (HAProxy's and nginx's behaviour for a broken
  header: there is no HTTP yet to answer in), logged at info level and counted in the
  listener's ``proxy_errors`` by reason (``aiolb_proxy_protocol_errors_total``).

Only listeners with ``proxy_protocol`` have readers: the others accept their
connection class directly and pay nothing.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import TYPE_CHECKING

from proxy.proxy_protocol import (
    V1_PREFIX,
    V2_SIGNATURE,
    Addresses,
    ProxyHeaderError,
    may_be_header,
    parse,
)

if TYPE_CHECKING:
    from proxy.server.base import ConnectionBase
    from proxy.server.h2 import H2Server
    from proxy.server.listener import Listener

log = logging.getLogger("aiolb")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def is_trusted(ip: str, trusted: tuple[Network, ...]) -> bool:
    """Whether ``ip`` (an IPv4-mapped IPv6 address counts as its IPv4 one) is in one of
    the ``trusted`` networks."""
    try:
        addr = ipaddress.ip_address(ip.partition("%")[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in trusted)


def take_address(conn: ConnectionBase | H2Server, transport: asyncio.BaseTransport) -> None:
    """Set ``conn``'s client address: the PROXY header's (``conn.proxied``), else the
    peer's. Every client connection learns its address here, once."""
    proxied = conn.proxied
    if proxied is not None:
        ip = proxied.src
    else:
        peer = transport.get_extra_info("peername")
        if not peer:
            return
        ip = peer[0]
    conn.client_ip = ip
    conn.client_ip_bytes = ip.encode()


def connection_addresses(
    proxied: Addresses | None, transport: asyncio.BaseTransport | None
) -> Addresses | None:
    """Who connected to whom, for a PROXY header sent upstream: the received header's
    addresses, else the connection's own; None when unknown (a closed transport, a
    Unix socket)."""
    if proxied is not None:
        return proxied
    if transport is None:
        return None
    peer = transport.get_extra_info("peername")
    local = transport.get_extra_info("sockname")
    if not peer or not local or not isinstance(peer, tuple) or not isinstance(local, tuple):
        return None
    return Addresses(peer[0], peer[1], local[0], local[1])


class HeaderReader(asyncio.Protocol):
    """A connection on a ``proxy_protocol`` listener until its header is read (or its
    first bytes show there is none to read)."""

    __slots__ = ("accepted", "held", "listener", "peer", "timer", "transport", "trusted")

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.held = b""
        self.trusted = False
        self.peer = ""
        self.timer: asyncio.TimerHandle | None = None
        self.accepted = listener.clock.now

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        listener = self.listener
        self.trusted = is_trusted(self.peer, listener.proxy_trusted or ())
        listener.readers.add(self)
        self.timer = listener.loop.call_later(listener.config.timeouts.header, self._expired)

    def connection_lost(self, exc: Exception | None) -> None:
        self._done()

    def data_received(self, data: bytes) -> None:
        try:
            held = self.held + data if self.held else data
            if self.trusted:
                self._trusted(held)
            else:
                self._untrusted(held)
        except ProxyHeaderError as exc:
            self._refuse("malformed", str(exc))
        except Exception as exc:  # a bug: it never escapes a protocol callback
            log.error("bug reading the PROXY header of %s", self.peer, exc_info=exc)
            self._refuse("malformed", "internal error")

    def eof_received(self) -> bool | None:
        if self.trusted or self.held:
            self._refuse("incomplete", "closed before a complete header")
        else:
            self._done()
        return None

    def _trusted(self, held: bytes) -> None:
        header = parse(held)
        if header is None:
            self.held = held
            return
        self._hand_over(header.addresses, held[header.length :])

    def _untrusted(self, held: bytes) -> None:
        if held.startswith(V1_PREFIX) or held.startswith(V2_SIGNATURE):
            self._refuse("untrusted", "a PROXY header from a peer not in proxy_protocol.trusted")
        elif may_be_header(held):
            self.held = held  # "PRO": an HTTP method or a header; wait for more
        else:
            self._hand_over(None, held)

    def _expired(self) -> None:
        self.timer = None
        if not self.trusted and not self.held:  # an idle client, as without the key
            self.close()
            return
        if self.transport is not None:
            timeout = self.listener.config.timeouts.header
            self._refuse("timeout", f"no complete header in {timeout:g}s")

    def _refuse(self, reason: str, detail: str) -> None:
        listener = self.listener
        errors = listener.proxy_errors
        errors[reason] = errors.get(reason, 0) + 1
        log.info("listener %s: closing the connection of %s: PROXY protocol %s: %s",
                 listener.name, self.peer, reason, detail)  # fmt: skip
        transport = self.transport
        self._done()
        if transport is not None:
            transport.close()  # nothing to write: closed now

    def _done(self) -> None:
        self.transport = None
        self.held = b""
        self.listener.readers.discard(self)
        timer = self.timer
        if timer is not None:
            self.timer = None
            timer.cancel()

    def _hand_over(self, addresses: Addresses | None, rest: bytes) -> None:
        transport = self.transport
        assert transport is not None
        listener = self.listener
        self._done()
        conn = listener.connection_type(listener)
        conn.proxied = addresses
        conn.deadline = self.accepted + listener.config.timeouts.header
        remaining = max(conn.deadline - listener.clock.now, 0.001)
        protocol = listener.wrap(conn, remaining)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if rest and not transport.is_closing():
            feed(protocol, rest)

    def close(self) -> None:
        """The listener closes everything (a shutdown)."""
        transport = self.transport
        self._done()
        if transport is not None:
            transport.abort()

    def __repr__(self) -> str:
        kind = "trusted" if self.trusted else "untrusted"
        return f"<HeaderReader {self.peer} [{kind}, {len(self.held)} bytes held]>"


def feed(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    """Give ``protocol`` bytes that were read for it, as the transport would have: a
    buffered protocol (the TLS ones) through its buffers, another through
    ``data_received``."""
    if not hasattr(protocol, "get_buffer"):
        protocol.data_received(data)  # type: ignore[attr-defined]
        return
    view = memoryview(data)
    while view:
        buf = memoryview(protocol.get_buffer(len(view)))
        n = min(len(buf), len(view))
        buf[:n] = view[:n]
        protocol.buffer_updated(n)  # type: ignore[attr-defined]
        view = view[n:]
