"""The Redis client both Redis stores use (rate limits, caches): redis-py's asyncio
client, imported only when a config uses Redis (the ``redis`` extra).

A burst of requests wants many Redis round trips at once: the connection pool blocks
for a free connection (``BlockingConnectionPool``, up to ``MAX_CONNECTIONS``) rather
than failing the round trip, so that only a Redis that is down or slow counts as an
error. redis-py's own retries are off: a caller waits at most its ``timeout``.
"""

from __future__ import annotations

import time
from typing import Any, Final

#: Connections to one Redis server per process.
MAX_CONNECTIONS: Final = 64
#: After an error, a store does not ask Redis again for this long.
RETRY_AFTER: Final = 1.0


class RedisCircuit:
    """How a store sees its Redis server: after an error the server is skipped for
    ``RETRY_AFTER`` (``available`` is false), ``errors`` counts the failures, and
    ``outage_began`` / ``outage_ended`` (the store's own log lines) run once at each end
    of an outage. Only an operation begun after the last failure ends one: a reply
    already on its way when Redis failed says nothing of Redis now."""

    __slots__ = ("down_until", "errors", "failed_at", "outage")

    def __init__(self) -> None:
        self.down_until = 0.0  # monotonic: Redis is not asked before then
        self.failed_at = 0.0  # monotonic: the last failure
        self.errors = 0
        self.outage = False

    @property
    def available(self) -> bool:
        return time.monotonic() >= self.down_until

    def failed(self, what: str, exc: BaseException) -> None:
        """``what`` (an operation) failed with ``exc``."""
        self.errors += 1
        self.failed_at = now = time.monotonic()
        self.down_until = now + RETRY_AFTER
        if not self.outage:
            self.outage = True
            self.outage_began(what, exc)

    def worked(self, started: float) -> None:
        """An operation begun at ``started`` (monotonic) succeeded."""
        if self.outage and started >= self.failed_at:
            self.outage = False
            self.outage_ended()

    def outage_began(self, what: str, exc: BaseException) -> None:
        raise NotImplementedError

    def outage_ended(self) -> None:
        raise NotImplementedError


def redis_client(url: str, timeout: float, read_timeout: float | None = None) -> Any:
    """A client of ``url`` whose connects, commands and waits for a pooled connection
    each take at most ``timeout`` seconds (a reply's reading: ``read_timeout``, when
    given: a large cached body takes longer than a command's answer should)."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=MAX_CONNECTIONS, timeout=timeout,
        socket_timeout=read_timeout if read_timeout is not None else timeout,
        socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0), health_check_interval=0,
    )  # fmt: skip
    return aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose closes both
