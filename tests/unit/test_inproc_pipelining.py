"""Pipelined requests, in process (``tests.inproc``): one at a time upstream, answers in
order, reading paused while requests queue, errors answered in their turn."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.inproc import Harness, get, harnesses, ok

Make = Callable[..., Harness]


@pytest.fixture
def proxy() -> Iterator[Make]:
    with harnesses() as make:
        yield make


def test_pipelined_requests_go_upstream_one_at_a_time_and_are_answered_in_order(
    proxy: Make,
) -> None:
    h = proxy()
    client = h.client()
    client.send(
        get("/1")
        + b"POST /2 HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello"
        + get("/3", extra=b"Connection: close\r\n")
    )
    up = h.upstream(0)
    assert [r.target for r in up.requests()] == [b"/1"]  # the next waits for this answer
    assert not client.reading  # requests queue: the proxy reads no further ahead
    up.respond(ok(b"one"))
    assert [r.target for r in up.requests()] == [b"/1", b"/2"]
    assert up.requests()[1].body == b"hello"
    up.respond(ok(b"two"))
    up.respond(ok(b"three"))
    assert [r.body for r in client.responses()] == [b"one", b"two", b"three"]
    assert client.responses()[2].header(b"Connection") == b"close"
    assert client.closed and len(h.upstreams) == 1


def test_reading_resumes_once_the_queue_is_empty(proxy: Make) -> None:
    h = proxy()
    client = h.client()
    client.send(get("/1") + get("/2"))
    assert not client.reading
    client.send(get("/3"))  # held by the paused transport, not lost
    up = h.upstream(0)
    up.respond(ok(b"1"))
    assert [r.target for r in up.requests()] == [b"/1", b"/2"]
    up.respond(ok(b"2"))
    up.respond(ok(b"3"))
    assert [r.body for r in client.responses()] == [b"1", b"2", b"3"]
    assert client.reading  # the queue emptied: reading again


def test_an_error_after_a_pipelined_request_is_answered_after_its_response(
    proxy: Make,
) -> None:
    h = proxy()
    client = h.client()
    client.send(get("/good") + b"BROKEN REQUEST\r\n\r\n")
    assert client.received() == b""  # the 400 waits for the answer due before it
    h.upstream(0).respond(ok(b"healthy"))
    first, second = client.responses()
    assert (first.status, first.body) == (200, b"healthy")
    assert second.status == 400 and second.header(b"Connection") == b"close"
    assert client.closed


def test_a_pipelined_request_after_a_local_answer_is_served(proxy: Make) -> None:
    h = proxy(route={"match": {"path_prefix": "/api"}})
    client = h.client()
    client.send(get("/nothing") + get("/api/x"))
    h.upstream(0).respond(ok(b"api"))
    assert [r.status for r in client.responses()] == [404, 200]


def test_a_request_pipelined_after_a_local_close_answer_is_never_forwarded(
    proxy: Make,
) -> None:
    h = proxy()
    client = h.client()
    client.send(get("/warm"))
    h.upstream(0).respond(ok())  # a pooled connection now waits, idle
    client.send(
        b"TRACE /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
        b"POST /delete HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"
    )
    [_, answer] = client.responses()
    assert answer.status == 405 and answer.header(b"Connection") == b"close"
    assert client.transport.eof_written  # ended: what follows is read and dropped
    h.advance(5.5)
    assert client.closed  # after the lingering close
    assert [r.target for r in h.upstream(0).requests()] == [b"/warm"]


def test_connection_close_on_a_request_ends_the_pipeline_there(proxy: Make) -> None:
    h = proxy()
    client = h.client()
    client.send(get("/1", extra=b"Connection: close\r\n") + get("/2"))
    up = h.upstream(0)
    up.respond(ok())
    assert [r.target for r in up.requests()] == [b"/1"]
    assert len(client.responses()) == 1 and client.closed


def test_a_pipelined_request_still_gets_its_response_header_timeout(proxy: Make) -> None:
    h = proxy(pool={"timeouts": {"response_header": "2s"}})
    client = h.client()
    client.send(get("/1") + get("/2"))
    up = h.upstream(0)
    up.respond(ok(b"first"))
    h.advance(1.5)
    assert len(client.responses()) == 1
    h.advance(1.5)  # past 2 s, within a tick or two
    first, second = client.responses()
    assert (first.status, second.status) == (200, 504)
    assert up.closed


def test_the_client_resetting_drops_the_queued_requests(proxy: Make) -> None:
    h = proxy()
    client = h.client()
    client.send(get("/1") + get("/2") + get("/3"))
    client.reset()
    h.settle()
    assert h.upstream(0).closed
    assert [r.target for r in h.upstream(0).requests()] == [b"/1"]
    upstream = h.upstream_of(0)
    assert upstream.active == 0 and upstream.conns == 0


def test_many_pipelined_requests_in_one_read_are_all_answered(proxy: Make) -> None:
    h = proxy()
    client = h.client()
    client.send(b"".join(get(f"/{i}") for i in range(50)))
    up = h.upstream(0)
    for i in range(50):
        up.respond(ok(b"%d" % i))
    assert [r.body for r in client.responses()] == [b"%d" % i for i in range(50)]
    assert len(h.upstreams) == 1 and client.reading
