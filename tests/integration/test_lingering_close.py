"""An answer that ends the connection before the client has sent its whole request body
(an upstream's early 413, a 404 for a large upload), over real sockets: the client,
which sends its whole body before it reads, must still get the answer. Closing at once
made the client's next bytes draw a reset from the proxy's kernel, and a reset destroys
the answer in the client's receive buffer; the proxy now lingers (nginx's lingering
close): it shuts its write side and reads and drops what still comes."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

from proxy.config import Config
from proxy.runtime.server import ProxyServer
from tests.support import HOST, make_config

MakeProxy = Callable[[Config], Awaitable[ProxyServer]]

BODY = 4 * 1024 * 1024
PIECE = 64 * 1024


async def early_413(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers 413 as soon as the request head is in, and closes."""
    try:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\n\r\nbig!")
        await writer.drain()
    finally:
        writer.close()


async def upload_then_read(port: int, target: bytes) -> bytes:
    """Send the head and the whole body (as curl does for an upload), then read what
    came back until the end of the connection."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(b"PUT %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (target, BODY))
        piece = b"x" * PIECE
        async with asyncio.timeout(20):
            for _ in range(BODY // PIECE):
                writer.write(piece)
                await writer.drain()
            return await reader.read()
    finally:
        writer.close()


async def test_an_upload_answered_early_gets_its_answer(proxy: MakeProxy) -> None:
    # A small receive buffer (accepted sockets inherit it): the upstream reads none of
    # the body, so the proxy cannot have passed it all on before the 413 comes. With
    # loopback's autotuned buffers it sometimes had, and then the request was whole
    # before its answer: a keep-alive 413, rightly, and no end for the client to read.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.bind((HOST, 0))
    upstream = await asyncio.start_server(early_413, sock=sock)
    url = f"http://{HOST}:{sock.getsockname()[1]}"
    try:
        server = await proxy(make_config([url]))
        got = await upload_then_read(server.listeners[0].port, b"/up")
    finally:
        upstream.close()
    assert got.startswith(b"HTTP/1.1 413 Payload Too Large\r\n")
    assert b"\r\nConnection: close\r\n" in got and got.endswith(b"\r\n\r\nbig!")


async def test_an_upload_the_proxy_refuses_gets_its_answer(proxy: MakeProxy) -> None:
    server = await proxy(make_config(
        ["http://127.0.0.1:9"], routes=[{"match": {"path_prefix": "/only"}, "pool": "main"}]
    ))  # fmt: skip
    got = await upload_then_read(server.listeners[0].port, b"/elsewhere")
    assert got.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert b"\r\nConnection: close\r\n" in got
