"""The Redis ``rate_limit`` store against a real ``redis-server``: decisions batched
into few round trips and still exact, a forgotten script, a Redis stopped or killed
with decisions under way, and the bound on waiting decisions."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator

import pytest
from pytest import approx

from proxy.filters import redis_pipe
from proxy.filters.redis_store import RedisBuckets
from tests.support import RedisServer

RATE, SIZE = 1e-6, 100.0  # a bucket of 100 that does not refill during a test


async def raw(server: RedisServer, *parts: bytes) -> bytes:
    """One command's reply line(s), on a connection of its own."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(redis_pipe.command(*parts))
    reply = await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    return reply


async def evalsha_calls(server: RedisServer) -> dict[str, int]:
    """``INFO commandstats``: the calls of EVAL and EVALSHA."""
    text = (await raw(server, b"INFO", b"commandstats")).decode()
    calls = {"eval": 0, "evalsha": 0}
    for line in text.splitlines():
        for name in calls:
            if line.startswith(f"cmdstat_{name}:"):
                calls[name] = int(line.split("calls=")[1].split(",")[0])
    return calls


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisBuckets]:
    store = RedisBuckets(redis_server.url, 1.0)
    yield store
    await store.close()


async def test_concurrent_decisions_share_one_round_trip(
    store: RedisBuckets, redis_server: RedisServer
) -> None:
    keys = [b"t:key%d" % i for i in range(500)]  # every decision a bucket of its own
    lefts = await asyncio.gather(*(store.take(key, RATE, SIZE) for key in keys))
    assert lefts == [SIZE - 1] * 500
    pipe = store.pipe
    assert pipe is not None
    assert pipe.writes <= 3, pipe  # one iteration asked them all: about one write
    assert (await evalsha_calls(redis_server))["evalsha"] == 500


async def test_one_buckets_decisions_are_one_command_and_exact_across_instances(
    store: RedisBuckets, redis_server: RedisServer
) -> None:
    other = RedisBuckets(redis_server.url, 1.0)  # a second instance: its own connection
    try:
        lefts = await asyncio.gather(
            *(s.take(b"t:shared", RATE, SIZE) for _ in range(250) for s in (store, other))
        )
    finally:
        await other.close()
    assert None not in lefts
    assert sum(left is not None and left >= 0 for left in lefts) == SIZE  # exactly
    assert max(lefts) == approx(SIZE - 1)  # type: ignore[type-var]
    # a refused decision says what one after the last token says: about -1 (its
    # Retry-After is one token's time, however many came in the same batch)
    assert min(lefts) == approx(-1.0, abs=1e-3)  # type: ignore[type-var]
    assert (await evalsha_calls(redis_server))["evalsha"] == 2  # one per instance


async def test_decisions_across_iterations_each_get_their_answer(store: RedisBuckets) -> None:
    async def one(i: int) -> float | None:
        await asyncio.sleep(i % 7 * 0.001)
        return await store.take(b"t:spread", RATE, SIZE)

    lefts = await asyncio.gather(*(one(i) for i in range(300)))
    assert sorted(lefts, reverse=True)[:3] == approx([99.0, 98.0, 97.0])  # type: ignore[type-var]
    assert sum(left is not None and left >= 0 for left in lefts) == SIZE


async def test_decide_makes_each_result_in_the_settling_callback(store: RedisBuckets) -> None:
    """``take(..., decide)``: each waiter's result is ``decide(tokens left)``, made in
    the callback that settles the bucket; one ``decide`` that raises fails its own
    waiter only; a cancelled waiter (its request gone) is skipped, its token taken."""
    seen: list[float | None] = []

    def decide(left: float | None) -> str:
        seen.append(left)
        if len(seen) == 2:
            raise RuntimeError("a bad decide")
        return f"left {left}"

    futures = [store.take(b"t:decide", RATE, SIZE, decide) for _ in range(4)]
    assert all(isinstance(f, asyncio.Future) and not f.done() for f in futures)
    futures[2].cancel()
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert results[0] == "left 99.0" and results[3] == "left 96.0"
    assert isinstance(results[1], RuntimeError) and isinstance(results[2], asyncio.CancelledError)
    assert seen == [99.0, 98.0, 96.0]  # the cancelled one was not decided
    assert await store.take(b"t:decide", RATE, SIZE) == approx(95.0)  # its token was taken
    assert not store.outage and store.errors == 0


async def test_a_forgotten_script_is_sent_again(
    store: RedisBuckets, redis_server: RedisServer
) -> None:
    assert await store.take(b"t:flush", RATE, SIZE) == 99.0
    assert await raw(redis_server, b"SCRIPT", b"FLUSH") == b"+OK\r\n"
    lefts = await asyncio.gather(*(store.take(b"t:flush", RATE, SIZE) for _ in range(50)))
    assert sorted(lefts) == approx([float(n) for n in range(49, 99)])  # type: ignore[type-var]
    assert (await evalsha_calls(redis_server))["eval"] >= 1
    assert not store.outage and store.errors == 0


async def test_a_stopped_redis_answers_every_waiter_none_within_the_timeout(
    redis_server: RedisServer,
) -> None:
    store = RedisBuckets(redis_server.url, 0.2)
    assert redis_server.proc is not None
    try:
        assert await store.take(b"t:stop", RATE, SIZE) == 99.0  # connected
        redis_server.proc.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        lefts = await asyncio.gather(*(store.take(b"t:stop", RATE, SIZE) for _ in range(500)))
        waited = time.monotonic() - started
        assert lefts == [None] * 500
        assert 0.15 <= waited < 0.5, waited
        assert store.outage and not store.available and store.errors == 1
        assert await store.take(b"t:stop", RATE, SIZE) is None  # the circuit: not asked
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
        await store.close()


async def test_redis_killed_mid_batch_answers_every_waiter_at_once(
    redis_server: RedisServer,
) -> None:
    store = RedisBuckets(redis_server.url, 5.0)
    assert redis_server.proc is not None
    try:
        assert await store.take(b"t:kill", RATE, SIZE) == 99.0
        redis_server.proc.send_signal(signal.SIGSTOP)  # the batch sent, no answer yet
        started = time.monotonic()
        waiting = asyncio.gather(*(store.take(b"t:kill", RATE, SIZE) for _ in range(500)))
        await asyncio.sleep(0.05)
        redis_server.kill()
        lefts = await waiting
        assert lefts == [None] * 500
        assert time.monotonic() - started < 1.0  # the connection's end, not the timeout
        assert store.outage and store.errors == 1
    finally:
        await store.close()


async def test_too_many_waiting_are_answered_none_without_queueing(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_pipe, "MAX_IN_FLIGHT", 11)  # SCRIPT LOAD and 10 decisions
    store = RedisBuckets(redis_server.url, 1.0)
    try:
        keys = [b"t:many%d" % i for i in range(25)]
        lefts = await asyncio.gather(*(store.take(key, RATE, SIZE) for key in keys))
        assert lefts == [SIZE - 1] * 10 + [None] * 15  # new buckets: exact
        assert not store.outage  # too busy is no outage
        assert await store.take(keys[-1], RATE, SIZE) == SIZE - 1
    finally:
        await store.close()


async def test_a_database_number_in_the_url_is_selected(redis_server: RedisServer) -> None:
    store = RedisBuckets(redis_server.url[: -len("/0")] + "/3", 1.0)
    try:
        assert await store.take(b"t:db", RATE, SIZE) == 99.0
    finally:
        await store.close()
    assert await raw(redis_server, b"EXISTS", b"t:db") == b":0\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", redis_server.port)
    writer.write(redis_pipe.command(b"SELECT", b"3") + redis_pipe.command(b"EXISTS", b"t:db"))
    assert await asyncio.wait_for(reader.readexactly(9), 5) == b"+OK\r\n:1\r\n"
    writer.close()


async def test_a_refused_connection_opens_the_circuit() -> None:
    store = RedisBuckets("redis://127.0.0.1:1/0", 1.0)
    assert await store.take(b"t:none", RATE, SIZE) is None
    assert store.outage and store.errors == 1 and store.pipe is None
