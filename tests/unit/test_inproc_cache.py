"""The response cache's outcomes, in process (``tests.inproc``): a miss then hits, a
revalidation answered 304, collapsed misses waiting on one fetch, stale answers when
the upstream fails, and what is never stored."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.inproc import Client, Harness, get, harnesses, ok

Make = Callable[..., Harness]

FRESH = b"Cache-Control: max-age=60\r\n"
#: stored, but stale at once: every use asks the upstream with its validator
STALE = b'Cache-Control: max-age=0\r\nETag: "v1"\r\n'


@pytest.fixture
def proxy() -> Iterator[Make]:
    with harnesses() as make:
        yield make


def cached(upstreams: int = 1, **cache: Any) -> dict[str, Any]:
    return {"upstreams": upstreams, "route": {"cache": "c"}, "caches": {"c": cache}}


def fetch(h: Harness, path: str = "/c", extra: bytes = b"") -> Client:
    client = h.client()
    client.send(get(path, extra=extra))
    return client


def test_a_miss_is_stored_and_then_served_from_the_cache(proxy: Make) -> None:
    h = proxy(**cached())
    first = fetch(h)
    h.upstream(0).respond(ok(b"hi", FRESH))
    [miss] = first.responses()
    assert miss.body == b"hi" and miss.header(b"Cache-Status") == b"aiolb; fwd=miss; stored"
    second = fetch(h)
    [hit] = second.responses()
    assert hit.body == b"hi" and hit.header(b"Cache-Control") == b"max-age=60"
    assert hit.header(b"Cache-Status").startswith(b"aiolb; hit; ttl=")  # type: ignore[union-attr]
    assert hit.header(b"Age") in (b"0", b"1")
    assert len(h.upstream(0).requests()) == 1  # the hit never went upstream
    assert h.cache.results["miss"] == 1 and h.cache.results["hit"] == 1


def test_a_head_is_answered_from_a_stored_get(proxy: Make) -> None:
    h = proxy(**cached())
    fetch(h)
    h.upstream(0).respond(ok(b"12345", FRESH))
    client = h.client()
    client.send(b"HEAD /c HTTP/1.1\r\nHost: example.test\r\n\r\n")
    [answer] = client.responses(head=True)
    assert answer.header(b"Content-Length") == b"5" and answer.body == b""
    assert client.received().endswith(b"\r\n\r\n")
    assert len(h.upstream(0).requests()) == 1


def test_the_clients_own_validator_gets_a_304_from_the_cache(proxy: Make) -> None:
    h = proxy(**cached())
    fetch(h)
    h.upstream(0).respond(ok(b"x", FRESH + b'ETag: "abc"\r\n'))
    client = fetch(h, extra=b'If-None-Match: W/"abc"\r\n')
    [answer] = client.responses()
    assert answer.status == 304 and answer.body == b"" and answer.header(b"ETag") == b'"abc"'


def test_a_stale_entry_is_revalidated_and_a_304_serves_it(proxy: Make) -> None:
    h = proxy(**cached())
    fetch(h)
    h.upstream(0).respond(ok(b"content", STALE))
    client = fetch(h)
    up = h.upstream(0)
    assert up.requests()[1].header(b"If-None-Match") == b'"v1"'  # asked conditionally
    up.respond(b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nX-Checked: yes\r\n'
               b"Cache-Control: max-age=0\r\n\r\n")  # fmt: skip
    [answer] = client.responses()
    assert (answer.status, answer.body) == (200, b"content")
    assert answer.header(b"Cache-Status") == b"aiolb; fwd=stale; fwd-status=304; ttl=0"
    assert answer.header(b"X-Checked") == b"yes"  # the 304's headers were merged in
    assert h.cache.results["revalidated"] == 1
    assert len(h.upstream_of(0).idle) == 1  # the 304 left the connection usable


def test_a_revalidation_answered_with_a_new_response_replaces_the_entry(proxy: Make) -> None:
    h = proxy(**cached())
    fetch(h)
    h.upstream(0).respond(ok(b"old", STALE))
    client = fetch(h)
    h.upstream(0).respond(ok(b"new", FRESH))
    assert client.responses()[0].body == b"new"
    again = fetch(h)
    assert again.responses()[0].body == b"new"  # the new one is stored: a hit
    assert len(h.upstream(0).requests()) == 2


def test_concurrent_misses_wait_for_one_fetch(proxy: Make) -> None:
    h = proxy(**cached())
    clients = [fetch(h) for _ in range(5)]
    assert len(h.loop.dials) == 1  # the other four wait for the first one's response
    up = h.upstream(0)
    assert len(up.requests()) == 1
    up.respond(ok(b"once", FRESH))
    answers = [c.responses()[0] for c in clients]
    assert [a.body for a in answers] == [b"once"] * 5
    statuses = [a.header(b"Cache-Status") or b"" for a in answers]
    assert statuses[0] == b"aiolb; fwd=miss; stored"
    assert all(s.startswith(b"aiolb; hit") for s in statuses[1:])
    assert len(up.requests()) == 1


def test_a_waiting_miss_goes_upstream_itself_after_the_lock_timeout(proxy: Make) -> None:
    h = proxy(**cached(lock_timeout="2s"))
    first = fetch(h)
    second = fetch(h)
    h.advance(1.5)
    assert len(h.loop.dials) == 1
    h.advance(0.6)
    assert len(h.loop.dials) == 2  # it waited long enough, and fetched for itself
    h.upstream(1).respond(ok(b"second", FRESH))
    assert second.responses()[0].body == b"second"
    h.upstream(0).respond(ok(b"first", FRESH))
    assert first.responses()[0].body == b"first"


def test_a_failed_fetch_lets_the_waiting_misses_go_on(proxy: Make) -> None:
    h = proxy(**cached())
    first, second = fetch(h), fetch(h)
    h.upstream(0).respond(ok(b"oops", b"Cache-Control: no-store\r\n",
                             b"500 Internal Server Error"))  # fmt: skip
    assert first.responses()[0].status == 500
    h.settle()
    assert len(h.loop.dials) == 1  # the waiter asks on the pooled connection
    h.upstream(0).respond(ok(b"fine", FRESH))
    assert second.responses()[0].body == b"fine"


def test_waiting_misses_are_served_when_the_fetching_client_leaves_mid_body(
    proxy: Make,
) -> None:
    """The fetch belongs to the first client: when it leaves, the partial response is
    dropped (never stored, never given to the waiters), and the waiters fetch again."""
    h = proxy(**cached())
    fetcher, *waiters = [fetch(h) for _ in range(3)]
    h.upstream(0).respond(
        b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 10\r\n\r\nabc"
    )
    fetcher.close()
    h.settle()
    assert h.upstream(0).closed
    for up in h.upstreams[1:]:
        up.respond(ok(b"0123456789", FRESH))
    assert [w.responses()[0].body for w in waiters] == [b"0123456789"] * 2


def test_a_stored_response_answers_when_the_upstream_cannot(proxy: Make) -> None:
    h = proxy(**cached())
    fetch(h)
    h.upstream(0).respond(ok(b"kept", STALE))
    h.upstream(0).close()
    h.refuse(0)
    client = fetch(h)
    h.advance(1)  # retries and their backoff
    [answer] = client.responses()
    assert (answer.status, answer.body) == (200, b"kept")
    assert answer.header(b"Cache-Status") == b"aiolb; hit; fwd=stale; detail=error; ttl=0"
    assert h.cache.results["stale"] == 1


def test_a_stored_response_stands_in_for_a_timeout(proxy: Make) -> None:
    h = proxy(pool={"timeouts": {"response_header": "2s"}}, **cached())
    fetch(h)
    h.upstream(0).respond(ok(b"kept", STALE))
    client = fetch(h)
    h.advance(3)
    [answer] = client.responses()
    assert answer.body == b"kept" and b"detail=timeout" in answer.header(b"Cache-Status")  # type: ignore[operator]


def test_a_5xx_from_the_upstream_is_replaced_by_the_stored_response(proxy: Make) -> None:
    h = proxy(**cached())
    fetch(h)
    h.upstream(0).respond(ok(b"good", STALE))
    client = fetch(h)
    h.upstream(0).respond(ok(b"down", status=b"503 Service Unavailable"))
    [answer] = client.responses()
    assert (answer.status, answer.body) == (200, b"good")
    assert answer.header(b"Cache-Status") == b"aiolb; hit; fwd=stale; fwd-status=503; ttl=0"
    client.send(get("/c"))  # the client's connection stays usable
    h.upstream(0).respond(ok(b"back", FRESH))
    assert client.responses()[1].body == b"back"


def test_must_revalidate_is_never_served_stale(proxy: Make) -> None:
    h = proxy(**cached())
    fetch(h)
    h.upstream(0).respond(ok(b"strict", b'Cache-Control: max-age=0, must-revalidate\r\n'
                                        b'ETag: "e"\r\n'))  # fmt: skip
    h.upstream(0).close()
    h.refuse(0)
    client = fetch(h)
    h.advance(1)
    assert client.responses()[0].status == 502


@pytest.mark.parametrize(
    ("headers", "request_extra"),
    [(b"Cache-Control: no-store, max-age=60\r\n", b""),
     (b"Cache-Control: private, max-age=60\r\n", b""),
     (b"", b""),
     (FRESH, b"Authorization: Bearer x\r\n"),
     (FRESH, b"Cache-Control: no-store\r\n")],
    ids=["no-store", "private", "no-freshness", "authorization", "request-no-store"],
)  # fmt: skip
def test_what_must_not_be_stored_reaches_the_upstream_every_time(
    proxy: Make, headers: bytes, request_extra: bytes
) -> None:
    h = proxy(**cached())
    for i in range(2):
        client = fetch(h, extra=request_extra)
        h.upstream(0).respond(ok(b"x%d" % i, headers))
        assert client.responses()[0].body == b"x%d" % i
    assert len(h.upstream(0).requests()) == 2


def test_a_body_cut_off_by_the_upstream_is_never_stored(proxy: Make) -> None:
    h = proxy(**cached())
    first = fetch(h)
    h.upstream(0).respond(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\n"
                          b"Content-Length: 100\r\n\r\nonly part")  # fmt: skip
    h.upstream(0).close()
    assert first.closed
    fetch(h)
    assert len(h.loop.dials) == 2  # not from the cache
    assert len(h.cache.store) == 0


def test_an_unsafe_method_that_succeeds_invalidates_the_uri(proxy: Make) -> None:
    h = proxy(**cached())
    fetch(h)
    up = h.upstream(0)
    up.respond(ok(b"v1", FRESH))
    fetch(h)  # a hit
    client = h.client()
    client.send(b"POST /c HTTP/1.1\r\nHost: example.test\r\nContent-Length: 1\r\n\r\nx")
    up.respond(ok(b"posted"))
    assert client.responses()[0].header(b"Cache-Status") == b"aiolb; fwd=method"
    after = fetch(h)
    up.respond(ok(b"v2", FRESH))
    assert after.responses()[0].body == b"v2"
    assert [r.method for r in up.requests()] == [b"GET", b"POST", b"GET"]


def test_a_hit_answers_a_range_with_206(proxy: Make) -> None:
    h = proxy(**cached())
    fetch(h)
    h.upstream(0).respond(ok(b"0123456789", FRESH))
    [answer] = fetch(h, extra=b"Range: bytes=2-4\r\n").responses()
    assert (answer.status, answer.body) == (206, b"234")
    assert answer.header(b"Content-Range") == b"bytes 2-4/10"
