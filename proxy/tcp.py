"""How the proxy writes to its TCP connections, and the socket options it sets.

Delayed ACKs and Nagle's algorithm
----------------------------------
On a connection that goes request, response, request, the kernel holds back its
ACKs, for up to 40 ms on Linux, hoping to send them with the next bytes going the
other way. A peer with Nagle's algorithm on (no TCP_NODELAY: nginx with
``tcp_nopush``, many HTTP client libraries) holds back the short last segment of
what it writes until the earlier segments are acknowledged. When a message arrives
in parts, each side then waits for the other: the message stalls for the full
delayed-ACK timer. ``ack_now`` breaks the wait: it asks the kernel to acknowledge
what has arrived, now. The proxy's own sockets have
TCP_NODELAY on (uvloop's default), so the proxy never holds its own segments back.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from typing import Final

#: Below this size the pieces of one write are joined into one buffer. Measured on
#: loopback with uvloop: about 0.3 µs less per write up to 4 KiB than a vector of the
#: pieces; from 16 KiB the copy costs more than it saves.
JOIN_BELOW: Final = 8 * 1024

#: Linux only; elsewhere ``ack_now`` does nothing.
TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


def ack_now(transport: asyncio.BaseTransport) -> None:
    """Make the kernel acknowledge, at once, what ``transport``'s socket has received
    (TCP_QUICKACK). About 2 µs: call it once per message that arrives in more than one
    read, not per read. Nothing is kept per connection. It never raises: a socket that
    is closing ignores it, and ``connection_lost`` follows."""
    if TCP_QUICKACK is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)
    except (OSError, ValueError):  # uvloop: ValueError once the socket is closed
        pass


def write_pieces(transport: asyncio.WriteTransport, pieces: Sequence[bytes | memoryview]) -> None:
    """Write ``pieces`` in one call: joined into one buffer when small (less work for
    uvloop and the kernel than a vector), as they are when large (no copy)."""
    if len(pieces) == 1:  # a request head alone, one read's body: no sizes to add up
        transport.write(pieces[0])
    elif sum(map(len, pieces)) <= JOIN_BELOW:
        transport.write(b"".join(pieces))
    else:
        transport.writelines(pieces)


async def connect_sending(
    loop: asyncio.AbstractEventLoop, host: str, port: int, first: bytes
) -> socket.socket:
    """A connected non-blocking socket to ``host:port`` whose first bytes are ``first``
    (a PROXY protocol header: before a TLS handshake, which the caller starts on it).
    Tries the addresses ``host`` resolves to in order; raises the last ``OSError``."""
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError = OSError(f"{host} resolves to no address")
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, address)
            await loop.sock_sendall(sock, first)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise error
