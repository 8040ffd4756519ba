"""First-match routing by host (exact or ``*.suffix``), path prefix and, for routes
that have them, the conditions of ``proxy.forwarding.matching`` (methods, headers,
query parameters, exact path, path regex).

Routes are compiled once per config. A lookup normalises the host (lower case, port
removed), finds the candidate routes for it (cached per host, the cache bounded so
that client-chosen hosts cannot grow it) and returns the target of the first route
whose path prefix matches: for a listener, a ``Route`` (its pool, its filter chain,
its cache, its name, what it allows). A listener with one catch-all route costs
nothing, and a router none of whose routes has extra conditions runs the plain loop:
it pays for them nothing but one flag test per lookup.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Generic, TypeVar

from proxy.forwarding.matching import Facts
from proxy.http.target import normalise_host

if TYPE_CHECKING:
    from proxy.cache import Cache
    from proxy.filters.chain import FilterChain
    from proxy.forwarding.matching import Conditions, Subject
    from proxy.forwarding.traffic import Mirror, Split
    from proxy.upstream.pool import Pool

P = TypeVar("P")

_CACHE_LIMIT = 1024


class Route:
    """A matched route: the ``pool`` that serves it (None for a route that redirects to
    https), its ``chain`` of filters and its ``cache`` (None when it has none: the
    exchange then runs no filter or cache code), its ``name``, the Upgrade protocols it
    tunnels and ``redirect`` (False, or the https port to redirect to: True for the
    default one)."""

    __slots__ = ("cache", "chain", "mirror", "name", "pool", "redirect", "split", "upgrades")

    def __init__(
        self,
        name: str,
        pool: Pool | None,
        chain: FilterChain | None = None,
        cache: Cache | None = None,
        upgrades: Sequence[str] = ("websocket",),
        redirect: bool | int = False,
        split: Split | None = None,
        mirror: Mirror | None = None,
    ) -> None:
        """``split``: the pools a request may go to (a traffic split, or the one
        ``pool`` of a mirrored route); it makes ``pool`` None, so the exchange asks the
        split, off the common route's path. ``mirror``: where copies go."""
        self.name = name
        #: the pool of the common route; None for a redirect or a split
        self.pool = None if redirect or split is not None else pool
        self.chain = chain
        self.cache = cache
        self.upgrades = frozenset(token.encode() for token in upgrades)
        self.redirect = redirect
        self.split = None if redirect else split
        self.mirror = None if redirect else mirror

    def __repr__(self) -> str:
        if self.split is not None:
            pool = repr(self.split)
        elif self.pool is not None:
            pool = self.pool.name
        else:
            pool = f"redirect {self.redirect}"
        return f"<Route {self.name} -> {pool} [{self.chain!r}, {self.cache!r}]>"


class _Route(Generic[P]):
    __slots__ = ("conditions", "host", "prefix", "suffix", "target")

    def __init__(
        self, host: str | None, prefix: str, target: P, conditions: Conditions | None = None
    ) -> None:
        self.host = host.lower().encode() if host else None
        self.suffix = self.host[1:] if self.host and self.host.startswith(b"*.") else None
        self.prefix = prefix.encode()
        self.target = target
        self.conditions = conditions

    def serves(self, host: bytes) -> bool:
        if self.host is None:
            return True
        if self.suffix is not None:
            return host.endswith(self.suffix) and len(host) > len(self.suffix)
        return host == self.host


class Router(Generic[P]):
    """Maps ``(host, path)`` (and, for routes with conditions, the request) to a
    route's target, or None when no route matches (404)."""

    __slots__ = ("_by_host", "_only", "_rich", "_routes")

    def __init__(
        self,
        routes: Sequence[tuple[str | None, str, P]],
        conditions: Sequence[Conditions | None] | None = None,
    ):
        """``routes``: ``(host pattern or None, path prefix, target)`` in config order;
        ``conditions``: each route's extra conditions (None: none), in the same order."""
        extra = conditions if conditions is not None else [None] * len(routes)
        self._routes = [
            _Route(host, prefix, target, cond)
            for (host, prefix, target), cond in zip(routes, extra, strict=True)
        ]
        self._by_host: dict[bytes, list[_Route[P]]] = {}
        #: some route has conditions: lookups take the loop that checks them
        self._rich = any(c is not None for c in extra)
        first = self._routes[0] if self._routes else None
        catch_all = (first is not None and first.host is None and first.prefix == b"/"
                     and first.conditions is None)  # fmt: skip
        self._only: P | None = first.target if first is not None and catch_all else None

    def route(self, host: bytes | None, path: bytes, subject: Subject | None = None) -> P | None:
        """The target of the first route that serves ``host`` and ``path`` (the
        normalised target, query included) and whose conditions ``subject`` (the
        request: method and headers) meets; None: no route matches."""
        if self._only is not None:
            return self._only
        key = normalise_host(host) if host else b""
        candidates = self._by_host.get(key)
        if candidates is None:
            candidates = [r for r in self._routes if r.serves(key)]
            if len(self._by_host) >= _CACHE_LIMIT:
                self._by_host.clear()
            self._by_host[key] = candidates
        if self._rich:
            return self._first(candidates, path, subject)
        for r in candidates:
            if path.startswith(r.prefix):
                return r.target
        return None

    def _first(self, candidates: list[_Route[P]], path: bytes, subject: Subject | None) -> P | None:
        facts: Facts | None = None
        for r in candidates:
            if not path.startswith(r.prefix):
                continue
            conditions = r.conditions
            if conditions is None:
                return r.target
            if subject is None:
                continue  # nothing to check the conditions against
            if facts is None:
                facts = Facts(subject, path)
            if conditions.matches(facts):
                return r.target
        return None

    def serves_host(self, host: bytes) -> bool:
        """True if a route names this host explicitly (for absolute-form targets)."""
        key = normalise_host(host)
        return any(r.host is not None and r.serves(key) for r in self._routes)

    def __repr__(self) -> str:
        return f"<Router [{len(self._routes)} routes, {len(self._by_host)} hosts cached]>"
