"""The Redis cache store against a real ``redis-server``: entries and variants, bodies
streamed in chunks, invalidation and purge, and an outage that costs a miss, not a
failure."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from proxy.cache.entry import Entry
from proxy.cache.redis_store import HOLD_AT, MAX_BACKLOG, RedisStore
from tests.support import RedisServer, wait_for

T0 = 1796119200.0
HEAD = b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Type: text/plain\r\n"


def entry(key: bytes, body: bytes, vary: tuple[bytes, ...] = (),
          values: tuple[bytes, ...] = ()) -> Entry:  # fmt: skip
    return Entry(key, vary, values, HEAD, body, (T0, T0), None)


@pytest.fixture
async def store(redis_server: RedisServer):  # type: ignore[no-untyped-def]
    store = RedisStore(redis_server.url, "aiolb-test:", keep_stale=60.0)
    yield store
    await store.close()


async def test_an_entry_comes_back_as_it_was_stored(store: RedisStore) -> None:
    stored = entry(b"shop.test /a", b"hello")
    await store.put(stored)
    found = await store.get(b"shop.test /a", [])
    assert found is not None
    assert (found.head, found.body, found.lifetime, found.age0) == (
        stored.head, stored.body, stored.lifetime, stored.age0)  # fmt: skip
    assert await store.get(b"shop.test /b", []) is None


async def test_variants_and_invalidation(store: RedisStore) -> None:
    vary = (b"accept-language",)
    await store.put(entry(b"shop.test /a", b"hallo", vary, (b"de",)))
    await store.put(entry(b"shop.test /a", b"hello", vary, (b"en",)))
    german = await store.get(b"shop.test /a", [(b"accept-language", b"de")])
    english = await store.get(b"shop.test /a", [(b"accept-language", b"en")])
    assert german is not None and english is not None
    assert (german.body, english.body) == (b"hallo", b"hello")
    assert await store.get(b"shop.test /a", [(b"accept-language", b"fr")]) is None
    assert await store.remove(b"shop.test /a") == 2
    assert await store.get(b"shop.test /a", [(b"accept-language", b"de")]) is None


async def test_purge_by_prefix(store: RedisStore) -> None:
    for path in (b"/static/a", b"/static/b", b"/api/c"):
        await store.put(entry(b"shop.test " + path, b"x"))
    assert await store.purge(b"shop.test /static/") == 2
    assert await store.get(b"shop.test /static/a", []) is None
    assert await store.get(b"shop.test /api/c", []) is not None


async def test_a_body_streams_in_chunks_and_only_a_complete_one_is_stored(
    store: RedisStore,
) -> None:
    body = bytes(i % 251 for i in range(4 * 1024 * 1024))
    writer = store.writer(b"shop.test /big", (), ())
    for start in range(0, len(body), 65536):
        writer.append(memoryview(body)[start : start + 65536])
    assert await writer.commit(entry(b"shop.test /big", b""))
    found = await store.get(b"shop.test /big", [])
    assert found is not None and found.body == body

    cut = store.writer(b"shop.test /cut", (), ())
    cut.append(b"half of it")
    cut.abort()  # the upstream went away mid-body
    assert await store.get(b"shop.test /cut", []) is None


async def test_a_writer_holds_the_upstream_back_while_redis_catches_up(
    store: RedisStore,
) -> None:
    holds: list[bool] = []
    writer = store.writer(b"shop.test /big", (), (), holds.append)
    block = bytes(range(256)) * 4096
    for _ in range(HOLD_AT // len(block) + 1):  # faster than Redis takes them
        writer.append(block)
    assert holds == [True]
    await wait_for(lambda: holds == [True, False], 5.0)  # Redis took them: go on
    writer.append(block)
    assert await writer.commit(entry(b"shop.test /big", b""))
    found = await store.get(b"shop.test /big", [])
    assert found is not None and found.body == block * (HOLD_AT // len(block) + 2)
    assert holds == [True, False]


async def test_a_writer_redis_falls_far_behind_gives_up_and_holds_nothing(
    store: RedisStore,
) -> None:
    writer = store.writer(b"shop.test /flood", (), ())  # nothing to hold back
    block = bytes(1024 * 1024)
    for _ in range(MAX_BACKLOG // len(block) + 1):  # faster than Redis takes them
        writer.append(block)
    assert (writer.failed, writer.pending, writer.backlog) == (True, [], 0)
    assert not await writer.commit(entry(b"shop.test /flood", b""))
    assert await store.get(b"shop.test /flood", []) is None
    assert store.available and store.errors == 0  # not an outage: Redis is fine


async def test_an_outage_is_a_miss_logged_once_and_recovery_is_automatic(
    redis_server: RedisServer, store: RedisStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "aiolb")
    await store.put(entry(b"shop.test /a", b"hello"))
    redis_server.kill()
    assert await store.get(b"shop.test /a", []) is None
    assert await store.get(b"shop.test /a", []) is None  # skipped: not tried again yet
    await store.put(entry(b"shop.test /b", b"lost"))  # not stored, not raised
    assert store.errors >= 1
    down = [r.getMessage() for r in caplog.records if "bypass the cache" in r.getMessage()]
    assert len(down) == 1
    redis_server.start()  # the same port, empty
    await redis_server.ready()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10.0
    while True:  # each try waits for the store to try Redis again (at most RETRY_AFTER)
        await wait_for(lambda: store.available, 5.0)
        await store.put(entry(b"shop.test /a", b"again"))
        found = await store.get(b"shop.test /a", [])
        if found is not None:
            break
        assert loop.time() < deadline, "caching did not resume"
    assert found.body == b"again"
    assert any("caching resumed" in r.getMessage() for r in caplog.records)


async def test_a_reply_sent_before_the_outage_does_not_end_it(
    store: RedisStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "aiolb")
    before = time.monotonic()  # an operation under way when Redis went away
    store.failed("storing a response", ConnectionError("Connection closed by server."))
    store.worked(before)  # its reply had arrived already: Redis is still down
    assert store.outage
    store.worked(time.monotonic())  # one begun after the failure: Redis is back
    assert not store.outage
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and "bypass the cache" in said[0] and "caching resumed" in said[1]


async def test_an_entry_that_went_by_surrogate_control_comes_back_the_same(
    store: RedisStore,
) -> None:
    head = (b"HTTP/1.1 200 OK\r\nCache-Control: no-cache\r\n"
            b"Surrogate-Control: max-age=60\r\n")  # fmt: skip
    stored = Entry(b"shop.test /s", (), (), head, b"x", (T0, T0), None, surrogate=True)
    assert (stored.lifetime, dict(stored.cc)) == (60.0, {"max-age": "60"})
    assert b"Surrogate-Control" not in stored.head  # never sent to a client
    await store.put(stored)
    found = await store.get(b"shop.test /s", [])
    assert found is not None
    assert (found.head, found.lifetime, dict(found.cc)) == (stored.head, 60.0, {"max-age": "60"})
    # a 304 that says nothing of freshness leaves it going by Surrogate-Control
    assert found.refresh(b"HTTP/1.1 304 Not Modified\r\nX-New: 1\r\n", (T0, T0 + 1), None)
    assert (found.lifetime, dict(found.cc)) == (60.0, {"max-age": "60"})
    assert b"X-New: 1" in found.head and b"Surrogate-Control" not in found.head


async def test_a_body_that_takes_longer_than_the_timeout_to_read_is_a_hit(
    redis_server: RedisServer,
) -> None:
    store = RedisStore(redis_server.url, "aiolb-slow:", keep_stale=60.0, timeout=0.05)
    try:
        body = bytes(range(256)) * (256 * 1024)  # 64 MiB: far more than 50 ms of reading
        writer = store.writer(b"shop.test /big", (), ())
        for start in range(0, len(body), 1024 * 1024):
            writer.append(body[start : start + 1024 * 1024])
            while writer.task is not None:  # as the upstream's reads would come
                await writer.task
        assert await writer.commit(entry(b"shop.test /big", b""))
        found = await store.get(b"shop.test /big", [])
        assert found is not None and found.body == body
        assert store.errors == 0
    finally:
        await store.close()


async def test_a_response_invalidated_while_it_was_being_written_is_not_stored(
    store: RedisStore,
) -> None:
    await store.put(entry(b"shop.test /a", b"old"))
    writer = store.writer(b"shop.test /a", (), ())  # a GET's response arriving...
    writer.append(b"new")
    await store.forget(b"shop.test /a")  # ...when a POST to the same URI succeeds
    assert not await writer.commit(entry(b"shop.test /a", b""))
    assert await store.get(b"shop.test /a", []) is None
    later = store.writer(b"shop.test /a", (), ())  # a response requested afterwards is
    later.append(b"newer")
    assert await later.commit(entry(b"shop.test /a", b""))
    found = await store.get(b"shop.test /a", [])
    assert found is not None and found.body == b"newer"
