"""A ``caches`` entry: a shared HTTP cache (RFC 9111) that routes opt into.

The cache itself is ``proxy.cache``; here are its settings, where it stores entries
(memory or Redis), and when a stale entry may stand in for a failure.
"""

from __future__ import annotations

import importlib.util
from typing import Annotated, Literal

from pydantic import Field, PlainSerializer, PlainValidator, model_validator

from proxy.config.base import ConfigModel, Duration, Kind, Size, Timeout


class CacheRedisStoreSpec(ConfigModel):
    """A cache store in Redis, shared by every worker and every instance that uses it."""

    type: Literal["redis"]
    """``redis``."""
    url: str = "redis://127.0.0.1:6379/0"
    """The Redis server (``redis://[:password@]host:port/db``, or ``rediss://`` for TLS)."""
    key_prefix: str = "aiolb:"
    """Prefix of every key the cache writes; caches on one Redis need different ones."""
    timeout: Timeout = 0.25
    """A Redis operation slower than this counts as an error: the request bypasses
    the cache."""

    @model_validator(mode="after")
    def _check(self) -> CacheRedisStoreSpec:
        if not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"url must start with redis://, rediss:// or unix://, got {self.url!r}"
            )
        if importlib.util.find_spec("redis") is None:
            raise ValueError("the redis store needs the redis package: pip install 'aiolb[redis]'")
        return self


#: Conditions under which a stale entry is served instead of an upstream's failure.
USE_STALE: tuple[str, ...] = ("error", "timeout")


def _check_use_stale(value: object) -> tuple[str | int, ...]:
    items = value if isinstance(value, list | tuple) else [value]
    out: list[str | int] = []
    for item in items:
        if isinstance(item, str) and item in USE_STALE:
            out.append(item)
        elif str(item).strip().isdigit() and 500 <= int(str(item)) <= 599:
            out.append(int(str(item)))
        else:
            raise ValueError(f"unknown condition {item!r}; use error, timeout or a status "
                             "500-599")  # fmt: skip
    return tuple(out)


#: When a stale entry may stand in for a failure: the names in ``USE_STALE`` and statuses.
UseStale = Annotated[
    tuple[str | int, ...],
    PlainValidator(_check_use_stale),
    PlainSerializer(list),
    Kind("list of conditions"),
]


class CacheSpec(ConfigModel):
    """A shared HTTP cache (RFC 9111) that routes opt into with ``cache: NAME``."""

    store: Literal["memory"] | CacheRedisStoreSpec = "memory"
    """``memory`` (per process, LRU) or ``{type: redis, url: ..., key_prefix: ...}``."""
    max_size: Annotated[Size, Field(ge=1)] = 256 * 1024 * 1024
    """Memory store: bytes of heads and bodies held; the least recently used go first."""
    max_object_size: Annotated[Size, Field(ge=0)] = 8 * 1024 * 1024
    """Larger responses stream through uncached."""
    default_ttl: Annotated[Duration, Field(gt=0)] | None = None
    """Freshness for responses that carry none but are heuristically cacheable (200,
    301, 404, ...); null: only explicitly fresh responses are stored (RFC 9111 4.2.2
    heuristics off)."""
    keep_stale: Annotated[Duration, Field(ge=0)] = 3600.0
    """How long an entry is kept after it turns stale: to revalidate it with a
    conditional request, and to serve it when every upstream fails."""
    lock_timeout: Annotated[Duration, Field(ge=0)] = 5.0
    """Concurrent misses for one key wait this long for the first one's response
    (request collapsing, nginx's ``proxy_cache_lock``), then go upstream themselves."""
    use_stale: UseStale = ("error", "timeout", 502, 503, 504)
    """When the upstream fails this way (``error``: no upstream available, refused or
    reset; ``timeout``; a status), a stored response is served however stale, unless it
    says ``must-revalidate``/``proxy-revalidate`` (nginx ``proxy_cache_use_stale``)."""
    surrogate_control: bool = True
    """Read the upstream's ``Surrogate-Control`` (untargeted or ``;aiolb`` directives
    replace ``Cache-Control``'s for this cache; a header with some is not passed on:
    one with only other devices' is), and send
    ``Surrogate-Capability: aiolb="Surrogate/1.0"`` upstream (Edge Architecture
    Specification 1.0, as Fastly and Varnish do); false: the header passes through."""
