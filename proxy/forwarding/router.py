"""First-match routing by host (exact or ``*.suffix``) and path prefix.

Routes are compiled once per config. A lookup normalises the host (lower case, port
removed), finds the candidate routes for it (cached per host, the cache bounded so
that client-chosen hosts cannot grow it) and returns the pool of the first route
whose path prefix matches. A listener with one catch-all route costs nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Generic, TypeVar

P = TypeVar("P")

_CACHE_LIMIT = 1024


def normalise_host(host: bytes) -> bytes:
    """``Example.COM:8080`` -> ``example.com``; ``[::1]:80`` -> ``[::1]``."""
    host = host.strip().lower()
    if host.startswith(b"["):
        end = host.find(b"]")
        return host[: end + 1] if end > 0 else host
    return host.partition(b":")[0]


class _Route(Generic[P]):
    __slots__ = ("host", "pool", "prefix", "suffix")

    def __init__(self, host: str | None, prefix: str, pool: P) -> None:
        self.host = host.lower().encode() if host else None
        self.suffix = self.host[1:] if self.host and self.host.startswith(b"*.") else None
        self.prefix = prefix.encode()
        self.pool = pool

    def serves(self, host: bytes) -> bool:
        if self.host is None:
            return True
        if self.suffix is not None:
            return host.endswith(self.suffix) and len(host) > len(self.suffix)
        return host == self.host


class Router(Generic[P]):
    """Maps ``(host, path)`` to a pool, or None when no route matches (404)."""

    __slots__ = ("_by_host", "_only", "_routes")

    def __init__(self, routes: Sequence[tuple[str | None, str, str]], pools: Mapping[str, P]):
        """``routes``: ``(host pattern or None, path prefix, pool name)`` in config order."""
        self._routes = [_Route(host, prefix, pools[name]) for host, prefix, name in routes]
        self._by_host: dict[bytes, list[_Route[P]]] = {}
        first = self._routes[0]
        catch_all = first.host is None and first.prefix == b"/"
        self._only: P | None = first.pool if catch_all else None

    def route(self, host: bytes | None, path: bytes) -> P | None:
        if self._only is not None:
            return self._only
        key = normalise_host(host) if host else b""
        candidates = self._by_host.get(key)
        if candidates is None:
            candidates = [r for r in self._routes if r.serves(key)]
            if len(self._by_host) >= _CACHE_LIMIT:
                self._by_host.clear()
            self._by_host[key] = candidates
        for r in candidates:
            if path.startswith(r.prefix):
                return r.pool
        return None

    def serves_host(self, host: bytes) -> bool:
        """True if a route names this host explicitly (for absolute-form targets)."""
        key = normalise_host(host)
        return any(r.host is not None and r.serves(key) for r in self._routes)

    def __repr__(self) -> str:
        return f"<Router [{len(self._routes)} routes, {len(self._by_host)} hosts cached]>"
