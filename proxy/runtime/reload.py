"""Reload: apply the config file again without dropping a connection or a counter.

Theory of operation
-------------------
A reload applies the whole new config or changes nothing:

1. read and validate the file as ``aiolb check`` does (``proxy.runtime.preflight``);
   any problem ends the reload;
2. build the new pools, fresh objects no request can reach yet, and bind the sockets
   of listeners that are new (or moved to another address); a failed bind closes what
   was bound and ends the reload;
   (the certificates and CA files are loaded here too, into the new objects: a file
   that broke since the check refuses the reload like a config error);
3. commit with no await in between: every new pool adopts its same-named predecessor
   (``Pool.adopt``: counters, and upstreams that stay are the same objects with their
   health, drain, in-flight count and idle connections), the old pools retire, the
   server's ``pools`` and ``config`` are swapped, and each listener that keeps its
   address gets the new router and config (client connections read
   ``listener.router`` per request, so keep-alive connections follow at once) and its
   certificates (new connections take them; open ones keep theirs);
4. the new listeners start serving on their sockets and the removed ones drain.

A listener keeps its socket when a new listener has the same name and address, or the
same fixed address under a new name (a rename). Requests in flight keep references to
the old pool objects and finish normally. The admin listener, the access log and the
worker count are not reloaded (a warning says so); ``metrics.enabled`` applies to new
client connections.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from proxy.cache import build_caches
from proxy.config import Config, ConfigError
from proxy.config.values import format_address
from proxy.runtime.preflight import validate, warnings
from proxy.runtime.provided import merge
from proxy.server.listener import alpn as _alpn
from proxy.tls import ServerTLS, TLSFileError
from proxy.upstream.pool import Pool

if TYPE_CHECKING:
    from proxy.config import ListenerSpec
    from proxy.runtime.server import ProxyServer
    from proxy.server.listener import Listener

log = logging.getLogger("aiolb")

BACKLOG = 2048  # as ``Listener.start``


@dataclass
class ListenerPlan:
    """Which running listeners stay (with their new config), start, or drain."""

    kept: list[tuple[Listener, ListenerSpec]] = field(default_factory=list)
    added: list[ListenerSpec] = field(default_factory=list)
    removed: list[Listener] = field(default_factory=list)


def _address(bind_host: str, port: int) -> tuple[str, int]:
    return bind_host.lower(), port


def _match(running: Sequence[Listener], lc: ListenerSpec) -> Listener | None:
    """The running listener that serves ``lc`` on: same name and address, else (for a
    fixed port) the same address under another name."""
    wanted = _address(lc.host, lc.port)
    same = [lst for lst in running if _address(lst.config.host, lst.config.port) == wanted]
    for lst in same:
        if lst.name == lc.name:
            return lst
    return same[0] if same and lc.port != 0 else None


def plan_listeners(running: Sequence[Listener], configs: Sequence[ListenerSpec]) -> ListenerPlan:
    """Match the new listener configs against the running listeners."""
    left = list(running)
    plan = ListenerPlan()
    for lc in configs:
        match = _match(left, lc)
        if match is None:
            plan.added.append(lc)
        else:
            left.remove(match)
            plan.kept.append((match, lc))
    plan.removed = left
    return plan


async def bind_socket(
    loop: asyncio.AbstractEventLoop, lc: ListenerSpec, reuse_port: bool = False
) -> socket.socket:
    """A listening socket for ``lc`` (raises OSError), for ``Listener.start(sock)``.
    ``reuse_port``: SO_REUSEPORT, so that every worker process binds the address."""
    infos = await loop.getaddrinfo(
        lc.host or None, lc.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    family, _, _, _, address = infos[0]
    sock = socket.create_server(
        address[:2], family=family, backlog=BACKLOG, reuse_port=reuse_port
    )
    sock.setblocking(False)
    return sock


async def bind_all(
    loop: asyncio.AbstractEventLoop,
    configs: Sequence[ListenerSpec],
    path: str,
    reuse_port: bool = False,
) -> tuple[list[socket.socket], list[str]]:
    """Sockets for every config, or none and the problems (``FILE: listener ...``)."""
    sockets: list[socket.socket] = []
    for lc in configs:
        try:
            sockets.append(await bind_socket(loop, lc, reuse_port))
        except OSError as exc:
            for sock in sockets:
                sock.close()
            reason = exc.strerror or str(exc)
            return [], [f"{path}: listener {lc.name!r}: cannot bind {lc.bind}: {reason}"]
    return sockets, []


def commit_pools(old: Mapping[str, Pool], new: dict[str, Pool]) -> None:
    """New pools adopt their same-named predecessors; every old pool retires."""
    for name, pool in new.items():
        previous = old.get(name)
        if previous is not None:
            pool.adopt(previous)
    for previous in old.values():
        previous.retire()


async def load(path: str) -> tuple[Config | None, list[str]]:
    """The config at ``path`` validated as ``aiolb check`` does (a broken new certificate
    refuses the reload), or None and its problems (in a thread: the preflight reads
    files and resolves host names). Its warnings are logged."""
    try:
        document = await asyncio.to_thread(validate, path)
    except ConfigError as exc:
        return None, exc.problems
    for line in await asyncio.to_thread(warnings, document):
        log.warning("reload: %s", line)
    return document.config, []


async def reload_server(server: ProxyServer) -> list[str]:
    """Apply ``server.config_path`` to ``server``: [] when applied, else the problems."""
    path = server.config_path
    if path is None:
        return ["no config file to reload (the server was not started with -c FILE)"]
    config, problems = await load(path)
    if config is None:
        return problems
    return await apply_config(server, config, path)


async def apply_config(server: ProxyServer, config: Config, path: str) -> list[str]:
    """Apply a validated ``config`` (read from ``path``) to ``server``: [] or problems.
    The pools and routes container labels ask for are added to it (``merge``); the
    server keeps ``config`` itself as its ``file_config``."""
    file_config = config
    if server.docker is not None:
        config = merge(config, server.docker.extra)
    plan = plan_listeners(server.listeners, config.listeners)
    try:  # everything that reads a TLS file, before anything changes
        pools = {name: Pool(name, pc) for name, pc in config.pools.items()}
        caches = build_caches(config.caches, server.caches)
        added = [server.make_listener(lc, pools, caches) for lc in plan.added]
        certificates = [
            ServerTLS(lc.tls, _alpn(lc)) if lc.tls else None for _, lc in plan.kept
        ]
    except TLSFileError as exc:
        return [f"{path}: {exc.message}"]
    serving = server.role != "supervisor"  # a supervisor binds nothing: workers serve
    sockets: list[socket.socket] = []
    if serving:
        sockets, problems = await bind_all(server.loop, plan.added, path, server.reuse_port)
        if problems:
            return problems
    _warn_unreloaded(server.config, config)
    commit_pools(server.pools, pools)
    dropped = [c for name, c in server.caches.items() if caches.get(name) is not c]
    server.pools, server.config, server.caches = pools, config, caches
    server.file_config = file_config
    for (listener, lc), tls in zip(plan.kept, certificates, strict=True):
        listener.apply(lc, pools, tls, caches)
        listener.record = config.records_requests
    order = {lc.name: i for i, lc in enumerate(config.listeners)}
    kept = [lst for lst, _ in plan.kept]
    server.listeners = sorted(kept + added, key=lambda lst: order[lst.name])
    server.retune_clock()
    server.discovery.sync(pools)
    if server.docker is not None:
        server.docker.sync(pools)
    server.scaling.attach(pools)
    server.sync_health()
    for listener, sock in zip(added, sockets, strict=serving):
        await server.start_listener(listener, sock)
        where = format_address(listener.config.host, listener.port)
        log.info("listener %s serving on %s", listener.name, where)
    for listener in plan.removed:
        server.retire_listener(listener)
    for cache in dropped:  # replaced or removed: background work stops, the store closes
        await cache.close()
    if server.access_log is not None:  # a reload also ends a log rotation (nginx's does)
        server.access_log.reopen()
    return []


def _warn_unreloaded(old: Config, new: Config) -> None:
    if old.admin != new.admin:
        log.warning("reload: admin settings change on restart only")
    if old.access_log != new.access_log:
        log.warning("reload: access log settings change on restart only")
    if old.tracing != new.tracing:
        log.warning("reload: tracing settings change on restart only")
    if old.providers != new.providers:
        log.warning("reload: providers settings change on restart only")
    if old.workers != new.workers:
        log.warning("reload: the worker count changes on restart only")
