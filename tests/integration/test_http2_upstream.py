"""HTTP/2 to upstreams (``http_version: "2"``), with real sockets: clients speaking
HTTP/1.1 and HTTP/2 (h2c) to the proxy, a controllable HTTP/2 server behind it
(``tests.h2_upstream.H2Backend``, whose every answer names the connection and stream
that carried it).

Multiplexing up to the upstream's ``SETTINGS_MAX_CONCURRENT_STREAMS`` (and more
connections beyond), GOAWAY and REFUSED_STREAM retried, resets mid-response never
presented as complete, request bodies intact and flow-controlled, PING keep-alive and
the idle timeout, passive health, retries, metrics and ``max_connections`` per stream,
TLS with ALPN, and reloads between HTTP/1.1 and HTTP/2.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import socket
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest

from proxy.config import Config
from proxy.runtime.server import ProxyServer
from proxy.upstream import h2 as upstream_h2
from proxy.upstream.pool import Upstream
from tests.admin_support import request_counts, samples, scrape
from tests.h2_support import H2Client
from tests.h2_upstream import H2Backend, alpn_context
from tests.support import HOST, CertAuthority, make_config, proxy_url, wait_for

MakeProxy = Callable[[Config], Awaitable[ProxyServer]]
MakeBackend = Callable[..., Awaitable[H2Backend]]

CLIENTS = ["h1", "h2"]


@pytest.fixture
async def backends() -> AsyncIterator[MakeBackend]:
    started: list[H2Backend] = []

    async def make(**kwargs: Any) -> H2Backend:
        backend = await H2Backend(**kwargs).start()
        started.append(backend)
        return backend

    yield make
    for backend in started:
        await backend.stop()


def h2_config(urls: list[str], **pool: Any) -> Config:
    """Pool ``main`` speaking HTTP/2 to ``urls``, behind a listener taking HTTP/1.1 and
    h2c on one port."""
    return make_config(
        urls, pool={"http_version": "2", **pool}, listener={"protocols": ["http/1.1", "h2c"]}
    )


def client(kind: str, **kwargs: Any) -> httpx.AsyncClient:
    """An httpx client speaking HTTP/1.1 or HTTP/2 with prior knowledge (h2c)."""
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    return httpx.AsyncClient(
        http1=kind == "h1", http2=kind == "h2", limits=limits, timeout=5.0, **kwargs
    )


def upstream_of(server: ProxyServer, backend: H2Backend) -> Upstream:
    found = server.pools["main"].upstream(f"{HOST}:{backend.port}")
    assert found is not None
    return found


def served(text: str) -> tuple[int, int]:
    """(connection index, stream id) from an answer of ``H2Backend``."""
    m = re.match(r"conn=(\d+) stream=(\d+)", text)
    assert m is not None, text
    return int(m.group(1)), int(m.group(2))


async def settled(value: Callable[[], int], quiet: float = 0.3, timeout: float = 3.0) -> int:
    """Wait until ``value()`` stays the same for ``quiet`` seconds; that value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last, since = value(), loop.time()
    while loop.time() - since < quiet:
        assert loop.time() < deadline, f"still moving after {timeout}s"
        await asyncio.sleep(0.02)
        if value() != last:
            last, since = value(), loop.time()
    return last


async def hold_then_release(
    backend: H2Backend, requests: list[Awaitable[httpx.Response]], in_flight: int
) -> list[httpx.Response]:
    """Send ``requests`` at once, wait until ``in_flight`` streams are held by the
    backend, then let it answer; the responses."""
    tasks = [asyncio.ensure_future(r) for r in requests]
    try:
        await wait_for(lambda: backend.in_flight == in_flight, 3.0)
    finally:
        backend.release()
    return await asyncio.gather(*tasks)


# -- multiplexing --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CLIENTS)
async def test_concurrent_requests_share_one_connection(
    proxy: MakeProxy, backends: MakeBackend, kind: str
) -> None:
    backend = await backends(max_streams=100, hold=True)
    server = await proxy(h2_config([backend.url]))
    async with client(kind) as c:
        url = proxy_url(server)
        responses = await hold_then_release(backend, [c.get(url) for _ in range(50)], 50)
    assert [r.status_code for r in responses] == [200] * 50
    assert {served(r.text)[0] for r in responses} == {0}  # one connection carried all
    assert len({served(r.text)[1] for r in responses}) == 50  # each on its own stream
    assert len(backend.connections) == 1 and backend.max_seen == 50
    assert backend.errors == []
    assert upstream_of(server, backend).conns == 1


@pytest.mark.parametrize("kind", CLIENTS)
async def test_more_connections_open_beyond_the_upstreams_stream_limit(
    proxy: MakeProxy, backends: MakeBackend, kind: str
) -> None:
    backend = await backends(max_streams=10, hold=True)
    server = await proxy(h2_config([backend.url]))
    async with client(kind) as c:
        url = proxy_url(server)
        responses = await hold_then_release(backend, [c.get(url) for _ in range(50)], 50)
    assert [r.status_code for r in responses] == [200] * 50
    per_conn = Counter(served(r.text)[0] for r in responses)
    assert len(backend.connections) == 5 and sorted(per_conn.values()) == [10] * 5
    assert backend.max_seen == 10 and backend.errors == []  # never above its limit


@pytest.mark.parametrize("kind", CLIENTS)
async def test_a_new_connection_carries_one_stream_until_the_upstreams_settings(
    proxy: MakeProxy, backends: MakeBackend, kind: str
) -> None:
    """Requests that arrive before the upstream said its limit (its SETTINGS are late)
    wait for it rather than be sent above it (RFC 9113 5.1.2: they would be refused)."""
    backend = await backends(max_streams=4, hold=True, settings_delay=0.2)
    server = await proxy(h2_config([backend.url]))
    async with client(kind) as c:
        url = proxy_url(server)
        responses = await hold_then_release(backend, [c.get(url) for _ in range(12)], 12)
    assert [r.status_code for r in responses] == [200] * 12
    assert backend.max_seen == 4 and backend.errors == []
    assert len(backend.connections) == 3


@pytest.mark.parametrize("kind", CLIENTS)
async def test_the_limit_holds_under_a_steady_load(
    proxy: MakeProxy, backends: MakeBackend, kind: str
) -> None:
    """Streams end and start again all the time: never more in flight than allowed."""
    backend = await backends(max_streams=4)
    server = await proxy(h2_config([backend.url]))
    async with client(kind) as c:
        url = proxy_url(server)

        async def loop() -> list[int]:
            return [(await c.get(url)).status_code for _ in range(10)]

        results = await asyncio.gather(*(loop() for _ in range(12)))
    assert [s for r in results for s in r] == [200] * 120
    assert backend.max_seen <= 4 and backend.errors == []
    assert len(backend.connections) <= 3  # (12 / 4: never more than needed)


# -- GOAWAY, REFUSED_STREAM, resets --------------------------------------------------------


@pytest.mark.parametrize("kind", CLIENTS)
async def test_goaway_mid_load_retries_the_unprocessed_streams_elsewhere(
    proxy: MakeProxy, backends: MakeBackend, kind: str
) -> None:
    backend = await backends(hold=True)
    server = await proxy(h2_config([backend.url]))
    url = proxy_url(server)
    body = b"p" * 1000
    digest = hashlib.sha256(body).hexdigest()
    async with client(kind) as c:
        # half of them POSTs: not idempotent, yet nothing reached the application
        first = [c.post(url, content=body) if i % 2 else c.get(url) for i in range(30)]
        tasks = [asyncio.ensure_future(r) for r in first]
        await wait_for(lambda: backend.in_flight == 30, 3.0)
        old = backend.connections[0]
        old.goaway(10)  # 30 streams in flight; the last 20 were not processed
        # they are sent again on a new connection
        await wait_for(lambda: backend.in_flight == 30 and len(backend.connections) == 2, 3.0)
        opened = len(old.streams)
        assert opened == 30 and len(backend.ignored) == 20
        # the proxy knows: new requests go to the new connection, none to the old one
        more = [asyncio.ensure_future(c.get(url)) for _ in range(5)]
        await wait_for(lambda: backend.in_flight == 35, 3.0)
        assert len(old.streams) == opened
        backend.release()
        responses = await asyncio.gather(*tasks, *more)
    assert [r.status_code for r in responses] == [200] * 35
    conns = Counter(served(r.text)[0] for r in responses)
    assert conns[0] == 10 and len(backend.connections) == 2
    for i, r in enumerate(responses[:30]):
        assert (f"bytes={len(body)} sha256={digest}" in r.text) == bool(i % 2)
    await wait_for(lambda: old.closed, 2.0)  # closed by the proxy once its streams ended
    upstream = upstream_of(server, backend)
    assert upstream.ejections == 0 and upstream.conns == 1


@pytest.mark.parametrize("kind", CLIENTS)
async def test_a_refused_stream_is_retried(
    proxy: MakeProxy, backends: MakeBackend, kind: str
) -> None:
    backend = await backends(refuse=1)
    server = await proxy(h2_config([backend.url]))
    async with client(kind) as c:
        get = await c.get(proxy_url(server))
        backend.refuse = 1
        post = await c.post(proxy_url(server), content=b"order")
    assert (get.status_code, post.status_code) == (200, 200)
    assert "bytes=5 " in post.text
    assert backend.refused == 2 and len(backend.seen) == 2
    assert server.pools["main"].retries == 2


async def test_a_stream_refused_during_its_body_is_sent_again_only_whole(
    proxy: MakeProxy, backends: MakeBackend
) -> None:
    """Refused once its body was sent (all of it, or 100,000 bytes): a body the retry
    buffer kept goes again whole; a larger one is not sent again (502), never cut."""
    backend = await backends(refuse=1)
    server = await proxy(h2_config([backend.url], retries={"buffer": 65536}))
    small, big = b"s" * 1000, b"b" * (1024 * 1024)
    url = proxy_url(server, "/refuse-late")
    async with client("h1") as c:
        r = await c.post(url, content=small)
        assert r.status_code == 200
        assert f"bytes=1000 sha256={hashlib.sha256(small).hexdigest()}" in r.text
        backend.refuse = 1
        r = await c.post(url, content=big)
        assert r.status_code == 502
    assert backend.refused == 2 and len(backend.seen) == 3  # no cut-short third try


async def test_a_reset_mid_response_closes_the_http1_clients_connection(
    proxy: MakeProxy, backends: MakeBackend, caplog: pytest.LogCaptureFixture
) -> None:
    backend = await backends()
    server = await proxy(h2_config([backend.url]))
    async with client("h1") as c:
        with pytest.raises(httpx.RemoteProtocolError):  # never a complete response
            await c.get(proxy_url(server, "/reset-mid"))
        assert (await c.get(proxy_url(server))).status_code == 200  # others go on
    assert "closed mid-response" in caplog.text


async def test_a_reset_mid_response_resets_the_http2_clients_stream(
    proxy: MakeProxy, backends: MakeBackend
) -> None:
    backend = await backends()
    server = await proxy(h2_config([backend.url]))
    c = await H2Client.open(server.listeners[0].port)
    try:
        broken = c.start("/reset-mid")
        await wait_for(lambda: c.replies[broken].reset is not None, 3.0)
        reply = c.replies[broken]  # (its head and first bytes may have gone before)
        assert not reply.ended and len(reply.body) < 100000
        other = await c.request("/")  # the connection goes on
        assert other.status == 200 and other.ended
    finally:
        c.writer.close()


# -- request bodies ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CLIENTS)
async def test_request_bodies_arrive_intact(
    proxy: MakeProxy, backends: MakeBackend, kind: str
) -> None:
    backend = await backends()
    server = await proxy(h2_config([backend.url]))
    body = bytes(range(256)) * 4096  # 1 MiB
    digest = hashlib.sha256(body).hexdigest()

    async def pieces() -> AsyncIterator[bytes]:  # no Content-Length: chunked on HTTP/1.1
        for i in range(0, len(body), 10000):
            yield body[i : i + 10000]

    async with client(kind) as c:
        sized = await c.post(proxy_url(server), content=body)
        streamed = await c.post(proxy_url(server), content=pieces())
    for r in (sized, streamed):
        assert r.status_code == 200
        assert f"bytes={len(body)} sha256={digest}" in r.text
    if kind == "h1":
        assert "content-length" not in backend.seen[1].headers  # it came chunked


async def test_a_chunked_upload_from_aiohttp_arrives_intact(
    proxy: MakeProxy, backends: MakeBackend
) -> None:
    backend = await backends()
    server = await proxy(h2_config([backend.url]))
    parts = [b"a" * 7, b"b" * 70000, b"", b"c" * 3]
    digest = hashlib.sha256(b"".join(parts)).hexdigest()

    async def gen() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    async with aiohttp.ClientSession() as s, s.put(proxy_url(server), data=gen()) as resp:
        assert resp.status == 200
        assert f"bytes=70010 sha256={digest}" in await resp.text()
    assert backend.seen[0].method == "PUT"


@pytest.mark.parametrize("kind", CLIENTS)
async def test_a_slow_reading_upstream_pauses_the_client(
    proxy: MakeProxy, backends: MakeBackend, kind: str
) -> None:
    """The upstream reads nothing: the proxy sends what its window allows (16 KiB, or
    the default 64 KiB before its SETTINGS arrive) and then pauses the client rather
    than buffer the body; once the upstream reads, every byte arrives."""
    backend = await backends(window=16384, reading=False)
    server = await proxy(h2_config([backend.url]))
    total, piece = 32 * 1024 * 1024, b"z" * 65536
    sent = [0]

    async def body() -> AsyncIterator[bytes]:
        while sent[0] < total:
            sent[0] += len(piece)
            yield piece

    async with client(kind) as c:
        task = asyncio.ensure_future(c.post(proxy_url(server), content=body()))
        await wait_for(lambda: backend.received >= 16384, 3.0)
        stalled = await settled(lambda: sent[0])
        assert 16384 <= backend.received <= 65535
        upstream = upstream_of(server, backend)
        (conn,) = upstream.h2 or ()
        (session,) = conn.streams.values()
        # the proxy holds at most its high-water mark; the rest is socket buffers
        assert session.write_buffer_size() <= upstream_h2.HIGH_WATER + 2 * 65536
        # the client: an HTTP/2 one only what the proxy's stream window let it send
        # (the window opens as the upstream takes the bytes); an HTTP/1.1 one what the
        # kernel's socket buffers hold besides (loopback autotuning: a few MiB)
        assert stalled < (1 if kind == "h2" else 12) * 1024 * 1024, stalled
        backend.read_all()
        response = await task
    assert response.status_code == 200
    assert f"bytes={total} " in response.text


@pytest.mark.parametrize("who", ["client", "upstream"])
async def test_abandoned_downloads_give_the_connection_window_back(
    proxy: MakeProxy, backends: MakeBackend, who: str
) -> None:
    """Clients stop reading a large download, then the client leaves or the upstream
    resets the stream: each stream held up to its window (1 MiB) of bytes it never
    passed on. Those go back to the connection's window, shared by every stream
    (16 MiB): after twenty such downloads, more than it holds, the same connection
    still carries one."""
    backend = await backends()
    server = await proxy(h2_config([backend.url]))
    port = server.listeners[0].port
    loop = asyncio.get_running_loop()

    async def abandon_one() -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, (HOST, port))
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            writer.write(b"GET /big/8000000 HTTP/1.1\r\nHost: x\r\n\r\n")
            await reader.readuntil(b"\r\n\r\n")
            (conn,) = backend.open_connections
            await wait_for(lambda: len(conn.downloads) == 1, 3.0)
            (sid,) = conn.downloads
            # the client reads no more: once the socket buffers are full the proxy
            # stops reading the stream, and the backend sends until its window shuts
            (proxied,) = upstream_of(server, backend).h2 or ()
            await wait_for(
                lambda: (
                    proxied.streams[sid].reading_paused
                    and conn.h2.local_flow_control_window(sid) == 0
                ),
                5.0,
            )
            if who == "upstream":
                conn.reset(sid)
                with pytest.raises(asyncio.IncompleteReadError):  # not presented whole
                    await asyncio.wait_for(reader.readexactly(8_000_000), 5.0)
        finally:
            writer.transport.abort()
        await wait_for(lambda: not conn.downloads, 3.0)

    for _ in range(20):
        await abandon_one()
    async with client("h1") as c:
        response = await c.get(proxy_url(server, "/big/3000000"))
    assert response.status_code == 200
    assert len(response.content) == 3_000_000
    assert len(backend.connections) == 1  # the same connection carried them all


# -- keep-alive ---------------------------------------------------------------------------------


async def test_an_idle_connection_is_pinged_then_closed_after_the_idle_timeout(
    proxy: MakeProxy, backends: MakeBackend
) -> None:
    backend = await backends()
    server = await proxy(h2_config([backend.url], timeouts={"idle": "600ms"}))
    server.clock.resolution = 0.05
    async with client("h1") as c:
        assert (await c.get(proxy_url(server))).status_code == 200
    conn = backend.connections[0]
    await wait_for(lambda: backend.pings >= 1, 2.0)  # half the idle timeout
    assert not conn.closed
    await wait_for(lambda: conn.closed, 2.0)
    assert backend.pings >= 1 and upstream_of(server, backend).conns == 0
    async with client("h2") as c:  # a new one when needed
        assert (await c.get(proxy_url(server))).status_code == 200
    assert len(backend.connections) == 2


async def test_a_busy_connection_is_not_pinged_nor_closed(
    proxy: MakeProxy, backends: MakeBackend
) -> None:
    backend = await backends(hold=True)
    server = await proxy(h2_config([backend.url], timeouts={"idle": "300ms"}))
    server.clock.resolution = 0.05
    async with client("h1") as c:
        task = asyncio.ensure_future(c.get(proxy_url(server)))
        await wait_for(lambda: backend.in_flight == 1, 2.0)
        clock = asyncio.get_running_loop()
        until = clock.time() + 0.8
        await wait_for(lambda: clock.time() > until, 2.0)  # longer than the idle timeout
        assert backend.pings == 0 and not backend.connections[0].closed
        backend.release()
        assert (await task).status_code == 200


async def test_an_upstream_closing_its_idle_connection_costs_no_request(
    proxy: MakeProxy, backends: MakeBackend
) -> None:
    backend = await backends()
    server = await proxy(h2_config([backend.url]))
    async with client("h1") as c:
        assert (await c.get(proxy_url(server))).status_code == 200
        assert backend.close_idle() == 1
        await wait_for(lambda: not upstream_of(server, backend).h2, 2.0)
        r = await c.get(proxy_url(server))
    assert r.status_code == 200 and served(r.text)[0] == 1
    assert server.pools["main"].retries == 0


# -- health, retries, metrics, limits ------------------------------------------------------


@pytest.mark.parametrize(("behaviour", "pool"), [
    ("/reset", {}),
    ("/status/503", {"retries": {"retry_on": [503]},
                     "health_check": {"passive": {"consecutive_failures": 3,
                                                  "consecutive_5xx": True}}}),
])  # fmt: skip
@pytest.mark.parametrize("kind", CLIENTS)
async def test_a_failing_upstream_is_retried_and_ejected_per_stream(
    proxy: MakeProxy, backends: MakeBackend, kind: str, behaviour: str, pool: dict[str, Any]
) -> None:
    good, bad = await backends(), await backends()
    bad.behaviour = behaviour
    passive = {"health_check": {"passive": {"consecutive_failures": 3}}}
    server = await proxy(h2_config([good.url, bad.url], **{**passive, **pool}))
    async with client(kind) as c:
        statuses = [(await c.get(proxy_url(server))).status_code for _ in range(20)]
    assert statuses == [200] * 20  # the failures were retried on the good upstream
    ub = upstream_of(server, bad)
    assert ub.ejected and ub.ejections == 1
    assert len(bad.seen) == 3  # three failures in a row, then out of rotation
    assert len(good.seen) == 20 and server.pools["main"].retries == 3
    counts = request_counts(await scrape(server))
    good_label, bad_label = f"{HOST}:{good.port}", f"{HOST}:{bad.port}"
    assert counts[("test", "main", good_label, "GET", "200")] == 20  # each stream counted
    assert not any(k[2] == bad_label for k in counts)  # no answer of bad reached a client


async def test_max_connections_limits_connections_each_with_its_streams(
    proxy: MakeProxy, backends: MakeBackend
) -> None:
    """``max_connections`` counts connections, not requests: with 2 and 10 streams each,
    20 requests are in flight and the next ones wait for a stream, then 503 beyond
    ``max_pending``."""
    backend = await backends(max_streams=10, hold=True)
    breaker = {"max_connections": 2, "max_pending": 5, "queue_timeout": "5s"}
    server = await proxy(h2_config([backend.url], circuit_breaker=breaker))
    pool = server.pools["main"]
    async with client("h2") as c:
        tasks = [asyncio.ensure_future(c.get(proxy_url(server))) for _ in range(27)]
        await wait_for(lambda: backend.in_flight == 20 and pool.pending == 5, 3.0)
        await wait_for(lambda: pool.overflows == 2, 3.0)
        assert len(backend.connections) == 2 and upstream_of(server, backend).conns == 2
        backend.release()
        statuses = Counter(r.status_code for r in await asyncio.gather(*tasks))
    assert statuses == {200: 25, 503: 2}
    assert len(backend.connections) == 2 and backend.max_seen == 10
    assert pool.pending == 0


# -- TLS -----------------------------------------------------------------------------------


async def test_https_upstreams_speak_http2_by_alpn(
    proxy: MakeProxy, backends: MakeBackend, ca: CertAuthority
) -> None:
    backend = await backends(ssl_context=alpn_context(ca, ["h2", "http/1.1"]))
    server = await proxy(h2_config([backend.url], tls={"ca": ca.cert_file}))
    async with client("h2") as c:
        responses = await asyncio.gather(*(c.get(proxy_url(server)) for _ in range(10)))
    assert [r.status_code for r in responses] == [200] * 10
    assert {served(r.text)[0] for r in responses} == {0}


async def test_an_https_upstream_without_h2_is_a_clear_connect_error(
    proxy: MakeProxy, backends: MakeBackend, ca: CertAuthority,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.INFO, "aiolb")
    backend = await backends(ssl_context=alpn_context(ca, ["http/1.1"]))
    server = await proxy(h2_config([backend.url], tls={"ca": ca.cert_file},
                                   retries={"attempts": 1}))  # fmt: skip
    async with client("h1") as c:
        r = await c.get(proxy_url(server))
    assert r.status_code == 502
    assert "the upstream does not speak HTTP/2 over TLS (ALPN chose nothing)" in caplog.text
    errors = samples(await scrape(server), "aiolb_upstream_connect_errors_total")
    assert errors == {(("pool", "main"), ("upstream", f"{HOST}:{backend.port}")): 1.0}
    assert upstream_of(server, backend).conns == 0 and backend.seen == []


# -- reloads -------------------------------------------------------------------------------


def pool_yaml(url: str, version: str) -> str:
    return "\n".join([
        "listeners:", "  - name: test", f'    bind: "{HOST}:0"',
        "    protocols: [http/1.1, h2c]", "    routes: [{pool: main}]",
        "pools:", "  main:", f'    http_version: "{version}"', f'    upstreams: [{{url: "{url}"}}]',
        "admin:", f'  bind: "{HOST}:0"', "",
    ])  # fmt: skip


async def test_a_reload_between_http1_and_http2_keeps_serving_and_retires_connections(
    proxy: MakeProxy, backends: MakeBackend, tmp_path: Path
) -> None:
    from proxy.config import load_config

    backend = await backends()
    path = tmp_path / "aiolb.yaml"
    path.write_text(pool_yaml(backend.url, "1.1"))
    server = await proxy(load_config(path))
    server.config_path = str(path)
    upstream = upstream_of(server, backend)
    async with client("h1") as c:
        url = proxy_url(server)
        assert (await c.get(url)).text.startswith("h1 conn=0")

        path.write_text(pool_yaml(backend.url, "2"))
        assert await server.reload() == []
        await wait_for(lambda: backend.connections[0].closed, 2.0)  # the idle HTTP/1.1 one
        backend.hold = True
        held = asyncio.ensure_future(c.get(url))
        await wait_for(lambda: backend.in_flight == 1, 2.0)
        assert served(backend.seen[0].body_line.decode()) == (1, 1)

        path.write_text(pool_yaml(backend.url, "1.1"))
        assert await server.reload() == []
        assert (await c.get(url)).text.startswith("h1 conn=2")  # at once, over HTTP/1.1
        assert not backend.connections[1].closed  # its stream is still in flight
        backend.release()
        assert (await held).text.startswith("conn=1 stream=1")
        await wait_for(lambda: backend.connections[1].closed, 2.0)  # retired, then closed
    assert upstream.h2 is None
    await wait_for(lambda: upstream.conns == 1, 2.0)  # the HTTP/1.1 one


async def test_an_idle_connection_whose_peer_answers_no_ping_is_closed(
    proxy: MakeProxy, backends: MakeBackend, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer that stopped answering (its host gone, a middlebox dropping the flow) is
    found by the keep-alive PING going unanswered for the connect timeout, well before
    the idle timeout; the next request opens a new connection rather than being sent
    into the void."""
    backend = await backends()
    server = await proxy(h2_config([backend.url], timeouts={"idle": "4s", "connect": "300ms"}))
    server.clock.resolution = 0.05
    async with client("h1") as c:
        assert (await c.get(proxy_url(server))).status_code == 200
    conn = backend.connections[0]
    assert conn.transport is not None
    conn.transport.pause_reading()  # it reads (and answers) nothing more
    started = asyncio.get_running_loop().time()
    await wait_for(lambda: upstream_of(server, backend).conns == 0, 4.0)
    assert asyncio.get_running_loop().time() - started < 3.5  # the PING, not the idle timeout
    assert "answered no PING in 0.3s" in caplog.text
    async with client("h1") as c:
        assert (await c.get(proxy_url(server))).status_code == 200
    assert len(backend.connections) == 2
