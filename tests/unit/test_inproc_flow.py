"""Back-pressure both ways, in process (``tests.inproc``): a client that does not read
pauses the upstream, an upstream that does not read pauses the client, each resumes
when the other drains, and a peer that stops for good is timed out."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.inproc import Client, Harness, UpstreamPeer, get, harnesses, ok

Make = Callable[..., Harness]

KIB = 1024


@pytest.fixture
def proxy() -> Iterator[Make]:
    with harnesses() as make:
        yield make


def big_download(h: Harness, size: int) -> tuple[Client, UpstreamPeer]:
    client = h.client()
    client.send(get("/big"))
    up = h.upstream(0)
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
    return client, up


def test_a_client_that_does_not_read_pauses_the_upstream_until_it_drains(
    proxy: Make,
) -> None:
    h = proxy()
    client, up = big_download(h, 1024 * KIB)
    client.stall()
    piece = b"x" * (64 * KIB)
    sent = 0
    while up.reading:
        up.respond(piece)
        sent += len(piece)
    assert 256 * KIB < sent <= 320 * KIB  # the client's high-water mark, and one read
    for _ in range(4):
        up.respond(piece)  # held: the proxy reads none of it
    assert client.transport.buffered == sent
    client.drain()
    assert up.reading
    while len(client.received()) < 1024 * KIB:
        up.respond(piece)
    [answer] = client.responses()
    assert answer.body == b"x" * (1024 * KIB)
    assert len(h.upstream_of(0).idle) == 1


def test_an_upstream_that_does_not_read_pauses_the_client_until_it_drains(
    proxy: Make,
) -> None:
    h = proxy()
    client = h.client()
    size = 1024 * KIB
    client.send(b"PUT /up HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size)
    up = h.upstream(0)  # over the body buffer: streamed, not buffered first
    up.stall()
    piece = b"y" * (32 * KIB)
    sent = 0
    while client.reading and sent < size:
        client.send(piece)
        sent += len(piece)
    assert sent < size and up.transport.buffered > 64 * KIB  # paused at its high water
    client.send(piece)  # held by the paused transport
    up.drain()
    assert client.reading
    while sent < size - len(piece):
        client.send(piece)
        sent += len(piece)
    [seen] = up.requests()
    assert seen.body == b"y" * size
    up.respond(ok())
    assert client.responses()[0].status == 200


def test_a_body_waiting_for_a_connection_pauses_the_client_above_64_kib(
    proxy: Make,
) -> None:
    h = proxy()
    h.hold(0)  # the connection takes its time
    client = h.client()
    size = 512 * KIB
    client.send(b"PUT /up HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size)
    piece = b"z" * (16 * KIB)
    sent = 0
    while client.reading:
        client.send(piece)
        sent += len(piece)
    assert 64 * KIB < sent <= 96 * KIB
    h.complete_connects()
    assert client.reading
    while sent < size:
        client.send(piece)
        sent += len(piece)
    assert h.upstream(0).requests()[0].body == b"z" * size


def test_a_client_that_reads_nothing_for_the_send_timeout_is_cut_off(proxy: Make) -> None:
    h = proxy(listener={"timeouts": {"send": "5s"}})
    client, up = big_download(h, 1024 * KIB)
    client.stall()
    while up.reading:
        up.respond(b"x" * (64 * KIB))
    h.advance(4)
    assert not client.closed
    h.advance(2)
    assert client.transport.aborted  # not a graceful close
    assert up.closed  # the upstream is freed too
    h.settle()
    assert h.upstream_of(0).conns == 0 and h.upstream_of(0).active == 0


def test_a_slow_client_that_reads_a_little_gets_another_period(proxy: Make) -> None:
    h = proxy(listener={"timeouts": {"send": "5s"}})
    client, up = big_download(h, 1024 * KIB)
    client.stall()
    while up.reading:
        up.respond(b"x" * (64 * KIB))
    for _ in range(3):
        h.advance(4)
        client.drain(1024)  # slowly, but it reads
    assert not client.closed


def test_an_upstream_that_takes_none_of_the_body_for_the_send_timeout_gets_504(
    proxy: Make,
) -> None:
    h = proxy(pool={"timeouts": {"send": "3s"}})
    client = h.client()
    client.send(b"PUT /up HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (1024 * KIB))
    up = h.upstream(0)
    up.stall()
    while client.reading:
        client.send(b"y" * (32 * KIB))
    h.advance(2)
    assert client.received() == b""
    h.advance(2)
    [answer] = client.responses()
    assert answer.status == 504 and answer.header(b"Connection") == b"close"
    assert up.closed


def test_no_408_after_the_upstream_took_the_body(proxy: Make) -> None:
    """A pause for the upstream's full buffer lifts when it reads; the client's own
    deadlines are not left lowered by it."""
    h = proxy(pool={"timeouts": {"send": "1s"}}, listener={"timeouts": {"body": "2s"}})
    client = h.client()
    size = 200 * KIB
    up_head = b"POST /slow HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size
    client.send(up_head)
    up = h.upstream(0)
    up.stall()
    client.send(b"b" * size)  # one read: the whole body, the upstream's buffer over high water
    assert not client.reading
    up.drain()
    assert client.reading
    h.advance(5)  # past every client deadline; the response is merely slow
    up.respond(ok(b"late"))
    client.send(get("/end"))
    up.respond(ok(b"end"))
    assert [(r.status, r.body) for r in client.responses()] == [(200, b"late"), (200, b"end")]


def test_a_pause_for_a_full_upstream_ends_with_its_exchange(proxy: Make) -> None:
    h = proxy()
    client = h.client()
    client.send(b"POST /early HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (200 * KIB))
    up = h.upstream(0)
    up.stall()
    client.send(b"b" * (200 * KIB))
    assert not client.reading
    up.respond(ok(b"early"))  # answered before reading the body through
    assert client.reading  # the pause belonged to that exchange
    client.send(get("/next"))
    assert client.responses()[0].body == b"early"
    up.drain()  # the upstream reads the rest of the body
    # that connection was still writing the first request: the next one gets another
    assert up.closed
    assert [r.target for r in up.requests()] == [b"/early"]
    fresh = h.upstream(1)
    assert [r.target for r in fresh.requests()] == [b"/next"]
    fresh.respond(ok(b"next"))
    assert client.responses()[1].body == b"next"


def test_a_reused_connection_with_a_full_write_buffer_still_pauses_the_client(
    proxy: Make,
) -> None:
    """The upstream answered the first request without reading its body (its write
    buffer over the high-water mark); the connection is pooled still paused for
    writing. The next request's body must not pile up behind it without limit: that
    connection is not reused (found by the in-process tier)."""
    h = proxy()
    client = h.client()
    client.send(b"POST /early HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (200 * KIB))
    up = h.upstream(0)
    up.stall()
    client.send(b"b" * (200 * KIB))
    up.respond(ok(b"early"))
    size = 4096 * KIB
    client.send(b"PUT /next HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size)
    sent = 0
    while client.reading and sent < size:
        client.send(b"c" * (64 * KIB))
        sent += 64 * KIB
    assert up.transport.buffered < 1024 * KIB, f"{up.transport.buffered} bytes buffered"


def test_a_deferred_body_bigger_than_64_kib_is_not_stuck(proxy: Make) -> None:
    h = proxy(listener={"limits": {"body_buffer_size": "1MiB"}})
    client = h.client()
    size = 200_000
    client.send(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size)
    for _ in range(size // 20_000):
        client.send(b"w" * 20_000)
    assert h.upstream(0).requests()[0].body == b"w" * size  # sent once read whole
    h.upstream(0).respond(ok())
    assert client.responses()[0].status == 200


def test_the_request_after_a_large_body_in_one_read_is_not_431(proxy: Make) -> None:
    h = proxy()
    client = h.client()
    size = 100_000
    client.send(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size + b"a" * size)
    h.upstream(0).respond(ok(b"up"))
    client.send(get("/end"))
    h.upstream(0).respond(ok(b"end"))
    assert [(r.status, r.body) for r in client.responses()] == [(200, b"up"), (200, b"end")]


def test_an_answer_before_the_body_is_through_closes_the_client_after_it(proxy: Make) -> None:
    """The upstream answers (413) while the client is still sending its body: the answer
    is relayed whole with ``Connection: close``, the upstream connection closes, and the
    client's connection lingers (found by this tier: it used to close at once, without
    saying so, and the client's next bytes made the kernel reset the connection, which
    can lose the 413 before the client reads it; nginx reads and drops the rest)."""
    h = proxy()
    client = h.client()
    client.send(b"PUT /u HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (1024 * KIB)
                + b"a" * (100 * KIB))  # fmt: skip
    up = h.upstream(0)
    up.respond(ok(b"big!", status=b"413 Payload Too Large"))
    [answer] = client.responses()
    assert (answer.status, answer.body) == (413, b"big!")
    assert answer.header(b"Connection") == b"close"
    assert up.closed
    assert client.transport.eof_written and not client.closed  # the write side is shut
    client.send(b"a" * (500 * KIB))  # still sending: read and dropped, no reset
    h.advance(4)
    client.send(b"a" * (100 * KIB))
    h.advance(4)
    assert not client.closed  # it sent within the lingering timeout
    h.advance(1.5)
    assert client.closed  # silent for 5 s (and a tick's slack): closed
    assert len(client.responses()) == 1


def test_a_lingering_close_ends_after_30_seconds_however_the_client_sends(
    proxy: Make,
) -> None:
    h = proxy()
    client = h.client()
    client.send(b"PUT /u HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (64 * 1024 * KIB))
    h.upstream(0).respond(ok(b"no", status=b"403 Forbidden"))
    start = h.loop.time()
    for _ in range(40):  # a byte a second, for 40 s
        if client.closed:
            break
        client.send(b"a")
        h.advance(1)
    assert client.closed
    assert h.loop.time() - start < 32


def test_a_local_answer_to_a_request_whose_body_still_arrives_lingers_too(
    proxy: Make,
) -> None:
    h = proxy(route={"match": {"path_prefix": "/only"}})
    client = h.client()
    client.send(b"POST /elsewhere HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\nab")
    [answer] = client.responses()
    assert (answer.status, answer.header(b"Connection")) == (404, b"close")
    assert not client.closed and client.transport.eof_written
    client.send(b"c" * 99_998)
    h.advance(4.5)
    assert not client.closed
    h.advance(1)  # 5 s and a tick's slack after the last bytes
    assert client.closed
