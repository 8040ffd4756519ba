"""The proxy as one object: build state from a config, serve, drain, stop.

``ProxyServer`` is the explicit shared state handed down (STYLE 7, uvicorn's
``ServerState``): pools, listeners, the clock. Shutdown follows one fixed order
(STYLE 11): stop accepting → finish in-flight requests with keep-alive off → wait
with a deadline → close what is left.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Literal

from proxy.admin import AdminHandle, start_admin
from proxy.admin.control import Control
from proxy.cache import Cache, build_caches
from proxy.clock import Clock
from proxy.config import Config, ListenerSpec
from proxy.config.diff import describe_changes
from proxy.config.values import format_address
from proxy.errors import BindError
from proxy.filters import FilterContext
from proxy.health.active import CheckTarget, HealthChecker
from proxy.http.headers import request_ids
from proxy.metrics.access_log import AccessLog
from proxy.metrics.stats import Stats
from proxy.runtime import notify
from proxy.runtime.provided import Scaling
from proxy.runtime.reload import apply_config, bind_socket, reload_server
from proxy.runtime.summary import startup_lines
from proxy.server.listener import Listener
from proxy.tracing import Tracer
from proxy.upstream.discovery import Discovery
from proxy.upstream.docker import DockerProvider, RouteLabels
from proxy.upstream.pool import Pool, Upstream

log = logging.getLogger("aiolb")


def _resolution(config: Config) -> float:
    """Timer tick: a quarter of the shortest timeout, between 20 ms and 250 ms."""
    shortest = min(
        [min(lc.timeouts.header, lc.timeouts.idle, lc.timeouts.body) for lc in config.listeners]
        + [min(p.timeouts.response_header, p.timeouts.read) for p in config.pools.values()]
    )
    return max(0.02, min(0.25, shortest / 4))


#: ``single``: one process does everything; ``supervisor``: admin API, health checks and
#: workers, no traffic; ``worker``: traffic only (health and drains come from the
#: supervisor).
Role = Literal["single", "supervisor", "worker"]


class ProxyServer:
    """Pools and listeners built from one config, sharing one clock."""

    def __init__(
        self,
        config: Config,
        loop: asyncio.AbstractEventLoop | None = None,
        role: Role = "single",
        filters: FilterContext | None = None,
        config_path: str | None = None,
    ) -> None:
        self.config = config
        #: what the route filters share across reloads: buckets, Redis stores, counters
        #: (a supervisor hands its workers one shared bucket table)
        self.filters = filters if filters is not None else FilterContext()
        if config_path is not None:
            self.filters.folder = os.path.dirname(os.path.abspath(config_path))
        self.role = role
        #: the supervisor/worker link (``proxy.runtime.workers``); None in one process
        self.control: Control | None = None
        #: listeners bind with SO_REUSEPORT (workers share each address)
        self.reuse_port = role == "worker"
        #: client connections per listener, summed over the workers (supervisor only)
        self.client_connections: dict[str, int] | None = None
        #: failed TLS handshakes by (listener, reason), summed over the workers
        #: (supervisor only; see ``handshake_errors``)
        self.handshake_totals: dict[tuple[str, str], int] | None = None
        #: refused PROXY protocol headers by (listener, reason), likewise
        self.proxy_protocol_totals: dict[tuple[str, str], int] | None = None
        #: retries each pool's budget allows now, summed over the workers (supervisor only)
        self.retry_budget_left: dict[str, float] | None = None
        #: when this server was built (Unix time), for the admin API's uptime
        self.started_at = time.time()
        #: worker processes serving traffic (set by a supervisor; 1 in a single process)
        self.workers = 1
        self.loop = loop or asyncio.get_running_loop()
        self.clock = Clock(self.loop, _resolution(config))
        self.request_ids = request_ids()
        #: responses the proxy made before any pool was chosen (400, 404, 408, ...)
        self.stats = Stats()
        #: None unless ``access_log`` is configured; opening it may raise OSError
        log_config = config.access_log
        self.access_log = AccessLog(log_config.path, log_config.format) if log_config else None
        #: None unless ``tracing`` is configured; it exports from this process's loop
        self.tracer = Tracer(config.tracing) if config.tracing is not None else None
        self.pools = {name: Pool(name, pc) for name, pc in config.pools.items()}
        #: the ``caches:`` by name (a reload keeps the ones whose settings stay)
        self.caches = build_caches(config.caches)
        self.listeners = [self.make_listener(lc) for lc in config.listeners]
        self.ready = False
        #: the file ``aiolb run -c`` loaded (None: built in code, e.g. the demo)
        self.config_path = config_path
        #: reloads by result, for ``aiolb_config_reloads_total``
        self.reloads = {"success": 0, "failure": 0}
        self.admin: AdminHandle | None = None
        #: take a free port when ``admin.bind``'s port is busy (the demo), else fail
        self.admin_fallback = False
        self._retired: list[Listener] = []  # removed by a reload, still draining
        self._reload_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[list[str]]] = set()
        self._stopped = asyncio.Event()
        self._stopping = False
        #: active health checks of every pool that configures them
        self.checker = HealthChecker(self)
        #: ``dns://`` upstreams: resolved again every ``dns_refresh``
        self.discovery = Discovery(self.sync_health)
        #: the config as the file says it (``config`` adds the pools and routes that
        #: container labels ask for: ``proxy.runtime.provided.merge``)
        self.file_config = config
        docker = config.providers.docker
        #: ``providers.docker``: pools filled from labelled containers; None: none
        self.docker = (
            DockerProvider(docker, self.sync_health, self._pools_wanted) if docker else None
        )
        #: ``scale_from_zero`` scalers, and ``idle_stop`` (with workers, the supervisor
        #: stops once every worker agrees: its ``consent``)
        self.scaling = Scaling(self.docker, role)
        self._provided: asyncio.Task[None] | None = None

    async def purge_cache(self, name: str, host: bytes | None, target: bytes, exact: bool) -> int:
        """Drop cache ``name``'s entries for ``target`` (``exact``: that target and its
        variants; else every target it prefixes), on ``host`` or any; in every worker
        too. How many went."""
        cache = self.caches[name]
        if exact and host is not None:
            purged = await cache.remove(host + b" " + target)
        else:
            purged = await cache.purge(host, target)
        if self.control is not None:
            purged += await self.control.purge(name, host, target, exact)
        return purged

    def make_listener(
        self,
        lc: ListenerSpec,
        pools: dict[str, Pool] | None = None,
        caches: dict[str, Cache] | None = None,
    ) -> Listener:
        """A listener for ``lc`` over ``pools`` and ``caches`` (default: the current ones),
        not yet bound; raises ``TLSFileError`` when its certificates cannot be loaded."""
        return Listener(
            lc, self.pools if pools is None else pools, self.loop, self.clock,
            self.request_ids, self.stats, record=self.config.records_requests,
            access_log=self.access_log, filters=self.filters,
            caches=self.caches if caches is None else caches, tracer=self.tracer,
        )  # fmt: skip

    async def start(self) -> None:
        """Start the admin API, bind every listener, start the clock.

        Raises ``AdminError`` (a non-loopback admin without a token) before binding
        anything, ``BindError`` naming the key (``admin.bind``, ``listeners[i].bind``) if a
        bind fails.
        """
        if self.role != "worker":
            admin = self.config.admin
            self.admin = await start_admin(self, admin, fallback_to_any_port=self.admin_fallback)
        try:
            await self.discovery.start(self.pools)  # the first requests find upstreams
            if self.docker is not None:
                await self.docker.start(self.pools)
            self.scaling.attach(self.pools)
            if self.role != "supervisor":
                for i, listener in enumerate(self.listeners):
                    await self._bind_listener(i, listener)
        except BaseException:
            await self.discovery.close()
            await self._close_provider()
            if self.admin is not None:
                await self.admin.stop()
            raise
        self.clock.add_sweeper(self._sweep_pools)
        self.clock.add_sweeper(self._sweep_retired)
        if self.docker is not None:
            self.clock.add_sweeper(lambda now: self.scaling.sweep(self.pools))
        if self.access_log is not None:
            self.clock.add_sweeper(self.access_log.flush)
        if self.tracer is not None and self.role != "supervisor":
            self.clock.add_sweeper(self.tracer.exporter.tick)
        self.clock.start()
        self.sync_health()
        self.ready = True

    async def _bind_listener(self, index: int, listener: Listener) -> None:
        """Start ``listeners[index]``; a failed bind is a ``BindError`` naming its key."""
        try:
            sock = None
            if self.reuse_port:
                sock = await bind_socket(self.loop, listener.config, reuse_port=True)
            await self.start_listener(listener, sock)
        except OSError as exc:
            raise BindError(("listeners", index, "bind"), listener.config.bind, exc) from None

    async def start_listener(self, listener: Listener, sock: socket.socket | None = None) -> None:
        """Bind ``listener`` (or serve on ``sock``) and sweep its deadlines on each tick."""
        await listener.start(sock)
        self.clock.add_sweeper(listener.sweep)

    def retire_listener(self, listener: Listener) -> None:
        """A reload removed ``listener``: drain it; it is forgotten once its connections end."""
        listener.drain()
        self._retired.append(listener)
        log.info("listener %s draining (removed from the config)", listener.name)

    def handshake_errors(self) -> dict[tuple[str, str], int]:
        """Failed TLS handshakes of this process by ``(listener, reason)``."""
        counts: dict[tuple[str, str], int] = {}
        for listener in (*self.listeners, *self._retired):
            for reason, n in listener.handshake_errors.items():
                key = (listener.name, reason)
                counts[key] = counts.get(key, 0) + n
        return counts

    def proxy_protocol_errors(self) -> dict[tuple[str, str], int]:
        """Connections of this process closed for their PROXY header, by ``(listener,
        reason)``."""
        counts: dict[tuple[str, str], int] = {}
        for listener in (*self.listeners, *self._retired):
            for reason, n in listener.proxy_errors.items():
                key = (listener.name, reason)
                counts[key] = counts.get(key, 0) + n
        return counts

    def connection_counts(self) -> dict[str, int]:
        """Open client connections of this process per listener name (draining ones of
        retired listeners included)."""
        counts: dict[str, int] = {}
        for listener in (*self.listeners, *self._retired):
            counts[listener.name] = counts.get(listener.name, 0) + len(listener.connections)
        return counts

    def client_connection_counts(self) -> dict[str, int]:
        """Open client connections per listener: this process's, or on a supervisor the
        workers' sum (the last one they reported)."""
        counts = self.connection_counts()
        if self.client_connections is not None:
            counts = {**dict.fromkeys(counts, 0), **self.client_connections}
        return counts

    def listener_addresses(self) -> dict[str, str]:
        """``host:port`` each configured listener serves on: the bound port for ``:0``
        (on a supervisor, the port it reserved for its workers)."""
        ports = {lst.name: lst.port for lst in self.listeners if lst.server is not None}
        return {lc.name: format_address(lc.host, ports.get(lc.name, lc.port))
                for lc in self.config.listeners}  # fmt: skip

    def _sweep_retired(self, now: float) -> None:
        for listener in tuple(self._retired):
            if not listener.connections:
                self.clock.remove_sweeper(listener.sweep)
                self._retired.remove(listener)

    def reopen_logs(self) -> None:
        """SIGUSR1 (nginx's reopen signal, what logrotate sends): open the access log
        file again, after a rotation moved it."""
        if self.access_log is not None:
            log.info("SIGUSR1: reopening the access log %s", self.access_log.path)
            self.access_log.reopen()

    def retune_clock(self) -> None:
        """Match the timer tick to the (new) config's shortest timeout."""
        self.clock.resolution = _resolution(self.config)

    async def reload(self) -> list[str]:
        """Apply ``config_path`` again (SIGHUP, ``POST /api/reload``).

        Returns [] when the new config was applied, else its problems (``FILE:LINE:
        ...``) and nothing changed. See ``proxy.runtime.reload``.
        """
        return (await self.reload_report())[0]

    async def reload_report(self) -> tuple[list[str], list[str]]:
        """``reload``, with what it changed: ``(problems, changes)``, one of them empty
        (``proxy.config.diff`` phrases; no changes when the file says what runs)."""
        if self._stopping:
            return ["the server is shutting down"], []
        async with self._reload_lock:
            before = self.config
            if self.role != "worker":
                notify.reloading()
            try:
                if self.control is not None:
                    problems = await self.control.reload()
                else:
                    problems = await reload_server(self)
            finally:
                if self.role != "worker":
                    notify.ready()  # applied or refused: serving again either way
            changes = [] if problems else describe_changes(before, self.config)
        self.reloads["failure" if problems else "success"] += 1
        for problem in problems:
            log.error("reload refused: %s", problem)
        if problems:
            log.error("reload failed; the running config stays")
        else:
            log.info("reloaded %s: %s", self.config_path, "; ".join(changes) or "no changes")
        return problems, changes

    # -- providers: pools that container labels ask for --------------------------------

    def _pools_wanted(self, extra: dict[str, RouteLabels]) -> None:
        """The Docker provider's label-made pools changed: apply the file's config with
        them (``merge``), through the reload machinery, in order."""
        previous = self._provided
        self._provided = self.loop.create_task(self._apply_provided(previous))

    async def _apply_provided(self, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        if self._stopping or self.docker is None:
            return
        async with self._reload_lock:
            path = self.config_path or "<config>"
            try:  # the file's config again, with the label-made pools (``merge``)
                problems = await apply_config(self, self.file_config, path)
            except Exception:
                log.exception("docker: applying the label-made pools failed")
                return
        for problem in problems:
            log.error("docker: label-made pools refused: %s", problem)
        if not problems:
            log.info("docker: pools made by labels: %s", ", ".join(sorted(self.docker.extra))
                     or "none")  # fmt: skip

    async def _close_provider(self) -> None:
        task, self._provided = self._provided, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self.scaling.close()
        if self.docker is not None:
            await self.docker.close()

    # -- health: the checker's targets and its verdicts (``proxy.health.active``) -------

    def check_targets(self) -> list[CheckTarget]:
        """One probe target per upstream of every pool with ``health_check.active``."""
        return [
            CheckTarget(
                name, u.address, u.host, u.port, pool.active_check, u.healthy, u.ssl,
                u.server_name, pool.tls_spec,
                pool.send_proxy(None) if pool.send_proxy is not None else None,
            )
            for name, pool in self.pools.items()
            if pool.active_check is not None
            for u in pool.upstreams
        ]

    def sync_health(self) -> None:
        """Probe what the current pools ask for; an upstream no longer probed is healthy
        (nothing is left to say otherwise). Workers do not probe: the supervisor does."""
        if self.role != "worker":
            self.checker.sync(self.check_targets())
        for pool in self.pools.values():
            if pool.active_check is None:
                for upstream in pool.upstreams:
                    if not upstream.healthy:
                        pool.set_healthy(upstream, True)

    def find_upstream(self, pool_name: str, address: str) -> tuple[Pool, Upstream] | None:
        """The pool and the upstream named so, or None when either is gone."""
        pool = self.pools.get(pool_name)
        upstream = pool.upstream(address) if pool is not None else None
        return (pool, upstream) if pool is not None and upstream is not None else None

    def check_result(self, pool: str, address: str, ok: bool) -> None:
        """Count one probe (``Pool.check_result``)."""
        found = self.find_upstream(pool, address)
        if found is not None:
            found[0].check_result(found[1], ok)

    def health_changed(self, pool: str, address: str, healthy: bool, reason: str) -> None:
        found = self.find_upstream(pool, address)
        if found is not None:
            found[0].set_healthy(found[1], healthy)

    def _sweep_pools(self, now: float) -> None:
        for pool in self.pools.values():
            pool.sweep(now)

    async def shutdown(self, timeout: float | None = None) -> None:
        """Graceful drain: stop accepting, finish in-flight requests, then close."""
        self.ready = False
        listeners = [*self.listeners, *self._retired]
        for listener in listeners:
            listener.drain()
        if timeout is None:
            timeout = self.config.shutdown_timeout
        deadline = self.loop.time() + timeout
        while any(lst.connections for lst in listeners) and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for listener in listeners:
            listener.close_all()
            if listener.server is not None:
                listener.server.close()
        await self.checker.close()
        await self.discovery.close()
        await self._close_provider()
        for pool in self.pools.values():
            pool.close()
        await self.filters.close()
        for cache in self.caches.values():
            await cache.close()
        self.clock.stop()
        if self.tracer is not None:
            await self.tracer.exporter.close()
        if self.access_log is not None:
            self.access_log.close()
        if self.admin is not None:
            await self.admin.stop()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        """Return once ``shutdown`` has finished."""
        await self._stopped.wait()

    def request_exit(self) -> None:
        """Stop serving as SIGTERM does, workers included (``POST /api/stop``)."""
        if self.control is not None:
            self.control.request_stop()
        else:
            self.request_stop()

    def request_stop(self) -> None:
        """Start a graceful shutdown of this server (from a signal handler)."""
        if not self._stopped.is_set() and not self._stopping:
            self._stopping = True
            if self.role == "single":
                notify.stopping()
            self.loop.create_task(self.shutdown())

    async def serve(self, on_bound: Callable[[], None] | None = None) -> None:
        """Start, then serve until SIGTERM or SIGINT (a second SIGINT exits at once).

        ``on_bound`` runs once every listener and the admin API are bound (``aiolb run``
        writes its ``pid_file`` there: a start that fails never touches it); then systemd
        hears ``READY=1`` (``proxy.runtime.notify``)."""
        await self.start()
        for line in startup_lines(self):
            log.info("%s", line)
        self._install_signals()  # first: a signal sent to the pid in the file is handled
        if on_bound is not None:
            on_bound()
        notify.ready()
        # Everything built so far (modules, config, pools) lives as long as the process:
        # keep it out of the cyclic GC's full collections, which would otherwise walk
        # every object and show up as multi-millisecond pauses in the latency tail.
        gc.freeze()
        await self._stopped.wait()

    def _install_signals(self) -> None:
        def on_term() -> None:
            log.info("shutting down: finishing in-flight requests")
            self.request_stop()

        def on_int() -> None:
            if self._stopping:
                log.info("second interrupt: exiting now")
                for listener in self.listeners:
                    listener.close_all()
                self._stopped.set()
                return
            on_term()

        def on_hup() -> None:
            log.info("SIGHUP: reloading %s", self.config_path)
            task = self.loop.create_task(self.reload())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        try:
            self.loop.add_signal_handler(signal.SIGTERM, on_term)
            self.loop.add_signal_handler(signal.SIGINT, on_int)
            self.loop.add_signal_handler(signal.SIGHUP, on_hup)
            self.loop.add_signal_handler(signal.SIGUSR1, self.reopen_logs)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass

    def __repr__(self) -> str:
        return f"<ProxyServer [{len(self.listeners)} listeners, {len(self.pools)} pools]>"
