"""Resource attacks from the attack sweep (issue #23), bounded in count and time.

Each one holds the proxy's connections the way an attacker would (bodies sent a byte at
a time, responses never read, a pipelined body that never comes) and checks what a user
would: ordinary requests beside the attack are still answered, and every pause the
proxy causes ends by a deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from proxy.config import Config
from proxy.runtime.server import ProxyServer
from tests.support import HOST, RawUpstream, Recorder, make_config, read_response, wait_for

MakeProxy = Callable[[Config], Awaitable[ProxyServer]]
MakeRecorder = Callable[..., Awaitable[Recorder]]

#: a small pool: the attack needs few connections to exhaust it on unprotected code
SMALL_POOL = {"circuit_breaker": {"max_connections": 8, "max_pending": 4, "queue_timeout": "1s"}}


async def get(port: int, path: str = "/") -> bytes:
    """One GET on a new connection: its status line."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(b"GET %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" % path.encode())
        status, _, _ = await asyncio.wait_for(read_response(reader), 5.0)
        return status
    finally:
        writer.close()


async def test_slow_request_bodies_do_not_pin_upstream_connections(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    """40 clients send a 200-byte body a byte every 50 ms (each would hold an upstream
    connection for 10 s if bodies streamed at once); 8 connections, 4 waiting at most.
    Ordinary requests meanwhile are all answered: the bodies are read before an upstream
    connection is taken (limits.body_buffer_size). nginx buffers bodies too (0 failed of
    81 in the sweep; aiolb before: 7 of 10 failed)."""
    rec = await recorders("up")
    server = await proxy(make_config([rec.url], pool=SMALL_POOL))
    port = server.listeners[0].port
    stop = asyncio.Event()
    sent: list[int] = []

    async def trickle() -> None:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(b"POST /slow HTTP/1.1\r\nHost: t\r\nContent-Length: 200\r\n\r\n")
            for _ in range(200):
                if stop.is_set():
                    return
                writer.write(b"x")
                await writer.drain()
                await asyncio.sleep(0.05)  # the attack's pace, not a wait for a condition
            status, _, _ = await asyncio.wait_for(read_response(reader), 5.0)
            sent.append(int(status.split()[1]))
        finally:
            writer.close()

    attackers = [asyncio.ensure_future(trickle()) for _ in range(40)]
    try:
        await wait_for(lambda: len(server.listeners[0].connections) >= 40)
        statuses = [await get(port) for _ in range(10)]
        assert statuses == [b"HTTP/1.1 200 OK"] * 10
        assert all(s.path != "/slow" for s in rec.seen)  # no slow body reached it yet
    finally:
        stop.set()
        await asyncio.gather(*attackers, return_exceptions=True)


async def test_slow_bodies_complete_and_arrive_whole(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    """The buffered body reaches the upstream whole and once, chunked or not, and a body
    larger than the buffer still streams."""
    rec = await recorders("up")
    server = await proxy(make_config([rec.url], listener={"limits": {"body_buffer_size": 1024}}))
    port = server.listeners[0].port
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nhello")
        await writer.drain()
        writer.write(b"world")
        status, _, _ = await asyncio.wait_for(read_response(reader), 5.0)
        assert status == b"HTTP/1.1 200 OK"
        chunked = b"POST /b HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        writer.write(chunked + b"3\r\nabc\r\n")
        await writer.drain()
        writer.write(b"0\r\n\r\n")
        status, _, _ = await asyncio.wait_for(read_response(reader), 5.0)
        assert status == b"HTTP/1.1 200 OK"
        big = b"z" * 5000  # over the 1 KiB buffer: streams
        writer.write(b"POST /c HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n" + big[:2000])
        await wait_for(lambda: any(s.path == "/c" for s in rec.seen))  # went before the rest
        writer.write(big[2000:])
        status, _, _ = await asyncio.wait_for(read_response(reader), 5.0)
        assert status == b"HTTP/1.1 200 OK"
    finally:
        writer.close()
    assert [s.path for s in rec.seen] == ["/a", "/b", "/c"]


async def test_clients_that_never_read_are_closed_after_the_send_timeout(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    """8 clients ask for an endless body and read nothing: each holds an upstream
    connection until timeouts.send (here 0.5 s) passes without progress, then it is
    closed, and ordinary requests get through. Before: held forever (nginx closes at
    send_timeout, 60 s)."""
    block = b"b" * (1 << 20)

    async def large(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(1024):  # more than any socket buffers: bounded at 1 GiB
            await response.write(block)
        return response

    rec = await recorders("up", {"/large": large})
    config = make_config(
        [rec.url], pool=SMALL_POOL, listener={"timeouts": {"send": "500ms"}}
    )
    server = await proxy(config)
    port = server.listeners[0].port
    writers = []
    try:
        for _ in range(8):
            reader, writer = await asyncio.open_connection(HOST, port, limit=1024)
            writer.write(b"GET /large HTTP/1.1\r\nHost: t\r\n\r\n")
            writers.append((reader, writer))
        pool = server.pools["main"]
        await wait_for(lambda: sum(u.conns for u in pool.upstreams) >= 8)
        started = time.monotonic()
        await wait_for(lambda: len(server.listeners[0].connections) == 0, 10.0)
        assert time.monotonic() - started >= 0.3  # not before the timeout
        assert await get(port) == b"HTTP/1.1 200 OK"
        for reader, _ in writers:  # each got part of the body, then the close
            got = 0
            while chunk := await asyncio.wait_for(reader.read(1 << 20), 5.0):
                got += len(chunk)
            assert 0 < got < 1024 * len(block)
    finally:
        for _, writer in writers:
            writer.close()


async def test_a_slow_reader_that_reads_is_not_cut_off(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    """The send timeout is a time without progress, not a deadline for the whole body."""
    big = b"r" * (4 << 20)

    async def large(request: web.Request) -> web.StreamResponse:
        return web.Response(body=big)

    rec = await recorders("up", {"/large": large})
    server = await proxy(make_config([rec.url], listener={"timeouts": {"send": "300ms"}}))
    reader, writer = await asyncio.open_connection(HOST, server.listeners[0].port)
    try:
        writer.write(b"GET /large HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        got = b""
        started = time.monotonic()
        while chunk := await asyncio.wait_for(reader.read(256 * 1024), 5.0):
            got += chunk
            await asyncio.sleep(0.1)  # a reader slower than the proxy's writes
        assert got.endswith(big)
        assert time.monotonic() - started > 0.6  # it took longer than two send timeouts
    finally:
        writer.close()


async def test_a_pipelined_body_after_its_head_is_read(
    proxy: MakeProxy, raw_upstreams: Callable[..., Awaitable[RawUpstream]]
) -> None:
    """A GET and a POST head pipelined, the POST's body only after the GET's answer: the
    body is read and the POST answered (before: the pipeline pause stayed on, nothing
    timed out, and the connection hung)."""
    up = await raw_upstreams({})
    server = await proxy(make_config([up.url]))
    reader, writer = await asyncio.open_connection(HOST, server.listeners[0].port)
    try:
        writer.write(
            b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n"
            b"POST /b HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\n"
        )
        status, _, _ = await asyncio.wait_for(read_response(reader), 5.0)
        assert status == b"HTTP/1.1 200 OK"
        writer.write(b"hello")
        status, _, _ = await asyncio.wait_for(read_response(reader), 5.0)
        assert status == b"HTTP/1.1 200 OK"
    finally:
        writer.close()
    assert [h.split(b" ")[1] for h in up.heads] == [b"/a", b"/b"]


async def test_a_pipelined_body_that_never_comes_times_out(
    proxy: MakeProxy, raw_upstreams: Callable[..., Awaitable[RawUpstream]]
) -> None:
    """Every pause the proxy causes has a deadline: 30 connections pipeline a GET and a
    POST head whose body never comes; each gets the GET's answer, then 408 and a close
    after timeouts.body, and nothing is left open."""
    up = await raw_upstreams({})
    config = make_config([up.url], listener={"timeouts": {"body": "300ms"}})
    server = await proxy(config)
    port = server.listeners[0].port

    async def attack() -> bytes:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(
                b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n"
                b"POST /b HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\n"
            )
            return await asyncio.wait_for(reader.read(), 5.0)
        finally:
            writer.close()

    answers = await asyncio.gather(*(attack() for _ in range(30)))
    for data in answers:
        assert data.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"\r\n\r\nokHTTP/1.1 408 Request Timeout\r\n" in data
    await wait_for(lambda: not server.listeners[0].connections)


async def test_an_upstream_that_reads_no_body_gets_a_504(
    proxy: MakeProxy, raw_upstreams: Callable[..., Awaitable[RawUpstream]]
) -> None:
    """A body larger than the socket buffers to an upstream that never reads it: after the
    pool's timeouts.send with no progress the client gets 504 (before: paused forever)."""
    hold: asyncio.Event = asyncio.Event()

    async def never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await hold.wait()
        writer.close()

    stuck = await asyncio.start_server(never_reads, HOST, 0)
    try:
        url = f"http://{HOST}:{stuck.sockets[0].getsockname()[1]}"
        config = make_config([url], pool={"timeouts": {"send": "500ms"}})
        server = await proxy(config)
        reader, writer = await asyncio.open_connection(HOST, server.listeners[0].port)
        size = 64 << 20
        writer.write(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size)
        block = b"u" * (1 << 20)

        async def push() -> Any:
            for _ in range(size // len(block)):
                writer.write(block)
                await writer.drain()

        pusher = asyncio.ensure_future(push())
        try:
            status, _, _ = await asyncio.wait_for(read_response(reader), 10.0)
        finally:
            pusher.cancel()
            writer.close()
        assert status == b"HTTP/1.1 504 Gateway Timeout"
    finally:
        hold.set()
        stuck.close()
        await stuck.wait_closed()
