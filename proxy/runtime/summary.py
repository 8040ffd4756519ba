"""What a starting aiolb says it serves: one log line for the process, one per listener
with its routes, one per pool with its balancer, upstreams and health checks, and the
admin URL. Logged once the addresses are bound (so ``:0`` ports are real), like
Caddy's and Envoy's start-up summaries; reloads log what changed instead
(``proxy.config.diff``).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from proxy import __version__
from proxy.config.values import format_duration

if TYPE_CHECKING:
    from proxy.config import Listener, Pool, Route
    from proxy.runtime.server import ProxyServer


def startup_lines(server: ProxyServer) -> list[str]:
    """The summary of a started ``server`` (a supervisor's lists its workers' listeners)."""
    config = server.config
    path = server.config_path or "(built in)"
    workers = f"{server.workers} worker{'s' if server.workers != 1 else ''}"
    lines = [f"aiolb {__version__} serving {path} (pid {os.getpid()}, {workers})"]
    addresses = server.listener_addresses()
    lines += [_listener(lc, addresses[lc.name]) for lc in config.listeners]
    lines += [_pool(name, pool) for name, pool in config.pools.items()]
    if server.admin is not None:
        token = "token required" if server.admin.token else "no token"
        lines.append(f"admin API on {server.admin.url} (dashboard /, metrics /metrics, {token})")
    return lines


def _listener(lc: Listener, address: str) -> str:
    routes = ", ".join(_route(route) for route in lc.routes)
    return f"listener {lc.name} serving on {address}: {routes}"


def _route(route: Route) -> str:
    return f"{route.match.host or ''}{route.match.path_prefix} -> {route.pool}"


def _pool(name: str, pool: Pool) -> str:
    backups = sum(spec.backup for spec in pool.upstreams)
    count = len(pool.upstreams)
    upstreams = f"{count} upstream{'s' if count != 1 else ''}"
    if backups:
        upstreams += f" ({backups} backup{'s' if backups != 1 else ''})"
    names = sum(spec.dns for spec in pool.upstreams)
    if names:
        upstreams += f", {names} of them dns:// names (one upstream per address)"
    active = pool.health_check.active
    checks = (f"active checks every {format_duration(active.interval)}" if active is not None
              else "no active checks")  # fmt: skip
    passive = "passive on" if pool.health_check.passive is not None else "passive off"
    return f"pool {name}: {pool.balancer.name}, {upstreams}, {checks}, {passive}"
