"""Failed attempts and retries, in process (``tests.inproc``): which failures are tried
again, where, after which backoff, and which never are.

Most tests have one primary upstream (0) and one backup (1), passive ejection off: every
request tries 0 first, and a retry can only land on 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.inproc import BASE_PORT, Harness, get, harnesses, ok

Make = Callable[..., Harness]

KIB = 1024
#: longer than the default backoff's first ceiling (25 ms)
BACKOFF = 0.03


@pytest.fixture
def proxy() -> Iterator[Make]:
    with harnesses() as make:
        yield make


def primary_and_backup(**pool: Any) -> dict[str, Any]:
    return {
        "upstreams": [{"url": f"http://127.0.0.1:{BASE_PORT}"},
                      {"url": f"http://127.0.0.1:{BASE_PORT + 1}", "backup": True}],
        "health_check": {"passive": None},
        **pool,
    }  # fmt: skip


def ports(h: Harness) -> list[int]:
    """Which upstream each connection attempt went to, in order."""
    return [port - BASE_PORT for _, port in h.loop.dials]


def test_a_refused_connection_is_retried_on_another_upstream(proxy: Make) -> None:
    h = proxy(pool=primary_and_backup())
    h.refuse(0)
    client = h.client()
    client.send(get())
    assert ports(h) == [0] and client.received() == b""  # waiting out the backoff
    h.advance(BACKOFF)
    assert ports(h) == [0, 1]
    h.upstream(0).respond(ok(b"backup"))
    assert client.responses()[0].body == b"backup"
    assert h.upstream_of(0).stats.connect_errors == 1
    assert h.pool.retries == 1 and h.upstream_of(0).conns == 0


def test_an_invalid_response_is_retried_on_another_upstream(proxy: Make) -> None:
    h = proxy(pool=primary_and_backup())
    client = h.client()
    client.send(get())
    first = h.upstream(0)
    first.respond(b"this is not http at all\r\n\r\n")
    assert first.closed and client.received() == b""
    h.advance(BACKOFF)
    second = h.upstream(1)
    assert second.port == BASE_PORT + 1
    second.respond(ok(b"good"))
    assert client.take() == ok(b"good")  # nothing of the garbage reached the client


def test_a_reset_before_the_response_is_retried_with_the_same_request(proxy: Make) -> None:
    h = proxy(pool=primary_and_backup())
    client = h.client()
    client.send(get("/x", extra=b"X-Request-ID: r-1\r\n"))
    h.upstream(0).reset()
    h.advance(BACKOFF)
    [first], [second] = h.upstream(0).requests(), h.upstream(1).requests()
    assert second.start == first.start and second.header(b"X-Request-ID") == b"r-1"
    h.upstream(1).respond(ok())
    assert client.responses()[0].status == 200


def test_an_idempotent_request_with_a_small_body_is_replayed_elsewhere(proxy: Make) -> None:
    h = proxy(pool=primary_and_backup())
    client = h.client()
    body = bytes(range(256)) * 64  # 16 KiB
    client.send(b"PUT /p HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    assert h.upstream(0).requests()[0].body == body
    h.upstream(0).close()  # read it all, answered nothing
    h.advance(BACKOFF)
    assert h.upstream(1).requests()[0].body == body
    h.upstream(1).respond(ok())
    assert client.responses()[0].status == 200


def test_a_post_that_reached_the_upstream_is_not_retried(proxy: Make) -> None:
    h = proxy(pool=primary_and_backup())
    client = h.client()
    client.send(b"POST /order HTTP/1.1\r\nHost: t\r\nContent-Length: 7\r\n\r\norder=1")
    h.upstream(0).close()
    h.advance(1)
    [answer] = client.responses()
    assert answer.status == 502 and ports(h) == [0]
    assert h.pool.retries == 0


def test_a_post_that_never_left_the_proxy_is_retried(proxy: Make) -> None:
    h = proxy(pool=primary_and_backup())
    h.refuse(0)
    client = h.client()
    client.send(b"POST /order HTTP/1.1\r\nHost: t\r\nContent-Length: 7\r\n\r\norder=1")
    h.advance(BACKOFF)
    [seen] = h.upstream(0).requests()
    assert (seen.method, seen.body) == (b"POST", b"order=1")


def test_a_body_streamed_past_the_retry_buffer_is_not_retried(proxy: Make) -> None:
    h = proxy(pool=primary_and_backup())
    client = h.client()
    client.send(b"PUT /p HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
    piece = b"q" * (16 * KIB)
    for _ in range(16):  # 256 KiB, past the 64 KiB retry buffer
        client.send(b"%x\r\n%s\r\n" % (len(piece), piece))
    client.send(b"0\r\n\r\n")
    h.upstream(0).close()
    h.advance(1)
    assert client.responses()[0].status == 502 and ports(h) == [0]


def test_a_503_is_retried_elsewhere_when_retry_on_names_it(proxy: Make) -> None:
    h = proxy(pool=primary_and_backup(retries={"retry_on": [503]}))
    client = h.client()
    client.send(get())
    busy = h.upstream(0)
    busy.respond(ok(b"busy", status=b"503 Service Unavailable"))
    assert client.received() == b"" and busy.closed  # dropped unread, with its connection
    h.advance(BACKOFF)
    h.upstream(1).respond(ok(b"good"))
    assert client.take() == ok(b"good")
    assert h.pool.retries == 1


def test_without_retry_on_503_the_upstreams_503_is_the_answer(proxy: Make) -> None:
    h = proxy(pool=primary_and_backup())
    client = h.client()
    client.send(get())
    h.upstream(0).respond(ok(b"busy", status=b"503 Service Unavailable"))
    assert client.take() == ok(b"busy", status=b"503 Service Unavailable")
    assert ports(h) == [0]


def test_the_last_attempt_answers_as_it_is(proxy: Make) -> None:
    h = proxy(pool=primary_and_backup(retries={"retry_on": [503], "attempts": 2}))
    client = h.client()
    client.send(get())
    h.upstream(0).respond(ok(b"busy 1", status=b"503 Service Unavailable"))
    h.advance(BACKOFF)
    h.upstream(1).respond(ok(b"busy 2", status=b"503 Service Unavailable"))
    [answer] = client.responses()
    assert (answer.status, answer.body) == (503, b"busy 2")


def test_the_backoff_timer_runs_before_each_retry(proxy: Make) -> None:
    h = proxy(upstreams=3, pool={
        "retries": {"retry_on": [503], "attempts": 3, "backoff": {"base": "1s", "max": "10s"}},
        "health_check": {"passive": None}})  # fmt: skip
    client = h.client()
    client.send(get())
    h.asked().respond(ok(status=b"503 Service Unavailable"))
    h.advance(0)
    assert len(h.loop.dials) == 1  # the first retry waits up to 1 s (full jitter)
    h.advance(1.0)
    assert len(h.loop.dials) == 2
    h.asked().respond(ok(status=b"503 Service Unavailable"))
    h.advance(2.0)  # the second waits up to 2 s
    assert len(h.loop.dials) == 3 and len(set(h.loop.dials)) == 3  # a new upstream each time
    h.asked().respond(ok(b"third"))
    assert client.responses()[0].body == b"third"


def test_a_stale_pooled_connection_is_retried_once_on_a_fresh_one(proxy: Make) -> None:
    h = proxy()
    client = h.client()
    client.send(get("/1"))
    h.upstream(0).respond(ok(b"1"))
    client.send(get("/2"))  # on the pooled connection
    assert [r.target for r in h.upstream(0).requests()] == [b"/1", b"/2"]
    h.upstream(0).close()  # it had closed meanwhile: no byte of an answer
    assert len(h.upstreams) == 2  # at once, no backoff: nothing was wrong with the upstream
    assert [r.target for r in h.upstream(1).requests()] == [b"/2"]
    h.upstream(1).respond(ok(b"2"))
    assert [r.body for r in client.responses()] == [b"1", b"2"]
    assert h.pool.retries == 1


def test_a_pooled_post_that_proved_stale_is_replayed(proxy: Make) -> None:
    h = proxy()
    client = h.client()
    client.send(get("/warm"))
    h.upstream(0).respond(ok())
    client.send(b"POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc")
    h.upstream(0).reset()
    assert h.upstream(1).requests()[0].body == b"abc"


def test_an_upstream_that_answers_partly_then_closes_is_not_retried(proxy: Make) -> None:
    h = proxy(pool=primary_and_backup())
    client = h.client()
    client.send(get())
    h.upstream(0).respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
    h.upstream(0).close()
    h.advance(1)
    assert ports(h) == [0] and client.closed  # the head was relayed: too late to retry


def test_every_upstream_refusing_gets_502_that_says_so(proxy: Make) -> None:
    h = proxy(upstreams=2)
    h.refuse(0)
    h.refuse(1)
    client = h.client()
    client.send(get())
    h.advance(1)
    [answer] = client.responses()
    assert answer.status == 502 and b"no connection to the upstream" in answer.body
    assert sorted(ports(h)) == [0, 1] and not client.closed
    assert h.pool.stats.requests == {("l", b"GET", 502): 1}


def test_no_retry_without_budget(proxy: Make) -> None:
    h = proxy(pool=primary_and_backup(
        retries={"budget": {"percent": 0, "min_retries_per_second": 0}}))  # fmt: skip
    h.refuse(0)
    client = h.client()
    client.send(get())
    h.advance(1)
    assert client.responses()[0].status == 502 and ports(h) == [0]
    assert h.pool.retry.budget.denied == 1


def test_per_try_timeout_moves_a_silent_upstreams_request_elsewhere(proxy: Make) -> None:
    h = proxy(pool=primary_and_backup(
        retries={"retry_on": ["timeout"], "per_try_timeout": "2s"}))  # fmt: skip
    client = h.client()
    client.send(get())
    h.advance(1.5)
    assert len(h.upstreams) == 1
    h.advance(1.5)  # past 2 s, within a tick or two, and the backoff
    assert h.upstream(0).closed and len(h.upstreams) == 2
    h.upstream(1).respond(ok(b"in time"))
    assert client.responses()[0].body == b"in time"
    assert h.pool.retries == 1


def test_a_connect_timeout_is_retried_elsewhere(proxy: Make) -> None:
    h = proxy(pool=primary_and_backup(timeouts={"connect": "1s"}))
    h.hang(0)
    client = h.client()
    client.send(get())
    h.advance(0.9)
    assert ports(h) == [0] and not h.upstreams
    h.advance(0.2)
    h.advance(BACKOFF)
    assert ports(h) == [0, 1]
    h.upstream(0).respond(ok())
    assert client.responses()[0].status == 200
    assert h.upstream_of(0).stats.connect_errors == 1 and h.upstream_of(0).conns == 0


def test_failed_connects_eject_an_upstream_and_requests_go_around_it(proxy: Make) -> None:
    h = proxy(upstreams=2, pool={"health_check": {"passive": {"consecutive_failures": 2}}})
    h.refuse(0)
    client = h.client()
    for _ in range(4):
        client.send(get())
        h.advance(BACKOFF)
        h.asked().respond(ok())
    assert [r.status for r in client.responses()] == [200] * 4
    assert ports(h).count(0) == 2  # then ejected: not tried again
    assert h.upstream_of(0).ejected and not h.upstream_of(0).available


def test_a_post_answered_503_is_not_retried_even_with_retry_on_503(proxy: Make) -> None:
    h = proxy(pool=primary_and_backup(retries={"retry_on": [503]}))
    client = h.client()
    client.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\nx")
    h.upstream(0).respond(ok(b"busy", status=b"503 Service Unavailable"))
    h.advance(1)
    assert client.responses()[0].status == 503 and ports(h) == [0]


def test_a_client_that_leaves_during_the_backoff_stops_the_retry(proxy: Make) -> None:
    h = proxy(pool=primary_and_backup())
    h.refuse(0)
    client = h.client()
    client.send(get())
    client.close()
    h.advance(1)
    assert ports(h) == [0]  # the retry's timer was cancelled
    assert [h.upstream_of(i).active for i in (0, 1)] == [0, 0]


def test_a_fresh_connection_that_fails_too_is_an_ordinary_failed_attempt(proxy: Make) -> None:
    """The stale retry is free and happens once; the fresh connection's failure counts
    as the first attempt, retried (here on the only upstream) as ``retry_on`` says."""
    h = proxy()
    client = h.client()
    client.send(get("/1"))
    h.upstream(0).respond(ok())
    client.send(get("/2"))
    h.upstream(0).close()  # stale: retried at once on a fresh connection
    h.upstream(1).close()  # fresh, and fails as well: a failed attempt
    h.advance(BACKOFF)
    h.upstream(2).close()  # the second and last attempt
    h.advance(1)
    assert [r.status for r in client.responses()] == [200, 502]
    assert len(h.upstreams) == 3 and h.pool.retries == 2
