"""``rate_limit``: a token bucket per key; over the limit, 429 (nginx ``limit_req``,
Envoy's local and global rate limits, Traefik's RateLimit).

The key is read with ``proxy.balancing.consistent_hash.key_reader`` (``client_ip``,
``header:NAME``, ``cookie:NAME``, ``query:NAME``, ``path``) from the request as the
filters before this one left it, or is ``route`` (one bucket for the route). A request
without its key counts against one shared bucket: leaving the header out is no way
around the limit (nginx does not count such requests). Buckets are named
``ROUTE/NAME`` + the key: long keys are hashed, so a key costs at most 64 bytes.

A refused request gets 429 with ``Retry-After`` (whole seconds until a token) and the
IETF httpapi draft's headers: ``RateLimit-Policy: "NAME";q=SIZE;w=WINDOW`` (the bucket
as a quota of SIZE per WINDOW seconds, the time it takes to refill) and ``RateLimit:
"NAME";r=0;t=SECONDS``. They are not added to admitted responses: that would put every
rate-limited route on the response path for headers few clients read.

The memory store decides inline (no await). The Redis store waits for Redis (the
decisions asked during one event-loop iteration share one round trip:
``proxy.filters.redis_store``): its hook returns the store's future, whose result is
already the outcome (``_decide`` runs in the callback that settles the bucket's
decisions), and the chain waits on it without a task (``proxy.filters.chain``).
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import TYPE_CHECKING, Final

from proxy.balancing.consistent_hash import key_reader
from proxy.filters.base import Filter, LocalResponse, Request

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable

    from proxy.config.filters import RateLimitOptions
    from proxy.filters.context import Site
    from proxy.filters.redis_store import RedisBuckets

_LONG_KEY: Final = 64


class RateLimit(Filter):
    """A token bucket per key (see the module)."""

    def __init__(self, options: RateLimitOptions, site: Site) -> None:
        super().__init__(options)
        self._rate = options.rate.per_second
        self._size = float(options.size)
        self._name = options.name
        self._key: Callable[[Request], bytes | None] | None = (
            None if options.key == "route" else key_reader(options.key)
        )
        self._counts = site.context.counter(site.route, options.name)
        store = options.store
        self._fail_open = store.fail_open
        self._prefix = f"{site.route}/{options.name}\0".encode()
        window = max(1, math.ceil(self._size / self._rate))
        self._policy = f'"{options.name}";q={options.size};w={window}'
        self._take = site.context.buckets.take
        self._redis: RedisBuckets | None = None
        if store.type == "redis":
            assert store.url is not None
            self._redis = site.context.redis(store.url, store.timeout)
            self._prefix = store.prefix.encode() + self._prefix[:-1] + b":"

    def _bucket(self, request: Request) -> bytes:
        key = self._key(request) if self._key is not None else b""
        if key and len(key) > _LONG_KEY:
            key = hashlib.blake2b(key, digest_size=16).digest()
        return self._prefix + (key or b"")

    def request_filter(
        self, request: Request
    ) -> LocalResponse | asyncio.Future[LocalResponse | None] | None:
        redis = self._redis
        if redis is not None:  # a future of ``_decide``'s outcome (no coroutine, no task)
            return redis.take(self._bucket(request), self._rate, self._size, self._decide)
        left = self._take(self._bucket(request), self._rate, self._size, time.monotonic())
        return None if left >= 0 else self._refuse(left)

    def _decide(self, left: float | None) -> LocalResponse | None:
        """The Redis store's answer (the tokens left, None: it cannot say) as an outcome."""
        if left is None:
            self._counts.store_errors += 1
            if self._fail_open:
                return None
            return LocalResponse(
                503,
                [("Retry-After", "1")],
                "503 Service Unavailable: the rate limit cannot be checked\n",
            )
        return None if left >= 0 else self._refuse(left)

    def _refuse(self, left: float) -> LocalResponse:
        self._counts.limited += 1
        wait = str(max(1, math.ceil(-left / self._rate)))
        headers = [
            ("Retry-After", wait),
            ("RateLimit-Policy", self._policy),
            ("RateLimit", f'"{self._name}";r=0;t={wait}'),
        ]
        return LocalResponse(429, headers, "429 Too Many Requests: rate limit exceeded\n")

    def __repr__(self) -> str:
        return f"<RateLimit {self._name} [{self._rate:g}/s, size {self._size:g}]>"
