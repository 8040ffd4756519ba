"""The rate limit store's RESP pipe as a state machine: commands out in one write per
loop iteration, replies (whole or in pieces) to their waiters in order, NOSCRIPT sent
again, and a bad reply ending the connection."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.filters import redis_pipe
from proxy.filters.redis_pipe import Pipe, ReplyError, command, handshake


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def abort(self) -> None:
        self.aborted = True


def connected() -> tuple[Pipe, FakeTransport, list[Any]]:
    lost: list[Any] = []
    pipe = Pipe(1.0, lambda p, exc: lost.append(exc))
    transport = FakeTransport()
    pipe.connection_made(transport)
    return pipe, transport, lost


def ask(pipe: Pipe, head: bytes, tail: bytes, redo: bytes | None) -> asyncio.Future[Any]:
    """``pipe.call`` with a future of the reply (its callback settles it, unless the
    future was cancelled)."""
    waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def answer(reply: Any) -> None:
        if not waiter.done():
            waiter.set_result(reply)

    assert pipe.call(head, tail, redo, answer)
    return waiter


def test_a_url_gives_the_address_and_the_commands_to_send_first() -> None:
    assert handshake("redis://10.0.0.5:6380/0") == ({"host": "10.0.0.5", "port": 6380}, [])
    where, first = handshake("redis://user:p%40ss@h/2")
    assert where == {"host": "h", "port": 6379}
    assert first == [command(b"AUTH", b"user", b"p@ss"), command(b"SELECT", b"2")]
    assert handshake("redis://:secret@h")[1] == [command(b"AUTH", b"secret")]
    assert handshake("unix:///run/redis.sock?db=1") == (
        {"path": "/run/redis.sock"}, [command(b"SELECT", b"1")])  # fmt: skip
    assert "ssl" in handshake("rediss://h:6390")[0]


async def test_one_write_per_iteration_and_replies_in_order() -> None:
    pipe, transport, lost = connected()
    waiters = [ask(pipe, b"*1\r\n", b"$4\r\nPING\r\n", None) for _ in range(3)]
    assert transport.written == []
    await asyncio.sleep(0)
    assert transport.written == [b"*1\r\n$4\r\nPING\r\n" * 3] and pipe.writes == 1
    pipe.data_received(b"$3\r\n1.5\r\n:7\r\n$2\r")  # the third in pieces
    assert [w.result() for w in waiters[:2] if w is not None] == [b"1.5", 7]
    assert waiters[2] is not None and not waiters[2].done()
    pipe.data_received(b"\n-")
    pipe.data_received(b"2\r\n")
    assert waiters[2].result() == b"-2" and not lost


async def test_noscript_sends_the_redo_for_the_same_waiter() -> None:
    pipe, transport, _ = connected()
    waiter = ask(pipe, b"SHA|", b"TAIL", b"TEXT|")
    await asyncio.sleep(0)
    pipe.data_received(b"-NOSCRIPT No matching script.\r\n")
    assert waiter is not None and not waiter.done()
    await asyncio.sleep(0)
    assert transport.written == [b"SHA|TAIL", b"TEXT|TAIL"]
    pipe.data_received(b"$2\r\n42\r\n")
    assert waiter.result() == b"42"


async def test_an_error_reply_goes_to_its_waiter() -> None:
    pipe, _, lost = connected()
    waiter = ask(pipe, b"X", b"", b"Y")
    pipe.data_received(b"-ERR wrong\r\n")
    assert waiter is not None and isinstance(waiter.result(), ReplyError) and not lost


async def test_a_reply_that_is_not_resp_ends_the_connection() -> None:
    pipe, transport, lost = connected()
    waiters = [ask(pipe, b"X", b"", None) for _ in range(2)]
    pipe.data_received(b"?what\r\n")
    assert [w.result() for w in waiters if w is not None] == [None, None]
    assert pipe.closed and transport.aborted and isinstance(lost[0], ValueError)


async def test_a_bug_while_reading_replies_ends_the_connection_not_the_loop() -> None:
    """Whatever goes wrong handing a reply on, no exception leaves ``data_received``
    (the event loop would log it and the waiters would hang): the connection ends and
    every waiter gets the outage answer."""
    lost: list[Any] = []

    def owner_hears(pipe: Pipe, exc: BaseException | None) -> None:
        lost.append(exc)

    pipe = Pipe(1.0, owner_hears)
    transport = FakeTransport()
    pipe.connection_made(transport)
    waiters = [ask(pipe, b"X", b"", None) for _ in range(2)]
    first = waiters[0]
    assert first is not None
    first.set_result = None  # type: ignore[method-assign]  # (a bug: not callable)
    pipe.data_received(b":1\r\n:2\r\n")
    assert pipe.closed and transport.aborted and isinstance(lost[0], TypeError)
    assert waiters[1] is not None and waiters[1].result() is None


async def test_a_callback_waiter_is_answered_as_its_reply_is_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``call``: the answer comes from ``data_received`` itself (no future, no later
    loop iteration), in order; over ``MAX_IN_FLIGHT`` nothing is sent; the connection's
    end answers the rest None."""
    monkeypatch.setattr(redis_pipe, "MAX_IN_FLIGHT", 3)
    pipe, _, lost = connected()
    got: list[Any] = []
    assert all(pipe.call(b"X", b"", None, got.append) for _ in range(3))
    assert not pipe.call(b"X", b"", None, got.append)  # too many waiting: not sent
    pipe.data_received(b":1\r\n$1\r\n2")
    assert got == [1]  # the second is not whole yet
    pipe.data_received(b"\r\n")
    assert got == [1, b"2"]
    pipe.lost(None)
    assert got == [1, b"2", None] and lost == [None]
