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
    from proxy.config import ListenerSpec, PoolSpec, RouteSpec, UpstreamSpec
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


def _listener(lc: ListenerSpec, address: str) -> str:
    routes = ", ".join(_route(lc, route) for route in lc.routes)
    if not lc.routes:  # a redirect_https listener: every request gets the 308
        routes = f"/ -> {_redirect(lc.redirect_https)}"
    return f"listener {lc.name} serving on {address}{_tls(lc)}: {routes}"


def _tls(lc: ListenerSpec) -> str:
    """`` with TLS (2 certificates, TLSv1.2+)``; empty for plain HTTP."""
    if lc.tls is None:
        return ""
    count = len(lc.tls.certificates)
    parts = [f"{count} certificate{'s' if count != 1 else ''}", f"{lc.tls.min_version}+"]
    if lc.tls.client_ca is not None:
        parts.append("client certificates required")
    return f" with TLS ({', '.join(parts)})"


def _route(lc: ListenerSpec, route: RouteSpec) -> str:
    redirect = lc.redirect_https if route.redirect_https is None else route.redirect_https
    target: str | None
    if redirect is not False:
        target = _redirect(redirect)
    elif route.pools is not None:
        target = " | ".join(f"{p.pool} ({p.weight})" for p in route.pools)
    else:
        target = route.pool
    if route.mirror is not None:
        target = f"{target}, mirrored to {route.mirror.pool}"
    return f"{route.match.host or ''}{route.match.path_prefix} -> {target}"


def _redirect(redirect: bool | int) -> str:
    return "https (308)" if redirect is True else f"https:{redirect} (308)"


#: The most upstreams a pool's line names; the rest are counted.
_SHOWN = 8


def _pool(name: str, pool: PoolSpec) -> str:
    count = len(pool.upstreams)
    shown = ", ".join(_upstream(spec) for spec in pool.upstreams[:_SHOWN])
    if count > _SHOWN:
        shown += f" and {count - _SHOWN} more"
    upstreams = f"{count} upstream{'s' if count != 1 else ''} ({shown})"
    active = pool.health_check.active
    checks = (f"active checks every {format_duration(active.interval)}" if active is not None
              else "no active checks")  # fmt: skip
    passive = "passive on" if pool.health_check.passive is not None else "passive off"
    return f"pool {name}: {pool.balancer.name}, {upstreams}, {checks}, {passive}"


def _upstream(spec: UpstreamSpec) -> str:
    """``app-1=127.0.0.1:9001 [backup, weight 2]``; ``dns://`` and ``https://`` kept."""
    where = spec.url if spec.dns else f"https://{spec.address}" if spec.https else spec.address
    if spec.dns:
        where += " (one per address)"
    notes = [word for word, on in (("backup", spec.backup), (f"weight {spec.weight}",
             spec.weight != 1)) if on]  # fmt: skip
    text = f"{spec.name}={where}" if spec.name else where
    return f"{text} [{', '.join(notes)}]" if notes else text
