"""HTTP/2 from clients, as real clients see it: curl (prior knowledge and ALPN), httpx,
h2load, and the ``h2`` library as a raw client where a test must choose the frames
(separate cookie headers, a ``Host`` beside ``:authority``). Upstreams are HTTP/1.1
(h2 -> h1)."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import shutil
import socket
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web

from proxy.config import Config
from proxy.forwarding.exchange import Exchange
from proxy.runtime.server import ProxyServer
from proxy.server.h2 import STREAM_HIGH_WATER, H2Server, H2Stream
from tests.h2_support import H2Client
from tests.support import (
    HOST,
    CertAuthority,
    Recorder,
    make_config,
    raw_exchange,
    unused_port,
    wait_for,
)

MakeProxy = Callable[[Config], Awaitable[ProxyServer]]
MakeRecorder = Callable[..., Awaitable[Recorder]]

H2C = {"protocols": ["http/1.1", "h2c"]}
BIG = 4 * 1024 * 1024


def big_body() -> bytes:
    return hashlib.sha256(b"seed").digest() * (BIG // 32)


async def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    assert shutil.which("curl"), "curl is needed (apt-get install curl)"
    return await asyncio.to_thread(
        subprocess.run, ["curl", "-sS", *args], capture_output=True, timeout=20
    )


def h2c_config(upstreams: list[str], **kwargs: Any) -> Config:
    listener = {**H2C, **kwargs.pop("listener", {})}
    return make_config(upstreams, listener=listener, **kwargs)


# --- real clients -------------------------------------------------------------------------------


async def test_curl_with_prior_knowledge_on_an_h2c_listener(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    up = await recorders("a")
    server = await proxy(h2c_config([up.url]))
    port = server.listeners[0].port
    done = await curl("--http2-prior-knowledge", "-i", f"http://{HOST}:{port}/x?q=1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(b"HTTP/2 200"), done.stdout
    assert done.stdout.endswith(b"\r\n\r\na")
    assert b"x-upstream: a\r\n" in done.stdout
    seen = up.seen[0]
    assert seen.path == "/x?q=1"
    assert seen.headers["Host"] == f"{HOST}:{port}"
    assert seen.headers["X-Forwarded-Proto"] == "http"
    assert seen.headers["X-Forwarded-For"] == HOST


async def test_curl_over_tls_gets_h2_by_alpn_and_http11_when_it_asks(
    proxy: MakeProxy, recorders: MakeRecorder, ca: CertAuthority
) -> None:
    up = await recorders("a")
    cert = ca.issue("a.test")
    server = await proxy(make_config([up.url], listener={"tls": {"certificates": [cert.entry]}}))
    port = server.listeners[0].port
    common = ["-i", "--cacert", ca.cert_file, "--resolve", f"a.test:{port}:{HOST}"]
    url = f"https://a.test:{port}/tls"
    done = await curl("--http2", *common, url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(b"HTTP/2 200"), done.stdout
    assert done.stdout.endswith(b"\r\n\r\na")
    assert up.seen[0].headers["X-Forwarded-Proto"] == "https"
    assert up.seen[0].headers["Host"] == f"a.test:{port}"
    done = await curl("--http1.1", *common, url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(b"HTTP/1.1 200"), done.stdout
    assert len(up.seen) == 2


async def test_a_plain_listener_without_h2c_answers_the_preface_with_400(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    up = await recorders("a")
    server = await proxy(make_config([up.url]))
    answer = await raw_exchange(server.listeners[0].port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400"), answer
    assert not up.seen


async def test_http11_and_h2c_are_both_served_on_one_port(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    up = await recorders("a")
    server = await proxy(h2c_config([up.url]))
    port = server.listeners[0].port
    answer = await raw_exchange(port, b"GET /one HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"a")
    client = await H2Client.open(port)
    try:
        reply = await client.request("/two")
        assert reply.status == 200 and bytes(reply.body) == b"a"
    finally:
        await client.close()
    # the preface in small pieces is still recognised
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        for piece in (b"PRI * HT", b"TP/2.0\r\n", b"\r\nSM\r\n\r\n"):
            writer.write(piece)
            await writer.drain()
        first = await asyncio.wait_for(reader.readexactly(9), 5)
        assert first[3] == 0x4  # the server's SETTINGS frame
    finally:
        writer.close()
    assert [s.path for s in up.seen] == ["/one", "/two"]


async def test_httpx_many_requests_on_one_connection_are_balanced_per_request(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    a, b = await recorders("a"), await recorders("b")
    server = await proxy(h2c_config([a.url, b.url]))
    port = server.listeners[0].port
    async with httpx.AsyncClient(http1=False, http2=True) as client:
        replies = await asyncio.gather(
            *(client.get(f"http://{HOST}:{port}/n{i}") for i in range(40))
        )
    assert {r.http_version for r in replies} == {"HTTP/2"}
    assert all(r.status_code == 200 for r in replies)
    assert len(a.seen) == len(b.seen) == 20
    assert sorted(r.text for r in replies) == ["a"] * 20 + ["b"] * 20
    peers = {s.peer_port for s in a.seen + b.seen}
    assert len(peers) >= 2  # two upstreams, so at least two upstream connections


async def test_4mib_download_and_upload_through_h2_to_h1(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    payload = big_body()
    got: list[str] = []

    async def download(request: web.Request) -> web.StreamResponse:
        return web.Response(body=payload)

    async def upload(request: web.Request) -> web.StreamResponse:
        data = await request.read()
        got.append(hashlib.sha256(data).hexdigest())
        return web.Response(text=str(len(data)))

    up = await recorders("a", {"/down": download, "/up": upload})
    server = await proxy(h2c_config([up.url]))
    base = f"http://{HOST}:{server.listeners[0].port}"
    async with httpx.AsyncClient(http1=False, http2=True, timeout=10) as client:
        down, sent = await asyncio.gather(
            client.get(f"{base}/down"), client.post(f"{base}/up", content=payload)
        )
    assert down.status_code == 200 and down.http_version == "HTTP/2"
    assert hashlib.sha256(down.content).hexdigest() == hashlib.sha256(payload).hexdigest()
    assert sent.status_code == 200 and sent.text == str(BIG)
    assert got == [hashlib.sha256(payload).hexdigest()]
    # a body without Content-Length (streamed by the client) goes upstream chunked
    client = await H2Client.open(server.listeners[0].port)
    try:
        reply = await client.request("/up", method="POST", body=payload, timeout=10)
        assert reply.status == 200 and bytes(reply.body) == str(BIG).encode()
    finally:
        await client.close()
    assert got[1] == got[0]
    assert up.seen[-1].headers.get("Transfer-Encoding") == "chunked"


# --- what the proxy answers, and what the upstream sees -------------------------------------------


async def test_head_204_304_404_a_filter_answer_and_502_are_proper_h2_responses(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    async def no_content(request: web.Request) -> web.StreamResponse:
        return web.Response(status=204)

    async def not_modified(request: web.Request) -> web.StreamResponse:
        return web.Response(status=304, headers={"ETag": '"v1"'})

    up = await recorders("a", {"/204": no_content, "/304": not_modified})
    dead = f"http://{HOST}:{unused_port()}"
    routes = [
        {"match": {"path_prefix": "/deny"}, "pool": "main",
         "filters": [{"access": {"deny": ["127.0.0.0/8"]}}]},
        {"match": {"path_prefix": "/dead"}, "pool": "dead"},
        {"match": {"path_prefix": "/"}, "pool": "main"},
    ]  # fmt: skip
    config = make_config(
        [up.url], listener={**H2C, "routes": routes},
        pools={"dead": {"upstreams": [{"url": dead}], "retries": {"attempts": 1}}},
    )  # fmt: skip
    server = await proxy(config)
    client = await H2Client.open(server.listeners[0].port)
    try:
        head = await client.request("/page", method="HEAD")
        assert head.status == 200 and head.ended and not head.body
        assert head.header(b"content-length") == b"1"
        r204 = await client.request("/204")
        assert r204.status == 204 and r204.ended and not r204.body
        r304 = await client.request("/304", headers=[(b"if-none-match", b'"v1"')])
        assert r304.status == 304 and r304.ended and not r304.body
        assert r304.header(b"etag") == b'"v1"'
        other = await client.request("/x", authority="nowhere.test")
        assert other.status == 200  # the catch-all route has no host: still served
        denied = await client.request("/deny")
        assert denied.status == 403 and denied.ended
        assert denied.header(b"content-length") == str(len(denied.body)).encode()
        failed = await client.request("/dead/x")
        assert failed.status == 502 and failed.ended
        assert bytes(failed.body).startswith(b"502 Bad Gateway")
        for reply in (head, r204, r304, denied, failed):
            names = {n for n, _ in reply.headers}
            assert not names & {b"connection", b"keep-alive", b"transfer-encoding"}
        # the connection carried them all and still serves
        assert (await client.request("/after")).status == 200
        assert client.goaway is None
    finally:
        await client.close()
    assert [s.path for s in up.seen] == ["/page", "/204", "/304", "/x", "/after"]
    assert up.seen[0].method == "HEAD"


async def test_no_route_is_404_over_h2(proxy: MakeProxy, recorders: MakeRecorder) -> None:
    up = await recorders("a")
    routes = [{"match": {"path_prefix": "/api"}, "pool": "main"}]
    server = await proxy(make_config([up.url], listener={**H2C, "routes": routes}))
    client = await H2Client.open(server.listeners[0].port)
    try:
        reply = await client.request("/elsewhere")
        assert reply.status == 404 and reply.ended
        assert (await client.request("/api/x")).status == 200
    finally:
        await client.close()
    assert [s.path for s in up.seen] == ["/api/x"]


async def test_the_upstream_sees_http11_headers_translated_from_h2(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    up = await recorders("a")
    server = await proxy(h2c_config([up.url]))
    port = server.listeners[0].port
    client = await H2Client.open(port)
    try:
        reply = await client.request(
            "/h", authority="svc.test:8080",
            headers=[(b"cookie", b"a=1"), (b"x-custom", b"v"), (b"cookie", b"b=2"),
                     (b"te", b"trailers"), (b"cookie", b"c=3")],
        )  # fmt: skip
        assert reply.status == 200
    finally:
        await client.close()
    seen = up.seen[0]
    names = [n.lower() for n, _ in seen.raw_headers]
    headers = {n.lower().decode(): v.decode() for n, v in seen.raw_headers}
    assert headers["host"] == "svc.test:8080"
    assert names.count(b"host") == 1 and names.count(b"cookie") == 1
    assert headers["cookie"] == "a=1; b=2; c=3"
    assert headers["x-custom"] == "v"
    assert headers["x-forwarded-for"] == HOST
    assert headers["x-forwarded-proto"] == "http"
    # te: trailers is asked of an HTTP/1.1 upstream in its own form (RFC 9110 10.1.4)
    assert headers["te"] == "trailers" and headers["connection"] == "TE"
    assert names.count(b"te") == 1 and names.count(b"connection") == 1
    assert not {b"keep-alive", b"upgrade", b"transfer-encoding",
                b"proxy-connection"} & set(names)  # fmt: skip
    assert not any(n.startswith(b":") for n in names)


async def test_malformed_requests_get_400_and_the_connection_goes_on(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    """RFC 9113 8.1.1: a malformed request is an error of its stream; the others on the
    connection (a browser's page) go on. None reaches the upstream."""
    up = await recorders("a")
    server = await proxy(h2c_config([up.url]))
    client = await H2Client.open(server.listeners[0].port, validate=False)
    bad: list[list[tuple[bytes, bytes]]] = [
        [(b"host", b"b.test")],  # :authority a.test
        [(b"connection", b"keep-alive")], [(b"transfer-encoding", b"chunked")],
        [(b"keep-alive", b"5")], [(b"proxy-connection", b"x")], [(b"upgrade", b"websocket")],
        [(b"te", b"gzip")], [(b"X-Upper", b"v")], [(b"x-bad name", b"v")],
        [(b"x-inject", b"v\r\nx-smuggled: 1")], [(b"x-nul", b"a\0b")], [(b"x-space", b" v")],
        [(b"x-a", b"1"), (b":method", b"POST")], [(b":status", b"200")],
        [(b":path", b"/again")],
    ]  # fmt: skip
    try:
        for extra in bad:
            reply = await client.request("/bad", authority="a.test", headers=extra)
            assert reply.status == 400, extra
            assert reply.ended and client.goaway is None, extra
        same = await client.request("/s", authority="a.test", headers=[(b"host", b"A.test")])
        assert same.status == 200
        missing = client.conn  # a head without :scheme, sent as raw as h2 allows
        sid = missing.get_next_available_stream_id()
        missing.send_headers(sid, [(b":method", b"GET"), (b":path", b"/x"),
                                   (b":authority", b"a.test")], end_stream=True)  # fmt: skip
        client.replies[sid] = type(client.replies[1])()
        client.flush()
        assert (await client.reply(sid)).status == 400
        assert (await client.request("/after")).status == 200
    finally:
        await client.close()
    assert [s.path for s in up.seen] == ["/s", "/after"]
    assert "X-Smuggled" not in up.seen[0].headers


async def test_the_access_log_has_h2_requests(
    proxy: MakeProxy, recorders: MakeRecorder, tmp_path: Path
) -> None:
    up = await recorders("a")
    log_path = tmp_path / "access.log"
    config = h2c_config([up.url])
    config = Config.model_validate({**config.model_dump(), "access_log": {"path": str(log_path)}})
    server = await proxy(config)
    client = await H2Client.open(server.listeners[0].port)
    try:
        assert (await client.request("/logged", method="POST", body=b"12345")).status == 200
    finally:
        await client.close()

    def lines() -> list[dict[str, Any]]:
        text = log_path.read_text() if log_path.exists() else ""
        return [json.loads(line) for line in text.splitlines()]

    await wait_for(lambda: len(lines()) == 1)
    line = lines()[0]
    assert (line["method"], line["path"], line["status"]) == ("POST", "/logged", 200)
    assert (line["bytes_in"], line["bytes_out"], line["host"]) == (5, 1, "a.test")
    assert line["client"] == HOST and line["pool"] == "main"


async def test_h2load_smoke_all_2xx(proxy: MakeProxy, recorders: MakeRecorder) -> None:
    assert shutil.which("h2load"), "h2load is needed (apt-get install nghttp2-client)"
    a, b = await recorders("a"), await recorders("b")
    server = await proxy(h2c_config([a.url, b.url]))
    port = server.listeners[0].port
    done = await asyncio.to_thread(
        subprocess.run, ["h2load", "-n", "2000", "-c", "4", "-m", "20",
                         f"http://{HOST}:{port}/load"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "2000 succeeded, 0 failed, 0 errored" in done.stdout, done.stdout
    assert "status codes: 2000 2xx" in done.stdout, done.stdout
    assert len(a.seen) + len(b.seen) == 2000
    assert abs(len(a.seen) - len(b.seen)) <= 8


# --- flow control -------------------------------------------------------------------------------


async def test_a_stalled_upstream_stops_its_stream_not_the_connection(
    proxy: MakeProxy,
) -> None:
    """The request body's window opens only as the upstream takes the bytes: an upstream
    that reads nothing stops its client's stream after the window and the buffers
    between (the kernel's, mostly), while other streams on the connection go on; once
    it reads, the rest flows and arrives whole."""
    go = asyncio.Event()
    received: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            if b" /sink " in head:
                await go.wait()
            body = await reader.readexactly(length)
            received.append(len(body))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%d" % (
                len(str(len(body))), len(body)))  # fmt: skip
            await writer.drain()
        finally:
            writer.close()

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # accepted sockets inherit it
    sock.bind((HOST, 0))
    sink = await asyncio.start_server(handle, sock=sock)
    try:
        server = await proxy(h2c_config([f"http://{HOST}:{sock.getsockname()[1]}"]))
        await _stall_and_resume(server.listeners[0].port, go, received)
    finally:
        go.set()
        sink.close()
        await sink.wait_closed()


async def _stall_and_resume(port: int, go: asyncio.Event, received: list[int]) -> None:
    total = 12 * 1024 * 1024
    client = await H2Client.open(port)
    try:
        sid = client.start("/sink", method="POST", end=False,
                           headers=[(b"content-length", str(total).encode())])  # fmt: skip
        conn, loop = client.conn, asyncio.get_running_loop()
        sent, chunk = 0, b"x" * 16384
        last = loop.time()
        while loop.time() - last < 0.3:  # until no window has come for 0.3 s
            n = min(conn.local_flow_control_window(sid), len(chunk), total - sent)
            if n > 0:
                conn.send_data(sid, chunk[:n])
                client.flush()
                await client.writer.drain()
                sent, last = sent + n, loop.time()
            else:
                await asyncio.sleep(0.005)
        assert conn.local_flow_control_window(sid) == 0  # stopped by its stream's window
        with open("/proc/sys/net/ipv4/tcp_wmem") as f:
            kernel = int(f.read().split()[2])  # the proxy's upstream socket may buffer this
        assert 65535 <= sent <= 65535 + kernel + 1024 * 1024, sent
        assert conn.outbound_flow_control_window > 1024 * 1024  # the connection is not stuck
        # other streams on the connection go on, a body larger than a stream window too
        other = await client.request("/other", method="POST", body=b"y" * 200_000,
                                     headers=[(b"content-length", b"200000")])  # fmt: skip
        assert other.status == 200 and bytes(other.body) == b"200000"
        go.set()  # the upstream reads now: the window opens, the rest of the body flows
        rest = b"x" * (total - sent)
        await client.send_body(sid, rest, timeout=20)
        reply = await client.reply(sid, timeout=20)
        assert reply.status == 200 and bytes(reply.body) == str(total).encode()
    finally:
        await client.close()
    assert sorted(received) == [200_000, total]


async def test_refused_bodies_give_the_connection_window_back(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    """Uploads refused mid-body (413 over ``max_body_size``): the bytes of each that the
    proxy took are handed back to the connection's window (here the smallest, 64 KiB)
    though the stream is over, else four such uploads would shut it for every stream."""
    up = await recorders("up")
    listener = {"http2": {"connection_window_size": 65535}, "limits": {"max_body_size": 1000}}
    server = await proxy(h2c_config([up.url], listener=listener))
    client = await H2Client.open(server.listeners[0].port)
    try:
        for _ in range(8):
            sid = client.start("/upload", method="POST", end=False)
            await client.send_body(sid, b"u" * 16384)
            reply = await client.reply(sid)
            assert reply.status == 413
        ok = await client.request("/small", method="POST", body=b"s" * 500)
        assert ok.status == 200
        assert client.conn.outbound_flow_control_window > 32768
    finally:
        await client.close()


async def test_a_client_that_reads_slowly_pauses_its_upstream_not_the_connection(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    """A response beyond the client's stream window waits in the stream, up to
    STREAM_HIGH_WATER, and then the upstream is no longer read: the proxy holds a
    bounded amount for a client that reads nothing, and serves its other streams."""
    payload = big_body()

    async def download(request: web.Request) -> web.StreamResponse:
        return web.Response(body=payload)

    up = await recorders("a", {"/down": download})
    server = await proxy(h2c_config([up.url]))
    client = await H2Client.open(server.listeners[0].port)
    try:
        sid = client.start("/down")
        client.held.add(sid)
        await wait_for(lambda: len(client.replies[sid].body) == 65535)
        h2 = next(c for c in server.listeners[0].connections if isinstance(c, H2Server))
        stream = h2.streams[sid]
        await wait_for(lambda: stream.write_paused)  # the upstream is no longer read
        assert stream.body_size <= STREAM_HIGH_WATER + 256 * 1024
        other = await client.request("/other")
        assert other.status == 200 and bytes(other.body) == b"a"
        assert stream.body_size <= STREAM_HIGH_WATER + 256 * 1024
        client.release(sid)
        reply = await client.reply(sid, timeout=10)
    finally:
        await client.close()
    assert reply.status == 200 and hashlib.sha256(reply.body).digest() == (
        hashlib.sha256(payload).digest()
    )  # fmt: skip


async def test_finished_streams_are_freed_without_the_cycle_collector(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    """A stream and its exchange point at each other; once the stream is over the link
    is cut, so both go by their reference counts. Left to the cyclic collector they
    piled up (10 objects a request) and its passes paused the proxy 100 ms a second
    under load."""
    up = await recorders("a")
    routes = [{"match": {"path_prefix": "/api"}, "pool": "main"}]
    server = await proxy(make_config([up.url], listener={**H2C, "routes": routes}))
    client = await H2Client.open(server.listeners[0].port)
    gc.collect()
    gc.disable()
    try:
        for i in range(50):  # forwarded, answered by the proxy, reset by the client
            assert (await client.request(f"/api/{i}")).status == 200
            assert (await client.request("/none")).status == 404
            sid = client.start("/api/reset", end=False)
            client.conn.reset_stream(sid)
            client.flush()
        await client.request("/api/last")
        left = [o for o in gc.get_objects() if isinstance(o, Exchange | H2Stream)]
    finally:
        gc.enable()
        await client.close()
    assert len(left) <= 2, left
