"""Bugs found by an attacker's review of the #23 fixes, one test each (raw sockets).

Each test states the bytes, what happened before its fix and what must happen; each
failed on the code before that fix.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest

from proxy.config import Config
from proxy.forwarding.states import Req
from proxy.runtime.server import ProxyServer
from tests.framing_support import FramingUpstream, RawClient, split_responses
from tests.support import HOST, make_config, wait_for

MakeProxy = Callable[[Config], Awaitable[ProxyServer]]

END = b"GET /end HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


async def _to_close(client: RawClient, timeout: float = 5.0) -> bytes:
    try:
        return await client.until_closed(timeout)
    except TimeoutError:
        raise AssertionError(
            f"not closed within {timeout}s; read {bytes(client.received)[:300]!r}"
        ) from None
    finally:
        client.close()


def _answers_late(late: bytes, delay: float) -> Callable[..., Awaitable[None]]:
    """An upstream that answers each request with its path (a 4-byte body read first),
    ``delay`` seconds late for the path ``late``."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if b"content-length: 4" in head.lower():
                await reader.readexactly(4)
            path = head.split(b" ")[1]
            await asyncio.sleep(delay if path == late else 0)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(path), path))
            await writer.drain()

    return serve


async def test_a_deferred_body_over_64k_is_not_stuck(proxy: MakeProxy) -> None:
    """``limits.body_buffer_size`` may be up to 16 MiB, but ``Exchange.flush_upstream``
    pauses the client (BODY_WAIT) at 64 KiB pending while no connection is attached,
    and a deferred exchange takes none until the body is complete: the body is never
    read, and ``check_timeouts`` renews the body deadline of a paused connection
    forever. POST with ``Content-Length: 200000`` and body_buffer_size 1 MiB: no answer,
    ever (even with timeouts.body 1 s). Should: read the body whole (or stream it)."""
    up = await FramingUpstream().start()
    try:
        server = await proxy(make_config(
            [up.url],
            listener={"limits": {"body_buffer_size": "1MiB"}, "timeouts": {"body": "1s"}},
        ))  # fmt: skip
        client = await RawClient.connect(server.listeners[0].port)
        size = 200_000
        client.send(
            b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
            % size
            + b"x\n" * (size // 2)
        )
        responses, _ = split_responses(await _to_close(client, 5.0))
        assert [r.status for r in responses] == [200]
        assert up.paths == [b"/up"]
    finally:
        await up.stop()


async def test_no_408_after_the_upstream_took_the_body(proxy: MakeProxy) -> None:
    """``Exchange.upstream_write_paused(True)`` lowers ``client.deadline`` to now + the
    pool's ``timeouts.send``; after ``resume_writing`` nothing restores it. When the
    body was complete (phase BUSY) at the pause, that deadline fires as a 408 while the
    response is pending: the client gets the upstream's 200, then an unsolicited
    ``408`` and a close. Reproduced for real with a 3.2 MB POST to an upstream that
    starts reading after 1 s and answers 4 s later (pool ``timeouts.send: 2s``): 200,
    then 408. Here the transport's pause/resume calls are made by hand at that point
    (deterministic). Should: 200 and the connection kept for the next request."""

    upstream = await asyncio.start_server(_answers_late(b"/slow", 1.0), HOST, 0)
    try:
        url = f"http://{HOST}:{upstream.sockets[0].getsockname()[1]}"
        server = await proxy(make_config([url], pool={"timeouts": {"send": "300ms"}}))
        client = await RawClient.connect(server.listeners[0].port)
        client.send(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody")
        conns = server.listeners[0].connections
        await wait_for(lambda: any(
            c.exchange is not None and getattr(c.exchange, "conn", None) is not None
            and c.exchange.req is Req.DONE for c in conns
        ))  # fmt: skip
        (conn,) = [c for c in conns if c.exchange is not None]
        upstream_conn = conn.exchange.conn
        upstream_conn.pause_writing()  # what uvloop calls when the body fills the buffer
        upstream_conn.resume_writing()  # and when the upstream has read it
        # past the lowered deadline (now + 300 ms) by the proxy's own clock, two ticks on
        clock = server.clock
        past = clock.now + 0.3 + 2 * clock.resolution
        await wait_for(lambda: clock.now > past, 5.0)
        client.send(END)
        responses, _ = split_responses(await _to_close(client))
        assert [(r.status, r.body) for r in responses] == [(200, b"/slow"), (200, b"/end")]
    finally:
        upstream.close()


async def test_many_pipelined_upgrade_requests_with_bodies(
    proxy: MakeProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """``_reframe`` (and ``_after_upgrade``) parse the rest of the read by calling
    ``data_received`` again, one level deeper per request: 1,000 pipelined
    ``POST /r`` with ``Connection: Upgrade``, ``Upgrade: foo`` and a 1-byte body in one
    write (84 KB) exceed the recursion limit; the ``RecursionError`` escapes
    ``data_received`` ("Fatal error on transport", traceback) and the connection is
    dropped without a single answer. (The same with bodiless ``Upgrade: h2c``
    requests, which ``_after_upgrade`` parses on.) Should: a loop, not recursion; every
    request answered, or a clean refusal, and no exception out of a protocol callback."""
    caplog.set_level(logging.DEBUG)
    up = await FramingUpstream().start()
    try:
        server = await proxy(make_config([up.url]))
        client = await RawClient.connect(server.listeners[0].port)
        one = (
            b"POST /r HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: foo\r\n"
            b"Content-Length: 1\r\n\r\nA"
        )
        client.send(one * 1000 + END)
        data = await _to_close(client, 10.0)
        assert not [r for r in caplog.records if r.exc_info], "an exception escaped"
        responses, _ = split_responses(data)
        assert responses, "dropped without an answer"
    finally:
        await up.stop()


async def test_the_request_after_a_large_body_is_not_431(proxy: MakeProxy) -> None:
    """(Pre-existing, not from #23, but it hits honest clients.) After a message ends,
    ``data_received`` measures the next head as ``len(data) - data.rfind(b"\\n") - 1``:
    the body bytes of the same read after its last LF count as head bytes. A keep-alive
    ``POST`` whose 100,000-byte body (no LF) arrives in one read is answered 200, then
    a ``431`` is queued and the connection closed: the client's next request gets 431.
    Should: 200, then the next request's own answer."""
    up = await FramingUpstream().start()
    try:
        server = await proxy(make_config([up.url]))
        client = await RawClient.connect(server.listeners[0].port)
        size = 100_000
        client.send(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size
                    + b"a" * size)  # fmt: skip
        await wait_for(lambda: b"\r\n\r\n/up" in bytes(client.received))
        client.send(END)
        responses, _ = split_responses(await _to_close(client))
        assert [(r.status, r.body) for r in responses] == [(200, b"/up"), (200, b"/end")]
    finally:
        await up.stop()


async def test_a_pause_for_a_full_upstream_ends_with_its_exchange(proxy: MakeProxy) -> None:
    """An upstream that answers while its write buffer is still full (it has not read
    the whole body) leaves the client paused for it (UPSTREAM_FULL); the exchange ends
    and the connection goes idle, but nothing read the client's next request until the
    idle timeout closed it. The pause belongs to the exchange: it ends with it."""

    upstream = await asyncio.start_server(_answers_late(b"/early", 0.3), HOST, 0)
    try:
        url = f"http://{HOST}:{upstream.sockets[0].getsockname()[1]}"
        server = await proxy(make_config([url]))
        client = await RawClient.connect(server.listeners[0].port)
        client.send(b"POST /early HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody")
        conns = server.listeners[0].connections
        await wait_for(lambda: any(
            c.exchange is not None and getattr(c.exchange, "conn", None) is not None
            and c.exchange.req is Req.DONE for c in conns
        ))  # fmt: skip
        (conn,) = [c for c in conns if c.exchange is not None]
        conn.exchange.conn.pause_writing()  # uvloop's call: the body filled the buffer
        await wait_for(lambda: b"/early" in bytes(client.received))
        client.send(END)  # read at once, not at the idle timeout
        responses, _ = split_responses(await _to_close(client, 3.0))
        assert [(r.status, r.body) for r in responses] == [(200, b"/early"), (200, b"/end")]
    finally:
        upstream.close()
