"""The upstream idle pool under a steady load, with the shipped defaults.

Every client keeps one request in flight, all at once, round after round: the proxy
takes and releases upstream connections in bursts as large as the number of clients.
Counted on both sides of the upstream connections (the proxy's
``aiolb_upstream_connections_opened_total`` and the connections the upstream accepted),
a steady load opens each connection once and then reuses it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from proxy.config import Config
from proxy.runtime.server import ProxyServer
from tests.admin_support import samples, scrape
from tests.support import HOST, RawUpstream, make_config, read_response

MakeProxy = Callable[[Config], Awaitable[ProxyServer]]
Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def steady_rounds(clients: list[Connection], rounds: int) -> None:
    """Each client sends a request, reads its answer, ``rounds`` times; all at once."""

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(rounds):
            writer.write(b"GET /item HTTP/1.1\r\nHost: shop.test\r\n\r\n")
            status, _, body = await read_response(reader)
            assert (status, body) == (b"HTTP/1.1 200 OK", b"ok")

    await asyncio.gather(*(client(reader, writer) for reader, writer in clients))


async def opened_metric(server: ProxyServer) -> float:
    """``aiolb_upstream_connections_opened_total`` of the one upstream, from ``/metrics``."""
    (value,) = samples(await scrape(server), "aiolb_upstream_connections_opened_total").values()
    return value


@pytest.mark.parametrize("concurrency", [64, 256, 1000])
async def test_a_steady_load_opens_each_upstream_connection_once(
    proxy: MakeProxy, raw_upstreams: Callable[..., Awaitable[RawUpstream]], concurrency: int
) -> None:
    upstream = await raw_upstreams({})  # answers every request with 200 "ok"
    server = await proxy(make_config([upstream.url]))  # nothing tuned
    port = server.listeners[0].port
    clients = [await asyncio.open_connection(HOST, port) for _ in range(concurrency)]
    try:
        await steady_rounds(clients, 2)  # warm-up: the pool grows to what the load needs
        warmed = upstream.connections
        assert 0 < warmed <= concurrency
        assert await opened_metric(server) == warmed
        await steady_rounds(clients, 5)
        assert upstream.connections == warmed  # not one connection opened after warm-up
        assert await opened_metric(server) == warmed
        assert len(upstream.heads) == 7 * concurrency
    finally:
        for _, writer in clients:
            writer.close()


async def test_a_cap_below_the_load_closes_connections_the_load_opens_again(
    proxy: MakeProxy, raw_upstreams: Callable[..., Awaitable[RawUpstream]]
) -> None:
    """What the default avoids: ``max_idle_connections: 8`` under 64 clients closes the
    connections released beyond 8, and the next round opens them again."""
    upstream = await raw_upstreams({})
    server = await proxy(make_config([upstream.url], pool={"max_idle_connections": 8}))
    clients = [await asyncio.open_connection(HOST, server.listeners[0].port) for _ in range(64)]
    try:
        await steady_rounds(clients, 2)
        warmed = upstream.connections
        await steady_rounds(clients, 5)
        assert upstream.connections > warmed + 5 * 8  # churn, round after round
        assert await opened_metric(server) == upstream.connections
        pooled = server.pools["main"].upstreams[0]
        assert len(pooled.idle) <= 8
    finally:
        for _, writer in clients:
            writer.close()


async def test_idle_connections_unused_for_the_idle_timeout_are_closed(
    proxy: MakeProxy, raw_upstreams: Callable[..., Awaitable[RawUpstream]]
) -> None:
    """The pool has no count cap by default: time trims it. A burst of 20 leaves 20
    idle connections; a single client afterwards keeps reusing the most recent one, and
    the other 19 are closed once ``timeouts.idle`` has passed."""
    upstream = await raw_upstreams({})
    server = await proxy(make_config(
        [upstream.url], pool={"timeouts": {"idle": "300ms"}},
        listener={"limits": {"max_requests_per_connection": None}}))  # fmt: skip
    pooled = server.pools["main"].upstreams[0]
    port = server.listeners[0].port
    burst = [await asyncio.open_connection(HOST, port) for _ in range(20)]
    try:
        await steady_rounds(burst, 1)
        assert len(pooled.idle) == upstream.connections == 20
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5.0
        while len(pooled.idle) > 1:  # one client, one request at a time: the hot one stays
            assert loop.time() < deadline, f"{len(pooled.idle)} idle connections left"
            await steady_rounds(burst[:1], 1)
        assert upstream.connections == 20  # all the while, no new connection
    finally:
        for _, writer in burst:
            writer.close()
