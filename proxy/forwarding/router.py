"""First-match routing by host (exact or ``*.suffix``) and path prefix.

Routes are compiled once per config. A lookup normalises the host (lower case, port
removed), finds the candidate routes for it (cached per host, the cache bounded so
that client-chosen hosts cannot grow it) and returns the target of the first route
whose path prefix matches: for a listener, a ``Route`` (its pool, its filter chain,
its name). A listener with one catch-all route costs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from proxy.filters.chain import FilterChain
    from proxy.upstream.pool import Pool

P = TypeVar("P")


class Route:
    """A matched route: the ``pool`` that serves it, its ``chain`` of filters (None for a
    route without filters: the exchange then runs no filter code) and its ``name``."""

    __slots__ = ("chain", "name", "pool")

    def __init__(self, name: str, pool: Pool, chain: FilterChain | None = None) -> None:
        self.name = name
        self.pool = pool
        self.chain = chain

    def __repr__(self) -> str:
        return f"<Route {self.name} -> {self.pool.name} [{self.chain!r}]>"

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
    """Maps ``(host, path)`` to a route's target, or None when no route matches (404)."""

    __slots__ = ("_by_host", "_only", "_routes")

    def __init__(self, routes: Sequence[tuple[str | None, str, P]]):
        """``routes``: ``(host pattern or None, path prefix, target)`` in config order."""
        self._routes = [_Route(host, prefix, target) for host, prefix, target in routes]
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
