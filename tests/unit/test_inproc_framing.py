"""Message framing through the proxy, in process (``tests.inproc``): HEAD, bodiless
statuses, chunked bodies both ways, close-delimited bodies, 1xx, ``Expect:
100-continue``, bodies cut short, and an Upgrade tunnel."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.inproc import Harness, get, harnesses, ok, parse_requests

Make = Callable[..., Harness]


@pytest.fixture
def proxy() -> Iterator[Make]:
    with harnesses() as make:
        yield make


def test_a_head_response_has_no_body_and_the_connections_stay_usable(proxy: Make) -> None:
    h = proxy()
    client = h.client()
    client.send(b"HEAD /f HTTP/1.1\r\nHost: t\r\n\r\n")
    h.upstream(0).respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    assert client.take() == b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
    client.send(get("/after"))
    h.upstream(0).respond(ok(b"intact"))
    assert client.take() == ok(b"intact")
    assert len(h.upstreams) == 1  # HEAD's Content-Length was not waited for


@pytest.mark.parametrize(
    "response",
    [b"HTTP/1.1 204 No Content\r\n\r\n", b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n'],
)
def test_204_and_304_have_no_body(proxy: Make, response: bytes) -> None:
    h = proxy()
    client = h.client()
    client.send(get())
    h.upstream(0).respond(response)
    assert client.take() == response  # no framing header added
    client.send(get())
    h.upstream(0).respond(ok(b"next"))
    assert client.take() == ok(b"next")


def test_a_chunked_response_is_relayed_chunk_by_chunk(proxy: Make) -> None:
    h = proxy()
    client = h.client()
    client.send(get())
    up = h.upstream(0)
    up.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    assert client.take() == b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    up.respond(b"6\r\n world\r\n0\r\n\r\n")
    assert client.take() == b"6\r\n world\r\n0\r\n\r\n"
    assert len(h.upstream_of(0).idle) == 1  # the response ended: the connection is kept


def test_a_close_delimited_response_becomes_chunked_for_http_1_1(proxy: Make) -> None:
    h = proxy()
    client = h.client()
    client.send(get())
    up = h.upstream(0)
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil ")
    up.respond(b"close")
    assert client.take() == (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"6\r\nuntil \r\n5\r\nclose\r\n"
    )
    up.close()
    assert client.take() == b"0\r\n\r\n"  # the close ended the body
    assert not client.closed  # the client's connection is kept
    client.send(get())
    h.upstream(1).respond(ok())
    assert client.responses()[1].status == 200


def test_a_close_delimited_response_stays_so_for_http_1_0(proxy: Make) -> None:
    h = proxy()
    client = h.client()
    client.send(b"GET / HTTP/1.0\r\n\r\n")
    up = h.upstream(0)
    up.respond(b"HTTP/1.1 200 OK\r\n\r\nall of it")
    up.close()
    data = client.received()
    assert data.endswith(b"\r\n\r\nall of it") and b"Connection: close" in data
    assert b"chunked" not in data.lower() and client.closed


def test_a_reset_cuts_a_close_delimited_body_short_without_the_last_chunk(proxy: Make) -> None:
    h = proxy()
    client = h.client()
    client.send(get())
    up = h.upstream(0)
    up.respond(b"HTTP/1.1 200 OK\r\n\r\npart")
    up.reset()
    assert client.closed
    assert not client.received().endswith(b"0\r\n\r\n")  # never presented as complete


def test_an_upstream_closing_mid_body_closes_the_client(proxy: Make) -> None:
    h = proxy()
    client = h.client()
    client.send(get())
    up = h.upstream(0)
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
    up.close()
    assert client.closed
    assert client.received().endswith(b"only this")  # 91 bytes short: the client can tell


def test_an_upstream_closing_mid_chunked_body_never_sends_the_last_chunk(proxy: Make) -> None:
    h = proxy()
    client = h.client()
    client.send(get())
    up = h.upstream(0)
    up.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nsome\r\n")
    up.close()
    assert client.closed and not client.received().endswith(b"0\r\n\r\n")


def test_a_small_chunked_request_body_is_read_whole_then_sent(proxy: Make) -> None:
    """Up to ``body_buffer_size``, a body is buffered before a connection is taken."""
    h = proxy()
    client = h.client()
    client.send(b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
    client.send(b"6\r\nhello \r\n")
    assert not h.loop.dials  # a slow sender holds no upstream connection
    client.send(b"5\r\nworld\r\n0\r\n\r\n")
    [seen] = h.upstream(0).requests()
    assert seen.chunked and seen.body == b"hello world"
    assert seen.header(b"Content-Length") is None
    h.upstream(0).respond(ok(b"got it"))
    assert client.responses()[0].body == b"got it"


def test_a_large_chunked_request_body_streams_before_it_ends(proxy: Make) -> None:
    h = proxy(listener={"limits": {"body_buffer_size": 1024}})
    client = h.client()
    client.send(b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
    piece = b"x" * 2000
    client.send(b"%x\r\n%s\r\n" % (len(piece), piece))
    up = h.upstream(0)
    assert up.request().endswith(piece + b"\r\n")  # on its way already
    client.send(b"0\r\n\r\n")
    [seen] = up.requests()
    assert seen.body == piece
    up.respond(ok())
    assert client.responses()[0].status == 200


def test_a_content_length_body_in_pieces_arrives_whole(proxy: Make) -> None:
    h = proxy()
    client = h.client()
    client.send(b"PUT /p HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\n\r\nhello")
    client.send(b" world")
    [seen] = h.upstream(0).requests()
    assert seen.body == b"hello world" and seen.header(b"Content-Length") == b"11"


def test_expect_100_continue_is_answered_by_the_proxy(proxy: Make) -> None:
    h = proxy()
    client = h.client()
    client.send(b"PUT /u HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    assert client.take() == b"HTTP/1.1 100 Continue\r\n\r\n"  # before any upstream is asked
    assert not h.loop.dials
    client.send(b"hello")
    up = h.upstream(0)
    [seen] = up.requests()
    assert seen.body == b"hello" and seen.header(b"Expect") is None
    up.respond(b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"done"))
    assert client.take() == ok(b"done")  # the upstream's own 100 is not relayed again


def test_expect_100_continue_from_http_1_0_gets_no_interim_response(proxy: Make) -> None:
    h = proxy()
    client = h.client()
    client.send(b"PUT /u HTTP/1.0\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
    assert client.take() == b""
    client.send(b"ok")
    assert h.upstream(0).requests()[0].body == b"ok"


def test_informational_responses_reach_http_1_1_clients_only(proxy: Make) -> None:
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
    h = proxy()
    for version, relayed in ((b"1.1", True), (b"1.0", False)):
        client = h.client()
        client.send(b"GET / HTTP/%s\r\nHost: t\r\n\r\n" % version)
        h.asked().respond(hints + ok(b"final"))
        data = client.received()
        assert data.startswith(hints) is relayed
        assert data.endswith(b"final")


def test_a_pipelined_request_after_a_chunked_upload_is_forwarded_after_it(proxy: Make) -> None:
    h = proxy()
    client = h.client()
    client.send(
        b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        + get("/b")
    )
    up = h.upstream(0)
    assert [r.target for r in up.requests()] == [b"/a"]
    up.respond(ok(b"A"))
    assert [r.target for r in parse_requests(up.request())] == [b"/a", b"/b"]
    up.respond(ok(b"B"))
    assert [r.body for r in client.responses()] == [b"A", b"B"]


def test_an_invalid_chunk_size_gets_400_and_close(proxy: Make) -> None:
    h = proxy()
    client = h.client()
    client.send(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    assert client.responses()[0].status == 400 and client.closed


def test_a_websocket_upgrade_becomes_a_tunnel(proxy: Make) -> None:
    h = proxy()
    client = h.client()
    client.send(
        b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        b"early"  # sent before the answer: held until the 101
    )
    up = h.upstream(0)
    [seen] = up.requests()
    assert seen.header(b"Upgrade") == b"websocket"
    assert seen.header(b"Connection") == b"upgrade"
    switched = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\n\r\n")  # fmt: skip
    up.take()
    up.respond(switched + b"from upstream")
    assert client.take() == switched + b"from upstream"
    assert up.take() == b"early"
    client.send(b"\x81\x05hello")  # no HTTP any more: bytes both ways
    assert up.take() == b"\x81\x05hello"
    upstream = h.upstream_of(0)
    assert upstream.tunnels == 1 and upstream.conns == 1 and not upstream.idle
    up.close()  # a half-close is passed on as one
    assert client.transport.eof_written and not client.closed
    client.close()
    assert client.lost and up.lost
    assert upstream.tunnels == 0 and upstream.conns == 0 and upstream.active == 0
    assert upstream.stats.requests == {("l", b"GET", 101): 1}


def test_an_upgrade_the_route_does_not_allow_gets_403(proxy: Make) -> None:
    h = proxy(route={"upgrades": []})
    client = h.client()
    client.send(b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    assert client.responses()[0].status == 403 and not h.loop.dials
