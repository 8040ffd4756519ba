"""Trailer fields of an HTTP/1.1 upstream's chunked response, through the real proxy:
in the last chunk for an HTTP/1.1 client that said ``TE: trailers`` (curl, a raw
socket), a trailing HEADERS frame for an HTTP/2 client that said ``te: trailers``,
nothing for the others, and never a framing field."""

from __future__ import annotations

import asyncio

from tests.h2_support import exchange
from tests.support import HOST, make_config, raw_exchange

TRAILED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: abc\r\nGrpc-Status: 0\r\n\r\n"
)
SMUGGLING = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    b"0\r\nSet-Cookie: session=evil\r\nHost: evil.test\r\nX-Kept: yes\r\n\r\n"
)
LENGTH_TRAILER = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    b"0\r\nContent-Length: 5\r\n\r\n"
)
RESPONSES = {b"/t": TRAILED, b"/smuggle": SMUGGLING, b"/length": LENGTH_TRAILER}


async def test_curl_with_te_trailers_gets_them_in_the_last_chunk(raw_upstreams, proxy):
    up = await raw_upstreams(RESPONSES)
    server = await proxy(make_config([up.url]))
    curl = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--raw", "-H", "TE: trailers", "-H", "Connection: TE",
        f"http://{HOST}:{server.listeners[0].port}/t",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(curl.communicate(), 10)
    assert curl.returncode == 0, err
    assert out == b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: abc\r\ngrpc-status: 0\r\n\r\n"
    assert b"\r\nTE: trailers\r\nConnection: TE\r\n" in up.heads[0]  # asked upstream too


async def test_a_client_without_te_trailers_gets_none(raw_upstreams, proxy):
    up = await raw_upstreams(RESPONSES)
    server = await proxy(make_config([up.url]))
    got = await raw_exchange(
        server.listeners[0].port,
        b"GET /t HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n",
    )
    head, _, body = got.partition(b"\r\n\r\n")
    assert b"x-checksum" not in head.lower()  # not made a header either
    assert body == b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    assert b"\r\nte:" not in up.heads[0].lower()  # the upstream was not asked for them


async def test_smuggling_fields_in_trailers_are_not_relayed(raw_upstreams, proxy):
    up = await raw_upstreams(RESPONSES)
    server = await proxy(make_config([up.url]))
    got = await raw_exchange(
        server.listeners[0].port,
        b"GET /smuggle HTTP/1.1\r\nHost: shop.test\r\nTE: trailers\r\n"
        b"Connection: TE, close\r\n\r\n",
    )
    assert got.endswith(b"\r\n\r\n5\r\nhello\r\n0\r\nx-kept: yes\r\n\r\n")
    assert b"evil" not in got


async def test_a_content_length_trailer_is_never_relayed(raw_upstreams, proxy):
    up = await raw_upstreams(RESPONSES)
    server = await proxy(make_config([up.url]))
    got = await raw_exchange(
        server.listeners[0].port,
        b"GET /length HTTP/1.1\r\nHost: shop.test\r\nTE: trailers\r\n\r\n",
    )
    assert b"content-length" not in got.lower()
    assert not got.endswith(b"0\r\n\r\n")  # an invalid response: not passed off as whole


async def _h2_get(port: int, path: bytes, te: bool) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """A GET by an HTTP/2 client (prior knowledge): (the body, the trailers)."""
    headers = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"shop.test"),
               (b":path", path)] + ([(b"te", b"trailers")] if te else [])  # fmt: skip
    _, body, trailers = await exchange(port, headers)
    return body, trailers


async def test_an_h2_client_gets_an_h1_upstreams_trailers(raw_upstreams, proxy):
    up = await raw_upstreams(RESPONSES)
    server = await proxy(make_config([up.url], listener={"protocols": ["http/1.1", "h2c"]}))
    port = server.listeners[0].port
    body, trailers = await _h2_get(port, b"/t", te=True)
    assert body == b"hello world"
    assert trailers == [(b"x-checksum", b"abc"), (b"grpc-status", b"0")]
    assert b"\r\nTE: trailers\r\n" in up.heads[0]
    body, trailers = await _h2_get(port, b"/t", te=False)
    assert body == b"hello world" and trailers == []
    assert b"\r\nte:" not in up.heads[1].lower()
