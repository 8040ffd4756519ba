"""The Redis client both Redis stores use (rate limits, caches): redis-py's asyncio
client, imported only when a config uses Redis (the ``redis`` extra).

A burst of requests wants many Redis round trips at once: the connection pool blocks
for a free connection (``BlockingConnectionPool``, up to ``MAX_CONNECTIONS``) rather
than failing the round trip, so that only a Redis that is down or slow counts as an
error. redis-py's own retries are off: a caller waits at most its ``timeout``.
"""

from __future__ import annotations

from typing import Any, Final

#: Connections to one Redis server per process.
MAX_CONNECTIONS: Final = 64


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
