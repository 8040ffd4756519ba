"""Large bodies stream both ways with matching digests, and back-pressure holds."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from aiohttp import web

from proxy.server import protocol as client_side
from proxy.tcp import ack_now
from proxy.upstream import connection as upstream_side
from tests.support import HOST, counting_known, make_config, proxy_url, read_response

MB = 1024 * 1024
BLOCK = bytes(range(256)) * 4096  # 1 MiB, not all one byte


def _digest(total: int) -> str:
    h = hashlib.sha256()
    for _ in range(total // MB):
        h.update(BLOCK)
    return h.hexdigest()


async def _sha_upstream(request: web.Request) -> web.Response:
    h = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_chunked(256 * 1024):
        h.update(chunk)
        size += len(chunk)
    return web.Response(text=f"{size} {h.hexdigest()}")


async def _download(request: web.Request) -> web.StreamResponse:
    total = int(request.query["mb"]) * MB
    resp = web.StreamResponse()
    if request.query.get("chunked"):
        resp.enable_chunked_encoding()
    else:
        resp.content_length = total
    await resp.prepare(request)
    for _ in range(total // MB):
        await resp.write(BLOCK)
    await resp.write_eof()
    return resp


async def test_100mb_upload_streams_with_matching_digest(recorders, proxy):
    up = await recorders("a", {"/sha": _sha_upstream})
    server = await proxy(make_config([up.url]))

    async def body():
        for _ in range(100):
            yield BLOCK

    async with aiohttp.ClientSession() as session:
        headers = {"Content-Length": str(100 * MB)}
        async with session.post(proxy_url(server, "/sha"), data=body(), headers=headers) as resp:
            assert resp.status == 200
            assert await resp.text() == f"{100 * MB} {_digest(100 * MB)}"


async def test_100mb_download_streams_with_matching_digest(recorders, proxy):
    up = await recorders("a", {"/download": _download})
    server = await proxy(make_config([up.url]))
    async with aiohttp.ClientSession() as session:
        for query in ("mb=100", "mb=100&chunked=1"):
            h = hashlib.sha256()
            async with session.get(proxy_url(server, f"/download?{query}")) as resp:
                assert resp.status == 200
                async for chunk in resp.content.iter_chunked(256 * 1024):
                    h.update(chunk)
            assert h.hexdigest() == _digest(100 * MB), query


async def test_chunked_upload_of_20mb(recorders, proxy):
    up = await recorders("a", {"/sha": _sha_upstream})
    server = await proxy(make_config([up.url]))

    async def body():
        for _ in range(20):
            yield BLOCK

    async with aiohttp.ClientSession() as session:  # no length: aiohttp sends chunked
        async with session.post(proxy_url(server, "/sha"), data=body()) as resp:
            assert await resp.text() == f"{20 * MB} {_digest(20 * MB)}"


async def test_slow_reader_pauses_the_upstream(recorders, proxy):
    """A client that stops reading stops the upstream too: nothing piles up in the proxy."""
    sent = 0

    async def endless(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        resp = web.StreamResponse()
        resp.content_length = 200 * MB
        await resp.prepare(request)
        for _ in range(200):
            await resp.write(BLOCK)
            sent += MB
        return resp

    up = await recorders("a", {"/endless": endless})
    server = await proxy(make_config([up.url]))
    reader, writer = await asyncio.open_connection(
        HOST, server.listeners[0].port, limit=64 * 1024
    )
    writer.transport.set_write_buffer_limits(0)
    writer.write(b"GET /endless HTTP/1.1\r\nHost: t\r\n\r\n")
    await reader.readexactly(MB)  # read a little, then stop reading
    # Kernel socket buffers on both sides hold a few MB; the proxy must not hold the rest.
    assert await _until_stalled(lambda: sent) < 40 * MB
    writer.close()


async def _until_stalled(sent: Callable[[], int]) -> int:
    """Wait until ``sent()`` has not grown for 0.5 s (at most 10 s); its value then."""
    loop = asyncio.get_running_loop()
    last, since = sent(), loop.time()
    deadline = loop.time() + 10
    while loop.time() - since < 0.5:
        assert loop.time() < deadline, "upstream never stalled"
        await asyncio.sleep(0.05)
        if sent() != last:
            last, since = sent(), loop.time()
    return last


async def _serve(handler) -> tuple[asyncio.Server, str]:
    """A raw upstream: ``await handler(head, reader, writer)`` answers each request head
    (and reads its body, if any); a false result closes the connection."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if not await handler(head, reader, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(serve, HOST, 0)
    return server, f"http://{HOST}:{server.sockets[0].getsockname()[1]}"


@contextlib.asynccontextmanager
async def _proxied(
    proxy, handler, **listener: Any
) -> AsyncIterator[tuple[Any, asyncio.StreamReader, Any]]:
    """The proxy in front of ``_serve(handler)``, and a client connection to it."""
    up, url = await _serve(handler)
    try:
        server = await proxy(make_config([url], listener=listener or None))
        reader, writer = await asyncio.open_connection(HOST, server.listeners[0].port)
        yield server, reader, writer
        writer.close()
    finally:
        up.close()
        await up.wait_closed()


def _count_acks(monkeypatch, module) -> list[int]:
    """Count the module's calls of ``proxy.tcp.ack_now`` from now on."""
    calls = [0]

    def counting(transport) -> None:
        calls[0] += 1
        ack_now(transport)

    monkeypatch.setattr(module, "ack_now", counting)
    return calls


async def test_a_response_that_comes_in_parts_is_acknowledged_at_once(proxy, monkeypatch):
    """An upstream with Nagle's algorithm on (nginx with ``tcp_nopush``) holds the short
    tail of a response until the first part is acknowledged, and the kernel delays that
    ACK by up to 40 ms on a request-response connection. The proxy asks for the ACK at
    once, one time per response that arrives in more than one read (``proxy.tcp``)."""
    acks = _count_acks(monkeypatch, upstream_side)
    first, rest = b"a" * 8000, b"b" * 4000
    relayed = asyncio.Event()

    async def upstream(head: bytes, reader, writer: asyncio.StreamWriter) -> bool:
        if head.startswith(b"GET /small "):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            return True
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 12000\r\n\r\n" + first)
        await relayed.wait()  # the proxy has read the first part: the rest is a new read
        relayed.clear()
        writer.write(rest)
        return True

    async with _proxied(proxy, upstream) as (server, reader, writer):
        for _ in range(3):
            writer.write(b"GET /parts HTTP/1.1\r\nHost: t\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 ")
            assert await asyncio.wait_for(reader.readexactly(len(first)), 5) == first
            relayed.set()
            assert await asyncio.wait_for(reader.readexactly(len(rest)), 5) == rest
        assert acks == [3]
        for _ in range(3):  # a response read in one piece needs nothing
            writer.write(b"GET /small HTTP/1.1\r\nHost: t\r\n\r\n")
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\nok"), 5)
        assert acks == [3]
        (conn,) = server.pools["main"].upstreams[0].idle  # one connection served all six
        assert conn.uses == 6


async def test_a_request_that_comes_in_parts_is_acknowledged_at_once(proxy, monkeypatch):
    """The same on the client side: a client with Nagle on that writes a request in parts
    waits for the ACK of the first part. Once per request that takes more than one read;
    none for a request read whole."""
    acks = _count_acks(monkeypatch, client_side)
    received: list[bytes] = []
    got = asyncio.Event()

    async def upstream(head: bytes, reader, writer: asyncio.StreamWriter) -> bool:
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        body = b""
        while len(body) < length:
            body += await reader.read(length - len(body))
            got.set()
        received.append(body)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return True

    # bodies stream (no request buffering): the upstream sees part one before part two
    async with _proxied(proxy, upstream, limits={"body_buffer_size": 0}) as (_, reader, writer):
        head = b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 12000\r\n\r\n"
        for _ in range(3):
            got.clear()
            writer.write(head + b"a" * 8000)
            await asyncio.wait_for(got.wait(), 5)  # the proxy has read and passed on part one
            writer.write(b"b" * 4000)
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\nok"), 5)
        assert acks == [3]
        for _ in range(3):  # a request read in one piece needs nothing
            writer.write(head + b"c" * 12000)
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\nok"), 5)
        assert acks == [3]
        assert received == [b"a" * 8000 + b"b" * 4000] * 3 + [b"c" * 12000] * 3


def _count_known(monkeypatch) -> list[int]:
    """How many responses were framed from a known head (``UpstreamConnection._known``)."""
    framed = [0]
    monkeypatch.setattr(upstream_side.UpstreamConnection, "_known", counting_known(framed))
    return framed


async def test_large_bodies_framed_from_a_known_head_arrive_whole(proxy, monkeypatch):
    """Once a head is known, its responses' bodies are counted instead of parsed, over
    many reads and passed on without copies: each of three 4 MiB bodies arrives whole,
    on one upstream connection."""
    framed = _count_known(monkeypatch)
    head = b"HTTP/1.1 200 OK\r\nX-Case: large-%d\r\nContent-Length: %d\r\n\r\n" % (
        id(object()), 4 * MB,
    )  # fmt: skip

    async def large(request: bytes, reader, writer: asyncio.StreamWriter) -> bool:
        writer.write(head)
        for _ in range(4):
            writer.write(BLOCK)
            await writer.drain()
        return True

    async with _proxied(proxy, large) as (server, reader, writer):
        for _ in range(3):
            writer.write(b"GET /large HTTP/1.1\r\nHost: t\r\n\r\n")
            line, _, body = await asyncio.wait_for(read_response(reader), 10)
            assert line == b"HTTP/1.1 200 OK" and len(body) == 4 * MB
            assert hashlib.sha256(body).hexdigest() == _digest(4 * MB)
        assert framed == [2]  # the first was parsed; then the head was known
        assert server.pools["main"].upstreams[0].idle[0].uses == 3


async def test_a_known_head_body_cut_short_closes_the_client(proxy, monkeypatch):
    """An upstream that closes in the middle of a counted body: the client connection is
    closed too, so the truncated body is never presented as complete."""
    framed = _count_known(monkeypatch)
    head = b"HTTP/1.1 200 OK\r\nX-Case: cut-%d\r\nContent-Length: 100000\r\n\r\n" % id(object())

    async def cut(request: bytes, reader, writer: asyncio.StreamWriter) -> bool:
        path = request.split(b" ")[1]
        writer.write(head + b"a" * (100000 if path == b"/whole" else 40000))
        await writer.drain()
        return path == b"/whole"

    async with _proxied(proxy, cut) as (_, reader, writer):
        writer.write(b"GET /whole HTTP/1.1\r\nHost: t\r\n\r\n")
        assert (await asyncio.wait_for(read_response(reader), 5))[2] == b"a" * 100000
        writer.write(b"GET /cut HTTP/1.1\r\nHost: t\r\n\r\n")
        rest = await asyncio.wait_for(reader.read(), 5)  # until the proxy closes
        assert rest.startswith(b"HTTP/1.1 200 OK\r\n")
        assert rest.endswith(b"\r\n\r\n" + b"a" * 40000)  # the part that came, then EOF
        assert framed == [1]


async def test_bytes_after_a_known_head_body_are_dropped_with_the_connection(
    proxy, monkeypatch
):
    """Bytes past a counted body belong to no request: the response is relayed whole and
    the upstream connection is closed, not reused out of step."""
    framed = _count_known(monkeypatch)
    head = b"HTTP/1.1 200 OK\r\nX-Case: extra-%d\r\nContent-Length: 12000\r\n\r\n" % id(object())
    relayed = asyncio.Event()

    async def extra(request: bytes, reader, writer: asyncio.StreamWriter) -> bool:
        path = request.split(b" ")[1]
        if path != b"/extra":
            writer.write(head + b"a" * 12000)
            return True
        writer.write(head + b"b" * 8000)
        await relayed.wait()  # the proxy read the first part: the rest is a later read
        writer.write(b"c" * 4000 + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        return True

    async with _proxied(proxy, extra) as (server, reader, writer):
        upstream = server.pools["main"].upstreams[0]
        writer.write(b"GET /first HTTP/1.1\r\nHost: t\r\n\r\n")
        assert (await asyncio.wait_for(read_response(reader), 5))[2] == b"a" * 12000
        writer.write(b"GET /extra HTTP/1.1\r\nHost: t\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert await asyncio.wait_for(reader.readexactly(8000), 5) == b"b" * 8000
        relayed.set()
        assert await asyncio.wait_for(reader.readexactly(4000), 5) == b"c" * 4000
        assert framed == [1]
        assert not upstream.idle  # closed, not pooled
        writer.write(b"GET /after HTTP/1.1\r\nHost: t\r\n\r\n")  # the client's is kept
        assert (await asyncio.wait_for(read_response(reader), 5))[2] == b"a" * 12000


async def test_a_slow_reader_pauses_the_upstream_on_a_known_head(proxy, monkeypatch):
    """Back-pressure holds when the body is counted from a known head: a client that
    stops reading stops the upstream, and the proxy holds no more than its buffers."""
    framed = _count_known(monkeypatch)
    total = 200 * MB
    head = b"HTTP/1.1 200 OK\r\nX-Case: slow-%d\r\nContent-Length: %d\r\n\r\n" % (
        id(object()), total,
    )  # fmt: skip
    sent = 0

    async def endless(request: bytes, reader, writer: asyncio.StreamWriter) -> bool:
        nonlocal sent
        sent = 0
        writer.write(head)
        for _ in range(total // MB):
            writer.write(BLOCK)
            await writer.drain()
            sent += MB
        return True

    async with _proxied(proxy, endless) as (_, reader, writer):
        writer.transport.set_write_buffer_limits(0)
        writer.write(b"GET /first HTTP/1.1\r\nHost: t\r\n\r\n")  # read whole: the head is known
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        left = total
        while left:
            left -= len(await asyncio.wait_for(reader.read(min(left, 4 * MB)), 5))
        writer.write(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
        await reader.readexactly(MB)  # read a little, then stop reading
        assert await _until_stalled(lambda: sent) < 40 * MB
        assert framed == [1]
