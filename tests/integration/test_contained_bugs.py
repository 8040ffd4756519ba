"""A bug in the proxy's own code stays with the request it hit (issue #23, finding 10:
no exception may escape a protocol callback). Bugs are injected with monkeypatch."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest

from proxy.config import Config
from proxy.forwarding.exchange import Exchange
from proxy.runtime.server import ProxyServer
from proxy.server.protocol import ClientConnection
from tests.support import HOST, RawUpstream, make_config, read_response, wait_for

MakeProxy = Callable[[Config], Awaitable[ProxyServer]]
MakeRaw = Callable[..., Awaitable[RawUpstream]]
GET = b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"


async def test_a_bug_relaying_a_response_is_a_502_not_a_dead_transport(
    proxy: MakeProxy, raw_upstreams: MakeRaw, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    up = await raw_upstreams({})
    server = await proxy(make_config([up.url]))
    reader, writer = await asyncio.open_connection(HOST, server.listeners[0].port)
    try:
        writer.write(GET)  # the response's head is now known: the next takes the fast path
        assert (await asyncio.wait_for(read_response(reader), 5))[0] == b"HTTP/1.1 200 OK"

        def broken(*args: object) -> bool:
            raise RuntimeError("injected")

        monkeypatch.setattr(Exchange, "relay_whole", broken)
        writer.write(GET)
        status, _, _ = await asyncio.wait_for(read_response(reader), 5)
    finally:
        writer.close()
    assert status == b"HTTP/1.1 502 Bad Gateway"
    assert any("bug while relaying a response" in r.getMessage() for r in caplog.records)
    # uvloop's own handler (a protocol callback that raised) was never reached
    assert not [r for r in caplog.records if r.name == "asyncio"]


async def test_a_bug_in_one_connections_timers_does_not_stop_the_others(
    proxy: MakeProxy, raw_upstreams: MakeRaw, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    up = await raw_upstreams({})
    config = make_config([up.url], listener={"timeouts": {"header": "300ms", "idle": "300ms"}})
    server = await proxy(config)
    listener = server.listeners[0]
    clients = [await asyncio.open_connection(HOST, listener.port) for _ in range(6)]
    try:
        await wait_for(lambda: len(listener.connections) == 6)
        bad = next(iter(listener.connections))  # the sweep's first, while the set stays
        check = ClientConnection.check_timeouts

        def flaky(conn: ClientConnection, now: float) -> None:
            if conn is bad:
                raise RuntimeError("injected")
            check(conn, now)

        monkeypatch.setattr(ClientConnection, "check_timeouts", flaky)
        with caplog.at_level(logging.ERROR, "aiolb"):
            for reader, _ in clients:  # every one closed: the others by their timeout
                assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        for _, writer in clients:
            writer.close()
    assert any("bug in the timeouts" in r.getMessage() for r in caplog.records)
