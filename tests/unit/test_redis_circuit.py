"""The circuit both Redis stores (rate limits, caches) keep over their server."""

from __future__ import annotations

import time

from proxy.filters.redis_store import RedisBuckets
from proxy.redis_client import RETRY_AFTER


def test_an_outage_is_logged_once_each_way_and_a_late_reply_does_not_end_it(caplog) -> None:  # type: ignore[no-untyped-def]
    store = RedisBuckets("redis://127.0.0.1:1/0", 0.1)  # never connected: no I/O here
    before = time.monotonic()  # a decision under way when Redis went away
    for _ in range(3):
        store.failed("a decision", ConnectionError("refused"))
    assert (store.errors, store.outage, store.available) == (3, True, False)
    assert store.down_until - store.failed_at == RETRY_AFTER
    store.worked(before)  # its reply had been sent before the failures
    assert store.outage
    store.worked(time.monotonic())
    assert not store.outage
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and "unreachable" in said[0] and "answers again" in said[1]
