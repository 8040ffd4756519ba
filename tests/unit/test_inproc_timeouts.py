"""Deadlines, in process (``tests.inproc``), on the virtual clock: the proxy's clock
ticks as ``advance`` moves time, so each timeout fires after its configured value and
within two ticks of it (``proxy.clock``), and never early."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.inproc import Harness, get, harnesses, ok

Make = Callable[..., Harness]


@pytest.fixture
def proxy() -> Iterator[Make]:
    with harnesses() as make:
        yield make


def test_no_response_header_in_time_is_a_504_and_the_client_stays(proxy: Make) -> None:
    h = proxy(pool={"timeouts": {"response_header": "5s"}})
    client = h.client()
    client.send(get())
    h.advance(4.9)
    assert client.received() == b""  # never early
    h.advance(0.6)  # within two ticks after it
    [answer] = client.responses()
    assert answer.status == 504 and answer.header(b"Connection") is None
    assert b"did not answer in time" in answer.body
    assert h.upstream(0).closed
    h.settle()
    assert h.upstream_of(0).conns == 0
    assert h.pool.stats.requests == {("l", b"GET", 504): 1}
    client.send(get())  # the client did nothing wrong: its connection goes on
    h.upstream(1).respond(ok())
    assert client.responses()[1].status == 200


def test_the_response_header_timeout_runs_from_the_end_of_the_request(proxy: Make) -> None:
    h = proxy(pool={"timeouts": {"response_header": "5s"}})
    client = h.client()
    client.send(b"PUT / HTTP/1.1\r\nHost: t\r\nContent-Length: 200000\r\n\r\n")
    for _ in range(10):  # a slow but steady upload, 20 s in all
        h.advance(2)
        client.send(b"u" * 20_000)
    h.advance(4)
    assert client.received() == b""
    h.upstream(0).respond(ok())
    assert client.responses()[0].status == 200


def test_a_response_that_stalls_mid_body_closes_the_client(proxy: Make) -> None:
    h = proxy(pool={"timeouts": {"read": "5s"}})
    client = h.client()
    client.send(get())
    up = h.upstream(0)
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nstart")
    for _ in range(3):
        h.advance(4)  # reads keep coming: the deadline moves on
        up.respond(b"more")
    assert not client.closed
    h.advance(6)
    assert client.closed and up.closed
    assert client.received().endswith(b"startmoremoremore")


def test_the_read_timeout_does_not_run_while_the_client_holds_the_upstream(
    proxy: Make,
) -> None:
    h = proxy(pool={"timeouts": {"read": "5s"}}, listener={"timeouts": {"send": "60s"}})
    client = h.client()
    client.send(get())
    up = h.upstream(0)
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (1024 * 1024))
    client.stall()
    while up.reading:
        up.respond(b"x" * 65536)
    h.advance(30)  # the client is slow, not the upstream
    assert not up.closed and not client.closed


def test_an_incomplete_request_head_gets_408(proxy: Make) -> None:
    h = proxy(listener={"timeouts": {"header": "5s"}})
    client = h.client()
    client.send(b"GET / HTTP/1.1\r\nHost: t\r\n")
    h.advance(4)
    assert client.received() == b""
    h.advance(2)
    [answer] = client.responses()
    assert answer.status == 408 and client.closed


def test_a_connection_that_sends_nothing_is_closed_without_a_response(proxy: Make) -> None:
    h = proxy(listener={"timeouts": {"header": "5s"}})
    client = h.client()
    h.advance(6)
    assert client.closed and client.received() == b""


def test_a_stalled_request_body_gets_408(proxy: Make) -> None:
    h = proxy(listener={"timeouts": {"body": "5s"}})
    client = h.client()
    client.send(b"PUT / HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
    h.advance(6)
    [answer] = client.responses()
    assert answer.status == 408 and client.closed
    assert not h.loop.dials  # the small body was being buffered: nothing went upstream


def test_a_keep_alive_connection_idle_for_the_idle_timeout_is_closed(proxy: Make) -> None:
    h = proxy(listener={"timeouts": {"idle": "10s"}})
    client = h.client()
    client.send(get())
    h.upstream(0).respond(ok())
    h.advance(9)
    assert not client.closed
    client.send(get())  # activity starts the timer again
    h.upstream(0).respond(ok())
    h.advance(9)
    assert not client.closed
    h.advance(2)
    assert client.closed and len(client.responses()) == 2  # quietly: no 408


def test_the_queue_wait_counts_no_response_header_time(proxy: Make) -> None:
    h = proxy(pool={"timeouts": {"response_header": "5s"},
                    "circuit_breaker": {"max_connections": 1, "queue_timeout": "30s"}})  # fmt: skip
    first, second = h.client(), h.client()
    first.send(get("/1"))
    second.send(get("/2"))
    h.advance(4)
    h.upstream(0).respond(ok(b"1"))  # the second is sent now, after 4 s in the queue
    h.advance(4)
    assert second.received() == b""
    h.upstream(0).respond(ok(b"2"))
    assert second.responses()[0].body == b"2"


def test_a_connect_that_never_completes_is_a_502_after_the_connect_timeout(
    proxy: Make,
) -> None:
    h = proxy(pool={"timeouts": {"connect": "2s"}})
    h.hang(0)
    client = h.client()
    client.send(get())
    h.advance(1.9)
    assert client.received() == b""
    h.advance(1)  # the failed try, then the retry (default: connect_failure) fails alike
    h.advance(3)
    [answer] = client.responses()
    assert answer.status == 502 and b"no connection" in answer.body
    assert h.upstream_of(0).conns == 0 and h.upstream_of(0).stats.connect_errors == 2


def test_a_timeout_with_retry_on_timeout_is_retried(proxy: Make) -> None:
    h = proxy(upstreams=2, pool={"timeouts": {"response_header": "3s"},
                                 "retries": {"retry_on": ["timeout"]}})  # fmt: skip
    client = h.client()
    client.send(get())
    h.advance(4)
    assert len(h.upstreams) == 2 and h.upstream(0).closed
    h.upstream(1).respond(ok(b"second"))
    assert client.responses()[0].body == b"second"


def test_draining_closes_idle_clients_and_finishes_busy_ones(proxy: Make) -> None:
    h = proxy()
    idle, busy = h.client(), h.client()
    busy.send(get())
    h.call(h.server.listeners[0].drain)
    assert idle.closed and not busy.closed
    h.upstream(0).respond(ok())
    [answer] = busy.responses()
    assert answer.status == 200 and answer.header(b"Connection") == b"close"
    assert busy.closed
