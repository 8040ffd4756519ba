"""Bugs found by an attacker's review of #27's merged items, one test each (raw sockets);
each failed on the code before its fix."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from proxy.config import Config
from proxy.runtime.server import ProxyServer
from tests.support import HOST, RawUpstream, make_config, raw_exchange, read_response, wait_for

MakeProxy = Callable[[Config], Awaitable[ProxyServer]]
MakeRaw = Callable[..., Awaitable[RawUpstream]]

BODY = b"0123456789abcdefghij"
STORED = (
    b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\nCache-Control: max-age=60\r\n"
    b'ETag: "v1"\r\nContent-Type: text/plain\r\n\r\n' + BODY
)
HUGE = b"9" * 5000  # past Python's 4300-digit int() limit; well inside max_header_size


async def test_a_range_with_a_huge_number_on_a_hit_is_not_a_500(
    proxy: MakeProxy, raw_upstreams: MakeRaw
) -> None:
    # proxy/cache/ranges.py byte_ranges: int() of >4300 digits raises ValueError -> 500
    up = await raw_upstreams({b"/v": STORED})
    server = await proxy(make_config([up.url], routes=[{"pool": "main", "cache": "main"}],
                                     caches={"main": {}}))  # fmt: skip
    reader, writer = await asyncio.open_connection(HOST, server.listeners[0].port)
    try:
        writer.write(b"GET /v HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await asyncio.wait_for(read_response(reader), 5))[2] == BODY
        store = server.caches["main"].store
        await wait_for(lambda: len(store) == 1)  # type: ignore[arg-type]  # stored
        for spec in (HUGE + b"-", b"0-" + HUGE, b"-" + HUGE):
            writer.write(b"GET /v HTTP/1.1\r\nHost: a\r\nRange: bytes=" + spec + b"\r\n\r\n")
            status, _, _ = await asyncio.wait_for(read_response(reader), 5)
            # 416 (start past the end), 206 of the whole body, or the whole 200: never 500
            assert status.split(b" ")[1] in (b"200", b"206", b"416"), (spec[:8], status)
    finally:
        writer.close()


async def test_options_with_a_huge_max_forwards_is_not_a_500(
    proxy: MakeProxy, raw_upstreams: MakeRaw
) -> None:
    # proxy/forwarding/exchange.py Exchange._answer_here: int(hops) raises -> 500
    up = await raw_upstreams({})
    server = await proxy(make_config([up.url]))
    data = b"OPTIONS /x HTTP/1.1\r\nHost: a\r\nMax-Forwards: %s\r\nConnection: close\r\n\r\n" % HUGE
    answer = await raw_exchange(server.listeners[0].port, data)
    assert not answer.startswith(b"HTTP/1.1 500"), answer[:80]


async def test_options_star_without_host_in_http_1_1_is_400(
    proxy: MakeProxy, raw_upstreams: MakeRaw
) -> None:
    # RFC 9112 3.2: an HTTP/1.1 request without Host is a 400; Exchange._resolve_target
    # returns True for ``OPTIONS *`` before the Host check, and _answer_here says 200
    up = await raw_upstreams({})
    server = await proxy(make_config([up.url]))
    answer = await raw_exchange(server.listeners[0].port,
                                b"OPTIONS * HTTP/1.1\r\nConnection: close\r\n\r\n")  # fmt: skip
    assert answer.startswith(b"HTTP/1.1 400"), answer[:80]


async def test_a_request_pipelined_after_a_local_close_answer_is_not_forwarded(
    proxy: MakeProxy, raw_upstreams: MakeRaw
) -> None:
    # A TRACE (or OPTIONS Max-Forwards: 0, or any local answer) with a body is answered
    # with Connection: close; the request pipelined behind it in the same packet is
    # still sent upstream when a pooled connection is idle (its answer goes nowhere)
    up = await raw_upstreams({})
    server = await proxy(make_config([up.url]))
    port = server.listeners[0].port
    await raw_exchange(port, b"GET /warm HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    upstreams = server.pools["main"].upstreams
    await wait_for(lambda: any(u.idle for u in upstreams))  # a pooled connection to use
    up.heads.clear()
    answer = await raw_exchange(port, (
        b"TRACE /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
        b"POST /delete HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"))  # fmt: skip
    assert answer.startswith(b"HTTP/1.1 405") and b"Connection: close" in answer
    assert answer.count(b"HTTP/1.1 ") == 1
    # a request answered after it: a POST sent before would have reached the upstream first
    await raw_exchange(port, b"GET /after HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    paths = [head.split(b" ")[1] for head in up.heads]
    assert paths == [b"/after"], "the POST after Connection: close reached the upstream"
