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


def test_when_the_fetch_is_dropped_one_waiter_fetches_and_the_others_wait_again(
    proxy: Make,
) -> None:
    """Found by this tier: the waiters of a dropped fetch all went upstream at once (a
    miss waited only once). One of them fetches now, the others wait for it within
    their ``lock_timeout`` (nginx's ``proxy_cache_lock``), and get it as a hit."""
    h = proxy(**cached())
    fetcher, *waiters = [fetch(h) for _ in range(4)]
    h.upstream(0).respond(
        b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 10\r\n\r\nabc"
    )
    fetcher.close()
    h.settle()
    assert len(h.loop.dials) == 2  # the dropped fetch, and one more for three waiters
    h.upstream(1).respond(ok(b"0123456789", FRESH))
    answers = [w.responses()[0] for w in waiters]
    assert [a.body for a in answers] == [b"0123456789"] * 3
    statuses = [a.header(b"Cache-Status") or b"" for a in answers]
    assert sum(s.startswith(b"aiolb; hit") for s in statuses) == 2
    assert len(h.loop.dials) == 2


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


# -- stale-while-revalidate: the refresh is a request through the pool -------------------

#: stale already (``Age``), served stale for a minute while it is fetched again
SWR = (b'Cache-Control: max-age=0, stale-while-revalidate=60\r\nETag: "v1"\r\n'
       b"Last-Modified: Tue, 01 Dec 2026 00:00:00 GMT\r\nAge: 1\r\n")  # fmt: skip
#: the cache key of ``/c``
KEY = b"example.test /c"
NOT_MODIFIED = b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nCache-Control: max-age=60\r\n\r\n'


def stale_stored(h: Harness) -> None:
    """Store ``/c``, stale at once, through upstream connection 0 (then idle)."""
    first = fetch(h)
    h.upstream(0).respond(ok(b"s1", SWR))
    assert first.responses()[0].body == b"s1"


def stale_hit(h: Harness, ip: str = "127.0.0.1", extra: bytes = b"") -> Client:
    """A request for ``/c`` answered at once with the stale entry."""
    client = h.client(ip=ip)
    client.send(get("/c", extra=extra))
    [answer] = client.responses()
    assert answer.header(b"Cache-Status").startswith(b"aiolb; hit; fwd=stale")  # type: ignore[union-attr]
    return client


def test_stale_while_revalidate_serves_at_once_and_refreshes_through_the_pool(
    proxy: Make,
) -> None:
    h = proxy(**cached())
    stale_stored(h)
    client = h.client(ip="192.0.2.7")
    client.send(get("/c", extra=b'If-None-Match: "mine"\r\nRange: bytes=0-0\r\n'
                                b"X-Forwarded-For: 10.1.1.1\r\nUser-Agent: t\r\n"
                                b"TE: trailers\r\n"))  # fmt: skip
    [answer] = client.responses()  # at once: the refresh has not been answered
    assert (answer.status, answer.body) == (206, b"s")
    assert answer.header(b"Cache-Status") == b"aiolb; hit; fwd=stale; ttl=-1"
    refresh = h.asked()  # on the pooled connection, as any request would be
    assert refresh is h.upstream(0) and len(h.loop.dials) == 1
    [sent] = refresh.requests()[1:]
    assert (sent.method, sent.target) == (b"GET", b"/c")
    assert sent.header(b"If-None-Match") == b'"v1"'  # the stored validators, not the client's
    assert sent.header(b"If-Modified-Since") == b"Tue, 01 Dec 2026 00:00:00 GMT"
    assert sent.header(b"Range") is None and sent.all(b"If-None-Match") == [b'"v1"']
    assert sent.header(b"TE") is None and sent.header(b"Connection") is None  # no client
    assert sent.header(b"X-Forwarded-For") == b"10.1.1.1, 192.0.2.7"  # the client's
    assert sent.header(b"User-Agent") == b"t" and sent.header(b"Via") == b"1.1 aiolb"
    assert sent.header(b"X-Request-ID").endswith(b"-revalidate")  # type: ignore[union-attr]
    assert h.cache.flights  # one refresh per key at a time
    stale_hit(h)
    assert len(refresh.requests()) == 2 and len(h.loop.dials) == 1  # no second refresh
    refresh.respond(NOT_MODIFIED)
    assert not h.cache.flights and h.cache.results["revalidated"] == 1
    [hit] = fetch(h).responses()  # refreshed: a fresh hit, not a stale one
    assert hit.body == b"s1"
    assert hit.header(b"Cache-Status").startswith(b"aiolb; hit; ttl=")  # type: ignore[union-attr]
    assert len(refresh.requests()) == 2 and len(h.upstream_of(0).idle) == 1


def test_a_refresh_answered_with_a_new_response_replaces_the_entry(proxy: Make) -> None:
    h = proxy(**cached())
    stale_stored(h)
    stale_hit(h)
    h.asked().respond(ok(b"s2", FRESH))
    assert not h.cache.flights
    [hit] = fetch(h).responses()
    assert hit.body == b"s2"
    assert hit.header(b"Cache-Status").startswith(b"aiolb; hit; ttl=")  # type: ignore[union-attr]
    assert len(h.loop.dials) == 1


def test_a_head_request_is_refreshed_with_a_get_that_can_be_stored(proxy: Make) -> None:
    h = proxy(**cached())
    stale_stored(h)
    client = h.client()
    client.send(b"HEAD /c HTTP/1.1\r\nHost: example.test\r\n\r\n")
    [answer] = client.responses(head=True)
    assert answer.header(b"Cache-Status").startswith(b"aiolb; hit; fwd=stale")  # type: ignore[union-attr]
    refresh = h.asked()
    assert refresh.requests()[-1].method == b"GET"
    refresh.respond(ok(b"s2", FRESH))
    assert fetch(h).responses()[0].body == b"s2"  # stored: a GET's response


def test_a_refresh_is_counted_in_the_pools_metrics(proxy: Make) -> None:
    h = proxy(**cached())
    stale_stored(h)
    requests = h.pool.requests
    stale_hit(h)
    h.asked().respond(NOT_MODIFIED)
    assert h.pool.requests == requests + 2  # the stale hit, and its refresh
    # the first fetch and the refresh reached the upstream; the stale hit did not
    assert h.upstream_of(0).stats.requests == {("l", b"GET", 200): 2}
    assert h.pool.stats.requests == {("l", b"GET", 200): 1}
    assert h.cache.results == {"hit": 0, "miss": 1, "stale": 1, "bypass": 0,
                               "revalidated": 1}  # fmt: skip


def test_a_refresh_waits_for_a_connection_at_max_connections(proxy: Make) -> None:
    h = proxy(pool={"circuit_breaker": {"max_connections": 1}}, **cached())
    stale_stored(h)
    busy = fetch(h, "/busy")  # takes the one connection the upstream may have
    up = h.upstream(0)
    stale_hit(h)
    assert h.pool.pending == 1 and len(h.loop.dials) == 1  # the refresh queues
    assert len(up.requests()) == 2
    up.respond(ok(b"done"))
    assert busy.responses()[0].body == b"done"
    assert len(up.requests()) == 3 and h.pool.pending == 0  # then it takes the freed one
    assert up.requests()[2].header(b"If-None-Match") == b'"v1"'
    up.respond(NOT_MODIFIED)
    assert not h.cache.flights and len(h.loop.dials) == 1


def test_a_refresh_that_waits_too_long_for_a_connection_gives_up(proxy: Make) -> None:
    h = proxy(pool={"circuit_breaker": {"max_connections": 1, "queue_timeout": "2s"}},
              **cached())  # fmt: skip
    stale_stored(h)
    fetch(h, "/busy")
    stale_hit(h)
    assert h.pool.pending == 1 and KEY in h.cache.flights
    h.advance(3)  # swept on the clock's tick, as a client's exchange is
    assert h.pool.pending == 0 and h.pool.overflows == 1 and KEY not in h.cache.flights
    assert h.pool.stats.requests == {("l", b"GET", 200): 1, ("l", b"GET", 503): 1}
    assert len(h.cache.store) == 1  # the stale entry stays


def test_a_failed_refresh_leaves_the_stale_entry_and_lets_the_next_one_try(
    proxy: Make,
) -> None:
    h = proxy(**cached())
    stale_stored(h)
    h.upstream(0).close()
    h.refuse(0)
    stale_hit(h)
    h.advance(1)  # the retry's backoff
    assert not h.cache.flights  # it landed
    assert h.upstream_of(0).failures >= 1  # passive health saw it
    assert h.upstream_of(0).stats.requests == {("l", b"GET", 200): 1}  # the first fetch
    assert h.pool.stats.requests == {("l", b"GET", 200): 1, ("l", b"GET", 502): 1}
    assert len(h.cache.store) == 1 and h.cache.results["stale"] == 1
    h.accept(0)
    stale_hit(h)  # still served, and refreshed again
    h.asked().respond(ok(b"s2", FRESH))
    assert fetch(h).responses()[0].body == b"s2"


def test_a_refresh_sends_what_the_request_filters_left_without_running_them_again(
    proxy: Make,
) -> None:
    filters = [{"rewrite": {"strip_prefix": "/api"}},
               {"headers": {"request": {"add": {"X-Tag": "${request_id}"}}}}]  # fmt: skip
    h = proxy(upstreams=1, route={"cache": "c", "filters": filters}, caches={"c": {}})
    first = fetch(h, "/api/c")
    h.upstream(0).respond(ok(b"s1", SWR))
    assert first.responses()[0].body == b"s1"
    client = h.client()
    client.send(get("/api/c", extra=b"X-Request-ID: trigger\r\n"))
    assert client.responses()[0].header(b"Cache-Status").startswith(b"aiolb; hit; fwd=stale")  # type: ignore[union-attr]
    [sent] = h.asked().requests()[1:]
    assert sent.target == b"/c" and sent.header(b"X-Forwarded-Prefix") == b"/api"
    assert sent.all(b"X-Tag") == [b"trigger"]  # the trigger's filters' header, added once
    assert sent.header(b"X-Request-ID") != b"trigger"


def test_a_range_miss_fetches_the_whole_stores_it_and_answers_the_range(proxy: Make) -> None:
    """Issue 27 left this open: a miss with ``Range`` was relayed as the upstream's 206
    and never stored. Now (as nginx's proxy_cache does) the upstream is asked for the
    whole response, which is stored, and the range is cut from it."""
    h = proxy(**cached())
    client = fetch(h, extra=b"Range: bytes=2-4\r\nIf-Range: \"v1\"\r\n")
    up = h.upstream(0)
    [sent] = up.requests()
    assert sent.header(b"Range") is None and sent.header(b"If-Range") is None
    up.respond(ok(b"0123456789", FRESH + b'ETag: "v1"\r\n'))
    [answer] = client.responses()
    assert (answer.status, answer.body) == (206, b"234")
    assert answer.header(b"Content-Range") == b"bytes 2-4/10"
    status = answer.header(b"Cache-Status") or b""
    assert status.startswith(b"aiolb; fwd=miss; stored; ttl=")
    [whole] = fetch(h).responses()  # stored: the next one is a hit
    assert (whole.status, whole.body) == (200, b"0123456789")
    assert whole.header(b"Cache-Status").startswith(b"aiolb; hit")  # type: ignore[union-attr]
    assert len(up.requests()) == 1
    assert h.upstream_of(0).stats.requests == {("l", b"GET", 206): 1}


def test_a_range_miss_that_may_not_be_stored_gets_the_whole_200(proxy: Make) -> None:
    """The upstream was asked for the whole; its answer may not be stored: the client
    gets it as it came (RFC 9110 lets a server ignore ``Range``)."""
    h = proxy(**cached())
    client = fetch(h, extra=b"Range: bytes=2-4\r\n")
    h.upstream(0).respond(ok(b"0123456789", b"Cache-Control: no-store\r\n"))
    [answer] = client.responses()
    assert (answer.status, answer.body) == (200, b"0123456789")


def test_a_range_miss_on_a_route_with_response_filters_is_forwarded_as_it_came(
    proxy: Make,
) -> None:
    """Response filters see the upstream's answer: there the ``Range`` goes upstream."""
    h = proxy(**cached())
    h2 = proxy(route={"cache": "c", "filters": [{"headers": {"response": {
        "set": {"X-Seen": "yes"}}}}]}, caches={"c": {}})  # fmt: skip
    client = fetch(h2, extra=b"Range: bytes=2-4\r\n")
    up = h2.upstream(0)
    assert up.requests()[0].header(b"Range") == b"bytes=2-4"
    up.respond(b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 2-4/10\r\n"
               b"Content-Length: 3\r\n\r\n234")  # fmt: skip
    [answer] = client.responses()
    assert (answer.status, answer.body, answer.header(b"X-Seen")) == (206, b"234", b"yes")
    assert h.upstreams == []
