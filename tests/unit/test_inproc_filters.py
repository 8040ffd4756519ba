"""Route filters' outcomes, in process (``tests.inproc``): a local answer, changed
headers, async hooks (run as the virtual clock moves), failures answered 500, and
the built-in filters' effect on what goes upstream."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.inproc import BASE_PORT, Harness, get, harnesses, ok

Make = Callable[..., Harness]


@pytest.fixture
def proxy() -> Iterator[Make]:
    with harnesses() as make:
        yield make


def with_filters(*filters: Any, **kwargs: Any) -> dict[str, Any]:
    return {"route": {"filters": list(filters)}, **kwargs}


def stamp(asynchronous: bool = False) -> dict[str, Any]:
    return {"python": "tests.filter_support:Stamp", "options": {"async": asynchronous}}


def boom(phase: str, how: str) -> dict[str, Any]:
    return {"python": "tests.filter_support:Boom", "options": {"phase": phase, "how": how}}


def test_a_request_filters_local_response_answers_without_the_upstream(proxy: Make) -> None:
    h = proxy(**with_filters(stamp()))
    client = h.client()
    client.send(get("/deny"))
    [answer] = client.responses()
    assert (answer.status, answer.body) == (401, b"denied by a filter\n")
    assert answer.header(b"WWW-Authenticate") == b"Stamp"
    assert not h.loop.dials and not client.closed
    client.send(get("/next"))  # the connection goes on
    assert h.upstream(0).requests()[0].target == b"/next"


def test_every_phase_of_a_sync_filter_leaves_its_mark(proxy: Make) -> None:
    h = proxy(**with_filters(stamp()))
    client = h.client()
    client.send(get("/teapot", extra=b"X-Request-ID: rid-7\r\n"))
    [seen] = h.upstream(0).requests()
    assert seen.header(b"X-Stamp-Request") == b"GET 127.0.0.1"
    assert seen.header(b"X-Stamp-Upstream") == b"127.0.0.1:%d" % BASE_PORT
    h.upstream(0).respond(ok(b"tea"))
    [answer] = client.responses()
    assert answer.status == 418 and answer.body == b"tea"  # the filter changed the status
    assert answer.header(b"X-Stamp-Response") == b"200"  # what the upstream said
    assert answer.header(b"X-Stamp-State") == b"rid-7"  # state kept across the phases


def test_async_filters_hold_each_phase_until_they_are_done(proxy: Make) -> None:
    h = proxy(**with_filters(stamp(asynchronous=True)))
    client = h.client()
    client.send(get("/x"))
    assert not h.loop.dials  # the request hook sleeps 10 ms
    h.advance(0.01)
    assert not h.loop.dials  # now the upstream hook does
    h.advance(0.01)
    [seen] = h.upstream(0).requests()
    assert seen.header(b"X-Stamp-Request") and seen.header(b"X-Stamp-Upstream")
    h.upstream(0).respond(ok(b"held"))
    assert client.received() == b""  # the response hook holds the response
    h.advance(0.01)
    [answer] = client.responses()
    assert answer.body == b"held" and answer.header(b"X-Stamp-Response") == b"200"
    assert len(h.upstream_of(0).idle) == 1


def test_an_async_response_filter_holds_a_streamed_body_and_its_upstream(proxy: Make) -> None:
    h = proxy(**with_filters(stamp(asynchronous=True)))
    client = h.client()
    client.send(get("/big"))
    h.advance(0.02)
    up = h.upstream(0)
    size = 64 * 16384
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"A" * 16384)
    assert not up.reading  # held: the upstream is not read meanwhile
    for _ in range(63):
        up.respond(b"A" * 16384)  # waits in the transport
    assert client.received() == b""
    h.advance(0.01)
    [answer] = client.responses()
    assert answer.body == b"A" * size and answer.header(b"X-Stamp-Response") == b"200"


def test_an_async_response_filter_and_a_head_request(proxy: Make) -> None:
    h = proxy(**with_filters(stamp(asynchronous=True)))
    client = h.client()
    client.send(b"HEAD /h HTTP/1.1\r\nHost: t\r\n\r\n")
    h.advance(0.02)
    h.upstream(0).respond(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    h.advance(0.01)
    [answer] = client.responses(head=True)
    assert answer.header(b"X-Stamp-Response") == b"200" and answer.body == b""
    client.send(get("/after"))
    h.advance(0.02)
    h.upstream(0).respond(ok(b"after"))
    h.advance(0.01)
    assert parse_last_body(client.received()) == b"after"


def parse_last_body(data: bytes) -> bytes:
    return data.rsplit(b"\r\n\r\n", 1)[1]


@pytest.mark.parametrize(
    ("phase", "how"),
    [("request", "raise"), ("request", "wrong"), ("request", "async-raise"),
     ("response", "raise"), ("response", "wrong"), ("response", "async-raise")],
)  # fmt: skip
def test_a_failing_filter_is_a_500(proxy: Make, phase: str, how: str) -> None:
    h = proxy(**with_filters(boom(phase, how)))
    client = h.client()
    client.send(get("/x"))
    h.settle()
    if phase == "response":
        h.asked().respond(ok(b"never seen"))
        assert h.upstream(0).closed  # dropped with its connection
    else:
        assert not h.loop.dials
    [answer] = client.responses()
    assert (answer.status, answer.body) == (500, b"500 Internal Server Error\n")
    assert not client.closed
    failed = [r.getMessage() for r in h.logged if f"{phase}_filter failed" in r.getMessage()]
    assert len(failed) == 1  # one log line says which filter and where
    client.send(get("/ok"))  # the filter lets /ok through
    h.asked().respond(ok(b"fine"))
    assert client.responses()[1].body == b"fine"


@pytest.mark.parametrize("phase", ["request", "response"])
def test_a_filter_slower_than_the_response_header_timeout_is_a_500(proxy: Make, phase: str) -> None:
    h = proxy(pool={"timeouts": {"response_header": "2s"}}, **with_filters(boom(phase, "slow")))
    client = h.client()
    client.send(get("/x"))
    if phase == "response":
        h.upstream(0).respond(ok())
    h.advance(1.9)
    assert client.received() == b""
    h.advance(0.2)
    [answer] = client.responses()
    assert answer.status == 500


def test_a_slow_async_request_filter_is_cancelled_when_the_client_leaves(proxy: Make) -> None:
    h = proxy(**with_filters(boom("request", "slow")))
    client = h.client()
    client.send(get("/x"))
    client.close()
    h.advance(60)
    assert not h.loop.dials  # the hook's task was cancelled: nothing went on
    h.settle()  # and no task is left behind to complain


def test_the_headers_filter_changes_both_sides(proxy: Make) -> None:
    spec = {"headers": {
        "request": {"set": {"X-Client": "${client_ip}", "Host": "backend.internal"},
                    "add": {"X-Tag": "id=${request_id} host=${host}"}, "remove": ["X-Secret"]},
        "response": {"set": {"Server": "aiolb"}, "remove": ["X-Upstream"]},
    }}  # fmt: skip
    h = proxy(**with_filters(spec))
    client = h.client()
    client.send(b"GET / HTTP/1.1\r\nHost: Example.COM:8080\r\nX-Secret: s\r\nX-Tag: first\r\n"
                b"X-Request-ID: rid-1\r\n\r\n")  # fmt: skip
    [seen] = h.upstream(0).requests()
    assert seen.header(b"X-Client") == b"127.0.0.1"
    assert seen.all(b"X-Tag") == [b"first", b"id=rid-1 host=example.com"]
    assert seen.header(b"X-Secret") is None
    assert seen.header(b"Host") == b"backend.internal"
    assert seen.header(b"X-Forwarded-Host") == b"Example.COM:8080"
    h.upstream(0).respond(ok(b"x", b"Server: upstream\r\nX-Upstream: u1\r\n"))
    [answer] = client.responses()
    assert answer.all(b"Server") == [b"aiolb"] and answer.header(b"X-Upstream") is None


def test_rewrite_changes_the_path_the_upstream_is_asked_for(proxy: Make) -> None:
    h = proxy(**with_filters({"rewrite": {"strip_prefix": "/api"}}))
    client = h.client()
    client.send(get("/api/users?x=1"))
    [seen] = h.upstream(0).requests()
    assert seen.target == b"/users?x=1" and seen.header(b"X-Forwarded-Prefix") == b"/api"


def test_redirect_answers_here_and_closes_on_an_unread_body(proxy: Make) -> None:
    h = proxy(**with_filters({"redirect": {"status": 301, "scheme": "https"}}))
    client = h.client()
    client.send(get("/x?y=1", host="a.test:8080"))
    [answer] = client.responses()
    assert (answer.status, answer.header(b"Location")) == (301, b"https://a.test/x?y=1")
    assert not client.closed and not h.loop.dials
    client.send(b"POST /a HTTP/1.1\r\nHost: a.test\r\nContent-Length: 100\r\n\r\npart")
    assert client.responses()[1].header(b"Connection") == b"close"
    assert client.transport.eof_written  # ended: the rest of the body is read and dropped
    h.advance(5.5)
    assert client.closed  # after the lingering close


def test_access_denies_by_client_address(proxy: Make) -> None:
    h = proxy(**with_filters({"access": {"allow": ["10.0.0.0/8"]}}))
    outside, inside = h.client(ip="192.0.2.1"), h.client(ip="10.1.2.3")
    outside.send(get())
    inside.send(get())
    assert outside.responses()[0].status == 403
    assert len(h.upstream(0).requests()) == 1


def test_rate_limit_answers_429_past_the_burst(proxy: Make) -> None:
    h = proxy(**with_filters({"rate_limit": {"rate": "2/m", "burst": 2}}))
    client = h.client()
    for _ in range(3):
        client.send(get())
        if h.upstreams and h.upstream(0).take():  # it went upstream
            h.upstream(0).respond(ok())
    assert [r.status for r in client.responses()] == [200, 200, 429]
    assert len(h.upstream(0).requests()) == 2


def test_sticky_pins_a_returning_client_to_its_upstream(proxy: Make) -> None:
    h = proxy(upstreams=2, **with_filters("sticky"))
    first = h.client()
    first.send(get())
    up = h.asked()
    up.respond(ok())
    cookie = first.responses()[0].header(b"Set-Cookie")
    assert cookie is not None and cookie.startswith(b"aiolb_sticky=")
    again = h.client()
    for _ in range(4):  # round robin would alternate; the cookie pins
        again.send(get(extra=b"Cookie: " + cookie.split(b";")[0] + b"\r\n"))
        pinned = h.asked()
        assert pinned.port == up.port
        pinned.respond(ok())
    assert [r.status for r in again.responses()] == [200] * 4
