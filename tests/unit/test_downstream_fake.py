"""The exchange over a downstream that is not HTTP/1.1: a recording fake of the
``Downstream`` interface (``proxy.forwarding.downstream``), as an HTTP/2 stream will be
one. The exchange must route, pick, send and relay without writing a byte of HTTP/1.1
framing to its client: what it hands the downstream is the head, the de-chunked body
pieces, the end, and the proxy's own answers as objects. The upstream side is the
in-process tier's fake network (``tests.inproc``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from proxy.forwarding.downstream import UPSTREAM_FULL, Downstream
from proxy.forwarding.exchange import Exchange
from proxy.http.headers import REQUEST_HEAD, RequestHeaders, ResponseHead
from proxy.metrics.access_log import AccessLog
from proxy.server.listener import Listener
from tests.inproc import Harness, harnesses, ok

Make = Callable[..., Harness]


class Recording:
    """A downstream that records what the exchange asks of it."""

    def __init__(self, harness: Harness, client_ip: str = "192.0.2.7") -> None:
        self._listener: Listener = harness.server.listeners[0]
        self.client_ip = client_ip
        self.client_ip_bytes = client_ip.encode()
        self.head_template = REQUEST_HEAD
        self.request_ids = self._listener.request_ids
        self.loop: asyncio.AbstractEventLoop = harness.loop
        self.clock = harness.server.clock
        self.body_buffer = 64 * 1024
        self.draining = False
        self.record = True
        self.log_times = False
        self.access_log: AccessLog | None = None
        self.paused = 0
        self.write_paused = False
        self.events: list[tuple[Any, ...]] = []

    @property
    def listener(self) -> Listener:
        return self._listener

    def pause(self, reason: int) -> None:
        self.paused |= reason
        self.events.append(("pause", reason))

    def resume(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            self.events.append(("resume", reason))

    def send_continue(self, ex: Any) -> None:
        self.events.append(("continue",))

    def send_informational(self, ex: Any, status: int, raw: bytes) -> None:
        self.events.append(("informational", status))

    def send_head(self, ex: Any, status: int, found: ResponseHead) -> None:
        self.events.append(("head", status, found.head))

    def send_body(self, ex: Any, data: bytes | memoryview) -> None:
        self.events.append(("body", bytes(data)))

    def send_trailers(self, ex: Any, trailers: list[tuple[bytes, bytes]]) -> None:
        self.events.append(("trailers", trailers))

    def send_end(self, ex: Any) -> None:
        self.events.append(("end",))

    def send_answer(self, ex: Any, answer: Any, close: bool) -> None:
        self.events.append(("answer", answer.status))

    def flush(self) -> None:
        pass

    def send_whole(self, ex: Any, found: ResponseHead, body: bytes | memoryview) -> None:
        self.events.append(("whole", found.status, found.head, bytes(body)))

    def send_local(self, ex: Any, status: int, answer: Any, close: bool, cause: str) -> None:
        self.events.append(("local", status, answer))

    def send_redirect(self, ex: Any, location: bytes, close: bool) -> None:
        self.events.append(("redirect", location))

    def switch(self, ex: Any, conn: Any, protocol: str, head: bytes, rest: bytes) -> None:
        self.events.append(("switch", protocol))

    def exchange_done(self, ex: Any, keep_alive: bool) -> None:
        self.events.append(("done", keep_alive))

    def close(self) -> None:
        self.events.append(("close",))

    def kinds(self) -> list[str]:
        return [e[0] for e in self.events]

    def relayed(self) -> tuple[int, bytes, bytes]:
        """The one response relayed (status, head, body), by either path: whole (the
        fast path, once the head is known) or head, body pieces and end."""
        kinds = self.kinds()
        if kinds[0] == "whole":
            assert kinds == ["whole", "done"], kinds
            return self.events[0][1], self.events[0][2], self.events[0][3]
        assert kinds[0] == "head" and kinds[-2:] == ["end", "done"], kinds
        body = b"".join(e[1] for e in self.events if e[0] == "body")
        return self.events[0][1], self.events[0][2], body


@pytest.fixture
def proxy() -> Iterator[Make]:
    with harnesses() as make:
        yield make


def start(
    h: Harness, method: bytes = b"GET", target: bytes = b"/a",
    extra: list[tuple[bytes, bytes]] | None = None,
) -> tuple[Recording, Exchange]:  # fmt: skip
    """A request handed to the exchange by the recording downstream, as a parser would."""
    down = Recording(h)
    typed: Downstream = down  # the fake satisfies the interface (mypy checks this line)
    headers = [(b"Host", b"example.test"), *(extra or [])]
    ex = Exchange(typed, method, target, headers, RequestHeaders(headers), 1, True)
    h.call(ex.start)
    return down, ex


def test_a_request_from_another_downstream_is_forwarded_and_answered_in_one_piece(
    proxy: Make,
) -> None:
    h = proxy()
    down, ex = start(h)
    h.call(ex.on_request_complete)
    up = h.upstream(0)
    [seen] = up.requests()
    assert seen.start == b"GET /a HTTP/1.1"
    assert seen.header(b"X-Forwarded-For") == b"192.0.2.7"  # the downstream's client
    up.respond(ok(b"hello"))
    status, head, body = down.relayed()
    assert (status, body) == (200, b"hello")
    assert b"Content-Length: 5" in head
    assert down.events[-1] == ("done", True)
    assert h.upstream_of(0).stats.requests == {("l", b"GET", 200): 1}


def test_a_chunked_upstream_body_reaches_the_downstream_without_chunk_framing(
    proxy: Make,
) -> None:
    """Framing is the downstream's: the exchange hands it the body's bytes only."""
    h = proxy()
    down, ex = start(h)
    h.call(ex.on_request_complete)
    up = h.upstream(0)
    up.requests()
    up.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    up.respond(b"6\r\n world\r\n0\r\n\r\n")
    kinds = down.kinds()
    assert kinds[0] == "head" and kinds[-2:] == ["end", "done"]
    body = b"".join(e[1] for e in down.events if e[0] == "body")
    assert body == b"hello world"
    head = down.events[0][2]
    assert b"Transfer-Encoding" not in head  # hop-by-hop: the downstream frames it


def test_the_proxys_own_answer_goes_to_the_downstream_as_a_status(proxy: Make) -> None:
    h = proxy(route={"match": {"path_prefix": "/only"}})
    down, ex = start(h, target=b"/elsewhere")
    h.call(ex.on_request_complete)
    assert down.events == [("local", 404, None), ("done", True)]
    assert h.upstreams == []


def test_a_request_body_from_the_downstream_is_sent_and_a_full_upstream_pauses_it(
    proxy: Make,
) -> None:
    h = proxy(listener={"limits": {"body_buffer_size": 0}})
    down, ex = start(h, b"POST", b"/up", [(b"Content-Length", b"300000")])
    up = h.upstream(0)
    up.stall()  # the upstream reads nothing: its write buffer fills
    for _ in range(3):
        h.call(ex.on_request_body, b"x" * 100_000)
        h.call(ex.flush_upstream)
    assert ("pause", UPSTREAM_FULL) in down.events
    up.drain()
    assert ("resume", UPSTREAM_FULL) in down.events
    h.call(ex.on_request_complete)
    [seen] = up.requests()
    assert seen.body == b"x" * 300_000
    up.respond(ok(b"got it"))
    assert ("done", True) in down.events


def test_a_failed_attempt_is_retried_before_the_downstream_hears_anything(
    proxy: Make,
) -> None:
    h = proxy(upstreams=2, pool={"balancer": "round_robin"})
    h.refuse(0)
    h.refuse(1)
    down, ex = start(h)
    h.call(ex.on_request_complete)
    h.accept(0)
    h.accept(1)
    h.advance(1)  # the retry's backoff
    assert down.events == []  # nothing yet: the first attempt failed quietly
    h.asked().respond(ok(b"second try"))
    assert down.relayed()[::2] == (200, b"second try")  # one response, the second try's
