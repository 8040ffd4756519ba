"""What a worker process counted, as plain data, and the supervisor's sum of it.

Theory of operation
-------------------
With several worker processes each one counts its own traffic in its own objects
(``Stats``, ``Pool``, ``Upstream``: no lock, no shared memory on the hot path). The
supervisor, which serves the admin API but no traffic, asks every worker for
``snapshot(server)`` (a JSON-able dict) when ``/metrics`` or ``/api/pools`` is asked
for and once a second for the dashboard's rates, and ``absorb`` writes the sums into
its own ``Pool`` and ``Upstream`` objects. The collector and the admin views then read
the supervisor's objects exactly as they read a single process's.

Summed: requests by labels, histograms, gRPC calls by pool and status, rate-limited
requests and rate-limit store errors by route and filter, connect errors, in-flight
requests, open connections, open tunnels, ejections, retries, budget denials and the
retries budgets allow now, overflows, waiting requests, client connections, failed TLS
handshakes and trace spans exported and dropped. Not summed: active health (the
supervisor probes, once; its verdicts and probe counts are the truth) and drains (the
supervisor decides them).
An upstream counts as ejected while any worker has it ejected (each worker's passive
health sees only its own traffic). Scale actions are the workers' wakes plus the
supervisor's own idle stops (``Hold.own``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from proxy.metrics.stats import Stats

if TYPE_CHECKING:
    from proxy.runtime.server import ProxyServer


def snapshot(server: ProxyServer) -> dict[str, Any]:
    """This process's counters as plain data."""
    now = server.loop.time()
    return {
        "stats": server.stats.snapshot(),
        "connections": server.connection_counts(),
        "handshake_errors": [[*key, n] for key, n in server.handshake_errors().items()],
        "proxy_protocol_errors": [
            [*key, n] for key, n in server.proxy_protocol_errors().items()
        ],
        "filters": server.filters.snapshot(),
        "traffic": server.filters.traffic_snapshot(),
        "caches": {name: cache.counts() for name, cache in server.caches.items()},
        "traces": server.tracer.counts() if server.tracer is not None else {},
        "pools": {
            name: {
                "stats": pool.stats.snapshot(),
                "retries": pool.retries,
                "denied": pool.retry.budget.denied,
                "budget_left": pool.retry.budget.available(pool.requests, now),
                "overflows": pool.overflows,
                "pending": pool.pending,
                "held": pool.held,
                "scale_actions": [[*key, n] for key, n in pool.scale_actions.items()],
                "upstreams": {
                    u.address: {
                        "stats": u.stats.snapshot(),
                        "active": u.active,
                        "conns": u.conns,
                        "tunnels": u.tunnels,
                        "waiting": len(u.waiting),
                        "ejections": u.ejections,
                        "ejected_for": max(0.0, u.ejected_until - now) if u.ejected else None,
                    }
                    for u in pool.upstreams
                },
            }
            for name, pool in server.pools.items()
        },
    }


def summed_stats(snapshots: Sequence[dict[str, Any]]) -> Stats:
    """One ``Stats`` holding the sum of several ``Stats.snapshot()`` dicts."""
    total = Stats()
    for snap in snapshots:
        for listener, method, status, n in snap["requests"]:
            key = (listener, method.encode(), int(status))
            total.requests[key] = total.requests.get(key, 0) + n
        hist = total.duration
        for i, n in enumerate(snap["buckets"]):
            hist.buckets[i] += n
        hist.count += sum(snap["buckets"])
        hist.sum += snap["sum"]
        total.connect_errors += snap["connect_errors"]
        total.connections_opened += snap["connections_opened"]
        grpc = total.grpc
        for code, n in snap.get("grpc", ()):
            grpc[code] = grpc.get(code, 0) + n
    return total


def absorb(server: ProxyServer, snapshots: Sequence[dict[str, Any]]) -> None:
    """Write the workers' sums into the supervisor's own objects."""
    now = server.loop.time()
    server.stats = summed_stats([s["stats"] for s in snapshots])
    connections: dict[str, int] = {}
    for snap in snapshots:
        for name, n in snap["connections"].items():
            connections[name] = connections.get(name, 0) + n
    server.client_connections = connections
    errors: dict[tuple[str, str], int] = {}
    for snap in snapshots:
        for listener, reason, n in snap.get("handshake_errors", ()):
            errors[(listener, reason)] = errors.get((listener, reason), 0) + n
    server.handshake_totals = errors
    refused: dict[tuple[str, str], int] = {}
    for snap in snapshots:
        for listener, reason, n in snap.get("proxy_protocol_errors", ()):
            refused[(listener, reason)] = refused.get((listener, reason), 0) + n
    server.proxy_protocol_totals = refused
    server.filters.absorb([s.get("filters", []) for s in snapshots])
    server.filters.absorb_traffic([s.get("traffic", []) for s in snapshots])
    if server.tracer is not None:
        server.tracer.absorb([s.get("traces", {}) for s in snapshots])
    for name, cache in server.caches.items():
        cache.absorb([s["caches"][name] for s in snapshots if name in s.get("caches", {})])
    server.retry_budget_left = {}
    for name, pool in server.pools.items():
        parts = [s["pools"][name] for s in snapshots if name in s["pools"]]
        pool.stats = summed_stats([p["stats"] for p in parts])
        pool.retries = sum(p["retries"] for p in parts)
        pool.retry.budget.denied = sum(p["denied"] for p in parts)
        server.retry_budget_left[name] = sum(p["budget_left"] for p in parts)
        pool.overflows = sum(p["overflows"] for p in parts)
        pool.pending = sum(p["pending"] for p in parts)
        scale = pool.scale
        if scale is not None:  # the workers hold and wake, the supervisor stops (its own)
            scale.count = sum(p.get("held", 0) for p in parts)
            actions: dict[tuple[str, str], int] = dict(scale.own)
            for p in parts:
                for action, result, n in p.get("scale_actions", ()):
                    actions[(action, result)] = actions.get((action, result), 0) + n
            scale.actions = actions
        changed = False
        for upstream in pool.upstreams:
            ups = [p["upstreams"][upstream.address] for p in parts
                   if upstream.address in p["upstreams"]]  # fmt: skip
            upstream.stats = summed_stats([u["stats"] for u in ups])
            upstream.active = sum(u["active"] for u in ups)
            upstream.conns = sum(u["conns"] for u in ups)
            upstream.tunnels = sum(u.get("tunnels", 0) for u in ups)
            upstream.ejections = sum(u["ejections"] for u in ups)
            ejected_for = [u["ejected_for"] for u in ups if u["ejected_for"] is not None]
            ejected = bool(ejected_for)
            if ejected != upstream.ejected:
                changed = True
            upstream.ejected = ejected
            upstream.ejected_until = now + max(ejected_for) if ejected_for else 0.0
        if changed:
            pool.rebuild()
