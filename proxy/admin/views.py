"""The JSON the admin API answers with: pools, upstreams, their live state and rates;
the server itself, its listeners and routes.

Shape of ``GET /api/pools`` (an upstream object is also the answer to drain/enable)::

    {"ready": true, "window_s": 10.0,
     "pools": [{"name": "web", "balancer": "round_robin", "retries": 0,
                "retries_denied": 0, "pending": 0, "held": 0, "overflows": 0, "tunnels": 0,
                "available": 2, "total": 3,
                "retry_budget": {"left": 10.0, "percent": 20.0,
                                 "min_retries_per_second": 10.0, "denied": 0},
                "ejection": {"passive": true, "ejected": 0, "max_percent": 50},
                "upstreams": [{"address": "127.0.0.1:9001", "name": "web-1",
                               "weight": 2, "backup": false,
                               "healthy": true, "enabled": true, "drained": false,
                               "available": true, "active": 1, "idle": 4,
                               "ejected": false, "ejected_until": null, "ejections": 0,
                               "connections": 5, "connections_opened": 5,
                               "waiting": 0, "tunnels": 0,
                               "source": "config", "container": null,
                               "requests": 120, "errors": 3, "connect_errors": 0,
                               "rate": 11.9, "error_rate": 0.0, "p50_ms": 1.2,
                               "p99_ms": 8.7}]}]}

``requests`` and ``errors`` (5xx) count every request the upstream answered since the
start; ``rate`` (requests/s), ``error_rate`` (fraction of those that were 5xx) and the
latency quantiles cover the last ``window_s`` seconds. ``healthy`` is the active checks'
verdict, ``ejected`` passive health's; ``ejected_until`` is a Unix time, or null.
``connections`` counts open upstream connections (busy, idle or connecting) against
``max_connections``, ``connections_opened`` every one established since the start (flat
under a steady load: connections are reused); ``waiting`` the requests queued for one;
``tunnels`` the open Upgrade (WebSocket) tunnels, which also count in ``active``.
``name`` is the config's upstream ``name``, else the address; ``source`` says where the
upstream came from (``config``: the file or its ``dns://`` entries; ``docker``: a
labelled container, then ``container`` is ``{"id": SHORT_ID, "name": NAME}``). ``held``
counts the requests a ``scale_from_zero`` pool holds for an upstream to become ready.
``retry_budget.left`` is how many retries the pool's budget allows now (summed over the
workers); ``ejection`` says whether passive health is on, how many upstreams it has out,
and its ``max_ejection_percent``.

Shape of ``GET /api/server``::

    {"version": "0.1.0", "started_at": 1790000000.0, "uptime_s": 12.3,
     "config_path": "config/aiolb.yaml", "workers": 1, "ready": true,
     "listeners": [{"name": "public", "bind": "127.0.0.1:8080", "connections": 2,
                    "routes": [{"name": "public/0", "host": null, "path_prefix": "/",
                                "pool": "web", "filters": ["rate_limit", "sticky"],
                                "rate_limited": 12}]}]}

A route's ``name`` is its config ``name``, else ``LISTENER/INDEX``; ``filters`` its
filters in order (``python:module:Class`` for a user's); ``rate_limited`` the requests
its rate limits refused (summed over the workers), as ``aiolb_rate_limited_total``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from proxy import __version__
from proxy.filters import label

if TYPE_CHECKING:
    from proxy.admin.control import Server
    from proxy.admin.recent import RecentStats
    from proxy.config import ListenerSpec, PoolSpec
    from proxy.upstream.pool import Pool, Upstream


def ejected_until(upstream: Upstream, loop_now: float) -> float | None:
    """When passive health returns an ejected upstream, as a Unix time; None when it
    is not ejected."""
    if not upstream.ejected or upstream.ejected_until <= loop_now:
        return None
    return round(time.time() + (upstream.ejected_until - loop_now), 3)


def upstream_view(
    pool: str, upstream: Upstream, recent: RecentStats, loop_now: float
) -> dict[str, Any]:
    """One upstream: identity, state, totals and recent rates."""
    stats = upstream.stats
    return {
        "address": upstream.address,
        "name": upstream.name,
        "weight": upstream.weight,
        "backup": upstream.backup,
        "healthy": upstream.healthy,
        "enabled": upstream.enabled,
        "drained": not upstream.enabled,
        "available": upstream.available,
        "active": upstream.active,
        "idle": len(upstream.idle),
        "ejected": upstream.ejected,
        "ejected_until": ejected_until(upstream, loop_now),
        "ejections": upstream.ejections,
        "connections": upstream.conns,
        "waiting": len(upstream.waiting),
        "tunnels": upstream.tunnels,
        "requests": stats.total,
        "errors": stats.errors,
        "connect_errors": stats.connect_errors,
        "connections_opened": stats.connections_opened,
        "source": "docker" if upstream.container is not None else "config",
        "container": _container(upstream),
        **recent.recent(pool, upstream.address, stats),
    }


def _container(upstream: Upstream) -> dict[str, str] | None:
    """The Docker container an upstream stands for (``providers.docker``), or None."""
    container = upstream.container
    if container is None:
        return None
    return {"id": container[0][:12], "name": container[1]}


def pool_view(server: Server, pool: Pool, recent: RecentStats) -> dict[str, Any]:
    """One pool and all its upstreams."""
    spec = server.config.pools.get(pool.name)
    now = server.loop.time()
    return {
        "name": pool.name,
        "balancer": spec.balancer.name if spec is not None else None,
        "retries": pool.retries,
        "retries_denied": pool.retry.budget.denied,
        "pending": pool.pending,
        "held": pool.scale.count if pool.scale is not None else 0,
        "overflows": pool.overflows,
        "tunnels": sum(u.tunnels for u in pool.upstreams),
        "available": sum(u.available for u in pool.upstreams),
        "total": len(pool.upstreams),
        "retry_budget": _budget(server, pool, spec, now),
        "ejection": _ejection(pool, spec),
        "upstreams": [upstream_view(pool.name, u, recent, now) for u in pool.upstreams],
    }


def _budget(server: Server, pool: Pool, spec: PoolSpec | None, now: float) -> Any:
    summed = server.retry_budget_left
    budget = pool.retry.budget
    left = summed.get(pool.name, 0.0) if summed is not None else budget.available(
        pool.requests, now)  # fmt: skip
    settings = spec.retries.budget if spec is not None else None
    return {
        "left": round(left, 1),
        "percent": settings.percent if settings is not None else None,
        "min_retries_per_second": settings.min_retries_per_second if settings else None,
        "denied": budget.denied,
    }


def _ejection(pool: Pool, spec: PoolSpec | None) -> dict[str, Any]:
    passive = spec.health_check.passive if spec is not None else None
    return {
        "passive": passive is not None,
        "ejected": sum(u.ejected for u in pool.upstreams),
        "max_percent": passive.max_ejection_percent if passive is not None else None,
    }


def route_views(server: Server, lc: ListenerSpec) -> list[dict[str, Any]]:
    """A listener's routes: name, match, pool, filters, cache and requests rate-limited."""
    limited: dict[str, int] = {}
    for (route, _), counts in server.filters.counts.items():
        limited[route] = limited.get(route, 0) + counts.limited
    views: list[dict[str, Any]] = [
        {"name": name, "host": r.match.host, "path_prefix": r.match.path_prefix,
         "pool": r.pool, "filters": [label(f) for f in r.filters], "cache": r.cache,
         "rate_limited": limited.get(name, 0)}
        for name, r in zip(lc.route_names(), lc.routes, strict=True)
    ]  # fmt: skip
    for view, r in zip(views, lc.routes, strict=True):  # a split's pools, a mirror's
        if r.pools is not None:
            view["pools"] = {p.pool: p.weight for p in r.pools}
        if r.mirror is not None:
            view["mirror"] = r.mirror.pool
    return views


def server_view(server: Server) -> dict[str, Any]:
    """The whole ``GET /api/server`` answer."""
    counts = server.client_connection_counts()
    addresses = server.listener_addresses()
    return {
        "version": __version__,
        "started_at": round(server.started_at, 3),
        "uptime_s": round(time.time() - server.started_at, 3),
        "config_path": server.config_path,
        "workers": server.workers,
        "ready": server.ready,
        "listeners": [
            {
                "name": lc.name,
                "bind": addresses[lc.name],
                "connections": counts.get(lc.name, 0),
                "routes": route_views(server, lc),
            }
            for lc in server.config.listeners
        ],
    }


def pools_view(server: Server, recent: RecentStats) -> dict[str, Any]:
    """The whole ``GET /api/pools`` answer."""
    return {
        "ready": server.ready,
        "window_s": round(recent.span, 3),
        "pools": [pool_view(server, pool, recent) for pool in server.pools.values()],
    }


def caches_view(server: Server) -> dict[str, Any]:
    """The whole ``GET /api/caches`` answer: every cache, its store and counters.

    ``hit_ratio`` is the share of the lookups (hits, stale hits, revalidations,
    misses) that were answered without a full upstream response; null before any."""
    out = []
    for name, cache in server.caches.items():
        counts = cache.report()
        results = counts["results"]
        lookups = results["hit"] + results["stale"] + results["revalidated"] + results["miss"]
        served = results["hit"] + results["stale"] + results["revalidated"]
        store = cache.spec.store
        out.append({
            "name": name,
            "store": "memory" if store == "memory" else "redis",
            "max_size": cache.spec.max_size if store == "memory" else None,
            "bytes": counts["bytes"],
            "entries": counts["entries"],
            "requests": results,
            "stored": counts["stored"],
            "errors": counts["errors"],
            "hit_ratio": round(served / lookups, 4) if lookups else None,
        })  # fmt: skip
    return {"caches": out}
