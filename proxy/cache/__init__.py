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
  background (``Revalidator``).
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
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Final

from proxy.cache.entry import Entry
from proxy.cache.memory import MemoryStore
from proxy.cache.policy import (
    UNSAFE_METHODS,
    Directives,
    http_date,
    must_revalidate,
    stale_allowed,
    storable,
    variant,
    vary_names,
)

if TYPE_CHECKING:
    from proxy.cache.redis_store import RedisStore
    from proxy.config.models import Cache as CacheConfig

Headers = Sequence[tuple[bytes, bytes]]

BYPASS: Final = 0
HIT: Final = 1
STALE: Final = 2
REVALIDATE: Final = 3
MISS: Final = 4

#: ``aiolb_cache_requests_total`` results.
RESULTS: Final = ("hit", "miss", "stale", "bypass", "revalidated")


class Request:
    """What the cache needs of one request: its key and the headers that matter."""

    __slots__ = ("authorized", "cc", "conditional", "headers", "key", "method")

    def __init__(self, method: bytes, host: bytes, target: bytes, headers: Headers) -> None:
        self.method = method
        #: the cache key: the request's authority and target (a HEAD uses its GET's)
        self.key = host.lower().split(b":", 1)[0] + b" " + target
        #: lower-case header names, as the cache's decisions and ``Vary`` read them
        self.headers = [(name.lower(), value) for name, value in headers]
        self.cc = Directives.of_request(self.headers)
        self.authorized = any(name == b"authorization" for name, _ in self.headers)
        self.conditional = any(
            name in (b"if-none-match", b"if-modified-since") for name, _ in self.headers
        )


class Flight:
    """A miss being fetched; the requests that missed the same key meanwhile wait for
    ``done`` (set whether or not the response was stored)."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = asyncio.Event()


class Cache:
    """One named cache: store, settings, counters, fetches in flight."""

    def __init__(self, name: str, spec: CacheConfig) -> None:
        self.name = name
        self.spec = spec
        self.max_object_size = spec.max_object_size
        self.default_ttl = spec.default_ttl
        self.keep_stale = spec.keep_stale
        self.lock_timeout = spec.lock_timeout
        self.use_stale_on = frozenset(spec.use_stale)
        self.store: MemoryStore | RedisStore
        if spec.store == "memory":
            self.store = MemoryStore(spec.max_size)
        else:
            from proxy.cache.redis_store import RedisStore

            redis = spec.store
            self.store = RedisStore(redis.url, redis.key_prefix, spec.keep_stale, redis.timeout)
        #: the memory store answers at once; Redis needs an await
        self.sync = isinstance(self.store, MemoryStore)
        self.results = dict.fromkeys(RESULTS, 0)
        self.stored = 0
        self.flights: dict[bytes, Flight] = {}

    # -- deciding ------------------------------------------------------------------------

    def decide(self, request: Request, entry: Entry | None, now: float) -> int:
        """What to do for ``request`` given what is stored for it (``entry``)."""
        if request.method not in (b"GET", b"HEAD") or "no-store" in request.cc:
            return BYPASS
        if entry is None:
            return MISS
        age = entry.age(now)
        if age > entry.lifetime + self.keep_stale:
            return MISS  # kept too long: treated as gone
        if not must_revalidate(request.cc, entry.cc, age, entry.lifetime):
            return HIT
        stale_for = age - entry.lifetime
        if (
            stale_for > 0
            and "no-cache" not in request.cc
            and "no-cache" not in entry.cc
            and stale_allowed(entry.cc, "stale-while-revalidate", stale_for)
        ):
            return STALE
        return REVALIDATE

    def may_store(self, request: Request, status: int, head: Headers) -> bool:
        """May this response to ``request`` be stored?"""
        why = storable(
            request.method, status, request.cc, Directives.of(head), head,
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

    def entry(self, request: Request, head: bytes, body: bytes, times: tuple[float, float],
              response: Headers) -> Entry:  # fmt: skip
        """A new entry of ``request``'s key and variant from a response."""
        names = vary_names(response) or ()
        values = variant(request.headers, names) if names else ()
        return Entry(request.key, names, values, head, body, times, self.default_ttl)

    def hit(self, entry: Entry, request: Request, now: float, status: str, keep_alive: bool,
            http_minor: int) -> tuple[bytes, bytes]:  # fmt: skip
        """(head, body) for serving ``entry``: ``Age``, ``Cache-Status: aiolb; STATUS``,
        the framing; a 304 without a body when the client's own validators match."""
        age = max(0, int(entry.age(now)))
        ttl = int(entry.lifetime - entry.age(now))
        connection = (b"" if keep_alive and http_minor else b"Connection: keep-alive\r\n"
                      if keep_alive else b"Connection: close\r\n")  # fmt: skip
        cache_status = b"Cache-Status: aiolb; %s; ttl=%d\r\n" % (status.encode(), ttl)
        if request.conditional and _not_modified(request.headers, entry.headers):
            rest = entry.head.partition(b"\r\n")[2]
            head = b"HTTP/1.1 304 Not Modified\r\n" + rest
            return head + b"Age: %d\r\n%s%s\r\n" % (age, cache_status, connection), b""
        body = b"" if request.method == b"HEAD" else entry.body
        return (
            entry.head
            + b"Age: %d\r\n%sContent-Length: %d\r\n%s\r\n"
            % (age, cache_status, len(entry.body), connection),
            body,
        )

    @staticmethod
    def now() -> float:
        """Unix time: ages are differences of ``Date`` values and arrival times."""
        return time.time()

    def __repr__(self) -> str:
        hits, misses = self.results["hit"], self.results["miss"]
        return f"<Cache {self.name} [{self.store!r}, {hits} hits, {misses} misses]>"


def build_caches(
    specs: Mapping[str, CacheConfig], previous: Mapping[str, Cache] | None = None
) -> dict[str, Cache]:
    """A ``Cache`` per ``caches:`` entry; a reload keeps each one whose settings did not
    change (the same object, its entries and counters with it)."""
    kept = previous or {}
    out = {}
    for name, spec in specs.items():
        old = kept.get(name)
        out[name] = old if old is not None and old.spec == spec else Cache(name, spec)
    return out


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
