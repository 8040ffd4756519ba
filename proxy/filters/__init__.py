"""Traffic policy as filters: what a route does to a request besides forwarding it.

``REGISTRY`` maps the name used in YAML to the filter's factory, ``(options, site) ->
Filter``: one module per filter, and ``python`` for a user's own class (``Filter`` is
the documented base class: ``proxy.filters.base``). ``build_chain`` makes a route's
``FilterChain`` (``proxy.filters.chain``) once per config.

Adding a filter touches: ``proxy/filters/<name>.py``, ``REGISTRY`` here, its options
model in ``proxy.config.filters`` (``FILTER_OPTIONS``, and the ``FilterSpec`` union),
and its tests. A test asserts that the registry and the config's names are one set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from proxy.filters import python
from proxy.filters.access import Access
from proxy.filters.base import Filter, Headers, LocalResponse, Request, Response, UpstreamInfo
from proxy.filters.chain import FilterChain
from proxy.filters.compress import Compress
from proxy.filters.context import FilterContext, Site
from proxy.filters.headers import HeadersFilter
from proxy.filters.rate_limit import RateLimit
from proxy.filters.redirect import Redirect
from proxy.filters.rewrite import Rewrite
from proxy.filters.sticky import Sticky

if TYPE_CHECKING:
    from proxy.config.filters import FilterOptions
    from proxy.upstream.pool import Pool

Factory = Callable[[Any, Site], Filter]

REGISTRY: dict[str, Factory] = {
    "rate_limit": RateLimit,
    "headers": HeadersFilter,
    "rewrite": Rewrite,
    "redirect": Redirect,
    "sticky": Sticky,
    "access": Access,
    "compress": Compress,
    "python": python.build,
}


def label(spec: FilterOptions) -> str:
    """How logs name a filter: ``rate_limit``, ``python:pkg.mod:Class``."""
    path = getattr(spec, "python", None)
    return f"python:{path}" if path else spec.NAME


def build_chain(
    route: str, specs: Sequence[FilterOptions], pool: Pool, context: FilterContext
) -> FilterChain:
    """The chain of the route named ``route``, with its filters in order."""
    site = Site(route, pool, context)
    return FilterChain(route, pool, [(label(s), REGISTRY[s.NAME](s, site)) for s in specs])


__all__ = [
    "REGISTRY",
    "Filter",
    "FilterChain",
    "FilterContext",
    "Headers",
    "LocalResponse",
    "Request",
    "Response",
    "UpstreamInfo",
    "build_chain",
]
