"""A shared HTTP cache (RFC 9111) that routes opt into: decisions, hits, stores.

Theory of operation
-------------------
A ``Cache`` is one ``caches:`` entry: its store (``MemoryStore`` in the process, or
``RedisStore`` shared by every worker and instance), its settings and its counters.
For each request of a route with ``cache:``, the exchange asks ``plan``: what the
request is (``Request``: method, cache key, the headers that matter) and what to do:

- ``BYPASS``: not a GET or HEAD (an unsafe method also invalidates the URI once it
  succeeds, RFC 9111 4.4), or the request asks for ``no-store``: forward, store nothing.
- ``HIT``: a stored response is fresh and the request accepts it: ``hit`` renders it
  (``Age``, ``Cache-Status``, a 304 when the client's own conditional matches it).
- ``STALE``: stale, but within ``stale-while-revalidate``: served, and refreshed in the
  background by a request through the pool like any other (``proxy.cache.flow.refresh``).
- ``REVALIDATE``: stored but not usable as is: forwarded with ``If-None-Match`` /
  ``If-Modified-Since``; a 304 refreshes and serves it, anything else replaces it.
- ``MISS``: nothing usable stored: forwarded, and the response stored if it may be.

A miss of a key another request is already fetching waits for that fetch
(``Flight``, at most ``lock_timeout``), then looks again: N concurrent misses make
one upstream request (request collapsing, nginx's ``proxy_cache_lock``).

When the upstream fails (no upstream, refused, timeout, or a status in ``use_stale``)
and a stored response exists that does not forbid it, that response is served however
stale (nginx's ``proxy_cache_use_stale``; RFC 5861 ``stale-if-error`` too).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from proxy.cache.entry import Entry
from proxy.cache.memory import MemoryStore
from proxy.cache.policy import (
    UNSAFE_METHODS,
    Directives,
    header,
    http_date,
    must_revalidate,
    response_directives,
    stale_allowed,
    storable,
    variant,
    vary_names,
)
from proxy.cache.ranges import ranged

if TYPE_CHECKING:
    from proxy.cache.redis_store import RedisStore
    from proxy.config import CacheSpec

log = logging.getLogger("aiolb")

Headers = Sequence[tuple[bytes, bytes]]

BYPASS: Final = 0
HIT: Final = 1
STALE: Final = 2
REVALIDATE: Final = 3
MISS: Final = 4

#: A hit's head: the stored one, then Age, Cache-Status, the framing (``Cache.hit``).
HEAD_HIT: Final = b"%sAge: %d\r\nCache-Status: aiolb; %s; ttl=%d\r\nContent-Length: %d\r\n%s\r\n"

#: ``aiolb_cache_requests_total`` results.
RESULTS: Final = ("hit", "miss", "stale", "bypass", "revalidated")


#: Request headers that change a cache's decision (the others matter only to ``Vary``).
_DECIDING: Final = frozenset(
    (b"cache-control", b"pragma", b"authorization", b"if-none-match", b"if-modified-since",
     b"range")
)
_NO_DIRECTIVES: Final = Directives()


class Request:
    """What the cache needs of one request: its key and the headers that matter."""

    __slots__ = ("authorized", "cc", "conditional", "headers", "if_range", "key", "method",
                 "range")

    def __init__(self, method: bytes, host: bytes, target: bytes, headers: Headers) -> None:
        self.method = method
        #: the cache key: the request's authority and target (a HEAD uses its GET's)
        self.key = host.lower().split(b":", 1)[0] + b" " + target
        #: lower-case header names, as the cache's decisions and ``Vary`` read them
        self.headers = lowered = [(name.lower(), value) for name, value in headers]
        self.cc = _NO_DIRECTIVES  # shared, never changed
        self.authorized = self.conditional = False
        #: a GET's ``Range`` and ``If-Range`` (a hit answers it: ``proxy.cache.ranges``)
        self.range = self.if_range = None
        if any(name in _DECIDING for name, _ in lowered):
            self.cc = Directives.of_request(lowered)
            self.authorized = any(name == b"authorization" for name, _ in lowered)
            self.conditional = any(
                name in (b"if-none-match", b"if-modified-since") for name, _ in lowered
            )
            if method == b"GET":
                self.range = header(lowered, b"range")
                self.if_range = header(lowered, b"if-range")


class Flight:
    """A miss being fetched; the requests that missed the same key meanwhile wait for
    ``done`` (set whether or not the response was stored)."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = asyncio.Event()


class Cache:
    """One named cache: store, settings, counters, fetches in flight."""

    def __init__(self, name: str, spec: CacheSpec) -> None:
        self.name = name
        self.spec = spec
        self.max_object_size = spec.max_object_size
        self.default_ttl = spec.default_ttl
        self.keep_stale = spec.keep_stale
        self.lock_timeout = spec.lock_timeout
        self.use_stale_on = frozenset(spec.use_stale)
        self.surrogate = spec.surrogate_control
        self.store: MemoryStore | RedisStore
        if spec.store == "memory":
            self.store = MemoryStore(spec.max_size)
        else:
            from proxy.cache.redis_store import RedisStore

            redis = spec.store
            self.store = RedisStore(redis.url, redis.key_prefix, spec.keep_stale, redis.timeout)
        self.results = dict.fromkeys(RESULTS, 0)
        self.stored = 0
        self.flights: dict[bytes, Flight] = {}
        #: background work of the Redis store (writes, removals), kept alive
        self.tasks: set[asyncio.Task[object]] = set()
        #: the workers' counters summed (a supervisor's, after ``absorb``); else None
        self.totals: dict[str, Any] | None = None

    # -- deciding ------------------------------------------------------------------------

    def decide(self, request: Request, entry: Entry | None, now: float) -> int:
        """What to do for ``request`` given what is stored for it (``entry``)."""
        cc = request.cc
        if entry is None:
            return MISS if request.method in (b"GET", b"HEAD") and "no-store" not in cc else BYPASS
        age = entry.age0 + (now - entry.response_time)
        if not cc and age < entry.lifetime and "no-cache" not in entry.cc and (
            request.method in (b"GET", b"HEAD")
        ):
            return HIT  # the common hit: a fresh entry, a request without directives
        if request.method not in (b"GET", b"HEAD") or "no-store" in cc:
            return BYPASS
        if age > entry.lifetime + self.keep_stale:
            return MISS  # kept too long: treated as gone
        if not must_revalidate(cc, entry.cc, age, entry.lifetime):
            return HIT
        stale_for = age - entry.lifetime
        if (
            stale_for > 0
            and "no-cache" not in cc
            and "no-cache" not in entry.cc
            and stale_allowed(entry.cc, "stale-while-revalidate", stale_for)
        ):
            return STALE
        return REVALIDATE

    def may_store(self, request: Request, status: int, head: Headers) -> bool:
        """May this response to ``request`` be stored?"""
        why = storable(
            request.method, status, request.cc, response_directives(head, self.surrogate), head,
            request.authorized, self.default_ttl is not None,
        )  # fmt: skip
        return why is None

    def may_serve_stale(self, entry: Entry, now: float, reason: str | int) -> bool:
        """May ``entry`` stand in for an upstream failure (``reason``: ``error``,
        ``timeout`` or a status)?"""
        if "must-revalidate" in entry.cc or "proxy-revalidate" in entry.cc:
            return False
        stale_for = entry.age(now) - entry.lifetime
        if stale_for <= 0:
            return True
        return reason in self.use_stale_on or stale_allowed(entry.cc, "stale-if-error", stale_for)

    # -- entries -------------------------------------------------------------------------

    def vary(
        self, request: Request, response: Headers
    ) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
        """The request header names ``response`` varies on, and their values in
        ``request``."""
        names = vary_names(response) or ()
        return names, variant(request.headers, names) if names else ()

    def entry(self, request: Request, head: bytes, body: bytes, times: tuple[float, float],
              response: Headers) -> Entry:  # fmt: skip
        """A new entry of ``request``'s key and variant from a response."""
        names, values = self.vary(request, response)
        return Entry(request.key, names, values, head, body, times, self.default_ttl,
                     self.surrogate)  # fmt: skip

    def hit(self, entry: Entry, request: Request, now: float, status: bytes, keep_alive: bool,
            http_minor: int) -> tuple[int, bytes, bytes]:  # fmt: skip
        """(status, head, body) for serving ``entry``: the stored head with ``Age``,
        ``Cache-Status: aiolb; STATUS`` and the framing; a 304 without a body when the
        client's own validators match. The head of the last hit is kept on the entry:
        hits within the same second of age send the same bytes."""
        if request.conditional or request.range is not None:
            code, head, framing, body = self.hit_split(entry, request, now, status, keep_alive,
                                                       http_minor)  # fmt: skip
            return code, head + framing, body
        current = entry.age0 + (now - entry.response_time)
        age = int(current) if current > 0 else 0
        ttl = int(entry.lifetime - current)
        connection = _connection(keep_alive, http_minor)
        body = b"" if request.method == b"HEAD" else entry.body
        shown = (age, ttl, status, connection)
        last = entry.shown
        if last is not None and last[0] == shown:
            return entry.status, last[1], body
        head = HEAD_HIT % (entry.head, age, status, ttl, len(entry.body), connection)
        entry.shown = (shown, head)
        return entry.status, head, body

    def hit_split(
        self, entry: Entry, request: Request, now: float, status: bytes, keep_alive: bool,
        http_minor: int,
    ) -> tuple[int, bytes, bytes, bytes]:  # fmt: skip
        """``hit`` with its head in two: (status, the status line and header lines, what
        response filters see; the framing after them and the blank line; body)."""
        current = entry.age0 + (now - entry.response_time)
        lines = b"Age: %d\r\nCache-Status: aiolb; %s; ttl=%d\r\n" % (
            int(current) if current > 0 else 0, status, int(entry.lifetime - current))
        connection = _connection(keep_alive, http_minor)
        if request.conditional and _not_modified(request.headers, entry.headers):
            rest = entry.head.partition(b"\r\n")[2]
            return 304, b"HTTP/1.1 304 Not Modified\r\n" + rest + lines, connection + b"\r\n", b""
        if request.range is not None and entry.status == 200:
            found = ranged(entry.head, entry.headers, entry.body, request.range, request.if_range)
            if found is not None:  # 206 or 416 (None: the whole 200)
                code, head, part = found
                return code, head + lines, b"Content-Length: %d\r\n%s\r\n" % (
                    len(part), connection), part  # fmt: skip
        body = b"" if request.method == b"HEAD" else entry.body
        framing = b"Content-Length: %d\r\n%s\r\n" % (len(entry.body), connection)
        return entry.status, entry.head + lines, framing, body

    # -- operating it ------------------------------------------------------------------

    def counts(self) -> dict[str, Any]:
        """The counters (one process's, or the workers' sum after ``absorb``)."""
        memory = isinstance(self.store, MemoryStore)
        return {
            "results": dict(self.results),
            "stored": self.stored,
            "errors": self.errors,
            "bytes": self.store.size if memory else None,  # type: ignore[union-attr]
            "entries": len(self.store) if memory else None,  # type: ignore[arg-type]
        }

    def absorb(self, parts: Sequence[dict[str, Any]]) -> None:
        """Make the counters the sum of the workers' ``counts()``."""
        self.totals = {
            "results": {r: sum(p["results"].get(r, 0) for p in parts) for r in RESULTS},
            "stored": sum(p["stored"] for p in parts),
            "errors": sum(p["errors"] for p in parts),
            "bytes": _sum_known(p["bytes"] for p in parts),
            "entries": _sum_known(p["entries"] for p in parts),
        }

    def report(self) -> dict[str, Any]:
        """The counters to show: the workers' sum when there are workers."""
        return self.totals if self.totals is not None else self.counts()

    @property
    def errors(self) -> int:
        """Store operations that failed (the Redis store; the memory store has none)."""
        return 0 if isinstance(self.store, MemoryStore) else self.store.errors

    async def remove(self, key: bytes) -> int:
        """Drop every variant stored for ``key``; how many."""
        store = self.store
        if isinstance(store, MemoryStore):
            return store.remove(key)
        return await store.remove(key)

    async def purge(self, host: bytes | None, prefix: bytes) -> int:
        """Drop the entries whose target starts with ``prefix`` (on ``host`` only, when
        given); how many."""
        def matches(key: bytes) -> bool:
            where, _, target = key.partition(b" ")
            return (host is None or where == host) and target.startswith(prefix)

        store = self.store
        if isinstance(store, MemoryStore):
            return store.purge_matching(matches)
        return await store.purge_matching(matches)

    async def close(self) -> None:
        """Stop background work, close the Redis client."""
        for task in list(self.tasks):
            task.cancel()
        if not isinstance(self.store, MemoryStore):
            await self.store.close()

    @staticmethod
    def now() -> float:
        """Unix time: ages are differences of ``Date`` values and arrival times."""
        return time.time()

    def __repr__(self) -> str:
        hits, misses = self.results["hit"], self.results["miss"]
        return f"<Cache {self.name} [{self.store!r}, {hits} hits, {misses} misses]>"


def _sum_known(values: Iterable[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def build_caches(
    specs: Mapping[str, CacheSpec], previous: Mapping[str, Cache] | None = None
) -> dict[str, Cache]:
    """A ``Cache`` per ``caches:`` entry; a reload keeps each one whose settings did not
    change (the same object, its entries and counters with it)."""
    kept = previous or {}
    out = {}
    for name, spec in specs.items():
        old = kept.get(name)
        out[name] = old if old is not None and old.spec == spec else Cache(name, spec)
    return out


def _connection(keep_alive: bool, http_minor: int) -> bytes:
    """The ``Connection`` line a hit needs: none for HTTP/1.1 kept alive."""
    if keep_alive:
        return b"" if http_minor else b"Connection: keep-alive\r\n"
    return b"Connection: close\r\n"


def _not_modified(request: Headers, stored: Headers) -> bool:
    """The client's ``If-None-Match`` (weak comparison) or, without one, its
    ``If-Modified-Since`` says it has this response already (RFC 9110 13.1)."""
    etag = next((v for n, v in stored if n == b"etag"), None)
    for name, value in request:
        if name == b"if-none-match":
            if etag is None:
                return False
            tags = [t.strip() for t in value.split(b",")]
            weak = etag.removeprefix(b"W/")
            return b"*" in tags or any(t.removeprefix(b"W/") == weak for t in tags)
    since = next((v for n, v in request if n == b"if-modified-since"), None)
    modified = next((v for n, v in stored if n == b"last-modified"), None)
    if since is None or modified is None:
        return False
    when, last = http_date(since), http_date(modified)
    return when is not None and last is not None and last <= when


__all__ = [
    "BYPASS",
    "HIT",
    "MISS",
    "RESULTS",
    "REVALIDATE",
    "STALE",
    "UNSAFE_METHODS",
    "Cache",
    "Entry",
    "Flight",
    "Request",
    "build_caches",
]
