"""The HTTP/2 attack classes (issue #25), each with raw frames on a real socket.

Each attack checks what a user would: the attacker's connection gets its GOAWAY (with
``ENHANCE_YOUR_CALM`` for the floods and Rapid Reset) or is closed, what the proxy holds
for it stays bounded (its streams, the upstream requests it causes), and another client
is served meanwhile. Timeouts in the configs are short so each test takes a second or so.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import hyperframe.frame as hf
import pytest
from aiohttp import web

from proxy.config import Config
from proxy.runtime.server import ProxyServer
from proxy.server.h2 import H2Server
from tests.h2_support import (
    ENHANCE_YOUR_CALM,
    NO_ERROR,
    REFUSED_STREAM,
    FrameClient,
    H2Client,
)
from tests.support import Recorder, make_config, wait_for

MakeProxy = Callable[[Config], Awaitable[ProxyServer]]
MakeRecorder = Callable[..., Awaitable[Recorder]]

PROTOCOL_ERROR = 0x1
FRAME_SIZE_ERROR = 0x6
SETTINGS_INITIAL_WINDOW_SIZE = 0x4


def h2_config(upstream: str, *, http2: dict[str, Any] | None = None,
              timeouts: dict[str, Any] | None = None, limits: dict[str, Any] | None = None,
              pool: dict[str, Any] | None = None) -> Config:  # fmt: skip
    listener: dict[str, Any] = {"protocols": ["http/1.1", "h2c"], "http2": http2 or {}}
    if timeouts:
        listener["timeouts"] = timeouts
    if limits:
        listener["limits"] = limits
    return make_config([upstream], listener=listener, pool=pool)


def h2_connections(server: ProxyServer) -> list[H2Server]:
    return [c for c in server.listeners[0].connections if isinstance(c, H2Server)]


async def served(port: int, path: str = "/other") -> None:
    """Another client gets an ordinary answer (a new HTTP/2 connection)."""
    client = await H2Client.open(port)
    try:
        reply = await client.request(path, timeout=3)
        assert reply.status == 200 and reply.ended
    finally:
        await client.close()


@pytest.fixture
async def attackers() -> AsyncIterator[Callable[..., Awaitable[FrameClient]]]:
    opened: list[FrameClient] = []

    async def make(port: int, settings: dict[int, int] | None = None) -> FrameClient:
        client = await FrameClient.open(port, settings)
        opened.append(client)
        return client

    yield make
    for client in opened:
        await client.close()


class Hold:
    """Upstream handlers that answer only when released (``/hold``)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.waiting = 0

    async def hold(self, request: web.Request) -> web.StreamResponse:
        self.waiting += 1
        try:
            await self.release.wait()
        finally:
            self.waiting -= 1
        return web.Response(text="held")


Attackers = Callable[..., Awaitable[FrameClient]]


@pytest.fixture
async def hold() -> AsyncIterator[Hold]:
    """A ``Hold`` released after the test, however it ended (the upstream's cleanup
    waits for its handlers)."""
    held = Hold()
    yield held
    held.release.set()


# --- streams and header blocks ------------------------------------------------------------------


async def test_streams_over_max_concurrent_streams_are_refused(
    proxy: MakeProxy, recorders: MakeRecorder, attackers: Attackers, hold: Hold
) -> None:
    up = await recorders("a", {"/hold": hold.hold})
    server = await proxy(h2_config(up.url, http2={"max_concurrent_streams": 4}))
    port = server.listeners[0].port
    attacker = await attackers(port)
    attacker.send(*(attacker.headers(sid, "/hold") for sid in range(1, 9, 2)))
    await wait_for(lambda: hold.waiting == 4)
    attacker.send(*(attacker.headers(sid, "/hold") for sid in range(9, 41, 2)))
    await wait_for(lambda: attacker.goaway is not None or attacker.reset_of(9) is not None)
    if attacker.goaway is not None:
        assert attacker.goaway.error_code in (PROTOCOL_ERROR, REFUSED_STREAM)
    else:
        assert attacker.reset_of(9) in (PROTOCOL_ERROR, REFUSED_STREAM)
    await served(port)
    assert len([s for s in up.seen if s.path == "/hold"]) == 4
    assert all(len(c.streams) <= 4 for c in h2_connections(server))


async def test_streams_sent_before_the_settings_arrive_are_refused_not_the_connection(
    proxy: MakeProxy, recorders: MakeRecorder, hold: Hold
) -> None:
    """A client may open streams before it has the proxy's SETTINGS (RFC 9113 6.5.3:
    the initial limit is none): those over the limit are REFUSED_STREAM (retried by
    the client), as nghttp2 does; the connection and the streams within it go on.
    h2load -m 20 against a limit of 4 failed every request before."""
    up = await recorders("a", {"/hold": hold.hold})
    server = await proxy(h2_config(up.url, http2={"max_concurrent_streams": 4}))
    port = server.listeners[0].port
    client = await FrameClient.open(port, ack=False)
    try:
        client.send(*(client.headers(sid, "/hold") for sid in range(1, 21, 2)))
        await wait_for(lambda: hold.waiting == 4)
        await wait_for(lambda: all(client.reset_of(sid) for sid in range(9, 21, 2)))
        assert {client.reset_of(sid) for sid in range(9, 21, 2)} == {REFUSED_STREAM}
        assert client.goaway is None
        client.ack_settings()
        hold.release.set()
        await wait_for(lambda: all(client.status(sid) == 200 for sid in range(1, 9, 2)))
        client.send(client.headers(21, "/after"))
        await wait_for(lambda: client.status(21) == 200)
        assert client.goaway is None and not client.eof
    finally:
        await client.close()
    assert len(up.seen) == 5
    done = await asyncio.to_thread(
        subprocess.run, ["h2load", "-n", "200", "-c", "2", "-m", "20",
                         f"http://127.0.0.1:{port}/load"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert " 0 succeeded" not in done.stdout, done.stdout


async def test_a_header_list_over_max_header_size_is_refused(
    proxy: MakeProxy, recorders: MakeRecorder, attackers: Attackers
) -> None:
    up = await recorders("a")
    server = await proxy(h2_config(up.url, limits={"max_header_size": 4096}))
    port = server.listeners[0].port
    attacker = await attackers(port)
    attacker.send(attacker.headers(1, "/big", extra=[(b"x-big", b"v" * 8000)]))
    await wait_for(lambda: attacker.goaway is not None or attacker.reset_of(1) is not None
                   or attacker.status(1) is not None)  # fmt: skip
    if attacker.goaway is None and attacker.reset_of(1) is None:
        assert attacker.status(1) == 431
    await served(port)
    assert [s.path for s in up.seen] == ["/other"]


async def test_a_body_over_max_body_size_sent_with_its_headers_gets_413(
    proxy: MakeProxy, recorders: MakeRecorder, attackers: Attackers
) -> None:
    """No Content-Length, and the whole body in the same write as the headers (before
    the stream's exchange starts): the limit counts those bytes too, and none of them
    reach the upstream."""
    up = await recorders("a")
    server = await proxy(h2_config(up.url, limits={"max_body_size": 1000}))
    port = server.listeners[0].port
    attacker = await attackers(port)
    head = attacker.headers(1, "/upload", end_stream=False, method=b"POST")
    end = hf.DataFrame(1, b"b" * 600, flags=["END_STREAM"])
    attacker.send(head, hf.DataFrame(1, b"b" * 600), end)
    await wait_for(lambda: attacker.status(1) is not None)
    assert attacker.status(1) == 413
    await served(port)
    assert [s.path for s in up.seen] == ["/other"]


async def test_continuation_flood_closes_the_connection_without_buffering(
    proxy: MakeProxy, recorders: MakeRecorder, attackers: Attackers
) -> None:
    """CVE-2024-27316 class: a header block that never ends. Thousands of CONTINUATION
    frames are refused after a bounded number; a few large ones after a bounded size."""
    up = await recorders("a")
    server = await proxy(h2_config(up.url, limits={"max_header_size": 16384}))
    port = server.listeners[0].port
    attacker = await attackers(port)
    attacker.send(attacker.headers(1, "/c", end_headers=False))
    attacker.send(*(hf.ContinuationFrame(1, data=b"\x40\x01a\x01b") for _ in range(5000)))
    await attacker.drain()
    await wait_for(lambda: attacker.goaway is not None and attacker.eof)
    assert attacker.goaway is not None and attacker.goaway.error_code != NO_ERROR
    # few frames, each as large as a frame may be: bounded by the size, not the count
    attacker = await attackers(port)
    attacker.send(attacker.headers(1, "/c", end_headers=False))
    big = hf.ContinuationFrame(1, data=b"\x40\x01a\x7f\x81\x7f" + b"v" * 16000)
    attacker.send(*(big for _ in range(3)))
    await attacker.drain()
    await wait_for(lambda: attacker.goaway is not None and attacker.eof, timeout=2)
    assert attacker.goaway is not None and attacker.goaway.error_code != NO_ERROR
    await served(port)
    assert [s.path for s in up.seen] == ["/other"]


async def test_a_frame_longer_than_allowed_is_refused_on_its_header(
    proxy: MakeProxy, recorders: MakeRecorder, attackers: Attackers
) -> None:
    """A frame header announcing 16 MiB is refused at once: the proxy does not hold what
    arrives of it, waiting for the whole frame, before it says it is too long."""
    up = await recorders("a")
    server = await proxy(h2_config(up.url))
    port = server.listeners[0].port
    attacker = await attackers(port)
    attacker.send(attacker.headers(1, "/f", end_stream=False))
    length = (1 << 24) - 1
    attacker.writer.write(length.to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01" + b"x" * 4096)
    await wait_for(lambda: attacker.goaway is not None and attacker.eof, timeout=2)
    assert attacker.goaway is not None and attacker.goaway.error_code == FRAME_SIZE_ERROR
    await served(port)


async def test_hpack_bomb_is_refused_by_the_decoded_size_limit(
    proxy: MakeProxy, recorders: MakeRecorder, attackers: Attackers
) -> None:
    """One 4 KiB header in the dynamic table, then a block that names it 1000 times
    (a byte each: 4 MB decoded from 1 KB)."""
    up = await recorders("a")
    server = await proxy(h2_config(up.url, limits={"max_header_size": 16384}))
    port = server.listeners[0].port
    attacker = await attackers(port)
    # stream 1: a literal with incremental indexing puts x-bomb into the dynamic table
    attacker.send(attacker.headers(1, "/seed", extra=[(b"x-bomb", b"b" * 4000)]))
    await wait_for(lambda: attacker.status(1) is not None)
    assert attacker.status(1) == 200
    # the newest dynamic entry is index 62; 0xbe is "indexed field 62"
    block = attacker.encoder.encode(
        [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a.test"),
         (b":path", b"/bomb")]
    ) + b"\xbe" * 1000  # fmt: skip
    attacker.send(hf.HeadersFrame(3, data=block, flags=["END_STREAM", "END_HEADERS"]))
    await wait_for(lambda: attacker.goaway is not None or attacker.reset_of(3) is not None
                   or attacker.status(3) is not None)  # fmt: skip
    if attacker.goaway is None and attacker.reset_of(3) is None:
        assert attacker.status(3) == 431
    await served(port)
    assert [s.path for s in up.seen] == ["/seed", "/other"]


# --- floods -------------------------------------------------------------------------------------


async def test_rapid_reset_costs_no_upstream_request_and_gets_enhance_your_calm(
    proxy: MakeProxy, recorders: MakeRecorder, attackers: Attackers
) -> None:
    """CVE-2023-44487: HEADERS then RST_STREAM, over and over, in one write."""
    up = await recorders("a")
    server = await proxy(h2_config(up.url, http2={"max_resets_per_second": 50}))
    port = server.listeners[0].port
    attacker = await attackers(port)
    pairs = []
    for sid in range(1, 2001, 2):
        pairs += [attacker.headers(sid, "/rr"), hf.RstStreamFrame(sid, error_code=0x8)]
    attacker.send(*pairs)
    await attacker.drain()
    await wait_for(lambda: attacker.goaway is not None and attacker.eof)
    assert attacker.goaway is not None
    assert attacker.goaway.error_code == ENHANCE_YOUR_CALM
    await served(port)
    rr = [s for s in up.seen if s.path == "/rr"]
    assert len(rr) <= 5, len(rr)  # 1000 sent; those reset in the same read cost nothing


async def test_rapid_reset_across_reads_is_bounded_by_the_reset_rate(
    proxy: MakeProxy, recorders: MakeRecorder, attackers: Attackers, hold: Hold
) -> None:
    """Each request reaches the upstream before its reset (the worst case: the reset
    cannot spare the upstream's work): the connection is closed once the resets pass
    the rate, bounding that work. Each pair waits for its request upstream, so a slow
    machine cannot spread them below the rate."""
    up = await recorders("a", {"/rr": hold.hold})
    server = await proxy(h2_config(up.url, http2={"max_resets_per_second": 5}))
    port = server.listeners[0].port
    attacker = await attackers(port)
    for n, sid in enumerate(range(1, 401, 2), 1):
        if attacker.eof:
            break
        attacker.send(attacker.headers(sid, "/rr"))
        await attacker.drain()
        await wait_for(lambda n=n: len(up.seen) >= n or attacker.eof)
        attacker.send(hf.RstStreamFrame(sid, error_code=0x8))
        await attacker.drain()
    await wait_for(lambda: attacker.goaway is not None and attacker.eof)
    assert attacker.goaway is not None and attacker.goaway.error_code == ENHANCE_YOUR_CALM
    await served(port)
    assert len([s for s in up.seen if s.path == "/rr"]) <= 8
    await wait_for(lambda: server.pools["main"].upstreams[0].active == 0)
    await wait_for(lambda: not h2_connections(server))


@pytest.mark.parametrize(
    "kind", ["settings", "ping", "empty_data", "window_update", "closed_reset", "closed_data"]
)
async def test_control_frame_floods_get_enhance_your_calm(
    proxy: MakeProxy, recorders: MakeRecorder, attackers: Attackers, hold: Hold, kind: str
) -> None:
    up = await recorders("a", {"/hold": hold.hold})
    server = await proxy(h2_config(up.url, http2={"max_control_frames_per_second": 100}))
    port = server.listeners[0].port
    attacker = await attackers(port)
    frame: hf.Frame
    if kind == "settings":
        frame = hf.SettingsFrame(0, settings={0x3: 100})
    elif kind == "ping":
        frame = hf.PingFrame(0, opaque_data=b"12345678")
    elif kind == "window_update":
        frame = hf.WindowUpdateFrame(0, window_increment=1)
    elif kind == "empty_data":
        attacker.send(attacker.headers(1, "/hold", method=b"POST", end_stream=False))
        frame = hf.DataFrame(1, data=b"")
    else:  # frames on a stream that is over: each asks the proxy for nothing (or an RST)
        attacker.send(attacker.headers(1, "/done"))
        await wait_for(lambda: any("END_STREAM" in f.flags for f in attacker.of_stream(1)))
        if kind == "closed_reset":
            frame = hf.RstStreamFrame(1, error_code=0x8)
        else:
            frame = hf.DataFrame(1, data=b"x")
    attacker.send(*(frame for _ in range(5000)))
    await attacker.drain()
    await wait_for(lambda: attacker.goaway is not None and attacker.eof)
    assert attacker.goaway is not None and attacker.goaway.error_code == ENHANCE_YOUR_CALM
    answered = [f for f in attacker.frames
                if isinstance(f, hf.PingFrame | hf.SettingsFrame | hf.RstStreamFrame)]  # fmt: skip
    assert len(answered) <= 200  # the answers it made the proxy send are bounded too
    await served(port)
    await wait_for(lambda: not h2_connections(server))


# --- slowloris: windows, idle connections, bodies -------------------------------------------------


async def test_a_zero_window_stall_resets_the_stream_after_the_send_timeout(
    proxy: MakeProxy, recorders: MakeRecorder, attackers: Attackers
) -> None:
    big = b"x" * (1024 * 1024)

    async def large(request: web.Request) -> web.StreamResponse:
        return web.Response(body=big)

    up = await recorders("a", {"/large": large})
    server = await proxy(h2_config(up.url, timeouts={"send": 0.3}))
    port = server.listeners[0].port
    attacker = await attackers(port, {SETTINGS_INITIAL_WINDOW_SIZE: 0})
    attacker.send(attacker.headers(1, "/large"))
    await wait_for(lambda: attacker.status(1) == 200)
    await wait_for(lambda: attacker.reset_of(1) is not None, timeout=3)
    assert not any(isinstance(f, hf.DataFrame) and f.data for f in attacker.of_stream(1))
    await wait_for(lambda: server.pools["main"].upstreams[0].active == 0)
    await wait_for(lambda: all(not c.streams for c in h2_connections(server)))
    await served(port)


async def test_an_idle_connection_gets_goaway_after_the_idle_timeout(
    proxy: MakeProxy, recorders: MakeRecorder, attackers: Attackers
) -> None:
    up = await recorders("a")
    server = await proxy(h2_config(up.url, timeouts={"idle": 0.3, "header": 0.3}))
    port = server.listeners[0].port
    never = await attackers(port)  # never sends a request: the header timeout
    after = await attackers(port)  # one request, then nothing: the idle timeout
    after.send(after.headers(1, "/once"))
    await wait_for(lambda: after.status(1) == 200)
    await wait_for(lambda: never.eof and after.eof, timeout=3)
    for client in (never, after):
        assert client.goaway is not None and client.goaway.error_code == NO_ERROR
    assert after.goaway is not None and after.goaway.last_stream_id == 1
    await served(port)


async def test_a_request_body_that_never_comes_gets_408(
    proxy: MakeProxy, recorders: MakeRecorder, attackers: Attackers
) -> None:
    up = await recorders("a")
    server = await proxy(h2_config(up.url, timeouts={"body": 0.3}))
    port = server.listeners[0].port
    attacker = await attackers(port)
    attacker.send(attacker.headers(1, "/slow", method=b"POST", end_stream=False,
                                   extra=[(b"content-length", b"10")]))  # fmt: skip
    await wait_for(lambda: attacker.status(1) is not None, timeout=3)
    assert attacker.status(1) == 408
    await served(port)
    await wait_for(lambda: all(not c.streams for c in h2_connections(server)))
    await wait_for(lambda: server.pools["main"].upstreams[0].active == 0)


# --- drain --------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["listener", "server"])
async def test_drain_sends_goaway_and_finishes_the_stream_in_flight(
    proxy: MakeProxy, recorders: MakeRecorder, attackers: Attackers, hold: Hold, how: str
) -> None:
    up = await recorders("a", {"/hold": hold.hold})
    server = await proxy(h2_config(up.url))
    port = server.listeners[0].port
    client = await attackers(port)
    client.send(client.headers(1, "/hold"))
    await wait_for(lambda: hold.waiting == 1)
    shutdown: asyncio.Task[None] | None = None
    if how == "listener":
        server.listeners[0].drain()
    else:
        shutdown = asyncio.get_running_loop().create_task(server.shutdown(timeout=3))
    await wait_for(lambda: client.goaway is not None)
    assert client.goaway is not None
    assert client.goaway.error_code == NO_ERROR and client.goaway.last_stream_id == 1
    client.send(client.headers(3, "/late"))
    await wait_for(lambda: client.reset_of(3) is not None)
    assert client.reset_of(3) == REFUSED_STREAM
    assert not client.eof
    hold.release.set()
    await wait_for(lambda: client.eof)
    assert client.status(1) == 200
    body = b"".join(f.data for f in client.of_stream(1) if isinstance(f, hf.DataFrame))
    assert body == b"held"
    assert any("END_STREAM" in f.flags for f in client.of_stream(1))
    assert [s.path for s in up.seen] == ["/hold"]
    if shutdown is not None:
        await shutdown


async def test_max_requests_per_connection_ends_an_http2_connection_with_goaway(
    proxy: MakeProxy, recorders: MakeRecorder, attackers: Attackers
) -> None:
    """``limits.max_requests_per_connection`` applies to HTTP/2 as nginx's
    ``keepalive_requests`` does: the last request is served, a GOAWAY names it, a stream
    after it is refused (the client retries it elsewhere), and the connection closes."""
    up = await recorders("a")
    server = await proxy(h2_config(up.url, limits={"max_requests_per_connection": 3}))
    client = await attackers(server.listeners[0].port)
    client.send(client.headers(1, "/1"), client.headers(3, "/2"), client.headers(5, "/3"))
    await wait_for(lambda: client.goaway is not None)
    assert client.goaway is not None
    assert client.goaway.error_code == NO_ERROR and client.goaway.last_stream_id == 5
    client.send(client.headers(7, "/4"))
    await wait_for(lambda: client.eof)
    assert [client.status(sid) for sid in (1, 3, 5)] == [200, 200, 200]
    assert client.reset_of(7) == REFUSED_STREAM or client.status(7) is None
    assert sorted(s.path for s in up.seen) == ["/1", "/2", "/3"]
