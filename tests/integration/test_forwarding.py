"""Forwarding through the real proxy to real upstreams: order, reuse, headers, framing."""

from __future__ import annotations

import asyncio
import gc

import aiohttp
import pytest
from aiohttp import web

from proxy.server.protocol import ClientConnection
from proxy.upstream.connection import UpstreamConnection
from tests.support import (
    HOST,
    RawUpstream,
    counting_known,
    make_config,
    proxy_url,
    raw_exchange,
    read_response,
    wait_for,
)


async def test_round_robin_visits_upstreams_in_turn(recorders, proxy):
    ups = [await recorders(n) for n in ("a", "b", "c")]
    server = await proxy(make_config([u.url for u in ups]))
    async with aiohttp.ClientSession() as session:
        names = []
        for _ in range(9):
            async with session.get(proxy_url(server)) as resp:
                assert resp.status == 200
                names.append(await resp.text())
    assert names == ["a", "b", "c"] * 3


async def test_keep_alive_reuses_upstream_connections(recorders, proxy):
    up = await recorders("a")
    server = await proxy(make_config([up.url]))
    async with aiohttp.ClientSession() as session:
        for i in range(50):
            async with session.get(proxy_url(server, f"/r{i}")) as resp:
                assert await resp.text() == "a"
    assert len(up.seen) == 50
    assert len({s.peer_port for s in up.seen}) == 1  # one upstream connection carried all


async def test_client_keep_alive_one_connection_many_requests(recorders, proxy):
    up = await recorders("a")
    server = await proxy(make_config([up.url]))
    reader, writer = await asyncio.open_connection(HOST, server.listeners[0].port)
    for i in range(20):
        writer.write(b"GET /k%d HTTP/1.1\r\nHost: t\r\n\r\n" % i)
        status, headers, body = await read_response(reader)
        assert status == b"HTTP/1.1 200 OK" and body == b"a"
        assert b"connection" not in headers
    writer.close()


async def test_connection_closes_after_max_requests_per_connection(recorders, proxy):
    """Like nginx's keepalive_requests: the last allowed response says Connection:
    close and the connection ends; the client reconnects and carries on."""
    up = await recorders("a")
    limits = {"max_requests_per_connection": 3}
    server = await proxy(make_config([up.url], listener={"limits": limits}))
    port = server.listeners[0].port
    for _ in range(2):  # two connections, three requests each
        reader, writer = await asyncio.open_connection(HOST, port)
        for i in range(3):
            writer.write(b"GET /m%d HTTP/1.1\r\nHost: t\r\n\r\n" % i)
            status, headers, body = await read_response(reader)
            assert status == b"HTTP/1.1 200 OK" and body == b"a"
            assert headers.get(b"connection") == (b"close" if i == 2 else None)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the proxy
        writer.close()
    assert len(up.seen) == 6


async def test_pipelined_requests_answered_in_order(recorders, proxy):
    ups = [await recorders(n) for n in ("a", "b", "c")]
    server = await proxy(make_config([u.url for u in ups]))
    data = (
        b"GET /1 HTTP/1.1\r\nHost: t\r\n\r\n"
        b"POST /2 HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /3 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    raw = await raw_exchange(server.listeners[0].port, data)
    bodies = [part.rsplit(b"\r\n\r\n", 1)[-1][:1] for part in raw.split(b"HTTP/1.1 200 OK")[1:]]
    assert bodies == [b"a", b"b", b"c"]
    assert [s.path for u in ups for s in u.seen] == ["/1", "/2", "/3"]


async def test_forwarded_headers_and_hop_by_hop_removal(recorders, proxy):
    up = await recorders("a")
    server = await proxy(make_config([up.url]))
    request = (
        b"GET /h?q=1 HTTP/1.1\r\nHost: shop.test\r\n"
        b"Connection: keep-alive, X-Secret\r\nX-Secret: s\r\nKeep-Alive: timeout=5\r\n"
        b"TE: gzip\r\nProxy-Connection: keep-alive\r\nUpgrade: h2c\r\n"
        b"X-Forwarded-For: 203.0.113.9\r\nX-Request-ID: abc-123\r\nX-Custom: kept\r\n"
        b"Connection: close\r\n\r\n"
    )
    await raw_exchange(server.listeners[0].port, request)
    seen = up.seen[0]
    names = {k.lower() for k in seen.headers}
    for hop in ("x-secret", "keep-alive", "te", "proxy-connection", "upgrade"):
        assert hop not in names
    assert seen.headers["Host"] == "shop.test"
    assert seen.headers["X-Forwarded-For"] == "203.0.113.9, 127.0.0.1"
    assert seen.headers["X-Forwarded-Proto"] == "http"
    assert seen.headers["X-Forwarded-Host"] == "shop.test"
    assert seen.headers["Via"] == "1.1 aiolb"
    assert seen.headers["X-Request-ID"] == "abc-123"
    assert seen.headers["X-Custom"] == "kept"
    assert seen.path == "/h?q=1"


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        # nginx 1.22 passes a client's Forwarded verbatim; aiolb never does (issue 27,
        # item 13): an application that prefers it would trust the spoofed value
        (None, None),
        ("drop", None),
        ("replace", ["for=127.0.0.1;proto=http"]),
        ("append", ["for=1.2.3.4;proto=https", "for=127.0.0.1;proto=http"]),
    ],
)
async def test_a_clients_forwarded_header_is_never_passed_on_unchecked(
    recorders, proxy, mode, expected
):
    up = await recorders("a")
    listener = {} if mode is None else {"forwarded": mode}
    server = await proxy(make_config([up.url], listener=listener))
    port = server.listeners[0].port
    for _ in range(2):  # the second on a pooled upstream connection (the fast start)
        await raw_exchange(port, b"GET / HTTP/1.1\r\nHost: shop.test\r\n"
                                 b"forwarded: for=1.2.3.4;proto=https\r\nConnection: close\r\n\r\n")
    for seen in up.seen:
        got = [v.decode() for n, v in seen.raw_headers if n.lower() == b"forwarded"]
        assert got == (expected or [])
        assert seen.headers["X-Forwarded-For"] == "127.0.0.1"


async def test_request_id_generated_and_unique(recorders, proxy):
    up = await recorders("a")
    server = await proxy(make_config([up.url]))
    async with aiohttp.ClientSession() as session:
        for _ in range(5):
            async with session.get(proxy_url(server)) as resp:
                await resp.read()
    ids = [s.headers["X-Request-ID"] for s in up.seen]
    assert len(set(ids)) == 5 and all(ids)



async def test_head_204_304_have_no_body_and_connection_stays_usable(proxy):
    raw = await RawUpstream(
        {
            b"/head": b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
            b"/204": b"HTTP/1.1 204 No Content\r\n\r\n",
            b"/304": b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n",
        }
    ).start()
    try:
        server = await proxy(make_config([raw.url]))
        reader, writer = await asyncio.open_connection(HOST, server.listeners[0].port)
        writer.write(b"HEAD /head HTTP/1.1\r\nHost: t\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK") and b"Content-Length: 10" in head
        for path, status in ((b"/204", b"204"), (b"/304", b"304"), (b"/after", b"200")):
            writer.write(b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path)
            line, headers, body = await read_response(reader)
            assert line.split()[1] == status
            assert b"transfer-encoding" not in headers
            if status != b"200":
                assert body == b""
        assert body == b"ok"  # the response after HEAD/204/304 is intact
        writer.close()
        assert raw.connections == 1  # the upstream connection survived HEAD's length
    finally:
        await raw.stop()


async def test_informational_1xx_relayed_before_final_response(proxy):
    raw = await RawUpstream(
        {
            b"/hints": b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        }
    ).start()
    try:
        server = await proxy(make_config([raw.url]))
        data = await raw_exchange(
            server.listeners[0].port,
            b"GET /hints HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        )
        assert data.startswith(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n")
        assert b"HTTP/1.1 200 OK" in data and data.endswith(b"ok")
    finally:
        await raw.stop()


async def test_expect_100_continue_answered_by_proxy(recorders, proxy):
    up = await recorders("a")
    server = await proxy(make_config([up.url]))
    reader, writer = await asyncio.open_connection(HOST, server.listeners[0].port)
    writer.write(b"PUT /u HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"hello")
    line, _, body = await read_response(reader)
    assert line == b"HTTP/1.1 200 OK" and body == b"a"
    assert "Expect" not in up.seen[0].headers
    writer.close()


async def test_chunked_request_body_streamed_upstream(recorders, proxy):
    received: list[bytes] = []

    async def echo(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.Response(text=request.headers.get("Transfer-Encoding", "none"))

    up = await recorders("a", {"/echo": echo})
    server = await proxy(make_config([up.url]))

    async def chunks():
        for piece in (b"hello ", b"chunked ", b"world"):
            yield piece

    async with aiohttp.ClientSession() as session:
        async with session.post(proxy_url(server, "/echo"), data=chunks()) as resp:
            assert resp.status == 200
            assert await resp.text() == "chunked"
    assert received == [b"hello chunked world"]


async def test_chunked_response_streamed_to_client(recorders, proxy):
    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(100):
            await resp.write(b"line %d\n" % i)
        await resp.write_eof()
        return resp

    up = await recorders("a", {"/stream": stream})
    server = await proxy(make_config([up.url]))
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy_url(server, "/stream")) as resp:
            assert resp.headers["Transfer-Encoding"] == "chunked"
            body = await resp.read()
    assert body == b"".join(b"line %d\n" % i for i in range(100))


async def test_close_delimited_response_becomes_chunked_for_http11(proxy):
    raw = await RawUpstream(
        {b"/eof": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close"},
        close_after={b"/eof"},
    ).start()
    try:
        server = await proxy(make_config([raw.url]))
        reader, writer = await asyncio.open_connection(HOST, server.listeners[0].port)
        writer.write(b"GET /eof HTTP/1.1\r\nHost: t\r\n\r\n")
        _, headers, body = await read_response(reader)
        assert headers[b"transfer-encoding"] == b"chunked" and body == b"until close"
        writer.write(b"GET /next HTTP/1.1\r\nHost: t\r\n\r\n")  # client connection kept
        assert (await read_response(reader))[2] == b"ok"
        writer.close()
        # An HTTP/1.0 client gets the body delimited by close instead.
        data = await raw_exchange(server.listeners[0].port, b"GET /eof HTTP/1.0\r\n\r\n")
        assert data.endswith(b"\r\n\r\nuntil close") and b"Connection: close" in data
    finally:
        await raw.stop()


async def test_a_transfer_coding_other_than_chunked_last_is_delimited_by_close(
    proxy, raw_upstreams
):
    """RFC 9112 6.3: a response whose Transfer-Encoding does not end in chunked has a
    body that ends with the connection; the client gets all of it, chunked."""
    raw = await raw_upstreams(
        {b"/te": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: x-custom\r\n\r\nall of it"},
        close_after={b"/te"},
    )
    server = await proxy(make_config([raw.url]))
    reader, writer = await asyncio.open_connection(HOST, server.listeners[0].port)
    writer.write(b"GET /te HTTP/1.1\r\nHost: t\r\n\r\n")
    _, headers, body = await read_response(reader)
    assert headers[b"transfer-encoding"] == b"chunked" and body == b"all of it"
    writer.write(b"GET /next HTTP/1.1\r\nHost: t\r\n\r\n")  # client connection kept
    assert (await read_response(reader))[2] == b"ok"
    writer.close()


async def test_response_hop_by_hop_headers_are_not_relayed(proxy):
    raw = await RawUpstream(
        {
            b"/hop": b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Internal\r\n"
            b"X-Internal: secret\r\nKeep-Alive: timeout=5\r\nX-Public: yes\r\n"
            b"Content-Length: 2\r\n\r\nok",
        }
    ).start()
    try:
        server = await proxy(make_config([raw.url]))
        data = await raw_exchange(
            server.listeners[0].port, b"GET /hop HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        head = data.split(b"\r\n\r\n")[0].lower()
        assert b"x-internal" not in head and b"keep-alive" not in head
        assert b"x-public: yes" in head
    finally:
        await raw.stop()


async def test_stale_pooled_connection_is_retried_on_a_fresh_one(proxy):
    # The upstream answers, then closes the kept-alive connection behind our back.
    raw = await RawUpstream(
        {b"/once": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"}, close_after={b"/once"}
    ).start()
    try:
        server = await proxy(make_config([raw.url]))
        port = server.listeners[0].port
        for _ in range(3):
            data = await raw_exchange(
                port,
                b"POST /once HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n"
                b"Connection: close\r\n\r\nabc",
            )
            assert data.startswith(b"HTTP/1.1 200 OK") and data.endswith(b"ok")
    finally:
        await raw.stop()


async def test_routing_by_host_wildcard_and_path_prefix(recorders, proxy):
    api, web_, static = [await recorders(n) for n in ("api", "web", "static")]
    config = make_config(
        [web_.url],
        routes=[
            {"match": {"host": "api.example.com", "path_prefix": "/v1/"}, "pool": "api"},
            {"match": {"host": "*.cdn.example.com"}, "pool": "static"},
            {"match": {"path_prefix": "/"}, "pool": "main"},
        ],
        pools={
            "api": {"upstreams": [{"url": api.url}]},
            "static": {"upstreams": [{"url": static.url}]},
        },
    )
    server = await proxy(config)
    cases = [
        ("api.example.com", "/v1/users", "api"),
        ("API.example.com:8080", "/v1/x", "api"),
        ("api.example.com", "/v2/users", "web"),
        ("img.cdn.example.com", "/a.png", "static"),
        ("cdn.example.com", "/a.png", "web"),
        ("other.test", "/", "web"),
    ]
    async with aiohttp.ClientSession() as session:
        for host, path, expected in cases:
            async with session.get(proxy_url(server, path), headers={"Host": host}) as resp:
                assert await resp.text() == expected, (host, path)


REPEATED = {
    b"/plain": b"HTTP/1.1 200 OK\r\nX-Case: plain-%d\r\nContent-Length: 5\r\n\r\nhello",
    b"/empty": b"HTTP/1.1 200 OK\r\nX-Case: empty-%d\r\nContent-Length: 0\r\n\r\n",
    b"/missing": b"HTTP/1.1 404 Not Found\r\nX-Case: 404-%d\r\nConnection: keep-alive\r\n"
    b"Content-Length: 9\r\n\r\nnot found",
    b"/close": b"HTTP/1.1 200 OK\r\nX-Case: close-%d\r\nConnection: close\r\n"
    b"Content-Length: 2\r\n\r\nok",
}


async def test_a_repeated_response_head_is_relayed_as_when_first_parsed(proxy, monkeypatch):
    """An upstream repeats its response head until its ``Date`` ticks. A response read
    whole, whose head the parser accepted before, is relayed without parsing it again:
    the client gets the same bytes, and the upstream connection the same fate (kept, or
    closed after ``Connection: close``)."""
    known = [0]
    monkeypatch.setattr(UpstreamConnection, "_known", counting_known(known))
    unique = id(object())  # heads that no other test has shown the proxy
    raw = await RawUpstream(
        {path: response % unique for path, response in REPEATED.items()},
        close_after={b"/close"},
    ).start()
    try:
        server = await proxy(make_config([raw.url]))
        upstream = server.pools["main"].upstreams[0]
        reader, writer = await asyncio.open_connection(HOST, server.listeners[0].port)
        for path in REPEATED:
            first = None
            for _ in range(3):
                writer.write(b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path)
                response = await asyncio.wait_for(read_response(reader), 5)
                first = first or response
                assert response == first
                assert len(upstream.idle) == (0 if path == b"/close" else 1)
        assert first == (b"HTTP/1.1 200 OK", {b"x-case": b"close-%d" % unique,
                                              b"content-length": b"2"}, b"ok")  # fmt: skip
        assert known == [2 * len(REPEATED)]  # each head parsed once, then known
        assert raw.connections == 3  # the last two /close each needed a new one
        writer.close()
    finally:
        await raw.stop()


async def test_closed_connections_are_freed_without_the_cyclic_gc(recorders, proxy):
    """A connection's parser holds bound methods of the connection (a reference cycle).
    Closing drops the parser, so closed client and upstream connections are freed at
    once: with connections closing all the time (``max_requests_per_connection``), the
    cyclic GC would otherwise collect them in pauses of a millisecond or more."""
    up = await recorders("a")
    server = await proxy(make_config([up.url], pool={"max_idle_connections": 0}))
    listener, upstream = server.listeners[0], server.pools["main"].upstreams[0]
    gc.collect()
    gc.disable()
    try:
        for i in range(5):
            reader, writer = await asyncio.open_connection(HOST, listener.port)
            writer.write(b"GET /g%d HTTP/1.1\r\nHost: t\r\n\r\n" % i)
            status, _, body = await read_response(reader)
            assert status == b"HTTP/1.1 200 OK" and body == b"a"
            writer.close()
            await writer.wait_closed()
        await wait_for(lambda: not listener.connections and upstream.conns == 0)

        def connection_objects() -> list[object]:
            kinds = (ClientConnection, UpstreamConnection)
            return [o for o in gc.get_objects() if isinstance(o, kinds)]

        # freed by reference counting once the transports let go (the GC is off)
        await wait_for(lambda: not connection_objects(), timeout=2.0)
    finally:
        gc.enable()


async def test_connection_header_and_version_decide_keep_alive(recorders, proxy):
    """HTTP/1.1 stays open unless it says close; HTTP/1.0 only when it says keep-alive
    (and is told so); whatever the Connection header, the version is read right."""
    up = await recorders("a")
    server = await proxy(make_config([up.url]))
    port = server.listeners[0].port
    cases = [
        (b"HTTP/1.1", b"", True),
        (b"HTTP/1.1", b"Connection: keep-alive\r\n", True),
        (b"HTTP/1.1", b"Connection: close\r\n", False),
        (b"HTTP/1.0", b"", False),
        (b"HTTP/1.0", b"Connection: keep-alive\r\n", True),
        (b"HTTP/1.0", b"Connection: close\r\n", False),
    ]
    for version, connection, kept in cases:
        reader, writer = await asyncio.open_connection(HOST, port)
        request = b"GET /v " + version + b"\r\nHost: t\r\n" + connection
        try:
            for _ in range(2 if kept else 1):
                writer.write(request + b"\r\n")
                status, headers, body = await read_response(reader)
                assert status == b"HTTP/1.1 200 OK" and body == b"a", (version, connection)
                said = headers.get(b"connection", b"").lower()
                if version == b"HTTP/1.0":
                    assert said == (b"keep-alive" if kept else b"close"), (version, connection)
                else:
                    assert said == (b"" if kept else b"close"), (version, connection)
            if not kept:  # the proxy closes after the response
                assert await asyncio.wait_for(reader.read(), 5) == b""
        finally:
            writer.close()
