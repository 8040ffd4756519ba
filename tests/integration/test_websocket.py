"""WebSocket and other Upgrade tunnels through the proxy, with a real WebSocket server
and client (the ``websockets`` package) and raw sockets where the bytes matter: what
is echoed, what is held, what is counted, when a tunnel closes, and back-pressure."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from proxy.config import Config
from proxy.runtime.server import ProxyServer
from tests.admin_support import samples, scrape
from tests.support import (
    HOST,
    CertAuthority,
    RawUpstream,
    Recorder,
    make_config,
    raw_exchange,
    read_response,
    wait_for,
)

MakeProxy = Callable[[Config], Awaitable[ProxyServer]]
MakeRecorder = Callable[..., Awaitable[Recorder]]
UPGRADE = (b"GET /chat HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: %s\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


class Echo:
    """A websockets server: echoes every message, and a few paths do more."""

    def __init__(self) -> None:
        self.server: Server | None = None
        self.port = 0
        self.connections: list[ServerConnection] = []
        self.fragments: list[int] = []  # frames of each message received on /fragments
        self.closed: list[tuple[int | None, str | None]] = []

    async def handle(self, ws: ServerConnection) -> None:
        self.connections.append(ws)
        path = ws.request.path if ws.request is not None else "/"
        try:
            if path == "/close":
                await ws.close(4001, "bye")
            elif path == "/die":
                await ws.recv()
                ws.transport.abort()  # the upstream process dies mid-tunnel
            elif path == "/fragments":
                while True:  # each message as the frames it came in, sent back so
                    parts = [part async for part in ws.recv_streaming()]
                    self.fragments.append(len(parts))
                    await ws.send(parts)
            else:
                async for message in ws:
                    await ws.send(message)
        except ConnectionClosed:
            pass
        finally:
            self.closed.append((ws.close_code, ws.close_reason))

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def start_echo() -> Echo:
    server = Echo()
    server.server = await serve(server.handle, HOST, 0, max_size=None, ping_interval=None)
    server.port = next(iter(server.server.sockets)).getsockname()[1]
    return server


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    server = await start_echo()
    yield server
    await server.stop()


def ws_url(proxy: ProxyServer, path: str = "/", scheme: str = "ws") -> str:
    return f"{scheme}://{HOST}:{proxy.listeners[0].port}{path}"


def tunnels(text: str) -> float:
    return sum(samples(text, "aiolb_tunnels_active").values())


async def test_messages_are_echoed_byte_identical(echo: Echo, proxy: MakeProxy) -> None:
    server = await proxy(make_config([echo.url]))
    async with connect(ws_url(server, "/chat"), max_size=None) as ws:  # permessage-deflate on
        assert ws.response is not None and ws.response.status_code == 101
        assert "permessage-deflate" in ws.response.headers.get("Sec-WebSocket-Extensions", "")
        await ws.send("héllo, wörld")
        assert await ws.recv() == "héllo, wörld"
        blob = os.urandom(70_000)
        await ws.send(blob)
        assert await ws.recv() == blob
        latency = await (await ws.ping(b"are you there"))  # pong carried back
        assert latency >= 0
    seen = echo.connections[0].request
    assert seen is not None and seen.headers["X-Forwarded-For"] == HOST
    assert seen.headers["Upgrade"] == "websocket" and seen.headers["Connection"] == "upgrade"


async def test_fragmented_and_16_mib_messages(echo: Echo, proxy: MakeProxy) -> None:
    server = await proxy(make_config([echo.url]))
    async with connect(ws_url(server, "/fragments"), max_size=None, compression=None) as ws:
        await ws.send(["frag", "ment", "ed"])  # one message in three frames
        assert await ws.recv() == "fragmented"
        big = os.urandom(16 * 1024 * 1024)
        await ws.send(big)
        back = await ws.recv()
        assert hashlib.sha256(back).digest() == hashlib.sha256(big).digest()
    assert echo.fragments[0] >= 3  # the server saw the frames (and an empty last one)


async def test_close_codes_pass_through_both_ways(echo: Echo, proxy: MakeProxy) -> None:
    server = await proxy(make_config([echo.url]))
    async with connect(ws_url(server, "/close")) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4001, "bye")
    async with connect(ws_url(server, "/chat")) as ws:
        await ws.send("x")
        await ws.recv()
        await ws.close(4002, "done here")
    await wait_for(lambda: (4002, "done here") in echo.closed)
    await wait_for(lambda: server.pools["main"].upstreams[0].tunnels == 0)
    upstream = server.pools["main"].upstreams[0]
    assert upstream.active == 0 and upstream.conns == 0 and not upstream.idle


async def test_an_upstream_that_dies_closes_the_client(echo: Echo, proxy: MakeProxy) -> None:
    server = await proxy(make_config([echo.url, echo.url.replace(HOST, "localhost")]))
    async with connect(ws_url(server, "/die")) as ws:
        await ws.send("goodbye")
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd is None  # no close frame: the connection just ended
    await wait_for(lambda: all(u.tunnels == 0 for u in server.pools["main"].upstreams))
    assert len(echo.connections) == 1  # never retried after the 101


async def test_tunnels_are_counted_in_flight_and_held_out_of_the_idle_pool(
    echo: Echo, proxy: MakeProxy
) -> None:
    other = await start_echo()
    try:
        config = make_config([echo.url, other.url], pool={"balancer": "least_connections"})
        server = await proxy(config)
        ws = await connect(ws_url(server, "/chat"))
        held = next(u for u in server.pools["main"].upstreams if u.tunnels)
        free = next(u for u in server.pools["main"].upstreams if not u.tunnels)
        assert held.active == 1 and not held.idle and held.conns == 1
        assert tunnels(await scrape(server)) == 1
        async with aiohttp.ClientSession() as session:
            for _ in range(4):  # least_connections sees the tunnel: the other upstream
                async with session.get(f"http://{HOST}:{server.listeners[0].port}/x") as resp:
                    await resp.read()
        assert (held.stats.total, free.stats.total) == (1, 4)  # the 101, the four
        await ws.close()
        await wait_for(lambda: held.tunnels == 0 and held.active == 0 and held.conns == 0)
        assert tunnels(await scrape(server)) == 0 and not held.idle
    finally:
        await other.stop()


async def test_a_non_101_answer_is_an_ordinary_response(
    recorders: MakeRecorder, proxy: MakeProxy
) -> None:
    up = await recorders("plain")
    server = await proxy(make_config([up.url]))
    reader, writer = await asyncio.open_connection(HOST, server.listeners[0].port)
    writer.write(UPGRADE % b"websocket")
    status, headers, body = await read_response(reader)
    assert status == b"HTTP/1.1 200 OK" and body == b"plain"
    assert headers.get(b"connection") != b"close"
    writer.write(b"GET /next HTTP/1.1\r\nHost: t\r\n\r\n")  # still HTTP on this connection
    status, _, body = await read_response(reader)
    assert status == b"HTTP/1.1 200 OK" and body == b"plain"
    writer.close()
    assert up.seen[0].headers["Upgrade"] == "websocket"
    assert up.seen[0].headers["Connection"] == "upgrade"
    assert "Upgrade" not in up.seen[1].headers


async def test_protocols_a_route_does_not_allow_are_refused_and_h2c_never_forwarded(
    recorders: MakeRecorder, proxy: MakeProxy
) -> None:
    up = await recorders("plain")
    config = make_config([up.url], routes=[
        {"match": {"path_prefix": "/none/"}, "pool": "main", "upgrades": []},
        {"match": {"path_prefix": "/"}, "pool": "main"},
    ])  # fmt: skip
    server = await proxy(config)
    port = server.listeners[0].port
    refused = await raw_exchange(port, (UPGRADE % b"websocket").replace(b"/chat", b"/none/x")
                                 .replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    assert refused.startswith(b"HTTP/1.1 403 Forbidden")
    assert b"does not allow that Upgrade protocol" in refused
    other = await raw_exchange(port, (UPGRADE % b"foo/2").replace(
        b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))  # fmt: skip
    assert other.startswith(b"HTTP/1.1 403 Forbidden")
    h2c = await raw_exchange(port, b"GET /h HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, "
                                   b"HTTP2-Settings, close\r\nUpgrade: h2c\r\n"
                                   b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")
    assert h2c.startswith(b"HTTP/1.1 200 OK") and h2c.endswith(b"plain")
    assert [s.path for s in up.seen] == ["/h"]
    names = {name.lower() for name in up.seen[0].headers}
    assert not names & {"upgrade", "http2-settings"}
    assert up.seen[0].headers.get("Connection", "close") == "close" or "upgrade" not in (
        up.seen[0].headers.get("Connection", "").lower())


class RawSwitch(RawUpstream):
    """A raw upstream: answers an Upgrade with 101 (``Upgrade: foo``), then echoes bytes,
    or, with ``flood``, sends that many bytes and counts what it could write, or, with
    ``deaf``, reads nothing more until ``hear`` is set, then counts what arrives."""

    def __init__(self, flood: int = 0, deaf: bool = False) -> None:
        super().__init__({})
        self.flood = flood
        self.deaf = deaf
        self.hear = asyncio.Event()
        self.heard = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.sent = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n"
                         b"Upgrade: foo\r\n\r\nhello after 101|")  # fmt: skip
            if self.deaf:
                await self.hear.wait()
                while data := await reader.read(1 << 20):
                    self.heard += len(data)
                return
            chunk = b"z" * 65536
            while self.sent < self.flood:
                writer.write(chunk)
                self.sent += len(chunk)
                await writer.drain()
            while not self.flood and (data := await reader.read(65536)):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        await super().stop()


@pytest.fixture
async def raw_switch() -> AsyncIterator[Callable[..., Awaitable[RawSwitch]]]:
    started: list[RawSwitch] = []

    async def make(**kwargs: Any) -> RawSwitch:
        switch = RawSwitch(**kwargs)
        await switch.start()
        started.append(switch)
        return switch

    yield make
    for switch in started:
        await switch.stop()


async def test_bytes_sent_after_the_upgrade_request_belong_to_the_tunnel(
    raw_switch: Callable[..., Awaitable[RawSwitch]], proxy: MakeProxy
) -> None:
    up = await raw_switch()
    server = await proxy(make_config([f"http://{HOST}:{up.port}"], routes=[
        {"pool": "main", "upgrades": ["foo"]}]))  # fmt: skip
    reader, writer = await asyncio.open_connection(HOST, server.listeners[0].port)
    # the request and the tunnel's first bytes in one write (which looks like HTTP)
    writer.write((UPGRADE % b"foo") + b"GET /not-http HTTP/1.1\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 Switching Protocols") and b"Upgrade: foo" in head
    echoed = await reader.readexactly(len(b"hello after 101|GET /not-http HTTP/1.1\r\n\r\n"))
    assert echoed == b"hello after 101|GET /not-http HTTP/1.1\r\n\r\n"
    writer.write(b"\x00\xffbinary")
    assert await reader.readexactly(8) == b"\x00\xffbinary"
    writer.write_eof()  # a half-close passes through: the upstream ends, so does the tunnel
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    counts = samples(await scrape(server), "aiolb_requests_total")
    assert [dict(k)["code"] for k in counts] == ["101"]


async def test_the_tunnel_closes_after_tunnel_idle(
    raw_switch: Callable[..., Awaitable[RawSwitch]], proxy: MakeProxy
) -> None:
    up = await raw_switch()
    server = await proxy(make_config([f"http://{HOST}:{up.port}"], routes=[
        {"pool": "main", "upgrades": ["foo"]}], pool={"timeouts": {"tunnel_idle": 0.4}}))
    reader, writer = await asyncio.open_connection(HOST, server.listeners[0].port)
    writer.write(UPGRADE % b"foo")
    await reader.readuntil(b"hello after 101|")
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(4):  # traffic keeps it open past the idle time
        await asyncio.sleep(0.2)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
    assert await asyncio.wait_for(reader.read(), 5) == b""  # then idle: closed
    assert loop.time() - started > 0.8 + 0.4
    writer.close()
    await wait_for(lambda: server.pools["main"].upstreams[0].tunnels == 0)


async def test_back_pressure_holds_a_fast_upstream_for_a_slow_client(
    raw_switch: Callable[..., Awaitable[RawSwitch]], proxy: MakeProxy
) -> None:
    up = await raw_switch(flood=64 * 1024 * 1024)
    server = await proxy(make_config([f"http://{HOST}:{up.port}"], routes=[
        {"pool": "main", "upgrades": ["foo"]}]))  # fmt: skip
    reader, writer = await asyncio.open_connection(HOST, server.listeners[0].port, limit=65536)
    writer.write(UPGRADE % b"foo")
    await reader.readuntil(b"hello after 101|")
    # the client reads nothing more: the upstream must be held back, not buffered
    await wait_for(lambda: up.sent > 0)
    loop = asyncio.get_running_loop()
    last = [up.sent, loop.time()]  # the upstream's count, and when it last grew

    def stalled() -> bool:  # the upstream could write nothing for 0.2 s
        if up.sent != last[0]:
            last[:] = [up.sent, loop.time()]
        return loop.time() - last[1] >= 0.2

    await wait_for(stalled, 20.0)
    conn = next(iter(server.listeners[0].connections))
    assert conn.tunnel is not None
    buffered = conn.tunnel.client_side.transport.get_write_buffer_size()
    assert buffered <= 2 * 1024 * 1024, buffered
    assert up.sent < 32 * 1024 * 1024  # kernel buffers and the water marks, not the 64 MiB
    total = 0
    while total < up.flood:  # now read everything: it all arrives
        data = await reader.read(1 << 20)
        assert data and set(data) == {ord("z")}
        total += len(data)
    assert total == up.flood
    writer.close()


async def test_back_pressure_holds_a_fast_client_for_a_slow_upstream(
    raw_switch: Callable[..., Awaitable[RawSwitch]], proxy: MakeProxy
) -> None:
    up = await raw_switch(deaf=True)
    server = await proxy(make_config([f"http://{HOST}:{up.port}"], routes=[
        {"pool": "main", "upgrades": ["foo"]}]))  # fmt: skip
    reader, writer = await asyncio.open_connection(HOST, server.listeners[0].port)
    writer.write(UPGRADE % b"foo")
    await reader.readuntil(b"hello after 101|")
    chunk, sent = b"y" * 65536, 0
    while True:  # write until the proxy stops taking bytes: the upstream reads nothing
        writer.write(chunk)
        sent += len(chunk)
        try:
            await asyncio.wait_for(writer.drain(), 0.5)
        except TimeoutError:
            break
        assert sent < 64 * 1024 * 1024, "the proxy kept reading from the client"
    conn = next(iter(server.listeners[0].connections))
    assert conn.tunnel is not None
    buffered = conn.tunnel.upstream_side.transport.get_write_buffer_size()
    assert buffered <= 2 * 1024 * 1024, buffered
    up.hear.set()  # the upstream reads again: everything the client wrote arrives
    await writer.drain()
    await wait_for(lambda: up.heard == sent, 10)
    writer.close()


async def test_wss_through_a_tls_listener(
    echo: Echo, proxy: MakeProxy, ca: CertAuthority
) -> None:
    cert = ca.issue("ws.test")
    config = make_config([echo.url], listener={"tls": {"certificates": [cert.entry]}})
    server = await proxy(config)
    port = server.listeners[0].port
    async with connect(f"wss://ws.test:{port}/chat", ssl=ca.client_context(),
                       host=HOST, port=port) as ws:  # fmt: skip
        await ws.send("secure")
        assert await ws.recv() == "secure"
    seen = echo.connections[0].request
    assert seen is not None and seen.headers["X-Forwarded-Proto"] == "https"


async def test_drain_keeps_tunnels_until_shutdown_timeout(echo: Echo) -> None:
    server = ProxyServer(make_config([echo.url]))
    await server.start()
    ws = await connect(ws_url(server, "/chat"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    shutdown = asyncio.create_task(server.shutdown(timeout=0.6))
    await wait_for(lambda: server.listeners[0].draining)
    await ws.send("still here")  # draining: the tunnel still carries messages
    assert await ws.recv() == "still here"
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 5)
    await shutdown
    assert loop.time() - started >= 0.5


async def test_a_thousand_concurrent_tunnels(echo: Echo, proxy: MakeProxy) -> None:
    server = await proxy(make_config([echo.url]))
    url = ws_url(server, "/chat")
    limit = asyncio.Semaphore(64)

    async def open_one() -> ClientConnection:
        async with limit:
            return await connect(url, compression=None, open_timeout=30)

    sockets = await asyncio.gather(*(open_one() for _ in range(1000)))
    try:
        assert tunnels(await scrape(server)) == 1000
        assert server.pools["main"].upstreams[0].active == 1000
        for i, ws in enumerate(sockets):
            await ws.send(f"n{i}")
        answers = [await ws.recv() for ws in sockets]
        assert answers == [f"n{i}" for i in range(1000)]
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets))
    await wait_for(lambda: server.pools["main"].upstreams[0].tunnels == 0, timeout=20)
