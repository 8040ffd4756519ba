"""First-match routing by host (exact or ``*.suffix``) and path prefix.

Routes are compiled once per config. A lookup normalises the host (lower case, port
removed), finds the candidate routes for it (cached per host, the cache bounded so
that client-chosen hosts cannot grow it) and returns the pool of the first route
whose path prefix matches. A listener with one catch-all route costs nothing.

A route that redirects to https has no pool: ``route`` returns None for it as for no
match, and only then does the exchange ask ``match`` which route it was (so the
common request pays nothing for redirects). ``match`` also gives an Upgrade request
its route's ``upgrades``.
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


#: What a route may say besides its pool: the Upgrade protocols it tunnels, and
#: ``redirect_https`` (False, True: the default https port, or a port number).
RouteOptions = tuple[tuple[str, ...], bool | int]
DEFAULT_OPTIONS: RouteOptions = (("websocket",), False)


class _Route(Generic[P]):
    __slots__ = ("host", "pool", "prefix", "redirect", "suffix", "upgrades")

    def __init__(self, host: str | None, prefix: str, pool: P | None, options: RouteOptions):
        self.host = host.lower().encode() if host else None
        self.suffix = self.host[1:] if self.host and self.host.startswith(b"*.") else None
        self.prefix = prefix.encode()
        self.upgrades = frozenset(token.encode() for token in options[0])
        #: False, or the https port to redirect to (True: the default port)
        self.redirect = options[1]
        self.pool = None if self.redirect else pool

    def serves(self, host: bytes) -> bool:
        if self.host is None:
            return True
        if self.suffix is not None:
            return host.endswith(self.suffix) and len(host) > len(self.suffix)
        return host == self.host


class Router(Generic[P]):
    """Maps ``(host, path)`` to a pool, or None when no route matches (404) or the route
    redirects (``match`` tells which)."""

    __slots__ = ("_by_host", "_only", "_routes")

    def __init__(
        self,
        routes: Sequence[tuple[str | None, str, str | None]],
        pools: Mapping[str, P],
        options: Sequence[RouteOptions] | None = None,
    ):
        """``routes``: ``(host pattern or None, path prefix, pool name)`` in config order;
        ``options``: each route's ``RouteOptions`` (default: websocket, no redirect)."""
        extra = options if options is not None else [DEFAULT_OPTIONS] * len(routes)
        self._routes = [
            _Route(host, prefix, pools[name] if name is not None else None, opts)
            for (host, prefix, name), opts in zip(routes, extra, strict=True)
        ]
        self._by_host: dict[bytes, list[_Route[P]]] = {}
        first = self._routes[0] if self._routes else None
        catch_all = first is not None and first.host is None and first.prefix == b"/"
        self._only: P | None = first.pool if first is not None and catch_all else None

    def route(self, host: bytes | None, path: bytes) -> P | None:
        if self._only is not None:
            return self._only
        for r in self._candidates(host):
            if path.startswith(r.prefix):
                return r.pool
        return None

    def match(self, host: bytes | None, path: bytes) -> _Route[P] | None:
        """The first route that matches (with its options), or None."""
        for r in self._candidates(host):
            if path.startswith(r.prefix):
                return r
        return None

    def _candidates(self, host: bytes | None) -> list[_Route[P]]:
        key = normalise_host(host) if host else b""
        candidates = self._by_host.get(key)
        if candidates is None:
            candidates = [r for r in self._routes if r.serves(key)]
            if len(self._by_host) >= _CACHE_LIMIT:
                self._by_host.clear()
            self._by_host[key] = candidates
        return candidates

    def serves_host(self, host: bytes) -> bool:
        """True if a route names this host explicitly (for absolute-form targets)."""
        key = normalise_host(host)
        return any(r.host is not None and r.serves(key) for r in self._routes)

    def __repr__(self) -> str:
        return f"<Router [{len(self._routes)} routes, {len(self._by_host)} hosts cached]>"
