"""First-match routing by host (exact or ``*.suffix``) and path prefix.

Routes are compiled once per config. A lookup normalises the host (lower case, port
removed), finds the candidate routes for it (cached per host, the cache bounded so
that client-chosen hosts cannot grow it) and returns the target of the first route
whose path prefix matches: for a listener, a ``Route`` (its pool, its filter chain,
its cache, its name, what it allows). A listener with one catch-all route costs
nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Generic, TypeVar

from proxy.http.target import normalise_host

if TYPE_CHECKING:
    from proxy.cache import Cache
    from proxy.filters.chain import FilterChain
    from proxy.upstream.pool import Pool

P = TypeVar("P")

_CACHE_LIMIT = 1024


class Route:
    """A matched route: the ``pool`` that serves it (None for a route that redirects to
    https), its ``chain`` of filters and its ``cache`` (None when it has none: the
    exchange then runs no filter or cache code), its ``name``, the Upgrade protocols it
    tunnels and ``redirect`` (False, or the https port to redirect to: True for the
    default one)."""

    __slots__ = ("cache", "chain", "name", "pool", "redirect", "upgrades")

    def __init__(
        self,
        name: str,
        pool: Pool | None,
        chain: FilterChain | None = None,
        cache: Cache | None = None,
        upgrades: Sequence[str] = ("websocket",),
        redirect: bool | int = False,
    ) -> None:
        self.name = name
        self.pool = None if redirect else pool
        self.chain = chain
        self.cache = cache
        self.upgrades = frozenset(token.encode() for token in upgrades)
        self.redirect = redirect

    def __repr__(self) -> str:
        pool = self.pool.name if self.pool is not None else f"redirect {self.redirect}"
        return f"<Route {self.name} -> {pool} [{self.chain!r}, {self.cache!r}]>"


class _Route(Generic[P]):
    __slots__ = ("host", "prefix", "suffix", "target")

    def __init__(self, host: str | None, prefix: str, target: P) -> None:
        self.host = host.lower().encode() if host else None
        self.suffix = self.host[1:] if self.host and self.host.startswith(b"*.") else None
        self.prefix = prefix.encode()
        self.target = target

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
        first = self._routes[0] if self._routes else None
        catch_all = first is not None and first.host is None and first.prefix == b"/"
        self._only: P | None = first.target if first is not None and catch_all else None

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
                return r.target
        return None

    def serves_host(self, host: bytes) -> bool:
        """True if a route names this host explicitly (for absolute-form targets)."""
        key = normalise_host(host)
        return any(r.host is not None and r.serves(key) for r in self._routes)

    def __repr__(self) -> str:
        return f"<Router [{len(self._routes)} routes, {len(self._by_host)} hosts cached]>"
