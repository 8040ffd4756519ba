"""``rate_limit`` buckets in Redis, shared by every aiolb instance that names it.

One decision is one round trip: ``EVALSHA`` of a Lua script (redis-py's ``Script``
sends ``EVAL`` once if Redis has forgotten it, after a restart) that runs the token
bucket rule of ``proxy.filters.buckets.take`` atomically on a hash of the bucket's
tokens and stamp, with Redis's own clock (``TIME``), so the instances' clocks do not
matter. The key expires when its bucket would be full again: Redis holds only the
buckets that matter. A fixed ``INCR``+``EXPIRE`` window would be one round trip too,
but it admits up to twice the limit across a window's edge, and would differ from the
memory store's rule.

Outages: any error (refused, timed out, a bad answer) opens a circuit for a second, in
which decisions are made without asking (``None``: the filter admits with
``fail_open``, else answers 503); the first error of an outage logs one line, the
first success after it another. redis-py is imported only when a config uses this
store (the ``redis`` extra), and its own retries are off: a decision waits at most
``timeout``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Final

from proxy.redis_client import RedisCircuit, redis_client

log = logging.getLogger("aiolb")

TOKEN_BUCKET: Final = """
if redis.replicate_commands then redis.replicate_commands() end
local rate = tonumber(ARGV[1])
local size = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 't', 's')
local tokens = tonumber(state[1])
if tokens == nil then
  tokens = size
elseif now > tonumber(state[2]) then
  tokens = math.min(size, tokens + (now - tonumber(state[2])) * rate)
else
  now = tonumber(state[2])  -- the bucket's time never goes back
end
local left = tokens - 1
if left >= 0 then tokens = left end
redis.call('HSET', KEYS[1], 't', string.format('%.17g', tokens), 's', string.format('%.6f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil((size - tokens) / rate * 1000) + 1000)
return string.format('%.17g', left)
"""


class RedisBuckets(RedisCircuit):
    """A Redis server's buckets, as ``take`` decisions; one per url and settings.
    ``errors`` counts the failed round trips (``RedisCircuit``)."""

    __slots__ = ("_client", "_script", "timeout", "url")

    def __init__(self, url: str, timeout: float) -> None:
        super().__init__()
        self.url = url
        self.timeout = timeout
        self._client: Any = redis_client(url, timeout)
        self._script = self._client.register_script(TOKEN_BUCKET)

    async def take(self, key: bytes, rate: float, size: float) -> float | None:
        """The tokens left after taking one from ``key``'s bucket (< 0: refused), or
        None when Redis cannot say (down, or the circuit is open)."""
        started = time.monotonic()
        if started < self.down_until:  # the circuit is open
            return None
        try:
            left = await self._script(keys=[key], args=[repr(rate), repr(size)])
            value = float(left)
        except Exception as exc:  # redis-py's errors, OSError, timeouts, a bad answer
            self.failed("a decision", exc)
            return None
        self.worked(started)
        return value

    def outage_began(self, what: str, exc: BaseException) -> None:
        log.error(
            "rate limit store %s unreachable (%s: %s); deciding without it until it "
            "answers", self.url, type(exc).__name__, exc or "no detail",
        )  # fmt: skip

    def outage_ended(self) -> None:
        log.warning("rate limit store %s answers again", self.url)

    async def close(self) -> None:
        await self._client.aclose()

    def __repr__(self) -> str:
        state = "down" if self.outage else "up"
        return f"<RedisBuckets {self.url} [{state}, {self.errors} errors]>"
