"""Getting an upstream session (``proxy.upstream.acquire``), fed by hand: plain fake
connections, waiters and a loop that records the connect tasks; no sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest

from proxy.config import Config
from proxy.errors import CircuitOpenError, ProxyError, UpstreamConnectError
from proxy.upstream import acquire as acquire_module
from proxy.upstream.acquire import (
    CANCELLED,
    CONNECTING,
    FAILED,
    GRANTED,
    OPENING,
    QUEUED,
    REFUSED,
    Ticket,
    acquire,
    assign,
)
from proxy.upstream.pool import Pool, Upstream

NOW = 100.0


class FakeConn:
    """What the pool asks of a connection: reusable, closable, paused or not."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False
        self.reading_paused = 0
        self.idle_since = 0.0

    def reusable(self) -> bool:
        return not self.closed

    def close(self) -> None:
        self.closed = True

    def resume_reading(self, reason: int) -> None:
        self.reading_paused &= ~reason

    def __repr__(self) -> str:
        return f"<FakeConn {self.name}>"


class FakeWaiter:
    """Records its answers; ``wants`` False: it finished before a connection came."""

    def __init__(self, wants: bool = True) -> None:
        self.wants = wants
        self.answers: list[tuple[str, Any]] = []

    def granted(self, session: Any, connect_seconds: float | None) -> bool:
        self.answers.append(("granted", session))
        return self.wants

    def queued(self, deadline: float) -> None:
        self.answers.append(("queued", deadline))

    def refused(self, error: CircuitOpenError) -> None:
        self.answers.append(("refused", error))

    def failed(self, error: ProxyError) -> None:
        self.answers.append(("failed", error))


class FakeTask:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """Records the connect tasks instead of running them."""

    def __init__(self) -> None:
        self.tasks: list[FakeTask] = []

    def create_task(self, coro: Coroutine[Any, Any, None]) -> FakeTask:
        coro.close()  # never run here: the bookkeeping is what is tested
        task = FakeTask()
        self.tasks.append(task)
        return task

    def time(self) -> float:
        return NOW


def make_upstream(
    max_connections: int = 2, max_pending: int = 2, queue_timeout: float = 5.0
) -> Upstream:
    config = Config.model_validate({
        "listeners": [{"name": "l", "bind": "127.0.0.1:0", "routes": [{"pool": "p"}]}],
        "pools": {"p": {
            "upstreams": [{"url": "http://127.0.0.1:9000"}],
            "circuit_breaker": {"max_connections": max_connections, "max_pending": max_pending,
                                "queue_timeout": queue_timeout},
        }},
    })  # fmt: skip
    return Pool("p", config.pools["p"]).upstreams[0]


def ask(upstream: Upstream, loop: FakeLoop, waiter: FakeWaiter | None = None) -> Ticket | None:
    return acquire(upstream, waiter or FakeWaiter(), loop, NOW)  # type: ignore[arg-type]


def test_the_most_recently_released_idle_connection_is_reused() -> None:
    upstream, loop, waiter = make_upstream(), FakeLoop(), FakeWaiter()
    old, recent = FakeConn("old"), FakeConn("recent")
    upstream.put_idle(old, 1.0)  # type: ignore[arg-type]
    upstream.put_idle(recent, 2.0)  # type: ignore[arg-type]
    assert ask(upstream, loop, waiter) is None  # answered at once: no ticket to keep
    assert waiter.answers == [("granted", recent)]
    assert list(upstream.idle) == [old] and not loop.tasks


def test_a_dead_idle_connection_is_closed_and_skipped() -> None:
    upstream, loop, waiter = make_upstream(), FakeLoop(), FakeWaiter()
    alive, dead = FakeConn("alive"), FakeConn("dead")
    upstream.idle.extend([alive, dead])  # type: ignore[list-item]
    dead.closed = True
    ask(upstream, loop, waiter)
    assert waiter.answers == [("granted", alive)] and not upstream.idle


def test_a_connection_is_opened_while_under_max_connections() -> None:
    upstream, loop, waiter = make_upstream(max_connections=2), FakeLoop(), FakeWaiter()
    ticket = ask(upstream, loop, waiter)
    assert ticket is not None and ticket.state is OPENING
    # the slot is taken when the open is decided, before the connect task runs
    assert upstream.conns == 1 and len(loop.tasks) == 1 and ticket.task is loop.tasks[0]
    assert waiter.answers == []  # told when the connect ends
    second = ask(upstream, loop)
    assert second is not None and second.state is OPENING and upstream.conns == 2


def test_a_request_waits_at_max_connections() -> None:
    upstream, loop, waiter = make_upstream(max_connections=1), FakeLoop(), FakeWaiter()
    ask(upstream, loop)
    ticket = ask(upstream, loop, waiter)
    assert ticket is not None and ticket.state is QUEUED
    assert list(upstream.waiting) == [ticket] and upstream.pool.pending == 1
    assert waiter.answers == [("queued", NOW + 5.0)]  # the queue deadline
    assert upstream.conns == 1 and len(loop.tasks) == 1


def test_beyond_max_pending_a_request_is_refused_at_once_and_counted() -> None:
    upstream, loop = make_upstream(max_connections=1, max_pending=1), FakeLoop()
    ask(upstream, loop)
    ask(upstream, loop)  # waits
    waiter = FakeWaiter()
    assert ask(upstream, loop, waiter) is None
    [(what, error)] = waiter.answers
    assert what == "refused" and isinstance(error, CircuitOpenError) and error.status == 503
    assert error.reason == "1 connections open, 1 requests waiting"
    assert upstream.pool.overflows == 1 and upstream.pool.pending == 1
    assert len(upstream.waiting) == 1


def test_max_pending_zero_refuses_every_request_that_would_wait() -> None:
    upstream, loop = make_upstream(max_connections=1, max_pending=0), FakeLoop()
    ask(upstream, loop)
    waiter = FakeWaiter()
    ask(upstream, loop, waiter)
    assert waiter.answers[0][0] == "refused" and upstream.pool.overflows == 1


def test_a_freed_connection_goes_to_the_first_waiter() -> None:
    upstream, loop = make_upstream(max_connections=1), FakeLoop()
    ask(upstream, loop)
    first, second = FakeWaiter(), FakeWaiter()
    ask(upstream, loop, first)
    behind = ask(upstream, loop, second)
    conn = FakeConn("freed")
    conn.reading_paused = 1  # every pause reason ends with the message
    upstream.put_idle(conn, NOW)  # type: ignore[arg-type]
    assert first.answers[-1] == ("granted", conn) and conn.reading_paused == 0
    assert second.answers == [("queued", NOW + 5.0)]
    assert list(upstream.waiting) == [behind] and upstream.pool.pending == 1
    assert not upstream.idle and upstream.conns == 1


def test_a_waiter_that_finished_meanwhile_hands_the_connection_back() -> None:
    upstream, loop = make_upstream(max_connections=1), FakeLoop()
    ask(upstream, loop)
    gone = FakeWaiter(wants=False)
    ask(upstream, loop, gone)
    conn = FakeConn("freed")
    upstream.put_idle(conn, NOW)  # type: ignore[arg-type]
    assert gone.answers[-1] == ("granted", conn)
    assert list(upstream.idle) == [conn] and conn.idle_since == NOW


def test_a_closed_connection_lets_the_first_waiter_open_one() -> None:
    upstream, loop = make_upstream(max_connections=1), FakeLoop()
    ask(upstream, loop)
    ticket = ask(upstream, loop)
    behind = ask(upstream, loop)
    upstream.connection_closed()
    assert ticket is not None and ticket.state is OPENING and len(loop.tasks) == 2
    assert upstream.conns == 1 and upstream.pool.pending == 1
    assert list(upstream.waiting) == [behind]


def test_cancelling_before_the_connect_task_ran_gives_the_slot_back() -> None:
    upstream, loop = make_upstream(max_connections=1), FakeLoop()
    ticket = ask(upstream, loop)
    assert ticket is not None and upstream.conns == 1
    waiter = FakeWaiter()
    behind = ask(upstream, loop, waiter)
    ticket.cancel()
    assert ticket.state is CANCELLED and loop.tasks[0].cancelled and ticket.task is None
    # the slot went back, and the first waiter took it
    assert behind is not None and behind.state is OPENING and upstream.conns == 1
    assert len(loop.tasks) == 2 and upstream.pool.pending == 0
    ticket.cancel()  # idempotent
    assert upstream.conns == 1


def test_cancelling_a_running_connect_leaves_the_slot_to_it() -> None:
    upstream, loop = make_upstream(), FakeLoop()
    ticket = ask(upstream, loop)
    assert ticket is not None
    ticket.state = CONNECTING  # what the task's first step does
    ticket.cancel()
    # the connect, cancelled, gives the slot back as it ends (``Upstream.connection_closed``)
    assert ticket.state is CANCELLED and loop.tasks[0].cancelled and upstream.conns == 1


def test_cancelling_a_waiting_request_leaves_the_queue_uncounted() -> None:
    upstream, loop = make_upstream(max_connections=1), FakeLoop()
    ask(upstream, loop)
    waiter = FakeWaiter()
    ticket = ask(upstream, loop, waiter)
    assert ticket is not None
    ticket.cancel()
    assert ticket.state is CANCELLED and not upstream.waiting
    assert upstream.pool.pending == 0 and upstream.pool.overflows == 0
    assert waiter.answers == [("queued", NOW + 5.0)]  # a requester that left is not told


def test_a_request_waiting_past_the_queue_timeout_is_refused() -> None:
    upstream, loop = make_upstream(max_connections=1), FakeLoop()
    opening = ask(upstream, loop)
    waiter = FakeWaiter()
    ticket = ask(upstream, loop, waiter)
    assert ticket is not None and ticket.deadline == NOW + 5.0
    assert ticket.expire()  # the requester's clock passed the deadline
    assert ticket.state is REFUSED and not upstream.waiting
    [_, (what, error)] = waiter.answers
    assert what == "refused" and isinstance(error, CircuitOpenError)
    assert error.reason == "no connection free within the queue timeout"
    assert upstream.pool.overflows == 1 and upstream.pool.pending == 0
    # a ticket that left the queue for a connect: its connect keeps its own timeout
    assert opening is not None and opening.expire() and opening.state is OPENING


def test_waiters_are_served_first_come_first_served() -> None:
    upstream, loop = make_upstream(max_connections=1, max_pending=5), FakeLoop()
    ask(upstream, loop)
    waiters = [FakeWaiter() for _ in range(3)]
    for w in waiters:
        ask(upstream, loop, w)
    for i in range(3):
        upstream.put_idle(FakeConn(f"c{i}"), NOW)  # type: ignore[arg-type]
    assert [w.answers[-1][1].name for w in waiters] == ["c0", "c1", "c2"]
    assert upstream.pool.pending == 0


def test_a_fresh_connection_is_opened_whatever_is_idle_or_open() -> None:
    """The replacement of a pooled connection that proved stale takes its slot."""
    upstream, loop = make_upstream(max_connections=1), FakeLoop()
    upstream.put_idle(FakeConn("idle"), NOW)  # type: ignore[arg-type]
    upstream.conns = 1
    ticket = acquire(upstream, FakeWaiter(), loop, NOW, fresh=True)  # type: ignore[arg-type]
    assert ticket is not None and ticket.state is OPENING
    assert upstream.conns == 2 and len(upstream.idle) == 1


def test_assign_returns_its_decisions_without_acting() -> None:
    upstream, loop = make_upstream(max_connections=1), FakeLoop()
    first = Ticket(upstream, FakeWaiter(), loop, NOW)  # type: ignore[arg-type]
    assert assign(upstream, first) == [(first, OPENING)]
    second = Ticket(upstream, FakeWaiter(), loop, NOW)  # type: ignore[arg-type]
    assert assign(upstream, second) == [(second, QUEUED)]
    conn = FakeConn("freed")
    upstream.idle.append(conn)  # type: ignore[arg-type]
    assert assign(upstream) == [(second, GRANTED)] and second.conn is conn
    assert not loop.tasks and second.waiter.answers == []  # type: ignore[attr-defined]


async def test_the_connect_task_hands_over_the_connection_or_the_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    upstream, loop = make_upstream(), asyncio.get_running_loop()
    results: list[Any] = [FakeConn("new"), UpstreamConnectError("connect failed: refused")]

    async def fake_open(up: Upstream, _: asyncio.AbstractEventLoop, header: bytes | None) -> Any:
        result = results.pop(0)
        if isinstance(result, Exception):
            up.connection_closed()  # as the real one does: the slot goes back
            raise result
        return result

    monkeypatch.setattr(acquire_module, "_open", fake_open)
    ok, bad = FakeWaiter(), FakeWaiter()
    ticket = acquire(upstream, ok, loop, NOW)
    assert ticket is not None and ticket.task is not None
    await ticket.task
    assert ticket.state is GRANTED and ok.answers[0][0] == "granted" and ticket.task is None
    ticket = acquire(upstream, bad, loop, NOW)
    assert ticket is not None and ticket.task is not None
    await ticket.task
    assert ticket.state is FAILED and isinstance(bad.answers[0][1], UpstreamConnectError)
    assert upstream.stats.connect_errors == 1 and upstream.conns == 1
