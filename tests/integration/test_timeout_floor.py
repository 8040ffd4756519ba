"""No timeout fires before its configured value (issue #27), over real sockets.

Deadlines are set from the coarse clock's cached ``now``, up to one tick old. Each test
starts many clients at different phases of the tick and times each one on the client
side with ``time.monotonic``: every answer comes at or after the configured timeout,
and within two ticks (plus some scheduling room) after it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from proxy.runtime.server import ProxyServer
from tests.support import HOST, Recorder, make_config, read_response

MakeProxy = Callable[[Any], Awaitable[ProxyServer]]
MakeRecorder = Callable[..., Awaitable[Recorder]]

TIMEOUT = 0.5
CLIENTS = 20
#: Scheduling room on a busy test machine, on top of the two ticks a timeout may take.
ROOM = 0.15


async def start(proxy: MakeProxy, url: str, **config: Any) -> tuple[int, float]:
    """The proxy's port and its clock's tick."""
    server = await proxy(make_config([url], **config))
    return server.listeners[0].port, server.clock.resolution


async def staggered(resolution: float, client: Callable[[], Awaitable[float]]) -> list[float]:
    """``CLIENTS`` runs of ``client`` (each returns seconds waited), started evenly
    across one tick so that each sets its deadline at another phase of the clock."""

    async def later(i: int) -> float:
        await asyncio.sleep(i * resolution / CLIENTS)  # a phase, not a wait for a condition
        return await client()

    return await asyncio.gather(*(later(i) for i in range(CLIENTS)))


def assert_on_time(waited: list[float], resolution: float) -> None:
    early = [w for w in waited if w < TIMEOUT]
    assert not early, f"fired before {TIMEOUT}s: {sorted(early)}"
    assert max(waited) < TIMEOUT + 2 * resolution + ROOM, sorted(waited)


async def test_response_header_timeout_never_gives_504_early(
    proxy: MakeProxy, raw_upstreams: Any
) -> None:
    raw = await raw_upstreams({b"/hang": None})
    port, resolution = await start(
        proxy, raw.url, listener={"timeouts": {"header": "5s", "idle": "5s"}},
        pool={"timeouts": {"response_header": f"{TIMEOUT}s"}, "retries": {"attempts": 1}},
    )  # fmt: skip

    async def client() -> float:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            started = time.monotonic()
            writer.write(b"GET /hang HTTP/1.1\r\nHost: a\r\n\r\n")
            status, _, _ = await asyncio.wait_for(read_response(reader), 5.0)
            waited = time.monotonic() - started
            assert status == b"HTTP/1.1 504 Gateway Timeout"
            return waited
        finally:
            writer.close()

    assert_on_time(await staggered(resolution, client), resolution)


async def test_header_timeout_never_gives_408_early(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    rec = await recorders("ok")
    port, resolution = await start(
        proxy, rec.url, listener={"timeouts": {"header": f"{TIMEOUT}s", "idle": "5s"}}
    )

    async def client() -> float:
        started = time.monotonic()  # the header timeout runs from the accept
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ")
            data = await asyncio.wait_for(reader.read(), 5.0)
            waited = time.monotonic() - started
            assert data.startswith(b"HTTP/1.1 408 ")
            return waited
        finally:
            writer.close()

    assert_on_time(await staggered(resolution, client), resolution)


async def test_idle_timeout_never_closes_early(proxy: MakeProxy, recorders: MakeRecorder) -> None:
    rec = await recorders("ok")
    port, resolution = await start(
        proxy, rec.url, listener={"timeouts": {"header": "5s", "idle": f"{TIMEOUT}s"}}
    )

    async def client() -> float:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            status, _, _ = await asyncio.wait_for(read_response(reader), 5.0)
            started = time.monotonic()  # the proxy set its deadline before we read this
            assert status == b"HTTP/1.1 200 OK"
            assert await asyncio.wait_for(reader.read(), 5.0) == b""
            return time.monotonic() - started
        finally:
            writer.close()

    assert_on_time(await staggered(resolution, client), resolution)
