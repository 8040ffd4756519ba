"""One worker process (``python -m proxy _worker``): the other end of the supervisor's
link.

The supervisor (``proxy.runtime.workers``, whose docstring tells the whole story) starts
this process with one end of a socketpair (``--control-fd``) and the shared rate-limit
buckets' file descriptor. The first JSON line it sends is the config; the worker builds
a ``ProxyServer`` in the ``worker`` role, binds every listener with SO_REUSEPORT, says
``ready``, then obeys the lines that follow until it is stopped:

- ``snapshot`` (answered by ``id``): its counters (``proxy.runtime.totals``);
- ``check``, ``state``, ``enabled``: probe results, the whole health and drain state,
  one drain; applied as a single process would apply its own;
- ``purge`` (answered): drop cache entries from its memory stores;
- ``idle`` (answered), ``unpark``: an idle stop the supervisor decides
  (``proxy.runtime.provided.Scaling``): how long until the pool is idle here, parking
  it when asked; serving it again when the stop did not happen;
- ``reload`` (answered): apply the config the supervisor validated; its problems.

SIGTERM drains and exits; SIGINT too, a second one exits at once; SIGUSR1 reopens the
access log; SIGHUP is ignored (the supervisor reloads the workers). When the supervisor
goes away, the worker drains and exits.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import socket
from collections.abc import Callable
from typing import Any

from proxy.config import Config
from proxy.filters import FilterContext
from proxy.filters.buckets import SharedBuckets
from proxy.runtime.reload import apply_config
from proxy.runtime.server import ProxyServer
from proxy.runtime.totals import snapshot

log = logging.getLogger("aiolb")

Reply = Callable[[int, Any], None]


class WorkerControl:
    """The worker's side of the link: reload is the supervisor's to start."""

    def enabled_changed(self, pool: str, address: str, enabled: bool) -> None:
        """Workers have no admin API: nothing calls this."""

    async def refresh(self) -> None:
        """A worker's counters are its own."""

    async def reload(self) -> list[str]:
        return ["reloads go through the supervisor (SIGHUP to it, or POST /api/reload)"]

    async def purge(self, cache: str, host: bytes | None, target: bytes, exact: bool) -> int:
        """Purges come from the supervisor: nothing to pass on."""
        return 0

    def request_stop(self) -> None:
        """Workers have no admin API: nothing calls this."""


async def run_worker(control_fd: int, index: int) -> int:
    """The body of ``python -m proxy _worker``: serve until told or signalled to stop."""
    sock = socket.socket(fileno=control_fd)
    reader, writer = await asyncio.open_connection(sock=sock)
    first = json.loads(await reader.readline())
    config = Config.model_validate(first["config"])
    buckets = SharedBuckets(first["buckets_fd"])
    server = ProxyServer(
        config, role="worker", filters=FilterContext(buckets), config_path=first.get("path")
    )
    server.control = WorkerControl()
    await server.start()
    loop = asyncio.get_running_loop()
    _install_signals(loop, server)

    def reply(ident: int, result: Any) -> None:
        writer.write(json.dumps({"id": ident, "result": result}).encode() + b"\n")

    writer.write(json.dumps({"op": "ready", "pid": os.getpid()}).encode() + b"\n")
    task = loop.create_task(_commands(server, reader, reply, index))
    # however the link's reader ends (a bug included), a worker no longer told what to do
    # must not outlive its supervisor: it drains and exits
    task.add_done_callback(lambda _: server.request_stop())
    gc.freeze()  # see ProxyServer.serve
    await server.wait_stopped()
    task.cancel()
    writer.close()
    return 0


def _install_signals(loop: asyncio.AbstractEventLoop, server: ProxyServer) -> None:
    loop.add_signal_handler(signal.SIGTERM, server.request_stop)
    stops = {"n": 0}

    def on_int() -> None:  # Ctrl-C reaches the whole process group: drain, then exit
        stops["n"] += 1
        if stops["n"] > 1:
            os._exit(0)
        server.request_stop()

    loop.add_signal_handler(signal.SIGINT, on_int)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)  # the supervisor reloads us
    loop.add_signal_handler(signal.SIGUSR1, server.reopen_logs)  # passed on by it


async def _commands(
    server: ProxyServer, reader: asyncio.StreamReader, reply: Reply, index: int
) -> None:
    """Obey the supervisor's lines until it goes away (then stop serving). A line that
    cannot be read or obeyed is logged and skipped: the link must outlive it, since the
    end of the link is how a worker learns that its supervisor is gone."""
    while True:
        try:
            line = await reader.readline()
        except (ValueError, OSError) as exc:  # a line past the limit, a broken link
            log.error("worker %d: the supervisor's link failed (%s); shutting down", index,
                      exc or type(exc).__name__)  # fmt: skip
            server.request_stop()
            return
        if not line:  # the supervisor is gone: stop serving
            log.error("worker %d: the supervisor went away; shutting down", index)
            server.request_stop()
            return
        try:
            await _command(server, json.loads(line), reply)
        except Exception as exc:
            log.error("worker %d: the supervisor's %r failed: %s: %s", index, line[:80],
                      type(exc).__name__, exc)  # fmt: skip


async def _command(server: ProxyServer, message: dict[str, Any], reply: Reply) -> None:
    """Do what one line of the supervisor asks (answering by ``id`` where it asks)."""
    op = message["op"]
    if op == "snapshot":
        reply(message["id"], snapshot(server))
    elif op == "check":
        server.check_result(message["pool"], message["address"], message["ok"])
    elif op == "state":
        _apply_state(server, message["upstreams"])
    elif op == "enabled":
        _apply_state_one(server, message["pool"], message["address"], None,
                         message["enabled"])  # fmt: skip
    elif op == "idle":
        pool = server.pools.get(message["pool"])
        reply(message["id"], server.scaling.park(pool, message["park"]))
    elif op == "unpark":
        server.scaling.unpark(server.pools.get(message["pool"]), message["stopped"])
    elif op == "purge":
        reply(message["id"], await _purge(server, message))
    elif op == "reload":
        new = Config.model_validate(message["config"])
        problems = await apply_config(server, new, message["path"] or "")
        reply(message["id"], problems)


async def _purge(server: ProxyServer, message: dict[str, Any]) -> int:
    """Drop this worker's entries of one cache, as ``ProxyServer.purge_cache`` does."""
    host = message["host"].encode("latin-1") if message["host"] is not None else None
    target = message["target"].encode("latin-1")
    cache = server.caches.get(message["cache"])
    if cache is None:
        return 0
    if message["exact"] and host is not None:
        return await cache.remove(host + b" " + target)
    return await cache.purge(host, target)


def _apply_state(server: ProxyServer, upstreams: list[list[Any]]) -> None:
    for pool, address, healthy, enabled in upstreams:
        _apply_state_one(server, pool, address, healthy, enabled)


def _apply_state_one(
    server: ProxyServer, pool_name: str, address: str, healthy: bool | None, enabled: bool
) -> None:
    found = server.find_upstream(pool_name, address)
    if found is None:
        return
    pool, upstream = found
    if healthy is not None and upstream.healthy != healthy:
        pool.set_healthy(upstream, healthy)
    if upstream.enabled != enabled:
        upstream.enabled = enabled
        pool.rebuild()
