"""Forwarding and the proxy's own answers, in process (``tests.inproc``): what the
upstream receives, what the client gets back, and which connections stay open."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.inproc import Harness, get, harnesses, ok

Make = Callable[..., Harness]


@pytest.fixture
def proxy() -> Iterator[Make]:
    with harnesses() as make:
        yield make


def test_a_get_is_forwarded_with_the_forwarding_headers_and_relayed(proxy: Make) -> None:
    h = proxy()
    client = h.client()
    client.send(get("/a?q=1", extra=b"X-Custom: kept\r\nX-Request-ID: abc-123\r\n"))
    up = h.upstream(0)
    [seen] = up.requests()
    assert seen.start == b"GET /a?q=1 HTTP/1.1"
    assert seen.header(b"Host") == b"example.test"
    assert seen.header(b"X-Forwarded-For") == b"127.0.0.1"
    assert seen.header(b"X-Forwarded-Proto") == b"http"
    assert seen.header(b"X-Forwarded-Host") == b"example.test"
    assert seen.header(b"Via") == b"1.1 aiolb"
    assert seen.header(b"X-Request-ID") == b"abc-123"
    assert seen.header(b"X-Custom") == b"kept"
    response = ok(b"hello", b"Content-Type: text/plain\r\n")
    up.respond(response)
    assert client.take() == response  # relayed byte for byte
    assert h.upstream_of(0).stats.requests == {("l", b"GET", 200): 1}


def test_a_request_id_is_made_when_the_client_sent_none(proxy: Make) -> None:
    h = proxy()
    client = h.client()
    client.send(get("/1"))
    h.upstream(0).respond(ok())
    client.send(get("/2"))
    h.upstream(0).respond(ok())
    ids = [r.header(b"X-Request-ID") for r in h.upstream(0).requests()]
    assert all(ids) and ids[0] != ids[1]


def test_hop_by_hop_headers_are_removed_both_ways(proxy: Make) -> None:
    h = proxy()
    client = h.client()
    client.send(
        b"GET /h HTTP/1.1\r\nHost: shop.test\r\nConnection: keep-alive, X-Secret\r\n"
        b"X-Secret: s\r\nKeep-Alive: timeout=5\r\nTE: gzip\r\n"
        b"Proxy-Connection: keep-alive\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n"
    )
    [seen] = h.upstream(0).requests()
    names = {name.lower() for name, _ in seen.headers}
    assert not names & {b"x-secret", b"keep-alive", b"te", b"proxy-connection", b"connection"}
    assert seen.header(b"X-Forwarded-For") == b"203.0.113.9, 127.0.0.1"
    h.upstream(0).respond(
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Internal\r\nX-Internal: secret\r\n"
        b"Keep-Alive: timeout=5\r\nX-Public: yes\r\nContent-Length: 2\r\n\r\nok"
    )
    [answer] = client.responses()
    names = {name.lower() for name, _ in answer.headers}
    assert not names & {b"x-internal", b"keep-alive", b"connection"}
    assert answer.header(b"X-Public") == b"yes" and answer.body == b"ok"


def test_keep_alive_reuses_one_upstream_connection(proxy: Make) -> None:
    h = proxy()
    client = h.client()
    for i in range(3):
        client.send(get(f"/{i}"))
        h.upstream(0).respond(ok(b"r%d" % i))
    assert [r.body for r in client.responses()] == [b"r0", b"r1", b"r2"]
    assert len(h.upstreams) == 1  # one upstream connection carried all three
    assert [r.target for r in h.upstream(0).requests()] == [b"/0", b"/1", b"/2"]
    upstream = h.upstream_of(0)
    assert upstream.conns == 1 and len(upstream.idle) == 1
    assert upstream.stats.connections_opened == 1
    assert not client.closed


def test_round_robin_takes_the_upstreams_in_turn(proxy: Make) -> None:
    h = proxy(upstreams=3)
    client = h.client()
    for _ in range(6):
        client.send(get())
        h.asked().respond(ok())
    ports = [u.port - 9001 for u in h.upstreams for _ in u.requests()]
    assert sorted(ports) == [0, 0, 1, 1, 2, 2]
    assert len(h.upstreams) == 3  # then reused: one connection each


def test_a_response_with_connection_close_closes_the_upstream_connection(proxy: Make) -> None:
    h = proxy()
    client = h.client()
    client.send(get())
    h.upstream(0).respond(ok(b"bye", b"Connection: close\r\n"))
    assert client.responses()[0].body == b"bye"
    assert h.upstream(0).closed and not client.closed  # the client keeps its connection
    client.send(get())
    assert len(h.upstreams) == 2  # a new upstream connection for the next one
    h.upstream(1).respond(ok())
    h.settle()
    assert h.upstream_of(0).conns == 1


def test_the_client_asking_to_close_gets_connection_close(proxy: Make) -> None:
    h = proxy()
    client = h.client()
    client.send(get(extra=b"Connection: close\r\n"))
    h.upstream(0).respond(ok())
    [answer] = client.responses()
    assert answer.header(b"Connection") == b"close"
    assert client.closed
    assert len(h.upstream_of(0).idle) == 1  # the upstream connection is kept all the same


def test_http_1_0_keep_alive_is_said_and_kept(proxy: Make) -> None:
    h = proxy()
    client = h.client()
    client.send(b"GET / HTTP/1.0\r\nHost: t\r\nConnection: keep-alive\r\n\r\n")
    h.upstream(0).respond(ok())
    assert client.responses()[0].header(b"Connection") == b"keep-alive"
    assert not client.closed
    client.send(b"GET / HTTP/1.0\r\nHost: t\r\n\r\n")
    h.upstream(0).respond(ok())
    assert client.responses()[1].header(b"Connection") == b"close"
    assert client.closed


def test_the_connection_closes_after_max_requests_per_connection(proxy: Make) -> None:
    h = proxy(listener={"limits": {"max_requests_per_connection": 2}})
    client = h.client()
    client.send(get())
    h.upstream(0).respond(ok())
    assert not client.closed
    client.send(get())
    h.upstream(0).respond(ok())
    assert [r.header(b"Connection") for r in client.responses()] == [None, b"close"]
    assert client.closed


def test_the_client_leaving_mid_response_closes_the_upstream_connection(proxy: Make) -> None:
    h = proxy()
    client = h.client()
    client.send(get())
    h.upstream(0).respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    client.close()
    assert h.upstream(0).closed  # half a response: the connection cannot be reused
    h.settle()
    assert h.upstream_of(0).conns == 0 and not h.upstream_of(0).idle


# -- answered by the proxy itself ------------------------------------------------------------


def test_no_matching_route_gets_404_and_keeps_the_connection(proxy: Make) -> None:
    h = proxy(route={"match": {"path_prefix": "/api"}})
    client = h.client()
    client.send(get("/other"))
    assert client.responses()[0].status == 404
    assert not client.closed and not h.upstreams
    client.send(get("/api/x"))
    h.upstream(0).respond(ok(b"api"))
    assert [r.status for r in client.responses()] == [404, 200]
    assert h.server.stats.requests == {("l", b"GET", 404): 1}


def test_a_target_that_climbs_above_the_root_gets_400_and_close(proxy: Make) -> None:
    h = proxy()
    client = h.client()
    client.send(get("/a/../../etc/passwd"))
    [answer] = client.responses()
    assert answer.status == 400 and answer.header(b"Connection") == b"close"
    assert client.closed and not h.loop.dials


def test_a_target_is_normalised_before_it_is_forwarded(proxy: Make) -> None:
    h = proxy()
    client = h.client()
    client.send(get("//a/./b/../%63?x=/../"))
    assert h.upstream(0).requests()[0].target == b"/a/c?x=/../"


def test_absolute_form_for_an_unrouted_host_gets_400(proxy: Make) -> None:
    h = proxy(route={"match": {"host": "shop.test"}})
    client = h.client()
    client.send(b"GET http://elsewhere.test/x HTTP/1.1\r\nHost: elsewhere.test\r\n\r\n")
    [answer] = client.responses()
    assert answer.status == 400 and b"not a forward proxy" in answer.body
    assert client.closed and not h.loop.dials


def test_absolute_form_for_a_routed_host_goes_upstream_in_origin_form(proxy: Make) -> None:
    h = proxy(route={"match": {"host": "shop.test"}})
    client = h.client()
    client.send(b"GET http://shop.test/x?y HTTP/1.1\r\nHost: other.test\r\n\r\n")
    [seen] = h.upstream(0).requests()
    assert seen.start == b"GET /x?y HTTP/1.1" and seen.header(b"Host") == b"shop.test"


def test_http_1_1_without_host_gets_400(proxy: Make) -> None:
    h = proxy()
    client = h.client()
    client.send(b"GET / HTTP/1.1\r\n\r\n")
    assert client.responses()[0].status == 400 and client.closed


def test_trace_gets_405_and_never_reaches_the_upstream(proxy: Make) -> None:
    h = proxy()
    client = h.client()
    client.send(b"TRACE / HTTP/1.1\r\nHost: t\r\nCookie: secret\r\n\r\n")
    [answer] = client.responses()
    assert answer.status == 405 and b"TRACE" not in answer.header(b"Allow")  # type: ignore[operator]
    assert not client.closed and not h.loop.dials


def test_connect_gets_405_and_close(proxy: Make) -> None:
    h = proxy()
    client = h.client()
    client.send(b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n")
    [answer] = client.responses()
    assert answer.status == 405 and client.closed and not h.loop.dials


def test_options_star_and_max_forwards_0_are_answered_here(proxy: Make) -> None:
    h = proxy()
    client = h.client()
    client.send(b"OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n")
    client.send(b"OPTIONS /x HTTP/1.1\r\nHost: t\r\nMax-Forwards: 0\r\n\r\n")
    answers = client.responses()
    assert [a.status for a in answers] == [200, 200]
    assert all(a.header(b"Allow") for a in answers)
    assert not h.loop.dials
    client.send(b"OPTIONS /x HTTP/1.1\r\nHost: t\r\nMax-Forwards: 3\r\n\r\n")
    assert h.upstream(0).requests()[0].header(b"Max-Forwards") == b"2"  # one hop less


def test_a_malformed_head_gets_400_and_close(proxy: Make) -> None:
    h = proxy()
    client = h.client()
    client.send(b"GET / HTTP/1.1\r\nHost: t\r\nBad Header: x\r\n\r\n")
    assert client.responses()[0].status == 400 and client.closed
    assert h.server.stats.requests == {("l", b"GET", 400): 1}


def test_an_unsupported_http_version_gets_505(proxy: Make) -> None:
    h = proxy()
    client = h.client()
    client.send(b"GET / HTTP/2.0\r\nHost: t\r\n\r\n")
    assert client.responses()[0].status == 505 and client.closed


@pytest.mark.parametrize(
    ("limits", "request_bytes", "status"),
    [
        ({"max_uri_size": 64}, get("/" + "a" * 100), 414),
        ({"max_header_size": 256}, get(extra=b"X-Big: " + b"b" * 300 + b"\r\n"), 431),
        ({"max_headers": 3}, get(extra=b"A: 1\r\nB: 2\r\nC: 3\r\n"), 431),
        ({"max_body_size": 4}, b"PUT / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\n", 413),
        (
            {"max_body_size": 10},
            b"PUT / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n14\r\n" + b"x" * 20,
            413,
        ),
    ],
)
def test_limits_are_answered_before_anything_goes_upstream(
    proxy: Make, limits: dict[str, int], request_bytes: bytes, status: int
) -> None:
    h = proxy(listener={"limits": limits})
    client = h.client()
    client.send(request_bytes)
    [answer] = client.responses()
    assert answer.status == status and client.closed and not h.loop.dials


def test_no_available_upstream_gets_503_with_retry_after(proxy: Make) -> None:
    h = proxy(pool={"health_check": {"active": {"initial_state": "unhealthy"}}})
    client = h.client()
    client.send(get())
    [answer] = client.responses()
    assert answer.status == 503 and answer.header(b"Retry-After") == b"1"
    assert not h.loop.dials
    assert h.pool.stats.requests == {("l", b"GET", 503): 1}
