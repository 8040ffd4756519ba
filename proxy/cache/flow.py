"""One request through its route's cache: look up, answer from it, or store what comes.

Theory of operation
-------------------
The exchange calls ``begin(ex, cache, split)`` once the route's request filters are
done, and gets an outcome: an ``Answer`` (a fresh hit; a stale one within
``stale-while-revalidate``, refreshed in the background), a ``CacheState`` (forward
the request: a miss, the first of concurrent misses for a key fetching for the others
(``Flight``); a revalidation, the stored validators in the upstream request; a
bypass), or a coroutine that comes to one of these (the Redis store's lookup, a wait
for another request's fetch). Nothing here touches the exchange's state: it reads
the request (``Subject``) and adds the headers a revalidation sends.

From there the exchange calls the ``CacheState`` at its boundaries:

- ``on_head`` with the upstream's response head: a 304 to a revalidation refreshes the
  entry and answers with it; a failure status in ``use_stale`` answers with the stale
  entry; otherwise the head goes on with ``Cache-Status`` added, and a storable
  response starts to be collected (memory) or streamed into Redis.
- ``on_body`` with each body chunk; ``on_complete`` when the response ended whole
  (it is stored then, never before); ``abandon`` when it did not.
- ``on_failure`` when no upstream answered: a stored entry, however stale, is the
  answer instead of the 502/503/504 (``use_stale``: ``error``, ``timeout``), unless
  it said ``must-revalidate``.

Unsafe methods (anything but GET, HEAD, OPTIONS, TRACE) invalidate the target URI, and
the ``Location`` / ``Content-Location`` on the same host, once the upstream answers
them with a status below 400 (RFC 9111 4.4).

A stale entry served within ``stale-while-revalidate`` is fetched again behind the
client's back (``refresh``): the cache makes a ``CacheState`` that revalidates it (its
``background`` set) and asks the exchange for a request through the pool like any other
(``Subject.revalidate``: a GET of the same key with the stored validators, without the
headers in ``NOT_REVALIDATED``). The response does the work through ``on_head``,
``on_body`` and ``on_complete`` as a foreground revalidation's would: a 304 refreshes the
entry, a new response replaces it (one that may not be stored drops it), a failure or a
status in ``use_stale`` leaves it. One refresh per key at a time: its ``Flight`` lands
when that request ends, however it ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Final, Protocol

from proxy.cache import (
    HIT,
    MISS,
    REVALIDATE,
    STALE,
    Cache,
    Flight,
    Request,
)
from proxy.cache.entry import Entry, parse_head
from proxy.cache.memory import MemoryStore
from proxy.cache.policy import SURROGATE_CAPABILITY, Directives, header
from proxy.errors import FilterError, ProxyError, UpstreamTimeoutError
from proxy.http.headers import ResponseHead, without

if TYPE_CHECKING:
    from proxy.cache.redis_store import BodyWriter
    from proxy.http.headers import RequestHeaders
    from proxy.upstream.pool import Pool

log = logging.getLogger("aiolb")

#: Redis store: bodies of a known length up to this are collected and stored whole
#: (this process serves them while Redis takes them); longer ones stream into Redis.
COLLECT_FOR_REDIS: Final = 1024 * 1024
#: Methods that do not invalidate stored responses (RFC 9110 9.2.1: safe).
SAFE_METHODS: Final = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE"))
#: Request headers (lower case) a background refresh leaves out: what would make the
#: response differ from a plain GET of the cache key (the client's conditionals and
#: ``Range``: it asks with the stored validators instead), a body's framing, an Upgrade,
#: ``TE: trailers`` (no client will keep them).
NOT_REVALIDATED: Final = frozenset((
    b"if-none-match", b"if-modified-since", b"if-match", b"if-unmodified-since",
    b"range", b"if-range", b"content-length", b"transfer-encoding", b"connection",
    b"upgrade", b"expect", b"te",
))  # fmt: skip


class _Client(Protocol):
    @property
    def draining(self) -> bool: ...


class Served(Protocol):
    """What the cache reads of the request it serves (the exchange)."""

    method: bytes
    host: bytes | None
    target: bytes
    headers: list[tuple[bytes, bytes]]
    found: RequestHeaders
    keep_alive: bool
    http_minor: int
    pool: Pool | None

    @property
    def client(self) -> _Client: ...

    def store_behind(self, behind: bool) -> None: ...


class Subject(Served, Protocol):
    """The request the cache is consulted for (the exchange): what it reads, and the
    background request it may ask for."""

    def revalidate(self, state: CacheState) -> None:
        """Send a background request for ``state`` (``refresh``): a GET of its
        request through the pool like any other, which calls ``state`` at its
        boundaries as a forwarded request does, and ``state.abandon()`` or
        ``state.on_failure`` when it ends otherwise (its flight lands either way)."""


class Answer:
    """A response the cache gives in place of the upstream's: what the downstream
    writes (``render``). ``head``: the status line and header lines (``framing`` empty:
    the whole head), ``framing``: the lines after them and the blank line; ``close``:
    the connection closes after it (a hit's head says so)."""

    __slots__ = ("body", "close", "framing", "head", "status")

    def __init__(
        self, status: int, head: bytes, framing: bytes, body: bytes, close: bool = False
    ) -> None:
        self.status = status
        self.head = head
        self.framing = framing
        self.body = body
        self.close = close

    def with_head(self, head: bytes, status: int) -> Answer:
        """The same answer with the head the route's response filters left."""
        return Answer(status, head, self.framing, self.body, self.close)

    def render(self, close: bool, head_only: bool) -> list[bytes]:
        head = self.head + self.framing if self.framing else self.head
        return [head] if head_only or not self.body else [head, self.body]

    def response_head(self) -> ResponseHead:
        """The head as the route's response filters take an upstream's."""
        found = ResponseHead.__new__(ResponseHead)
        found.chunked = found.close = False
        found.has_length, found.length = True, len(self.body)
        found.status, found.head = self.status, self.head
        return found


def begin(
    ex: Subject, cache: Cache, split: bool, headers: list[tuple[bytes, bytes]] | None = None
) -> Any:
    """Consult ``cache`` for ``ex``: an ``Answer``, a ``CacheState`` to forward with, or a
    coroutine that comes to one (``split``: the route has response filters, which take
    a hit's head apart from its framing; ``headers``: the request's headers as the
    cache is to read them, when a filter normalised some, else ``ex.headers``)."""
    request = Request(ex.method, ex.host or b"", ex.target, ex.headers if headers is None
                      else headers)  # fmt: skip
    store = cache.store
    if isinstance(store, MemoryStore) and request.method in (b"GET", b"HEAD"):  # a hit at once
        entry = store.get(request.key, request.headers)
        now = time.time()
        action = cache.decide(request, entry, now)
        if action == HIT:
            assert entry is not None
            cache.results["hit"] += 1
            return hit(ex, cache, request, entry, now, b"hit", split)
        return CacheState(cache, request, split).act(ex, entry, action, now)
    state = CacheState(cache, request, split)
    if request.method not in (b"GET", b"HEAD"):
        state.invalidate = request.method not in SAFE_METHODS
        state.status = b"fwd=method"
        cache.results["bypass"] += 1
        return state
    return state.lookup(ex)  # the Redis store


def hit(ex: Served, cache: Cache, request: Request, entry: Entry, now: float,
        status: bytes, split: bool) -> Answer:  # fmt: skip
    """The answer ``entry`` gives ``ex`` (``split``: its head apart from its framing, for
    the route's response filters)."""
    found = ex.found
    keep = (ex.keep_alive and not ex.client.draining and not found.chunked
            and found.content_length in (None, b"0"))  # fmt: skip
    if not split:
        code, head, body = cache.hit(entry, request, now, status, keep, ex.http_minor)
        return Answer(code, head, b"", body, not keep)
    code, head, framing, body = cache.hit_split(entry, request, now, status, keep,
                                                ex.http_minor)  # fmt: skip
    return Answer(code, head, framing, body, not keep)


class CacheState:
    """What a cache does for one exchange, between its request and its response."""

    __slots__ = (
        "background",
        "body",
        "cache",
        "collect",
        "entry",
        "final",
        "flight",
        "head",
        "invalidate",
        "ranged",
        "request",
        "requested",
        "size",
        "split",
        "status",
        "wait_until",
        "whole",
        "writer",
    )

    def __init__(self, cache: Cache, request: Request, split: bool) -> None:
        self.cache = cache
        self.request = request
        self.split = split
        self.entry: Entry | None = None  # the stored response being revalidated
        self.flight: Flight | None = None  # set when this exchange fetches for others
        self.status = b"fwd=miss"  # the Cache-Status of a forwarded response
        self.invalidate = False
        #: the loop time until which this miss may wait for other requests' fetches of
        #: its key (``lock_timeout`` from its first wait); 0.0 until it waits
        self.wait_until = 0.0
        #: a background refresh (``refresh``): it answers nobody, so no stale answer
        #: stands in for its failure and only a revalidation is counted
        self.background = False
        self.requested = time.time()
        self.collect: list[bytes] | None = None  # the body, while it is being kept
        self.writer: BodyWriter | None = None  # or streamed into Redis
        self.size = 0
        #: a ``Range`` miss sent without its ``Range`` (``_whole``), so that the whole
        #: is stored and the range cut from it
        self.whole = False
        #: then: the answer's keep-alive and HTTP minor version; and that answer, once
        #: the response is stored (``final``)
        self.ranged: tuple[bool, int] | None = None
        self.final: Answer | None = None
        self.head = b""
        self.body = b""

    # -- request side ------------------------------------------------------------------

    async def lookup(self, ex: Subject) -> Any:
        """The Redis store's lookup (in the exchange's task): the outcome it comes to."""
        store = self.cache.store
        assert not isinstance(store, MemoryStore)
        entry = await store.get(self.request.key, self.request.headers)
        return self.decide(ex, entry)

    def decide(self, ex: Subject, entry: Entry | None) -> Any:
        """What to do with the entry a lookup found (or None), now."""
        now = time.time()
        return self.act(ex, entry, self.cache.decide(self.request, entry, now), now)

    def act(self, ex: Subject, entry: Entry | None, action: int, now: float) -> Any:
        """The outcome of what ``Cache.decide`` chose for ``entry`` at ``now``."""
        cache, request = self.cache, self.request
        if action in (HIT, STALE):
            assert entry is not None
            stale = action == STALE
            cache.results["stale" if stale else "hit"] += 1
            answer = hit(ex, cache, request, entry, now,
                         b"hit; fwd=stale" if stale else b"hit", self.split)  # fmt: skip
            if stale:
                refresh(ex, cache, request, entry)
            return answer
        if action == REVALIDATE:
            assert entry is not None
            self.entry = entry
            # RFC 9211: ``request`` when only the request's directives ruled a fresh one out
            fresh = entry.age(now) < entry.lifetime and "no-cache" not in entry.cc
            self.status = b"fwd=request" if fresh else b"fwd=stale"
            if not request.conditional:
                _ask_validators(ex, entry)
        elif action == MISS:
            flight = cache.flights.get(request.key)
            if flight is not None and (
                not self.wait_until or asyncio.get_running_loop().time() < self.wait_until
            ):
                return self.wait(ex, flight)
            cache.results["miss"] += 1
            if flight is None:
                self.flight = cache.flights[request.key] = Flight()
            if request.range is not None and not self.split:
                _whole(ex)  # fetched whole, stored, then the range cut from it
                self.whole = True
        else:  # BYPASS: the request said no-store
            cache.results["bypass"] += 1
            self.status = b"fwd=request"
        if cache.surrogate:
            ex.found.parts += SURROGATE_CAPABILITY
        return self  # forward, with this state

    async def wait(self, ex: Subject, flight: Flight) -> Any:
        """Another request is fetching this key: wait for it, then look again. A fetch
        that ends without storing (its client left, a no-store answer) makes one of the
        waiters fetch, and the others wait again for that one, as long as their
        ``lock_timeout`` from the first wait allows (nginx's ``proxy_cache_lock``)."""
        now = asyncio.get_running_loop().time()
        if not self.wait_until:
            self.wait_until = now + self.cache.lock_timeout
        try:
            await asyncio.wait_for(flight.done.wait(), max(self.wait_until - now, 0.0))
        except TimeoutError:
            self.wait_until = -1.0  # waited long enough: never again
        store = self.cache.store
        if isinstance(store, MemoryStore):
            return self.decide(ex, store.get(self.request.key, self.request.headers))
        return self.lookup(ex)

    def ask(self, ex: Served) -> None:
        """Make a background refresh's request (``refresh``) conditional on the stored
        entry's validators, and say what the cache understands (``Surrogate-Capability``)."""
        assert self.entry is not None
        _ask_validators(ex, self.entry)
        if self.cache.surrogate:
            ex.found.parts += SURROGATE_CAPABILITY

    # -- response side -----------------------------------------------------------------

    def on_head(
        self, ex: Served, status: int, found: ResponseHead
    ) -> ResponseHead | Answer | Later:
        """The upstream's response head: what to relay (``found`` with ``Cache-Status``),
        an ``Answer`` to send instead (the upstream's response is then dropped), or
        ``LATER``: a ``Range`` miss, answered from the entry once the body is stored."""
        cache, request = self.cache, self.request
        now = time.time()
        if self.invalidate:
            if status < 400:
                invalidate(ex, cache, request, found.head)
            return _with_status(found, self.status)
        entry = self.entry
        if entry is not None and status == 304:  # revalidated: the stored one stands
            if entry.refresh(found.head, (self.requested, now), cache.default_ttl):
                _store(cache, entry)
            cache.results["revalidated"] += 1
            self.land()
            return self.answer(ex, entry, now, b"fwd=stale; fwd-status=304")
        if entry is not None and status >= 500 and cache.may_serve_stale(entry, now, status):
            self.land()
            if self.background:  # the entry stays; the upstream's answer goes nowhere
                return _with_status(found, self.status)
            cache.results["stale"] += 1
            return self.answer(ex, entry, now, b"hit; fwd=stale; fwd-status=%d" % status)
        if entry is not None and not self.background:  # answered with a response of its own
            cache.results["miss"] += 1
        upstream_head = found.head
        status_line, lines = parse_head(upstream_head)
        headers = [(name, value) for name, value, _ in lines]
        if (cache.surrogate and any(name == b"surrogate-control" for name, _ in headers)
                and Directives.surrogate(headers)):  # fmt: skip
            found = _without(found, status_line, lines, b"surrogate-control")  # ours: not sent
        length = header(headers, b"content-length")
        fits = length is None or (length.isdigit() and int(length) <= cache.max_object_size)
        if request.method == b"GET" and fits and cache.may_store(request, status, headers):
            self.start_storing(ex, upstream_head, headers)
            if self.whole and status == 200 and self.collect is not None and length is not None:
                # the client asked for a range: it is answered once the whole is stored
                self.ranged = (ex.keep_alive and not ex.client.draining, ex.http_minor)
                return LATER
            return _with_status(found, self.status + b"; stored")
        if entry is not None:  # replaced by a response that is not stored: forget it
            _remove(cache, request.key)
        self.land()
        return _with_status(found, self.status)

    def answer(self, ex: Served, entry: Entry, now: float, status: bytes) -> Answer:
        keep = ex.keep_alive and not ex.client.draining
        code, head, framing, body = self.cache.hit_split(entry, self.request, now, status, keep,
                                                         ex.http_minor)  # fmt: skip
        return Answer(code, head, framing, body, not keep)

    def start_storing(self, ex: Served, head: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        """Keep the body as it comes: in memory (the memory store; and for Redis, a body
        of known size up to ``COLLECT_FOR_REDIS``, stored whole once complete and served
        from this process until Redis has it), else streamed into Redis."""
        self.head = head
        store = self.cache.store
        length = header(headers, b"content-length")
        if isinstance(store, MemoryStore) or (
            length is not None and int(length) <= COLLECT_FOR_REDIS
        ):
            self.collect = []
            return
        names, values = self.cache.vary(self.request, headers)
        self.writer = store.writer(self.request.key, names, values, ex.store_behind)

    def on_body(self, data: bytes | memoryview) -> None:
        """A chunk of the response body (de-chunked)."""
        self.size += len(data)
        if self.size > self.cache.max_object_size:
            self.abandon()
            return
        if self.collect is not None:
            self.collect.append(bytes(data))
        elif self.writer is not None:
            self.writer.append(data)

    def on_complete(self) -> None:
        """The response ended whole: store it."""
        cache = self.cache
        if self.collect is None and self.writer is None:
            self.land()
            return
        body = b"".join(self.collect) if self.collect is not None else b""
        times = (self.requested, time.time())
        _, lines = parse_head(self.head)
        headers = [(name, value) for name, value, _ in lines]
        entry = cache.entry(self.request, self.head, body, times, headers)
        cache.stored += 1
        writer = self.writer
        if writer is not None:
            task = asyncio.get_running_loop().create_task(writer.commit(entry))
            task.add_done_callback(lambda _: self.land())
            cache.tasks.add(task)
            task.add_done_callback(cache.tasks.discard)
        else:
            _store(cache, entry)
            self.land()
        self.collect = self.writer = None
        if self.ranged is not None:  # the range the client asked for, cut from the whole
            keep, minor = self.ranged
            code, head, framing, part = cache.hit_split(
                entry, self.request, times[1], self.status + b"; stored", keep, minor
            )
            self.final = Answer(code, head, framing, part, not keep)

    def abandon(self) -> None:
        """The response did not end whole (or grew too large): nothing is stored."""
        if self.writer is not None:
            self.writer.abort()
        self.collect = self.writer = None
        self.land()

    def land(self) -> None:
        """This fetch is over: the requests waiting for it look again."""
        flight = self.flight
        if flight is not None:
            self.flight = None
            if self.cache.flights.get(self.request.key) is flight:
                del self.cache.flights[self.request.key]
            flight.done.set()

    def on_failure(self, ex: Served, error: ProxyError) -> Answer | None:
        """No upstream answered: the stored entry's answer when it may stand in (not
        for a route filter's failure: that is the answer's own), else None."""
        self.abandon()
        entry = self.entry
        if entry is None or self.background or isinstance(error, FilterError):
            return None
        reason = "timeout" if isinstance(error, UpstreamTimeoutError) else "error"
        now = time.time()
        if not self.cache.may_serve_stale(entry, now, reason):
            return None
        self.cache.results["stale"] += 1
        return hit(ex, self.cache, self.request, entry, now,
                   b"hit; fwd=stale; detail=%s" % reason.encode(), self.split)  # fmt: skip


def _without(found: ResponseHead, status_line: bytes, lines: list[tuple[bytes, bytes, bytes]],
             name: bytes) -> ResponseHead:  # fmt: skip
    """A copy of ``found`` without the header lines called ``name``."""
    copy = found.with_lines(b"")
    copy.head = b"".join([status_line, b"\r\n", *(raw + b"\r\n" for n, _, raw in lines
                                                   if n != name)])  # fmt: skip
    return copy


def _with_status(found: ResponseHead, status: bytes) -> ResponseHead:
    return found.with_lines(b"Cache-Status: aiolb; " + status + b"\r\n")


class Later:
    """``CacheState.on_head``'s answer for a ``Range`` miss fetched whole: the client's
    answer is made once the response is stored (``CacheState.final``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "LATER"


LATER: Final = Later()
#: the request headers a ``Range`` miss does not send: the whole is fetched and stored
_RANGE_HEADERS: Final = frozenset((b"range", b"if-range"))


def _whole(ex: Subject) -> None:
    """Ask the upstream for the whole response: drop ``Range`` and ``If-Range`` from the
    request (nginx does the same for a cached location)."""
    parts = ex.found.parts
    parts[:] = without(parts, _RANGE_HEADERS)  # the same list: a filter's view holds it


def _ask_validators(ex: Served, entry: Entry) -> None:
    """Make the upstream request conditional on the stored response's validators."""
    etag = header(entry.headers, b"etag")
    if etag is not None:
        ex.found.parts += (b"If-None-Match", b": ", etag, b"\r\n")
    modified = header(entry.headers, b"last-modified")
    if modified is not None:
        ex.found.parts += (b"If-Modified-Since", b": ", modified, b"\r\n")


def _store(cache: Cache, entry: Entry) -> None:
    store = cache.store
    if isinstance(store, MemoryStore):
        store.put(entry)
        return
    task = asyncio.get_running_loop().create_task(store.put(entry))
    cache.tasks.add(task)
    task.add_done_callback(cache.tasks.discard)


def _remove(cache: Cache, key: bytes) -> None:
    store = cache.store
    if isinstance(store, MemoryStore):
        store.remove(key)
        return
    task = store.forget(key)
    cache.tasks.add(task)
    task.add_done_callback(cache.tasks.discard)


def invalidate(ex: Served, cache: Cache, request: Request, head: bytes) -> None:
    """An unsafe method succeeded: the target URI's stored responses go, and those of
    ``Location`` and ``Content-Location`` when they are on the same host."""
    _remove(cache, request.key)
    host = request.key.split(b" ", 1)[0]
    _, lines = parse_head(head)
    for name, value, _ in lines:
        if name in (b"location", b"content-location"):
            target = _same_host_target(value, host)
            if target is not None:
                _remove(cache, host + b" " + target)


def _same_host_target(value: bytes, host: bytes) -> bytes | None:
    """The origin-form target of a ``Location`` value on ``host``, or None."""
    if value.startswith(b"/"):
        return value
    for scheme in (b"http://", b"https://"):
        if value.lower().startswith(scheme):
            authority, slash, rest = value[len(scheme):].partition(b"/")
            if authority.lower().split(b":", 1)[0] == host:
                return slash + rest if slash else b"/"
    return None


def refresh(ex: Subject, cache: Cache, request: Request, entry: Entry) -> None:
    """A stale entry was served to ``ex`` (``stale-while-revalidate``): have it fetched
    again in the background, through the pool (``Subject.revalidate``), once per key at
    a time: a GET of the same key, conditional on ``entry``'s validators."""
    if request.key in cache.flights or ex.pool is None:
        return
    headers = [(name, value) for name, value in request.headers if name not in NOT_REVALIDATED]
    state = CacheState(cache, Request(b"GET", ex.host or b"", ex.target, headers), False)
    state.background = True
    state.entry = entry
    state.status = b"fwd=stale"
    state.flight = cache.flights[request.key] = Flight()
    ex.revalidate(state)
