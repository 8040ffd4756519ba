"""Every error status the proxy makes, over real sockets (proxy and upstreams on 127.0.0.1:0).

Each test sends what a misbehaving client or upstream would, checks the answer a user
sees (status, ``Connection: close``, whether the connection was closed, a short text
body and never a traceback) and then checks that the proxy still serves a normal
request on a new connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from proxy.runtime.server import ProxyServer
from tests.support import (
    HOST,
    Recorder,
    make_config,
    raw_exchange,
    read_response,
    unused_port,
    wait_for,
)

MakeProxy = Callable[[Any], Awaitable[ProxyServer]]
MakeRecorder = Callable[..., Awaitable[Recorder]]

GOOD = b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n"
#: Short timeouts so that timer cases finish quickly (ticks are a quarter of these).
FAST_LISTENER = {"timeouts": {"header": "300ms", "body": "300ms", "idle": "5s"}}


# -- helpers ---------------------------------------------------------------------------------


def parse(data: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """Split one response (everything up to EOF): status, lower-cased headers, body."""
    assert b"\r\n\r\n" in data, f"no complete response head in {data[:200]!r}"
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    version, status, _ = lines[0].split(b" ", 2)
    assert version == b"HTTP/1.1", lines[0]
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return int(status), headers, body


def assert_short_error(data: bytes, status: int) -> dict[bytes, bytes]:
    """One error response from the proxy itself, then close: short text, never a traceback."""
    got, headers, body = parse(data)
    assert got == status, data[:300]
    assert headers[b"content-type"].startswith(b"text/plain")
    assert int(headers[b"content-length"]) == len(body), "nothing may follow the error body"
    assert 0 < len(body) < 200
    assert body.startswith(str(status).encode())
    assert b"Traceback" not in data and b"File \"" not in data
    assert headers.get(b"connection") == b"close"
    return headers


async def send_and_read_to_eof(port: int, data: bytes) -> bytes:
    """Send ``data`` and read until the proxy closes (fails if it does not within 5 s)."""
    return await raw_exchange(port, data, timeout=5.0)


async def responses(
    port: int, data: bytes, count: int = 1
) -> list[tuple[bytes, dict[bytes, bytes], bytes]]:
    """Send ``data`` on a new connection and read ``count`` responses (5 s each)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(data)
        return [await asyncio.wait_for(read_response(reader), 5.0) for _ in range(count)]
    finally:
        writer.close()
        await writer.wait_closed()


async def assert_still_serving(port: int, host: bytes = b"example.test") -> None:
    """A normal request on a new connection gets the upstream's 200."""
    [(status, _, _)] = await responses(port, b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host)
    assert status == b"HTTP/1.1 200 OK"


class Uploader(asyncio.Protocol):
    """A client that keeps what the proxy answered even if the proxy cuts its upload short.

    (A ``StreamReader`` raises on a broken pipe before returning what it had read.)
    """

    def __init__(self) -> None:
        self.received = b""
        self.closed = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self._can_write: asyncio.Future[None] | None = None

    @classmethod
    async def connect(cls, port: int) -> Uploader:
        _, protocol = await asyncio.get_running_loop().create_connection(cls, HOST, port)
        return protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received += data

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        self.resume_writing()

    def pause_writing(self) -> None:
        self._can_write = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._can_write is not None and not self._can_write.done():
            self._can_write.set_result(None)

    async def send(self, data: bytes) -> bool:
        """Write with flow control; False once the connection is gone."""
        if self.closed.done():
            return False
        assert self.transport is not None
        self.transport.write(data)
        if self._can_write is not None:
            await self._can_write
        return not self.closed.done()

    async def response_head(self, timeout: float = 5.0) -> bytes:
        """The status line of the first response, once its head has arrived (or EOF)."""
        await wait_for(lambda: b"\r\n\r\n" in self.received or self.closed.done(), timeout)
        return self.received.partition(b"\r\n")[0]

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def start_with(
    proxy: MakeProxy, recorders: MakeRecorder, **config: Any
) -> tuple[ProxyServer, int, Recorder]:
    """A proxy whose ``main`` pool is one healthy recorder (plus whatever ``config`` adds)."""
    rec = await recorders("healthy")
    config.setdefault("listener", FAST_LISTENER)
    server = await proxy(make_config([rec.url], **config))
    return server, server.listeners[0].port, rec


def via_pool(prefix: str, url: str, **pool: Any) -> dict[str, Any]:
    """Config keys sending ``prefix`` to a pool ``faulty`` at ``url``, the rest to ``main``."""
    return {
        "routes": [
            {"match": {"path_prefix": prefix}, "pool": "faulty"},
            {"match": {"path_prefix": "/"}, "pool": "main"},
        ],
        "pools": {"faulty": {"upstreams": [{"url": url}], **pool}},
    }


# -- the client sends something the proxy must refuse --------------------------------------

BAD_REQUESTS = {
    "garbage request line": b"THIS IS NOT HTTP\r\n\r\n",
    "extra word after version": b"GET / HTTP/1.1 extra\r\nHost: a\r\n\r\n",
    "space inside target": b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
    "unknown version": b"GET / HTTP/1.x\r\nHost: a\r\n\r\n",
    "invalid header name": b"GET / HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n",
    "space before colon": b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
    "control char in header value": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x01b\r\n\r\n",
    "NUL in header value": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x00b\r\n\r\n",
    "obsolete line folding": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\r\n b\r\n\r\n",
    "content-length with transfer-encoding": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "differing content-lengths": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"
    ),
    "identical duplicate content-lengths": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc"
    ),
    "negative content-length": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
    "content-length overflow": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\n"
    ),
    "transfer-encoding not ending in chunked": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"
    ),
    "bare LF line endings": b"GET / HTTP/1.1\nHost: a\n\n",
    "bare LF after a header": b"GET / HTTP/1.1\r\nHost: a\n\r\n",
    "HTTP/1.1 without Host": b"GET / HTTP/1.1\r\n\r\n",
    "two Host headers": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "absolute-form for a host no route names": (
        b"GET http://evil.example/ HTTP/1.1\r\nHost: evil.example\r\n\r\n"
    ),
}


@pytest.mark.parametrize("request_bytes", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
async def test_malformed_request_head_gets_400_and_close(
    proxy: MakeProxy, recorders: MakeRecorder, request_bytes: bytes
) -> None:
    # A catch-all route exists: a refused request would have had somewhere to go.
    _, port, rec = await start_with(proxy, recorders)

    data = await send_and_read_to_eof(port, request_bytes)

    assert_short_error(data, 400)
    await assert_still_serving(port)
    assert [s.path for s in rec.seen] == ["/"], "only the later good request was forwarded"


@pytest.mark.parametrize(
    "chunk_size_line", [b"zz\r\n", b"5 x\r\n", b"-5\r\n", b"ffffffffffffffffffffff\r\n"]
)
async def test_invalid_chunk_size_gets_400_and_close(
    proxy: MakeProxy, recorders: MakeRecorder, chunk_size_line: bytes
) -> None:
    _, port, _ = await start_with(proxy, recorders)
    head = b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"

    data = await send_and_read_to_eof(port, head + chunk_size_line + b"hello\r\n0\r\n\r\n")

    assert_short_error(data, 400)
    await assert_still_serving(port)


async def test_invalid_chunk_after_the_head_was_forwarded_gets_400(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    # a streamed body (no request buffering), so the head goes upstream before the chunk
    streaming = {**FAST_LISTENER, "limits": {"body_buffer_size": 0}}
    _, port, rec = await start_with(proxy, recorders, listener=streaming)
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"5\r\nhello\r\n")
        await wait_for(lambda: any(s.path == "/upload" for s in rec.seen))

        writer.write(b"not-hex\r\n")
        data = await asyncio.wait_for(reader.read(), 5.0)
    finally:
        writer.close()
        await writer.wait_closed()

    assert_short_error(data, 400)
    await assert_still_serving(port)


async def test_error_after_a_pipelined_request_is_answered_after_its_response(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    _, port, _ = await start_with(proxy, recorders)

    data = await send_and_read_to_eof(port, GOOD + b"BROKEN REQUEST\r\n\r\n")

    first, _, rest = data.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200 ")
    assert rest.startswith(b"healthy")  # the recorder's body, then the 400
    assert_short_error(rest[len(b"healthy"):], 400)


async def test_absolute_form_for_a_routed_host_is_forwarded_in_origin_form(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    routes = [{"match": {"host": "api.test"}, "pool": "main"}]
    _, port, rec = await start_with(proxy, recorders, routes=routes)
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(b"GET http://api.test/items?page=2 HTTP/1.1\r\nHost: other.test\r\n\r\n")
        status, _, body = await asyncio.wait_for(read_response(reader), 5.0)
    finally:
        writer.close()
        await writer.wait_closed()

    assert status == b"HTTP/1.1 200 OK"
    assert body == b"healthy"
    assert rec.seen[0].path == "/items?page=2"
    assert [v for n, v in rec.seen[0].raw_headers if n.lower() == b"host"] == [b"api.test"]


async def test_absolute_form_for_an_unrouted_host_is_refused_even_with_host_routes(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    routes = [{"match": {"host": "api.test"}, "pool": "main"}]
    _, port, rec = await start_with(proxy, recorders, routes=routes)

    data = await send_and_read_to_eof(
        port, b"GET http://evil.example/ HTTP/1.1\r\nHost: api.test\r\n\r\n"
    )

    assert_short_error(data, 400)
    # the answer says why, not "could not be parsed" (nginx 1.22 serves such a request
    # from its default server; aiolb is never a forward proxy)
    assert b"not a forward proxy for this host" in parse(data)[2]
    assert rec.seen == []
    await assert_still_serving(port, host=b"api.test")


async def test_connect_gets_405_with_allow(proxy: MakeProxy, recorders: MakeRecorder) -> None:
    _, port, rec = await start_with(proxy, recorders)

    data = await send_and_read_to_eof(
        port, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
    )

    headers = assert_short_error(data, 405)
    assert b"GET" in headers[b"allow"]
    assert rec.seen == []
    await assert_still_serving(port)


async def test_trace_gets_405_with_allow_and_never_reaches_the_upstream(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    # nginx 1.22 answers TRACE with 405 (no Allow); forwarded, the upstream's echo would
    # show the client's cookies and the proxy's own headers (issue 27, item 11)
    _, port, rec = await start_with(proxy, recorders)
    (status, headers, body), (after, _, _) = await responses(port, (
        b"TRACE /x HTTP/1.1\r\nHost: example.test\r\nCookie: s=1\r\nMax-Forwards: 3\r\n\r\n"
        + GOOD
    ), 2)  # fmt: skip

    assert status == b"HTTP/1.1 405 Method Not Allowed"
    assert b"TRACE" not in headers[b"allow"] and b"GET" in headers[b"allow"]
    assert body == b"405 Method Not Allowed: aiolb does not forward TRACE\n"
    assert after == b"HTTP/1.1 200 OK", "the connection is kept"
    assert [s.method for s in rec.seen] == ["GET"]


async def test_options_with_max_forwards_0_is_answered_by_the_proxy(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    # RFC 9110 7.6.2: the recipient of Max-Forwards 0 is the final one (nginx 1.22
    # forwards it unchanged)
    _, port, rec = await start_with(proxy, recorders)
    [(status, headers, body)] = await responses(
        port, b"OPTIONS /x HTTP/1.1\r\nHost: example.test\r\nMax-Forwards: 0\r\n\r\n"
    )

    assert status == b"HTTP/1.1 200 OK"
    assert headers[b"allow"] == b"GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS"
    assert (headers[b"content-length"], body) == (b"0", b"")
    assert rec.seen == []


async def test_options_max_forwards_is_decremented_when_forwarded(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    _, port, rec = await start_with(proxy, recorders)
    for sent in (b"Max-Forwards: 5\r\n", b"Max-Forwards: x\r\n", b""):
        [(status, _, _)] = await responses(
            port, b"OPTIONS /x HTTP/1.1\r\nHost: example.test\r\n%s\r\n" % sent
        )
        assert status == b"HTTP/1.1 200 OK"

    assert [s.method for s in rec.seen] == ["OPTIONS"] * 3
    assert [s.headers.get("Max-Forwards") for s in rec.seen] == ["4", "x", None]


async def test_options_asterisk_is_answered_by_the_proxy_behind_a_catch_all_route(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    # nginx 1.22 answers ``OPTIONS *`` with 400; aiolb was 404 (issue 27, item 12)
    _, port, rec = await start_with(proxy, recorders)
    (status, headers, body), (after, _, _) = await responses(
        port, b"OPTIONS * HTTP/1.1\r\nHost: example.test\r\n\r\n" + GOOD, 2
    )

    assert status == b"HTTP/1.1 200 OK"
    assert headers[b"allow"] == b"GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS"
    assert (headers[b"content-length"], body) == (b"0", b"")
    assert after == b"HTTP/1.1 200 OK"
    assert [s.method for s in rec.seen] == ["GET"]


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9"])
async def test_unsupported_http_version_gets_505(
    proxy: MakeProxy, recorders: MakeRecorder, version: bytes
) -> None:
    _, port, rec = await start_with(proxy, recorders)

    data = await send_and_read_to_eof(port, b"GET / " + version + b"\r\nHost: a\r\n\r\n")

    assert_short_error(data, 505)
    assert rec.seen == []
    await assert_still_serving(port)


async def test_no_matching_route_gets_404_and_keeps_the_connection(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    routes = [{"match": {"host": "api.test", "path_prefix": "/v1/"}, "pool": "main"}]
    _, port, rec = await start_with(proxy, recorders, routes=routes)
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(b"GET /v2/items HTTP/1.1\r\nHost: api.test\r\n\r\n")
        status, headers, body = await asyncio.wait_for(read_response(reader), 5.0)
        assert status == b"HTTP/1.1 404 Not Found"
        assert headers.get(b"connection") != b"close"
        assert b"Traceback" not in body and len(body) < 200

        writer.write(b"GET /v1/other HTTP/1.1\r\nHost: elsewhere.test\r\n\r\n")
        status, _, _ = await asyncio.wait_for(read_response(reader), 5.0)
        assert status == b"HTTP/1.1 404 Not Found"

        writer.write(b"GET /v1/items HTTP/1.1\r\nHost: api.test\r\n\r\n")
        status, _, body = await asyncio.wait_for(read_response(reader), 5.0)
        assert status == b"HTTP/1.1 200 OK"
        assert body == b"healthy"
    finally:
        writer.close()
        await writer.wait_closed()
    assert [s.path for s in rec.seen] == ["/v1/items"]


# -- limits ----------------------------------------------------------------------------------

LIMITS = {
    "timeouts": FAST_LISTENER["timeouts"],
    "limits": {"max_header_size": 2048, "max_uri_size": 256, "max_body_size": 1000},
}


async def test_header_block_over_the_limit_gets_431(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    _, port, rec = await start_with(proxy, recorders, listener=LIMITS)

    data = await send_and_read_to_eof(
        port, b"GET / HTTP/1.1\r\nHost: a\r\nX-Filler: " + b"f" * 4000 + b"\r\n\r\n"
    )

    assert_short_error(data, 431)
    assert rec.seen == []
    await assert_still_serving(port)


async def test_header_block_growing_past_the_limit_in_small_writes_gets_431(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    _, port, _ = await start_with(proxy, recorders, listener=LIMITS)
    head = b"GET / HTTP/1.1\r\nHost: a\r\nX-Filler: " + b"f" * 3000
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        for i in range(0, 2000, 50):  # still under max_header_size (2048): no answer yet
            writer.write(head[i : i + 50])
            await writer.drain()
        writer.write(head[2000:2100])  # the head is unfinished, but already too large
        data = await asyncio.wait_for(reader.read(), 5.0)
    finally:
        writer.close()
        await writer.wait_closed()

    assert_short_error(data, 431)
    await assert_still_serving(port)


async def test_many_headers_over_the_limit_get_431(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    _, port, _ = await start_with(proxy, recorders, listener=LIMITS)
    filler = b"".join(b"X-H%d: v\r\n" % i for i in range(400))

    data = await send_and_read_to_eof(port, b"GET / HTTP/1.1\r\nHost: a\r\n" + filler + b"\r\n")

    assert_short_error(data, 431)
    await assert_still_serving(port)


async def test_uri_over_the_limit_gets_414(proxy: MakeProxy, recorders: MakeRecorder) -> None:
    _, port, rec = await start_with(proxy, recorders, listener=LIMITS)

    long_target = b"/" + b"u" * 1000
    data = await send_and_read_to_eof(port, b"GET " + long_target + b" HTTP/1.1\r\nHost: a\r\n\r\n")

    assert_short_error(data, 414)
    assert rec.seen == []
    await assert_still_serving(port)


async def test_content_length_over_the_limit_gets_413_before_the_body(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    _, port, rec = await start_with(proxy, recorders, listener=LIMITS)

    data = await send_and_read_to_eof(
        port, b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n\r\n"
    )

    assert_short_error(data, 413)
    assert rec.seen == []
    await assert_still_serving(port)


async def test_body_at_the_limit_is_forwarded(proxy: MakeProxy, recorders: MakeRecorder) -> None:
    _, port, rec = await start_with(proxy, recorders, listener=LIMITS)
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n")
        writer.write(b"b" * 1000)
        status, _, _ = await asyncio.wait_for(read_response(reader), 5.0)
    finally:
        writer.close()
        await writer.wait_closed()
    assert status == b"HTTP/1.1 200 OK"
    assert [s.path for s in rec.seen] == ["/upload"]


async def test_chunked_body_over_the_limit_gets_413(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    _, port, _ = await start_with(proxy, recorders, listener=LIMITS)
    chunks = b"".join(b"200\r\n" + b"c" * 0x200 + b"\r\n" for _ in range(4))  # 2048 bytes

    data = await send_and_read_to_eof(
        port,
        b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunks + b"0\r\n\r\n",
    )

    assert_short_error(data, 413)
    await assert_still_serving(port)


# -- timeouts on the client side -------------------------------------------------------------


async def test_incomplete_request_head_gets_408_then_close(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    _, port, rec = await start_with(proxy, recorders)
    loop = asyncio.get_running_loop()
    started = loop.time()

    data = await send_and_read_to_eof(port, b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ")

    assert loop.time() - started >= 0.2  # the timeout, less at most one tick
    assert_short_error(data, 408)
    assert rec.seen == []
    await assert_still_serving(port)


async def test_connection_that_sends_nothing_is_closed_without_a_response(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    _, port, _ = await start_with(proxy, recorders)

    data = await send_and_read_to_eof(port, b"")

    assert data == b""
    await assert_still_serving(port)


async def test_stalled_request_body_gets_408(proxy: MakeProxy, recorders: MakeRecorder) -> None:
    _, port, _ = await start_with(proxy, recorders)

    data = await send_and_read_to_eof(
        port, b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nonly-some"
    )

    assert_short_error(data, 408)
    await assert_still_serving(port)


# -- the upstream fails ------------------------------------------------------------------------


async def test_upstream_refusing_connections_gets_502(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    _, port, _ = await start_with(
        proxy, recorders, **via_pool("/down", f"http://{HOST}:{unused_port()}")
    )
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(b"GET /down HTTP/1.1\r\nHost: a\r\n\r\n")
        status, _, body = await asyncio.wait_for(read_response(reader), 5.0)
    finally:
        writer.close()
        await writer.wait_closed()

    assert status == b"HTTP/1.1 502 Bad Gateway"
    # it says what happened: nothing answered, which is not an invalid response
    assert body == b"502 Bad Gateway: no connection to the upstream could be made\n"
    await assert_still_serving(port)


async def test_a_pipelined_request_behind_another_still_times_out(
    proxy: MakeProxy, recorders: MakeRecorder, raw_upstreams: Any
) -> None:
    """The second of two pipelined requests was read whole while it waited; once it is
    sent, on a pooled connection, its response header timeout runs like any other."""
    raw = await raw_upstreams({b"/hang": None})
    _, port, _ = await start_with(
        proxy, recorders, **via_pool("/hang", raw.url, timeouts={"response_header": "300ms"})
    )
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        ok = b"GET /hang-not HTTP/1.1\r\nHost: a\r\n\r\n"  # answered at once by the same upstream
        writer.write(ok)  # leaves a pooled connection to it
        status, _, _ = await asyncio.wait_for(read_response(reader), 5.0)
        assert status == b"HTTP/1.1 200 OK"
        writer.write(ok + b"GET /hang HTTP/1.1\r\nHost: a\r\n\r\n")
        first = await asyncio.wait_for(read_response(reader), 5.0)
        second = await asyncio.wait_for(read_response(reader), 5.0)
        assert (first[0], second[0]) == (b"HTTP/1.1 200 OK", b"HTTP/1.1 504 Gateway Timeout")
    finally:
        writer.close()


async def test_upstream_that_never_answers_gets_504(
    proxy: MakeProxy, recorders: MakeRecorder, raw_upstreams: Any
) -> None:
    raw = await raw_upstreams({b"/hang": None})
    _, port, _ = await start_with(
        proxy, recorders, **via_pool("/hang", raw.url, timeouts={"response_header": "300ms"})
    )
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        started = loop.time()
        writer.write(b"GET /hang HTTP/1.1\r\nHost: a\r\n\r\n")
        status, headers, body = await asyncio.wait_for(read_response(reader), 5.0)
        assert loop.time() - started >= 0.2  # the timeout, less at most one tick
        assert status == b"HTTP/1.1 504 Gateway Timeout"
        assert body.startswith(b"504") and b"Traceback" not in body and len(body) < 200

        # The client did nothing wrong: its connection stays usable.
        assert headers.get(b"connection") != b"close"
        writer.write(GOOD)
        status, _, body = await asyncio.wait_for(read_response(reader), 5.0)
        assert (status, body) == (b"HTTP/1.1 200 OK", b"healthy")
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize(
    "answer",
    [
        b"this is not http at all\r\n\r\n",
        b"HTTP/1.1 abc Broken\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nBad Header Name: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Le",
        b"",
    ],
    ids=["not http", "bad status", "ambiguous length", "bad header", "head cut off", "nothing"],
)
async def test_upstream_sending_garbage_gets_502(
    proxy: MakeProxy, recorders: MakeRecorder, raw_upstreams: Any, answer: bytes
) -> None:
    raw = await raw_upstreams({b"/garbage": answer}, close_after={b"/garbage"})
    _, port, _ = await start_with(proxy, recorders, **via_pool("/garbage", raw.url))
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(b"GET /garbage HTTP/1.1\r\nHost: a\r\n\r\n")
        status, _, body = await asyncio.wait_for(read_response(reader), 5.0)
    finally:
        writer.close()
        await writer.wait_closed()

    assert status == b"HTTP/1.1 502 Bad Gateway"
    assert body == b"502 Bad Gateway: the upstream did not give a valid response\n"
    await assert_still_serving(port)


async def test_upstream_closing_mid_body_closes_the_client_before_content_length(
    proxy: MakeProxy, recorders: MakeRecorder, raw_upstreams: Any
) -> None:
    raw = await raw_upstreams(
        {b"/short": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello"},
        close_after={b"/short"},
    )
    _, port, _ = await start_with(proxy, recorders, **via_pool("/short", raw.url))

    data = await send_and_read_to_eof(port, b"GET /short HTTP/1.1\r\nHost: a\r\n\r\n")

    status, headers, body = parse(data)
    assert status == 200
    assert headers[b"content-length"] == b"100"
    assert body == b"hello"  # then EOF: 5 of 100 bytes, visibly truncated
    await assert_still_serving(port)


async def test_upstream_closing_mid_chunked_body_never_sends_the_last_chunk(
    proxy: MakeProxy, recorders: MakeRecorder, raw_upstreams: Any
) -> None:
    raw = await raw_upstreams(
        {b"/cut": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"},
        close_after={b"/cut"},
    )
    _, port, _ = await start_with(proxy, recorders, **via_pool("/cut", raw.url))

    data = await send_and_read_to_eof(port, b"GET /cut HTTP/1.1\r\nHost: a\r\n\r\n")

    status, headers, body = parse(data)
    assert status == 200
    assert headers[b"transfer-encoding"] == b"chunked"
    assert body.startswith(b"5\r\nhello\r\n")
    assert not body.endswith(b"0\r\n\r\n"), "a cut body must not look complete"
    await assert_still_serving(port)


async def test_no_available_upstream_gets_503_with_retry_after(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    server, port, rec = await start_with(proxy, recorders)
    pool = server.pools["main"]
    for upstream in pool.upstreams:
        upstream.enabled = False
    pool.rebuild()
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(GOOD)
        status, headers, body = await asyncio.wait_for(read_response(reader), 5.0)
        assert status == b"HTTP/1.1 503 Service Unavailable"
        assert int(headers[b"retry-after"]) >= 1
        assert body.startswith(b"503") and b"Traceback" not in body and len(body) < 200
        assert headers.get(b"connection") != b"close"
        assert rec.seen == []

        for upstream in pool.upstreams:
            upstream.enabled = True
        pool.rebuild()
        writer.write(GOOD)  # the same connection, once an upstream is back
        status, _, body = await asyncio.wait_for(read_response(reader), 5.0)
        assert (status, body) == (b"HTTP/1.1 200 OK", b"healthy")
    finally:
        writer.close()
        await writer.wait_closed()
    await assert_still_serving(port)


# -- regressions: bugs found by these tests, fixed ---------------------------------------


async def test_slow_but_steady_upload_is_not_a_gateway_timeout(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    _, port, rec = await start_with(
        proxy, recorders,
        listener={"timeouts": {"header": "2s", "body": "2s"}},
        pool={"timeouts": {"response_header": "300ms"}},
    )
    client = await Uploader.connect(port)
    try:
        await client.send(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n")
        for _ in range(10):  # one byte every 100 ms: well within the 2 s body timeout
            await asyncio.sleep(0.1)
            if not await client.send(b"x"):
                break
        status = await client.response_head()
    finally:
        client.close()
    assert status == b"HTTP/1.1 200 OK"
    assert [s.path for s in rec.seen] == ["/upload"]


async def test_pipelined_request_after_a_large_body_is_not_431(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    listener = {"timeouts": FAST_LISTENER["timeouts"], "limits": {"max_header_size": 2048}}
    _, port, rec = await start_with(proxy, recorders, listener=listener)
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(
            b"POST /one HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000
            + b"GET /two HTTP/1.1\r\nHost: a\r\n"  # a 30-byte head, not yet finished
        )
        first = await asyncio.wait_for(read_response(reader), 5.0)
        writer.write(b"\r\n")
        second = await asyncio.wait_for(read_response(reader), 5.0)
    finally:
        writer.close()
        await writer.wait_closed()
    assert first[0] == b"HTTP/1.1 200 OK"
    assert second[0] == b"HTTP/1.1 200 OK"
    assert [s.path for s in rec.seen] == ["/one", "/two"]


async def test_upload_held_back_by_a_slow_upstream_is_not_a_client_timeout(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    size = 32 * 1024 * 1024  # more than the socket buffers between proxy and upstream
    finished = asyncio.Event()

    async def busy_then_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            await asyncio.sleep(1.0)  # busy for longer than the 300 ms body timeout
            await reader.readexactly(size)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nread")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            finished.set()

    slow = await asyncio.start_server(busy_then_read, HOST, 0)
    try:
        url = f"http://{HOST}:{slow.sockets[0].getsockname()[1]}"
        _, port, _ = await start_with(
            proxy, recorders, **via_pool("/upload", url, timeouts={"response_header": "5s"})
        )
        client = await Uploader.connect(port)
        try:
            head = b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size
            await client.send(head)
            block = b"u" * (1 << 20)
            for _ in range(size // len(block)):  # as fast as the proxy accepts it
                if not await client.send(block):
                    break
            status = await client.response_head()
        finally:
            client.close()
        assert status == b"HTTP/1.1 200 OK"
    finally:
        await asyncio.wait_for(finished.wait(), 5.0)  # let the upstream handler end by itself
        slow.close()
        await slow.wait_closed()


async def test_head_request_refused_by_the_proxy_gets_no_body(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    _, port, _ = await start_with(proxy, recorders)

    data = await send_and_read_to_eof(port, b"HEAD / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")

    status, headers, body = parse(data)
    assert status == 400
    assert headers[b"connection"] == b"close"
    assert body == b"", "a response to HEAD carries no content (RFC 9110 9.3.2)"


# -- absolute-form authority ------------------------------------------------------------


async def test_absolute_form_with_userinfo_is_judged_by_its_real_host(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    routes = [{"match": {"host": "api.test"}, "pool": "main"}]
    _, port, rec = await start_with(proxy, recorders, routes=routes)

    # userinfo "api.test:80", host "evil.example" (RFC 3986 3.2): no route names that host
    data = await send_and_read_to_eof(
        port,
        b"GET http://api.test:80@evil.example/x HTTP/1.1\r\n"
        b"Host: api.test\r\nConnection: close\r\n\r\n",
    )

    assert_short_error(data, 400)
    assert b"authority is malformed" in parse(data)[2]  # nginx 1.22: 400 as well
    assert rec.seen == []
