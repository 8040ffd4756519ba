"""Paths the refactor of issue 24 moved and the other in-process tests did not reach:
held responses (async response filters) around 1xx, closes, chunked and
close-delimited bodies and cache stand-ins; local answers due at the end of the
request; acquisition cancelled while queued or connecting; reference cycles."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from proxy.filters import Filter, Request, Response
from tests.inproc import Harness, get, harnesses, ok

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
