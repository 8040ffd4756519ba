"""The ``compress`` filter through real sockets: real upstreams (aiohttp, raw bytes),
the real proxy, real clients (curl ``--compressed``, httpx, raw sockets decoded by
the stdlib, ``brotli`` and ``zstandard``). What is asserted is what a user checks: the
decoded body equals the upstream's, the headers (``Content-Encoding``, ``Vary``, a
weak ``ETag``, no ``Content-Length`` beside a compressed body), each case that is
never compressed, the cache's stored variants, and a slow client holding the
upstream instead of the proxy holding the body."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import random
import shutil
import subprocess
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import brotli
import httpx
import pytest
import zstandard
from aiohttp import web

from proxy.config import Config
from proxy.filters.compress import Coder, Compress
from proxy.runtime.server import ProxyServer
from proxy.server.h2 import STREAM_HIGH_WATER, H2Server
from tests.h2_support import H2Client
from tests.support import HOST, RawUpstream, Recorder, make_config, read_response, wait_for

MakeProxy = Callable[[Config], Awaitable[ProxyServer]]
MakeRecorder = Callable[..., Awaitable[Recorder]]
RawUpstreams = Callable[..., Awaitable[RawUpstream]]

#: A text body that compresses, and is long enough to take several reads.
TEXT = b"".join(
    b"line %06d: the quick brown fox jumps over the lazy dog\n" % i for i in range(4000)
)
JSON = b'{"items": [' + b",".join(b'{"id": %d, "name": "item"}' % i for i in range(200)) + b"]}"
H2C = {"protocols": ["http/1.1", "h2c"]}
#: A route with the ``compress`` filter and the cache ``main``.
CACHED_ROUTE: dict[str, Any] = {
    "match": {"path_prefix": "/"},
    "pool": "main",
    "cache": "main",
    "filters": [{"compress": {}}],
}


def decode(encoding: str | None, data: bytes) -> bytes:
    if encoding is None:
        return data
    if encoding == "gzip":
        return gzip.decompress(data)
    if encoding == "br":
        return bytes(brotli.decompress(data))
    assert encoding == "zstd", encoding
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


def handlers(calls: list[str]) -> dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]]:
    """The upstream's paths: each answers one case the filter decides on."""

    def plain(body: bytes, **headers: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            calls.append(request.path)
            return web.Response(body=body, headers=headers)

        return handle

    async def streamed(request: web.Request) -> web.StreamResponse:
        calls.append(request.path)
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        for i in range(0, len(TEXT), 7000):
            await response.write(TEXT[i : i + 7000])
        await response.write_eof()
        return response

    async def short_stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        await response.write(b"tiny")
        await response.write_eof()
        return response

    text = {"Content-Type": "text/plain; charset=utf-8"}
    return {
        "/text": plain(TEXT, **text, ETag='"v1"', Vary="Cookie", **{"Accept-Ranges": "bytes"}),
        "/json": plain(JSON, **{"Content-Type": "application/json"}),
        "/small": plain(b"x" * 100, **text),
        "/png": plain(TEXT, **{"Content-Type": "image/png"}),
        "/encoded": plain(gzip.compress(TEXT), **text, **{"Content-Encoding": "gzip"}),
        "/no-transform": plain(TEXT, **text, **{"Cache-Control": "no-transform"}),
        "/events": plain(TEXT, **{"Content-Type": "text/event-stream"}),
        "/grpc": plain(TEXT, **{"Content-Type": "application/grpc"}),
        "/vary-star": plain(TEXT, **text, Vary="*"),
        "/weak": plain(TEXT, **text, ETag='W/"w1"'),
        "/stream": streamed,
        "/short-stream": short_stream,
        "/nocontent": plain(b"", **{"Content-Type": "text/plain"}),
    }


async def start(
    proxy: MakeProxy, recorders: MakeRecorder, options: dict[str, Any] | None = None, **extra: Any
) -> tuple[ProxyServer, list[str]]:
    calls: list[str] = []
    up = await recorders("a", handlers(calls))
    route = {
        "match": {"path_prefix": "/"},
        "pool": "main",
        "filters": [{"compress": options or {}}],
        **extra,
    }
    server = await proxy(
        make_config(
            [up.url],
            listener=H2C,
            routes=[route],
        )
    )
    return server, calls


def url(server: ProxyServer, path: str) -> str:
    return f"http://{HOST}:{server.listeners[0].port}{path}"


async def raw_get(
    server: ProxyServer, path: str, *headers: str, method: str = "GET"
) -> tuple[int, dict[bytes, bytes], bytes]:
    """One HTTP/1.1 request on a raw socket; the body as it came (de-chunked)."""
    reader, writer = await asyncio.open_connection(HOST, server.listeners[0].port)
    try:
        lines = "".join(f"{h}\r\n" for h in headers)
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\n{lines}\r\n".encode())
        if method == "HEAD":
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:] if line)
            return status, {k.lower(): v for k, v in fields.items()}, b""
        line, got, body = await read_response(reader)
        return int(line[9:12]), got, body
    finally:
        writer.close()


async def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    assert shutil.which("curl"), "curl is needed (apt-get install curl)"
    return await asyncio.to_thread(
        subprocess.run, ["curl", "-sS", *args], capture_output=True, timeout=20
    )


# --- negotiated encodings, decoded by real clients ----------------------------------------


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
async def test_each_encoding_decodes_to_the_upstreams_bytes_over_http1(
    proxy: MakeProxy, recorders: MakeRecorder, encoding: str
) -> None:
    server, _ = await start(proxy, recorders)
    status, headers, body = await raw_get(server, "/text", f"Accept-Encoding: {encoding}")
    assert status == 200
    assert headers[b"content-encoding"] == encoding.encode()
    assert b"content-length" not in headers and headers[b"transfer-encoding"] == b"chunked"
    assert headers[b"vary"] == b"Cookie, Accept-Encoding"
    assert headers[b"etag"] == b'W/"v1"'
    assert b"accept-ranges" not in headers
    assert len(body) < len(TEXT) // 4
    assert decode(encoding, body) == TEXT


async def test_curl_compressed_over_http1_and_http2(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    server, _ = await start(proxy, recorders)
    for path, original in (("/text", TEXT), ("/json", JSON), ("/stream", TEXT)):
        for proto in ("--http1.1", "--http2-prior-knowledge"):
            done = await curl(
                proto,
                "--compressed",
                "-D",
                "-",
                "-o",
                "/dev/null",
                "-w",
                "%{size_download}",
                url(server, path),
            )
            assert done.returncode == 0, done.stderr
            head = done.stdout.lower()
            assert b"content-encoding: zstd" in head, head  # curl offers deflate, gzip, br, zstd
            assert b"content-length" not in head
            body = await curl(proto, "--compressed", url(server, path))
            assert body.stdout == original


async def test_httpx_over_http2_decodes_each_encoding(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    server, _ = await start(proxy, recorders)
    async with httpx.AsyncClient(http1=False, http2=True) as client:
        for encoding in ("gzip", "br", "zstd"):
            r = await client.get(url(server, "/stream"), headers={"Accept-Encoding": encoding})
            assert r.http_version == "HTTP/2"
            assert r.headers["content-encoding"] == encoding
            assert "content-length" not in r.headers
            assert r.content == TEXT


# --- negotiation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("gzip, br, zstd", "zstd"),  # the server's order among equals
        ("gzip;q=1, br;q=0.5, zstd;q=0.1", "gzip"),  # the client's q-values first
        ("zstd;q=0, br;q=0, gzip", "gzip"),  # q=0 refuses
        ("*", "zstd"),
        ("*;q=0.5, br", "br"),
        ("gzip;q=0.5, identity", None),  # identity named and preferred
        ("identity", None),
        ("deflate", None),  # nothing offered is accepted
        ("gzip;q=2", None),  # a malformed q-value refuses
        ("GZIP", "gzip"),
        ("x-gzip", "gzip"),
        ("", None),
    ],
)
async def test_accept_encoding_picks_the_encoding(
    proxy: MakeProxy, recorders: MakeRecorder, accept: str, expected: str | None
) -> None:
    server, _ = await start(proxy, recorders)
    status, headers, body = await raw_get(server, "/text", f"Accept-Encoding: {accept}")
    assert status == 200
    assert headers.get(b"content-encoding") == (expected.encode() if expected else None)
    assert decode(expected, body) == TEXT
    assert headers[b"vary"] == b"Cookie, Accept-Encoding"  # whatever was chosen


async def test_no_accept_encoding_is_not_compressed(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    server, _ = await start(proxy, recorders)
    status, headers, body = await raw_get(server, "/text")
    assert (status, body) == (200, TEXT)
    assert b"content-encoding" not in headers and headers[b"content-length"] == b"%d" % len(TEXT)
    assert headers[b"etag"] == b'"v1"'  # not compressed: the strong one stays


async def test_the_configured_encodings_and_their_order(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    server, _ = await start(proxy, recorders, {"encodings": ["gzip", "br"]})
    _, headers, body = await raw_get(server, "/text", "Accept-Encoding: zstd, br, gzip")
    assert headers[b"content-encoding"] == b"gzip"
    assert decode("gzip", body) == TEXT
    _, headers, _ = await raw_get(server, "/text", "Accept-Encoding: zstd")
    assert b"content-encoding" not in headers


async def test_hostile_accept_encoding_headers(proxy: MakeProxy, recorders: MakeRecorder) -> None:
    server, _ = await start(proxy, recorders)
    huge = ", ".join(f"x-{i};q=0.{i % 10}" for i in range(1500))  # beyond MAX_ITEMS
    for accept in (
        huge + ", gzip",
        "gzip;q=;q=;;;,,,",
        ";;;,,,",
        "gzip;q=0.0001",
        "gzip;q=-1",
        "gzip;q=nan",
        "gzip;q=1e3",
        "br;q=0.999, gzip;q=1.000",
    ):
        status, headers, body = await raw_get(server, "/text", f"Accept-Encoding: {accept}")
        assert status == 200
        assert decode(headers.get(b"content-encoding", b"").decode() or None, body) == TEXT
    _, headers, _ = await raw_get(server, "/text", "Accept-Encoding: br;q=0.999, gzip;q=1.000")
    assert headers[b"content-encoding"] == b"gzip"
    _, headers, _ = await raw_get(server, "/text", "Accept-Encoding: gzip;q=1e3")
    assert b"content-encoding" not in headers
    # several lines of Accept-Encoding count as one list
    _, headers, _ = await raw_get(
        server, "/text", "Accept-Encoding: gzip;q=0.5", "Accept-Encoding: br"
    )
    assert headers[b"content-encoding"] == b"br"


# --- never compressed -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/small", "/png", "/no-transform", "/events", "/grpc", "/nocontent"]
)
async def test_responses_that_are_never_compressed(
    proxy: MakeProxy, recorders: MakeRecorder, path: str
) -> None:
    server, _ = await start(proxy, recorders)
    status, headers, body = await raw_get(server, path, "Accept-Encoding: gzip, br, zstd")
    assert status == 200
    assert b"content-encoding" not in headers
    assert b"accept-encoding" not in headers.get(b"vary", b"").lower()
    assert headers[b"content-length"] == b"%d" % len(body)


async def test_an_encoded_response_passes_as_it_is(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    server, _ = await start(proxy, recorders)
    _, headers, body = await raw_get(server, "/encoded", "Accept-Encoding: gzip, br, zstd")
    assert headers[b"content-encoding"] == b"gzip"
    assert gzip.decompress(body) == TEXT  # once, not twice


async def test_head_range_and_the_upstreams_accept_encoding(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    calls: list[str] = []
    up = await recorders("a", handlers(calls))
    route = {"match": {"path_prefix": "/"}, "pool": "main", "filters": [{"compress": {}}]}
    server = await proxy(make_config([up.url], routes=[route]))
    status, headers, _ = await raw_get(server, "/text", "Accept-Encoding: gzip", method="HEAD")
    assert status == 200 and b"content-encoding" not in headers
    assert headers[b"content-length"] == b"%d" % len(TEXT)
    status, headers, body = await raw_get(
        server, "/text", "Accept-Encoding: gzip", "Range: bytes=0-99"
    )
    # (this upstream ignores Range: its whole 200 goes as it is, for a Range request)
    assert status == 200 and body == TEXT and b"content-encoding" not in headers
    await raw_get(server, "/text", "Accept-Encoding: gzip, deflate, br, zstd")
    # the upstream is asked for what the client gets: the chosen encoding, or identity
    assert [s.headers["Accept-Encoding"] for s in up.seen] == ["identity", "identity", "zstd"]


async def test_vary_star_is_kept_and_a_weak_etag_stays_weak(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    server, _ = await start(proxy, recorders)
    _, headers, body = await raw_get(server, "/vary-star", "Accept-Encoding: gzip")
    assert headers[b"vary"] == b"*" and headers[b"content-encoding"] == b"gzip"
    _, headers, body = await raw_get(server, "/weak", "Accept-Encoding: gzip")
    assert headers[b"etag"] == b'W/"w1"' and headers[b"vary"] == b"Accept-Encoding"
    assert gzip.decompress(body) == TEXT


async def test_min_size_and_types(proxy: MakeProxy, recorders: MakeRecorder) -> None:
    server, _ = await start(proxy, recorders, {"min_size": "64", "types": ["image/*"]})
    _, headers, _ = await raw_get(server, "/small", "Accept-Encoding: gzip")
    assert b"content-encoding" not in headers  # text/plain is not listed now
    _, headers, body = await raw_get(server, "/png", "Accept-Encoding: gzip")
    assert headers[b"content-encoding"] == b"gzip" and gzip.decompress(body) == TEXT


async def test_a_short_body_of_unknown_length_is_compressed(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    """The choice (ARCHITECTURE.md): a chunked body's size is unknown when its head is
    sent, and holding the head would stall a stream: it is compressed whatever its size."""
    server, _ = await start(proxy, recorders)
    _, headers, body = await raw_get(server, "/short-stream", "Accept-Encoding: gzip")
    assert headers[b"content-encoding"] == b"gzip" and gzip.decompress(body) == b"tiny"


async def test_http1_0_client_gets_a_close_delimited_compressed_body(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    server, _ = await start(proxy, recorders)
    reader, writer = await asyncio.open_connection(HOST, server.listeners[0].port)
    writer.write(b"GET /text HTTP/1.0\r\nAccept-Encoding: gzip\r\n\r\n")
    data = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Content-Encoding: gzip" in head and b"Content-Length" not in head
    assert gzip.decompress(body) == TEXT


# --- streaming: flushed per read, and back-pressure --------------------------------------------


async def test_each_upstream_read_is_flushed_to_the_client(
    proxy: MakeProxy, raw_upstreams: RawUpstreams
) -> None:
    """A streamed response is never held in the compressor: each piece the upstream
    sends reaches the client, decodable, before the next is sent."""
    gate = asyncio.Event()

    up = RawUpstream({})

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n"
        )
        await writer.drain()
        await gate.wait()
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        await writer.drain()
        writer.close()

    server_ = await asyncio.start_server(handle, HOST, 0)
    port = server_.sockets[0].getsockname()[1]
    route = {"match": {"path_prefix": "/"}, "pool": "main", "filters": [{"compress": {}}]}
    server = await proxy(make_config([f"http://{HOST}:{port}"], routes=[route]))
    reader, writer = await asyncio.open_connection(HOST, server.listeners[0].port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n")
    await reader.readuntil(b"\r\n\r\n")
    d = zlib.decompressobj(31)
    got = b""
    try:
        async with asyncio.timeout(10):
            while got != b"first":
                size = int(await reader.readuntil(b"\r\n"), 16)
                got += d.decompress((await reader.readexactly(size + 2))[:-2])
    finally:
        gate.set()
    async with asyncio.timeout(10):
        while True:
            size = int(await reader.readuntil(b"\r\n"), 16)
            chunk = await reader.readexactly(size + 2)
            if not size:
                break
            got += d.decompress(chunk[:-2])
    assert got + d.flush() == b"firstsecond"
    writer.close()
    server_.close()
    del up


async def test_trailers_follow_the_whole_compressed_body(
    proxy: MakeProxy, raw_upstreams: RawUpstreams
) -> None:
    body = TEXT[:5000]
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 1000]), body[i : i + 1000])
        for i in range(0, len(body), 1000)
    )
    response = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n"
        b"Trailer: X-Sum\r\n\r\n" + chunks + b"0\r\nX-Sum: 42\r\n\r\n"
    )
    up = await raw_upstreams({b"/t": response})
    route = {"match": {"path_prefix": "/"}, "pool": "main", "filters": [{"compress": {}}]}
    server = await proxy(make_config([up.url], routes=[route]))
    reader, writer = await asyncio.open_connection(HOST, server.listeners[0].port)
    writer.write(b"GET /t HTTP/1.1\r\nHost: x\r\nTE: trailers\r\nAccept-Encoding: gzip\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert b"Content-Encoding: gzip" in head
    got = b""
    async with asyncio.timeout(10):
        while True:
            size = int(await reader.readuntil(b"\r\n"), 16)
            if not size:
                break
            got += (await reader.readexactly(size + 2))[:-2]
        trailer = await reader.readuntil(b"\r\n\r\n")
    assert gzip.decompress(got) == body
    assert trailer.lower() == b"x-sum: 42\r\n\r\n"
    writer.close()


async def test_a_client_that_does_not_read_holds_the_upstream(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    """64 MiB of text that compresses about 2x, to a client that reads nothing: the
    upstream is held (the client's write buffer fills, as for any response), and what
    the proxy holds stays bounded, never the whole compressed body."""
    noise = b"".join(hashlib.sha256(b"%d" % i).hexdigest().encode() for i in range(8192))
    rounds = 64 * 1024 * 1024 // len(noise)
    sent = [0]

    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        for _ in range(rounds):
            await response.write(noise)
            sent[0] += len(noise)
        await response.write_eof()
        return response

    up = await recorders("a", {"/huge": huge})
    route = {"match": {"path_prefix": "/"}, "pool": "main", "filters": [{"compress": {}}]}
    server = await proxy(make_config([up.url], routes=[route]))
    reader, writer = await asyncio.open_connection(HOST, server.listeners[0].port, limit=64 * 1024)
    writer.write(b"GET /huge HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n")
    await wait_for(lambda: sent[0] > 0)
    loop = asyncio.get_running_loop()
    last = [sent[0], loop.time()]  # the upstream's count, and when it last grew

    def stalled() -> bool:  # the upstream could write nothing for 0.3 s
        if sent[0] != last[0]:
            last[:] = [sent[0], loop.time()]
        return loop.time() - last[1] >= 0.3

    await wait_for(stalled, 20.0)
    conn = next(iter(server.listeners[0].connections))
    buffered = conn.transport.get_write_buffer_size()
    assert buffered <= 2 * 1024 * 1024, buffered
    # kernel buffers, the water marks and the compressor's window: not the 64 MiB
    assert sent[0] < 24 * 1024 * 1024, sent[0]
    d = zlib.decompressobj(31)  # now read it all: it decodes to what was sent
    await reader.readuntil(b"\r\n\r\n")
    total = 0
    async with asyncio.timeout(60):
        while True:
            size = int(await reader.readuntil(b"\r\n"), 16)
            chunk = await reader.readexactly(size + 2)
            if not size:
                break
            total += len(d.decompress(chunk[:-2]))
    assert total == rounds * len(noise) == sent[0]
    writer.close()


async def test_an_http2_client_that_does_not_read_holds_its_stream_upstream(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    """The same over HTTP/2: the compressed stream waits in the stream up to its high
    water mark and then the upstream is not read; the connection's other streams go on."""
    # hex of random bytes: about 2x smaller compressed, and no repeats for a window to find
    pieces = [random.Random(i).randbytes(128 * 1024).hex().encode() for i in range(128)]
    sent = [0]

    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        for piece in pieces:
            await response.write(piece)
            sent[0] += len(piece)
        await response.write_eof()
        return response

    up = await recorders("a", {"/huge": huge})
    route = {"match": {"path_prefix": "/"}, "pool": "main", "filters": [{"compress": {}}]}
    server = await proxy(make_config([up.url], listener=H2C, routes=[route]))
    client = await H2Client.open(server.listeners[0].port)
    try:
        sid = client.start("/huge", headers=[(b"accept-encoding", b"zstd")])
        client.held.add(sid)
        await wait_for(lambda: len(client.replies[sid].body) == 65535, 10)
        h2 = next(c for c in server.listeners[0].connections if isinstance(c, H2Server))
        stream = h2.streams[sid]
        await wait_for(lambda: stream.write_paused, 10)  # the upstream is no longer read
        assert stream.body_size <= STREAM_HIGH_WATER + 256 * 1024
        other = await client.request("/other")
        assert other.status == 200 and bytes(other.body) == b"a"
        assert sent[0] < 16 * 1024 * 1024, sent[0]  # not the 32 MiB
        assert stream.body_size <= STREAM_HIGH_WATER + 256 * 1024
        client.release(sid)
        reply = await client.reply(sid, timeout=60)
    finally:
        await client.close()
    assert reply.status == 200 and (b"content-encoding", b"zstd") in reply.headers
    assert decode("zstd", bytes(reply.body)) == b"".join(pieces)


# --- with a route cache ------------------------------------------------------------------------


async def test_the_cache_stores_each_encoding_once_and_serves_it_without_compressing(
    proxy: MakeProxy, recorders: MakeRecorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _stored_once(proxy, recorders, monkeypatch, {})


async def test_the_redis_cache_stores_each_encoding_once_too(
    proxy: MakeProxy,
    recorders: MakeRecorder,
    monkeypatch: pytest.MonkeyPatch,
    redis_server: Any,
) -> None:
    await _stored_once(
        proxy, recorders, monkeypatch, {"store": {"type": "redis", "url": redis_server.url}}
    )


async def _stored_once(
    proxy: MakeProxy, recorders: MakeRecorder, monkeypatch: pytest.MonkeyPatch, spec: dict[str, Any]
) -> None:
    calls: list[str] = []

    async def cacheable(request: web.Request) -> web.Response:
        calls.append(request.path)
        return web.Response(
            body=TEXT, headers={"Content-Type": "text/plain", "Cache-Control": "max-age=60"}
        )

    up = await recorders("a", {"/c": cacheable})
    config = make_config([up.url], listener=H2C, routes=[CACHED_ROUTE], caches={"main": spec})
    server = await proxy(config)
    compressions: list[bytes] = []
    original = Compress.encode

    def counting(self: Compress, *args: Any) -> Any:
        out = original(self, *args)
        if out is not None and out[1] is not None:
            compressions.append(args[0].encoding)
        return out

    monkeypatch.setattr(Compress, "encode", counting)
    seen: dict[str, bytes] = {}
    for accept in (
        "gzip",
        "gzip",
        "br",
        "zstd",
        "identity",
        "gzip, deflate",
        "br;q=1, gzip;q=0.5",
        "zstd",
        "",
    ):
        extra = (f"Accept-Encoding: {accept}",) if accept else ()
        status, headers, body = await raw_get(server, "/c", *extra)
        encoding = headers.get(b"content-encoding", b"").decode() or None
        assert status == 200 and decode(encoding, body) == TEXT
        assert headers[b"vary"] == b"Accept-Encoding"
        if encoding in seen:  # a hit: the stored bytes
            assert body == seen[encoding], accept
            assert b"hit" in headers[b"cache-status"], (accept, headers[b"cache-status"])
        seen[encoding or "identity"] = body
    # one upstream request and one compression per encoding; identity is stored once too
    assert sorted(compressions) == [b"br", b"gzip", b"zstd"]
    assert calls == ["/c"] * 4
    # over HTTP/2 the stored gzip bytes too
    async with httpx.AsyncClient(http1=False, http2=True) as client:
        r = await client.get(url(server, "/c"), headers={"Accept-Encoding": "gzip"})
        assert r.headers["content-encoding"] == "gzip" and r.content == TEXT
        assert "hit" in r.headers["cache-status"]
    assert len(compressions) == 3 and len(calls) == 4


async def test_a_revalidated_compressed_entry_keeps_its_weak_etag(
    proxy: MakeProxy, recorders: MakeRecorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str | None] = []

    async def revalidated(request: web.Request) -> web.Response:
        asked.append(request.headers.get("If-None-Match"))
        headers = {"ETag": '"r1"', "Cache-Control": "max-age=0"}
        if request.headers.get("If-None-Match") in ('W/"r1"', '"r1"'):
            return web.Response(status=304, headers=headers)
        return web.Response(body=TEXT, headers={**headers, "Content-Type": "text/plain"})

    up = await recorders("a", {"/r": revalidated})
    server = await proxy(make_config([up.url], routes=[CACHED_ROUTE], caches={"main": {}}))
    compressions = []
    original = Coder.__init__

    def counting(self: Coder, *args: Any) -> None:
        compressions.append(args[0])
        original(self, *args)

    monkeypatch.setattr(Coder, "__init__", counting)
    for _ in range(3):
        status, headers, body = await raw_get(server, "/r", "Accept-Encoding: gzip")
        assert status == 200 and headers[b"content-encoding"] == b"gzip"
        assert headers[b"etag"] == b'W/"r1"' and gzip.decompress(body) == TEXT
    assert asked == [None, 'W/"r1"', 'W/"r1"']  # revalidated with the stored validator
    assert compressions == [b"gzip"]  # the 304s refreshed the stored gzip body


async def test_a_background_refresh_stores_the_variant_compressed(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    """A stale-while-revalidate hit refreshes its entry behind the client's back; the
    refreshed gzip variant is stored compressed as the first one was."""
    calls: list[str | None] = []

    async def stale(request: web.Request) -> web.Response:
        calls.append(request.headers.get("Accept-Encoding"))
        headers = {
            "Content-Type": "text/plain",
            "Age": "100",  # stale from the start
            "Cache-Control": "max-age=50, stale-while-revalidate=1000",
        }
        return web.Response(body=TEXT, headers=headers)

    up = await recorders("a", {"/s": stale})
    server = await proxy(make_config([up.url], routes=[CACHED_ROUTE], caches={"main": {}}))
    cache = server.caches["main"]
    for i in range(3):
        status, headers, body = await raw_get(server, "/s", "Accept-Encoding: gzip")
        assert status == 200 and headers[b"content-encoding"] == b"gzip", (i, headers)
        assert gzip.decompress(body) == TEXT
        await wait_for(lambda i=i: cache.stored == i + 1 and not cache.flights)
    assert calls == ["gzip"] * 3  # the first, and two refreshes


# --- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"encodings": ["gzip", "gzip"]}, "listed twice"),
        ({"encodings": ["deflate"]}, "'zstd', 'br' or 'gzip'"),
        ({"encodings": []}, "at least 1"),
        ({"types": ["text"]}, "not a content type pattern"),
        ({"levels": {"gzip": 12}}, "not within 1-9"),
        ({"min_size": "lots"}, "invalid size"),
    ],
)
def test_bad_options_are_config_errors(options: dict[str, Any], message: str) -> None:
    from pydantic import ValidationError

    route = {"match": {"path_prefix": "/"}, "pool": "main", "filters": [{"compress": options}]}
    with pytest.raises(ValidationError, match=message):
        make_config(["http://127.0.0.1:1"], routes=[route])


def test_an_encoding_whose_package_is_missing_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    from pydantic import ValidationError

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "brotli" else real(name, *a)
    )
    route = {"match": {"path_prefix": "/"}, "pool": "main", "filters": [{"compress": {}}]}
    config = make_config(["http://127.0.0.1:1"], routes=[route])  # the default leaves it out
    spec = config.listeners[0].routes[0].filters[0]
    assert spec.encodings == ["zstd", "gzip"]  # type: ignore[union-attr]
    route["filters"] = [{"compress": {"encodings": ["br", "gzip"]}}]
    with pytest.raises(ValidationError, match=r"br needs the brotli package"):
        make_config(["http://127.0.0.1:1"], routes=[route])
