"""Which protocol a client connection speaks: HTTP/1.1 or HTTP/2.

A TLS listener offers its ``protocols`` with ALPN (``h2`` first by default); the
handshake's choice is read when the connection is made (``AlpnConnection``). A plain
listener with ``h2c`` and ``http/1.1`` tells them apart by the first bytes
(``SniffingConnection``): the HTTP/2 connection preface (``PRI * HTTP/2.0``, RFC 9113
section 3.4) cannot begin an HTTP/1.1 request the proxy would serve. Either way an
HTTP/2 connection is handed to an ``H2Server`` (``transport.set_protocol``) and the
``ClientConnection`` that stood in is dropped; an HTTP/1.1 one simply goes on as the
``ClientConnection`` it already is (its class is changed back, so the request path
pays nothing for the choice).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from proxy.h2.codec import PREFACE
from proxy.server.h2 import H2Server
from proxy.server.protocol import ClientConnection

if TYPE_CHECKING:
    from proxy.server.listener import Listener


def connection_class(listener: Listener, protocols: tuple[str, ...]) -> type[ClientConnection]:
    """The protocol a listener's accepted connections start as."""
    if listener.tls is not None:
        return AlpnConnection if "h2" in protocols else ClientConnection
    if "h2c" not in protocols:
        return ClientConnection
    return SniffingConnection if "http/1.1" in protocols else H2Only


def _hand_over(conn: ClientConnection, data: bytes) -> None:
    """Make ``conn``'s transport an HTTP/2 connection, ``data`` its first bytes."""
    listener = conn.listener
    listener.connections.discard(conn)
    conn.closed = conn.broken = True  # the stand-in is never used again
    transport = conn.transport
    h2 = H2Server(listener)
    h2.proxied = conn.proxied
    transport.set_protocol(h2)
    h2.connection_made(transport)
    if data:
        h2.data_received(data)


class SniffingConnection(ClientConnection):
    """A plain connection that may be HTTP/1.1 or HTTP/2 with prior knowledge."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        seen = self.held + data if self.held else data
        if PREFACE.startswith(seen[:24]):
            if len(seen) < len(PREFACE):  # the preface so far: wait for the rest
                self.held = seen
                return
            self.held = b""
            _hand_over(self, seen)
            return
        self.held = b""
        self.__class__ = ClientConnection  # type: ignore[assignment]
        ClientConnection.data_received(self, seen)


class H2Only(ClientConnection):
    """A plain listener that speaks only ``h2c``."""

    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        _hand_over(self, b"")


class AlpnConnection(ClientConnection):
    """A TLS connection whose handshake chose its protocol (ALPN)."""

    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # the handshake succeeded
        tls = transport.get_extra_info("ssl_object")
        chosen = tls.selected_alpn_protocol() if tls is not None else None
        h1 = "http/1.1" in self.listener.config.effective_protocols()
        if chosen == "h2" or (chosen is None and not h1):
            _hand_over(self, b"")
            return
        self.__class__ = ClientConnection  # type: ignore[assignment]
        ClientConnection.connection_made(self, transport)
