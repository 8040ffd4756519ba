"""Paths the refactor of issue 24 moved and the other in-process tests did not reach:
held responses (async response filters) around 1xx, closes, chunked and
close-delimited bodies and cache stand-ins; local answers due at the end of the
request; acquisition cancelled while queued or connecting; reference cycles."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from proxy.filters import Filter, Request, Response
from tests.inproc import Harness, get, harnesses, ok, parse_responses

Make = Callable[..., Harness]

FRESH = b"Cache-Control: max-age=60\r\n"
STALE = b'Cache-Control: max-age=0\r\nETag: "v1"\r\n'
NOT_MODIFIED = b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nCache-Control: max-age=0\r\n\r\n'


class Flaky(Filter):
    """A response filter, async when the options say so, that fails for requests with
    ``X-Fail`` and marks the others (``X-Flaky``)."""

    def response_filter(self, request: Request, response: Response) -> Any:
        if (self.options or {}).get("async"):
            return self._later(request, response)
        self._mark(request, response)
        return None

    async def _later(self, request: Request, response: Response) -> None:
        await asyncio.sleep(0.01)
        self._mark(request, response)

    def _mark(self, request: Request, response: Response) -> None:
        if request.headers.get("X-Fail") is not None:
            raise RuntimeError("flaky")
        response.headers.set("X-Flaky", str(response.status))


def flaky(asynchronous: bool = False) -> dict[str, Any]:
    return {"python": "tests.unit.test_inproc_review:Flaky", "options": {"async": asynchronous}}


@pytest.fixture
def proxy() -> Iterator[Make]:
    with harnesses() as make:
        yield make


def filtered(asynchronous: bool = True, **kwargs: Any) -> dict[str, Any]:
    route = {"filters": [flaky(asynchronous)], **kwargs.pop("route", {})}
    return {"route": route, **kwargs}


def cached_filtered(asynchronous: bool, **cache: Any) -> dict[str, Any]:
    return {"route": {"cache": "c", "filters": [flaky(asynchronous)]}, "caches": {"c": cache}}


# -- held responses ------------------------------------------------------------------


def test_an_early_hint_goes_out_before_a_held_response(proxy: Make) -> None:
    h = proxy(**filtered())
    client = h.client()
    client.send(get("/x"))
    up = h.upstream(0)
    up.respond(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n" + ok(b"body"))
    h.advance(0.01)
    data = client.received()
    assert data.startswith(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\nHTTP/1.1 200 OK")
    [final] = [r for r in client.responses() if r.status == 200]
    assert final.body == b"body" and final.header(b"X-Flaky") == b"200"
    assert h.upstream_of(0).conns == 1 and len(h.upstream_of(0).idle) == 1


def test_a_held_chunked_body_is_relayed_chunked_once_released(proxy: Make) -> None:
    h = proxy(**filtered())
    client = h.client()
    client.send(get("/x"))
    up = h.upstream(0)
    up.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    up.respond(b"2\r\nde\r\n0\r\n\r\n")  # complete while held
    assert client.received() == b""
    h.advance(0.01)
    [answer] = client.responses()
    assert answer.chunked and answer.body == b"abcde" and answer.header(b"X-Flaky") == b"200"
    assert not client.closed and len(h.upstream_of(0).idle) == 1


def test_a_held_close_delimited_body_ends_with_the_upstreams_close(proxy: Make) -> None:
    h = proxy(**filtered())
    client = h.client()
    client.send(get("/x"))
    up = h.upstream(0)
    up.respond(b"HTTP/1.1 200 OK\r\n\r\nuntil ")
    up.respond(b"close")
    up.close()
    h.advance(0.01)
    [answer] = client.responses()
    assert answer.chunked and answer.body == b"until close"
    assert not client.closed and h.upstream_of(0).conns == 0


def test_a_held_response_whose_upstream_closes_after_it_is_still_relayed(proxy: Make) -> None:
    """``Connection: close``: the upstream sends the whole response and closes, while the
    async response hook still runs. The response was complete: the client gets it."""
    h = proxy(**filtered())
    client = h.client()
    client.send(get("/x"))
    up = h.upstream(0)
    up.respond(ok(b"whole", b"Connection: close\r\n"))
    up.close()  # the server closes after its response, as it said it would
    h.advance(0.01)
    [answer] = client.responses()
    assert answer.status == 200 and answer.body == b"whole"
    assert not client.closed and h.upstream_of(0).conns == 0


def test_a_hook_failing_while_held_is_a_500_after_the_early_hint(proxy: Make) -> None:
    h = proxy(**filtered())
    client = h.client()
    client.send(get("/x", extra=b"X-Fail: 1\r\n"))
    up = h.upstream(0)
    up.respond(b"HTTP/1.1 103 Early Hints\r\n\r\n"
               b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    h.advance(0.01)
    statuses = [r.status for r in client.responses()]
    assert statuses == [103, 500]
    assert up.closed and not client.closed
    client.send(get("/next"))
    h.asked().respond(ok(b"next"))
    h.advance(0.01)
    assert client.responses()[-1].body == b"next"


# -- the cache answering instead, through response filters -----------------------------


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_304_merge_through_response_filters(proxy: Make, asynchronous: bool) -> None:
    h = proxy(**cached_filtered(asynchronous))
    client = h.client()
    client.send(get("/c"))
    h.upstream(0).respond(ok(b"content", STALE))
    h.advance(0.01)
    client.send(get("/c"))
    h.upstream(0).respond(NOT_MODIFIED)
    h.advance(0.01)
    answer = client.responses()[1]
    assert (answer.status, answer.body) == (200, b"content")
    assert answer.header(b"X-Flaky") == b"200"
    assert answer.header(b"Cache-Status") == b"aiolb; fwd=stale; fwd-status=304; ttl=0"
    assert len(h.upstream_of(0).idle) == 1


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_response_filter_failing_on_a_304_merge_is_a_500(proxy: Make, asynchronous: bool) -> None:
    """The cache answers a revalidation's 304 with the stored response; a response hook
    that fails over that answer is a 500 (the error page), as over any response: the
    stored response is not sent."""
    h = proxy(**cached_filtered(asynchronous))
    client = h.client()
    client.send(get("/c"))
    h.upstream(0).respond(ok(b"content", STALE))
    h.advance(0.01)
    client.send(get("/c", extra=b"X-Fail: 1\r\n"))
    h.upstream(0).respond(NOT_MODIFIED)
    h.advance(0.01)
    answer = client.responses()[1]
    assert (answer.status, answer.body) == (500, b"500 Internal Server Error\n")


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_stale_stand_in_for_a_5xx_through_response_filters(
    proxy: Make, asynchronous: bool
) -> None:
    h = proxy(**cached_filtered(asynchronous))
    client = h.client()
    client.send(get("/c"))
    h.upstream(0).respond(ok(b"good", STALE))
    h.advance(0.01)
    client.send(get("/c"))
    h.upstream(0).respond(ok(b"down", status=b"503 Service Unavailable"))
    h.advance(0.01)
    answer = client.responses()[1]
    assert (answer.status, answer.body) == (200, b"good")
    assert answer.header(b"X-Flaky") == b"200"
    client.send(get("/c"))
    h.upstream(0).respond(ok(b"back", FRESH))
    h.advance(0.01)
    assert client.responses()[2].body == b"back"


@pytest.mark.parametrize("asynchronous", [False, True])
def test_use_stale_on_a_refused_upstream_through_response_filters(
    proxy: Make, asynchronous: bool
) -> None:
    h = proxy(**cached_filtered(asynchronous))
    client = h.client()
    client.send(get("/c"))
    h.upstream(0).respond(ok(b"kept", STALE))
    h.advance(0.01)
    h.upstream(0).close()
    h.refuse(0)
    client.send(get("/c"))
    h.advance(1)
    answer = client.responses()[1]
    assert (answer.status, answer.body) == (200, b"kept")
    assert answer.header(b"X-Flaky") == b"200"
    assert b"detail=error" in (answer.header(b"Cache-Status") or b"")
    assert h.upstream_of(0).conns == 0


# -- acquisition: leaving while queued, opening or connecting ------------------------


def limited(**pool: Any) -> dict[str, Any]:
    return {"pool": {"circuit_breaker": {"max_connections": 1, **pool}}}


def test_a_client_leaving_while_queued_gives_its_place_back(proxy: Make) -> None:
    h = proxy(**limited())
    first, second, third = h.client(), h.client(), h.client()
    first.send(get("/1"))
    second.send(get("/2"))
    third.send(get("/3"))
    upstream = h.upstream_of(0)
    assert upstream.conns == 1 and len(upstream.waiting) == 2 and h.pool.pending == 2
    second.reset()
    assert len(upstream.waiting) == 1 and h.pool.pending == 1
    h.upstream(0).respond(ok(b"1"))
    assert [r.target for r in h.upstream(0).requests()] == [b"/1", b"/3"]  # /2 skipped
    h.upstream(0).respond(ok(b"3"))
    assert third.responses()[0].body == b"3"
    assert upstream.conns == 1 and upstream.active == 0 and h.pool.pending == 0


def test_a_client_leaving_while_its_connection_opens_gives_the_slot_back(proxy: Make) -> None:
    h = proxy(**limited())
    h.hold(0)
    client, waiting = h.client(), h.client()
    client.send(get("/1"))
    waiting.send(get("/2"))
    upstream = h.upstream_of(0)
    assert upstream.conns == 1 and len(upstream.waiting) == 1
    client.reset()  # the connect is cancelled: its slot goes to the waiting request
    assert len(h.loop.dials) == 2 and upstream.conns == 1 and not upstream.waiting
    h.complete_connects()
    h.asked().respond(ok(b"2"))
    assert waiting.responses()[0].body == b"2"
    waiting.reset()
    h.settle()
    assert upstream.conns == 1 and upstream.active == 0 and h.pool.pending == 0


def test_a_client_leaving_before_its_connect_task_ran_gives_the_slot_back(proxy: Make) -> None:
    h = proxy(**limited())
    client = h.client()

    def ask_and_leave() -> None:  # one loop iteration: the connect task never runs
        client.transport.feed(get("/1"))
        client.transport.reset()

    h.call(ask_and_leave)
    upstream = h.upstream_of(0)
    assert not h.loop.dials and upstream.conns == 0 and upstream.active == 0


def test_a_queued_request_past_the_queue_timeout_gets_503(proxy: Make) -> None:
    h = proxy(**limited(queue_timeout="1s"))
    first, second = h.client(), h.client()
    first.send(get("/1"))
    second.send(get("/2"))
    h.advance(1.5)
    [answer] = second.responses()
    assert answer.status == 503 and h.pool.pending == 0 and h.pool.overflows == 1
    h.upstream(0).respond(ok(b"1"))
    assert first.responses()[0].body == b"1"
    assert h.upstream_of(0).conns == 1 and not h.upstream_of(0).waiting


def test_max_pending_refuses_at_once(proxy: Make) -> None:
    h = proxy(**limited(max_pending=1))
    clients = [h.client() for _ in range(3)]
    for i, client in enumerate(clients):
        client.send(get(f"/{i}"))
    [refused] = clients[2].responses()
    assert refused.status == 503 and h.pool.overflows == 1 and h.pool.pending == 1
    h.upstream(0).respond(ok(b"0"))
    h.upstream(0).respond(ok(b"1"))
    assert clients[1].responses()[0].body == b"1" and h.pool.pending == 0


# -- local answers due at the end of the request ---------------------------------------


def test_requests_pipelined_behind_a_local_answer_and_a_100_continue(proxy: Make) -> None:
    h = proxy(route={"filters": [{"python": "tests.filter_support:Stamp"}]})
    client = h.client()
    client.send(get("/deny") + b"POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n"
                b"Expect: 100-continue\r\n\r\n")
    data = client.received()
    assert data.startswith(b"HTTP/1.1 401 ") and data.endswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    client.send(b"hi" + get("/after"))
    up = h.asked()
    up.respond(ok(b"p"))
    h.asked().respond(ok(b"a"))
    tail = client.received().split(b"HTTP/1.1 100 Continue\r\n\r\n", 1)[1]
    assert [r.body for r in parse_responses(tail)] == [b"p", b"a"]
    assert [r.method for r in h.upstream(0).requests()] == [b"POST", b"GET"]


# -- reference cycles: every exchange freed by reference counting ------------------------

SWR = b'Cache-Control: max-age=0, stale-while-revalidate=60\r\nETag: "v1"\r\n'


def left_over() -> list[object]:
    """The exchanges, cache states, background downstreams and tickets alive now."""
    from proxy.cache.flow import CacheState
    from proxy.forwarding.background import Background
    from proxy.forwarding.core import ExchangeCore
    from proxy.upstream.acquire import Ticket

    kinds = (ExchangeCore, CacheState, Background, Ticket)
    return [o for o in gc.get_objects() if isinstance(o, kinds)]


def test_refreshes_waits_queues_and_retries_are_freed_without_the_cyclic_gc(
    proxy: Make,
) -> None:
    """A background refresh, a collapsed miss, a queued request that left and one that
    timed out, a retry that ends in a 502: with the cyclic GC off, no exchange, cache
    state, background downstream or ticket is left once they are over."""
    gc.collect()
    gc.disable()
    try:
        swr = proxy(**{"route": {"cache": "c"}, "caches": {"c": {}}}, **limited(queue_timeout="1s"))
        one = swr.client()
        one.send(get("/s"))
        swr.upstream(0).respond(ok(b"s1", SWR))
        one.send(get("/s"))  # a stale hit: a background refresh
        swr.asked().respond(ok(b"s2", FRESH))
        one.send(get("/m"))  # a miss that another one waits for
        two = swr.client()
        two.send(get("/m"))
        swr.asked().respond(ok(b"m", FRESH))
        one.send(get("/q"))  # holds the one connection
        leaving, late = swr.client(), swr.client()
        leaving.send(get("/q2"))
        late.send(get("/q3"))
        leaving.reset()  # leaves the queue
        swr.advance(1.5)  # the other times out: 503
        swr.asked().respond(ok(b"q"))
        swr.advance(1)
        assert [r.status for r in late.responses()] == [503]
        assert [r.body for r in two.responses()] == [b"m"]
        assert swr.cache.results["revalidated"] == 0 and len(one.responses()) == 4

        retry = proxy(upstreams=2)
        retry.refuse(0)
        retry.refuse(1)
        failing = retry.client()
        failing.send(get("/r"))
        retry.advance(1)
        assert failing.responses()[0].status == 502

        assert left_over() == []
    finally:
        gc.enable()


@pytest.mark.parametrize("asynchronous", [False, True])
def test_filtered_exchanges_are_freed_without_the_cyclic_gc(
    proxy: Make, asynchronous: bool
) -> None:
    """A route with a response hook: once the response is out, the exchange (and its
    cache state) must go by reference counting. (Pre-existing: ``Exchange.filters`` is
    the ``Request`` view, whose ``ex`` is the exchange, a cycle nobody breaks.)"""
    gc.collect()
    gc.disable()
    try:
        h = proxy(**filtered(asynchronous))
        client = h.client()
        client.send(get("/x"))
        h.upstream(0).respond(ok(b"x"))
        h.advance(0.01)
        assert client.responses()[0].body == b"x"
        assert left_over() == []
    finally:
        gc.enable()


def test_a_response_held_longer_than_the_read_timeout_still_arrives(proxy: Make) -> None:
    """The upstream is done; an async response hook takes 2 s with ``timeouts.read`` at
    1 s (its own bound is ``response_header``). The hold is the proxy's, not a slow
    upstream: the read deadline waits for it, as it waits for a slow client."""
    h = proxy(
        route={"filters": [{"python": "tests.filter_support:Pondering",
                            "options": {"seconds": 2}}]},
        pool={"timeouts": {"read": "1s", "response_header": "10s"}},
    )  # fmt: skip
    client = h.client()
    client.send(get("/x"))
    up = h.upstream(0)
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
    h.advance(2.5)
    up.respond(b"56789")
    [answer] = client.responses()
    assert (answer.status, answer.body) == (200, b"0123456789")
    assert answer.header(b"X-Pondered") == b"yes"
    assert not client.closed
