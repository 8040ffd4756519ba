"""``sticky``: pin a client to the upstream that served it with a cookie aiolb sets
(HAProxy's ``cookie SERVERID insert``, Traefik's sticky cookie).

The cookie's value names the upstream by a hash of its address (the first 16 hex
digits of its SHA-256: the same in every aiolb instance and after restarts, and no
address given away). A request whose cookie names an available upstream of the pool
goes there; otherwise (no cookie, an unknown value, that upstream down, drained or
ejected) the balancer picks, and the response sets the cookie to the upstream that
answered: a retry that went elsewhere moves the client there.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from proxy.balancing.consistent_hash import key_reader
from proxy.filters.base import Filter, Request, Response

if TYPE_CHECKING:
    from proxy.config.filters import StickyOptions
    from proxy.filters.context import Site
    from proxy.upstream.pool import Pool, Upstream

_MEMO_LIMIT = 4096


class Sticky(Filter):
    """Cookie affinity (see the module)."""

    def __init__(self, options: StickyOptions, site: Site) -> None:
        super().__init__(options)
        self._pool: Pool = site.pool
        self._cookie = key_reader(f"cookie:{options.cookie}")
        attributes = [f"Path={options.path}"]
        if options.max_age is not None:
            attributes.append(f"Max-Age={max(1, round(options.max_age))}")
        if options.http_only:
            attributes.append("HttpOnly")
        if options.secure:
            attributes.append("Secure")
        attributes.append(f"SameSite={options.same_site.capitalize()}")
        self._set = f"{options.cookie}=%s; " + "; ".join(attributes)
        self._ids: dict[str, str] = {}  # address -> cookie value

    def ident(self, address: str) -> str:
        """The cookie value that names the upstream at ``address``."""
        value = self._ids.get(address)
        if value is None:
            if len(self._ids) >= _MEMO_LIMIT:
                self._ids.clear()
            value = self._ids[address] = hashlib.sha256(address.encode()).hexdigest()[:16]
        return value

    def _named(self, request: Request) -> Upstream | None:
        raw = self._cookie(request)
        if not raw:
            return None
        value = raw.decode("latin-1")
        for upstream in self._pool.upstreams:
            if self.ident(upstream.address) == value:
                return upstream
        return None

    def request_filter(self, request: Request) -> None:
        upstream = self._named(request)
        if upstream is not None and upstream.available:
            request.pinned = upstream

    def response_filter(self, request: Request, response: Response) -> None:
        served = request.ex.upstream
        if served is None:
            return
        value = self.ident(served.address)
        raw = self._cookie(request)
        if raw is None or raw.decode("latin-1") != value:
            response.headers.add("Set-Cookie", self._set % value)
