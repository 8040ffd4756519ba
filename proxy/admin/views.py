"""The JSON the admin API answers with: pools, upstreams, their live state and rates.

Shape of ``GET /api/pools`` (an upstream object is also the answer to drain/enable)::

    {"ready": true, "window_s": 10.0,
     "pools": [{"name": "web", "balancer": "round_robin", "retries": 0,
                "retries_denied": 0, "pending": 0, "overflows": 0, "tunnels": 0,
                "available": 2, "total": 3,
                "upstreams": [{"address": "127.0.0.1:9001", "weight": 2, "backup": false,
                               "healthy": true, "enabled": true, "drained": false,
                               "available": true, "active": 1, "idle": 4,
                               "ejected": false, "ejected_until": null, "ejections": 0,
                               "connections": 5, "connections_opened": 5,
                               "waiting": 0, "tunnels": 0,
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
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxy.admin.recent import RecentStats
    from proxy.runtime.server import ProxyServer
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
        **recent.recent(pool, upstream.address, stats),
    }


def pool_view(server: ProxyServer, pool: Pool, recent: RecentStats) -> dict[str, Any]:
    """One pool and all its upstreams."""
    spec = server.config.pools.get(pool.name)
    now = server.loop.time()
    return {
        "name": pool.name,
        "balancer": spec.balancer.name if spec is not None else None,
        "retries": pool.retries,
        "retries_denied": pool.retry.budget.denied,
        "pending": pool.pending,
        "overflows": pool.overflows,
        "tunnels": sum(u.tunnels for u in pool.upstreams),
        "available": sum(u.available for u in pool.upstreams),
        "total": len(pool.upstreams),
        "upstreams": [upstream_view(pool.name, u, recent, now) for u in pool.upstreams],
    }


def pools_view(server: ProxyServer, recent: RecentStats) -> dict[str, Any]:
    """The whole ``GET /api/pools`` answer."""
    return {
        "ready": server.ready,
        "window_s": round(recent.span, 3),
        "pools": [pool_view(server, pool, recent) for pool in server.pools.values()],
    }
