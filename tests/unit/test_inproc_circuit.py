"""Circuit breaking and the connection pool, in process (``tests.inproc``): at
``max_connections`` requests queue for a connection, past ``max_pending`` they get 503
at once, a queued request times out or leaves; idle connections are reused LIFO and
closed after ``timeouts.idle``."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.inproc import Client, Harness, get, harnesses, ok

Make = Callable[..., Harness]


@pytest.fixture
def proxy() -> Iterator[Make]:
    with harnesses() as make:
        yield make


def breaker(**settings: object) -> dict[str, object]:
    return {"pool": {"circuit_breaker": settings, "health_check": {"passive": None}}}


def clients(h: Harness, n: int, path: str = "/") -> list[Client]:
    made = []
    for _ in range(n):
        client = h.client()
        client.send(get(path))
        made.append(client)
    return made


def test_at_max_connections_requests_queue_for_a_free_connection(proxy: Make) -> None:
    h = proxy(**breaker(max_connections=2, max_pending=10))
    a, b, c, d = clients(h, 4)
    assert len(h.loop.dials) == 2  # never more than max_connections
    assert h.pool.pending == 2 and h.upstream_of(0).conns == 2
    h.upstream(0).respond(ok(b"1"))
    assert h.pool.pending == 1
    assert len(h.upstream(0).requests()) == 2  # the freed connection took a waiting one
    h.upstream(1).respond(ok(b"2"))
    h.upstream(0).respond(ok(b"3"))
    h.upstream(1).respond(ok(b"4"))
    assert [x.responses()[0].status for x in (a, b, c, d)] == [200] * 4
    assert len(h.loop.dials) == 2 and h.pool.pending == 0


def test_past_max_pending_the_answer_is_503_at_once(proxy: Make) -> None:
    h = proxy(**breaker(max_connections=1, max_pending=1))
    first, waiting, refused = clients(h, 3)
    [answer] = refused.responses()
    assert answer.status == 503 and answer.header(b"Retry-After") == b"1"
    assert h.pool.overflows == 1 and h.pool.pending == 1
    h.upstream(0).respond(ok())
    h.upstream(0).respond(ok())
    assert first.responses()[0].status == waiting.responses()[0].status == 200


def test_max_pending_0_refuses_as_soon_as_every_connection_is_busy(proxy: Make) -> None:
    h = proxy(**breaker(max_connections=1, max_pending=0))
    _, refused = clients(h, 2)
    assert refused.responses()[0].status == 503 and h.pool.overflows == 1
    assert h.pool.stats.requests == {("l", b"GET", 503): 1}


def test_a_request_waiting_past_the_queue_timeout_gets_503(proxy: Make) -> None:
    h = proxy(**breaker(max_connections=1, queue_timeout="3s"))
    first, waiting = clients(h, 2)
    h.advance(2.5)
    assert waiting.received() == b""
    h.advance(1)
    assert waiting.responses()[0].status == 503
    assert h.pool.pending == 0 and h.pool.overflows == 1
    h.upstream(0).respond(ok())
    assert first.responses()[0].status == 200
    assert len(h.upstream(0).requests()) == 1  # the one that gave up was never sent


def test_a_queued_client_that_leaves_gives_its_place_up(proxy: Make) -> None:
    h = proxy(**breaker(max_connections=1))
    _, leaving, staying = clients(h, 3)
    assert h.pool.pending == 2
    leaving.close()
    h.settle()
    assert h.pool.pending == 1
    h.upstream(0).respond(ok(b"1"))
    h.upstream(0).respond(ok(b"3"))
    assert staying.responses()[0].body == b"3"
    assert [r.target for r in h.upstream(0).requests()] == [b"/", b"/"]


def test_a_connection_that_closes_lets_a_waiting_request_open_one(proxy: Make) -> None:
    h = proxy(**breaker(max_connections=1))
    _, waiting = clients(h, 2)
    h.upstream(0).respond(ok(b"bye", b"Connection: close\r\n"))
    h.settle()
    assert len(h.loop.dials) == 2  # the slot came back when the connection closed
    h.upstream(1).respond(ok(b"next"))
    assert waiting.responses()[0].body == b"next"
    assert h.upstream_of(0).conns == 1


def test_a_refused_connect_gives_its_slot_back(proxy: Make) -> None:
    h = proxy(**breaker(max_connections=1))
    h.refuse(0)
    client = h.client()
    client.send(get())
    h.advance(1)
    assert client.responses()[0].status == 502
    assert h.upstream_of(0).conns == 0
    h.accept(0)
    client.send(get())
    h.upstream(0).respond(ok())
    assert client.responses()[1].status == 200


def test_idle_connections_are_reused_most_recent_first(proxy: Make) -> None:
    h = proxy()
    client = clients(h, 2)[0]
    h.upstream(0).respond(ok())
    h.upstream(1).respond(ok())  # released last: reused first
    client.send(get("/next"))
    assert h.asked() is h.upstream(1)


def test_idle_connections_unused_for_the_idle_timeout_are_closed(proxy: Make) -> None:
    h = proxy(pool={"timeouts": {"idle": "10s"}})
    client = clients(h, 1)[0]
    h.upstream(0).respond(ok())
    assert len(h.upstream_of(0).idle) == 1
    h.advance(9)
    assert not h.upstream(0).closed
    h.advance(2)
    assert h.upstream(0).closed and not h.upstream_of(0).idle
    assert h.upstream_of(0).conns == 0
    client.send(get())
    assert len(h.loop.dials) == 2


def test_an_idle_connection_the_upstream_closes_is_forgotten(proxy: Make) -> None:
    h = proxy()
    client = clients(h, 1)[0]
    h.upstream(0).respond(ok())
    h.upstream(0).close()
    assert not h.upstream_of(0).idle and h.upstream_of(0).conns == 0
    client.send(get())
    assert len(h.loop.dials) == 2 and h.pool.retries == 0  # no stale connection was tried


def test_bytes_on_an_idle_connection_close_it(proxy: Make) -> None:
    h = proxy()
    clients(h, 1)
    h.upstream(0).respond(ok())
    h.upstream(0).respond(b"HTTP/1.1 200 OK\r\n")  # out of step
    assert h.upstream(0).closed and not h.upstream_of(0).idle


def test_max_idle_connections_closes_the_ones_over_the_cap(proxy: Make) -> None:
    h = proxy(pool={"max_idle_connections": 1})
    clients(h, 3)
    for i in range(3):
        h.upstream(i).respond(ok())
    assert len(h.upstream_of(0).idle) == 1
    assert sum(u.closed for u in h.upstreams) == 2


def test_a_client_that_leaves_while_its_connection_opens_gives_the_slot_back(
    proxy: Make,
) -> None:
    h = proxy(**breaker(max_connections=1))
    h.hold(0)
    client = h.client()
    client.send(get())
    assert h.upstream_of(0).conns == 1  # counted from the moment it is decided
    client.close()
    h.settle()
    assert h.upstream_of(0).conns == 0 and not h.upstreams
    h.complete_connects()  # (the attempt was cancelled: nothing completes)
    h.accept(0)
    again = h.client()
    again.send(get())
    h.upstream(0).respond(ok())
    assert again.responses()[0].status == 200
