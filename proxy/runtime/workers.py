"""Several worker processes behind one supervisor: ``workers: N`` (or ``auto``).

Theory of operation
-------------------
``aiolb run`` with more than one worker starts a *supervisor*: a ``ProxyServer`` in the
``supervisor`` role, which serves the admin API, probes upstreams (active health
checks run once for the whole proxy) and serves no traffic, and N *worker* processes
(``python -m proxy _worker``), each a ``ProxyServer`` in the ``worker`` role that
serves traffic and nothing else.

Sockets: every worker binds every listener itself with SO_REUSEPORT, and the kernel
spreads new connections over the workers' accept queues. (Inherited sockets, all
workers accepting on one queue, wake several workers per connection and load them
unevenly under epoll; nginx added ``reuseport`` for the same reason.) The supervisor
first binds each address with SO_REUSEPORT *without listening*: that checks the
address is free, fixes the port of ``:0`` listeners, and keeps it reserved while
workers come and go; a socket that does not listen receives no connections.

Control: one socketpair per worker carries JSON lines. The supervisor sends the config
(with the reserved ports, and the file descriptor of the shared rate-limit buckets,
passed to the worker at its start: ``proxy.filters.buckets.SharedBuckets``), health
verdicts and probe results (so each worker's balancers skip what the checks found
down and ends ejections as a single process would), the full health and drain state
once a second (a worker that just started, or just discovered an address through DNS,
catches up within a second), drains, reloads, requests for counters
(``proxy.runtime.totals``), and the questions of an idle stop, which the supervisor
decides once every worker agrees and parks the pool (``idle`` and ``unpark``:
``proxy.runtime.provided.Scaling``); a worker answers the requests it was asked by
``id``.
This module is the supervisor's side; ``proxy.runtime.worker`` is the worker's.

Lifecycle: a worker that exits unasked is started again after a backoff (0.5 s,
doubling to 30 s; back to 0.5 s once a worker has run for 30 s), and the others keep
serving meanwhile. SIGTERM (or SIGINT) stops restarts and passes SIGTERM on: each
worker drains (``shutdown_timeout``) and exits 0; then the supervisor exits 0. A second
SIGINT kills the workers at once. SIGHUP reloads: the supervisor validates the file
and applies it to itself and to every worker; an invalid file changes nothing (a
reload reopens the access log). SIGUSR1 is passed on: each worker reopens its access
log (log rotation).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Collection, Mapping
from typing import Any

from proxy.config import Config
from proxy.errors import BindError
from proxy.filters import FilterContext
from proxy.filters.buckets import SharedBuckets
from proxy.health.active import HealthChecker
from proxy.runtime import notify
from proxy.runtime.provided import UNSURE
from proxy.runtime.reload import apply_config, load
from proxy.runtime.server import ProxyServer
from proxy.runtime.summary import startup_lines
from proxy.runtime.totals import absorb

log = logging.getLogger("aiolb")

READY_TIMEOUT = 30.0  # seconds a new worker may take to bind and say so
REPLY_TIMEOUT = 5.0  # seconds a worker may take to answer a request
STATE_INTERVAL = 1.0  # seconds between broadcasts of the whole health and drain state
BACKOFF_FIRST, BACKOFF_MAX, STABLE_AFTER = 0.5, 30.0, 30.0


def worker_count(value: int | str) -> int:
    """``workers``: an int, or ``auto`` for one per CPU core this process may use."""
    if value == "auto":
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux
            return os.cpu_count() or 1
    return int(value)


def reserve(
    config: Config, names: Collection[str] | None = None
) -> tuple[Config, list[socket.socket]]:
    """Bind (not listen) every listener address (or those ``names``) with SO_REUSEPORT;
    the config with the ports that ``:0`` got. Raises ``BindError`` naming the key when
    an address is busy."""
    sockets: list[socket.socket] = []
    listeners = []
    try:
        for i, lc in enumerate(config.listeners):
            if names is not None and lc.name not in names:
                listeners.append(lc)
                continue
            infos = socket.getaddrinfo(
                lc.host or None, lc.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family, _, _, _, address = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                sock.bind(address[:2])
            except OSError as exc:
                raise BindError(("listeners", i, "bind"), lc.bind, exc) from None
            port = sock.getsockname()[1]
            host = f"[{lc.host}]" if ":" in lc.host else lc.host
            listeners.append(lc.model_copy(update={"bind": f"{host}:{port}"}))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return config.model_copy(update={"listeners": listeners}), sockets


class Worker:
    """The supervisor's side of one worker process."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.ready = False
        #: a SIGUSR1 came while it started: passed on once it is ready (before that its
        #: handlers may not be installed, and SIGUSR1's default action kills it)
        self.reopen = False
        self.started_at = 0.0
        self.replies: dict[int, asyncio.Future[Any]] = {}
        self.reader_task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def send(self, message: Mapping[str, Any]) -> None:
        writer = self.writer
        if writer is not None and not writer.is_closing():
            writer.write(json.dumps(message).encode() + b"\n")

    def __repr__(self) -> str:
        state = "ready" if self.ready else "starting"
        return f"<Worker {self.index} pid {self.pid} [{state}]>"


class Supervisor:
    """Runs the workers; the ``Control`` of the supervisor's ``ProxyServer``."""

    def __init__(self, config: Config, path: str | None, count: int) -> None:
        self.path = path
        self.count = count
        self.config, self._reserved = reserve(config)
        #: the rate-limit buckets every worker shares (memory store: one limit for the
        #: instance), handed to each worker as a file descriptor
        self.buckets = SharedBuckets()
        self.server = ProxyServer(
            self.config, role="supervisor", filters=FilterContext(self.buckets),
            config_path=path,
        )  # fmt: skip
        self.server.control = self
        self.server.workers = count
        self.server.scaling.consent = self
        self.server.checker = HealthChecker(self)
        self.workers = [Worker(i) for i in range(count)]
        self.loop = self.server.loop
        self._ids = 0
        self._stopping = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._done = asyncio.Event()

    # -- Control (called by the server and the admin API) -----------------------------

    def enabled_changed(self, pool: str, address: str, enabled: bool) -> None:
        self._broadcast({"op": "enabled", "pool": pool, "address": address, "enabled": enabled})

    async def purge(self, cache: str, host: bytes | None, target: bytes, exact: bool) -> int:
        """Purge cache entries in every worker (each has its own memory store); how many
        went in all (a Redis store is one, purged by the supervisor already)."""
        if self.config.caches[cache].store != "memory":
            return 0
        message = {"op": "purge", "cache": cache, "target": target.decode("latin-1"),
                   "host": host.decode("latin-1") if host is not None else None,
                   "exact": exact}  # fmt: skip
        replies = await asyncio.gather(
            *(self._ask(w, message) for w in self.workers if w.ready), return_exceptions=True
        )
        return sum(r for r in replies if isinstance(r, int))

    async def refresh(self) -> None:
        """Bring every ready worker's counters into the supervisor's objects."""
        replies = await asyncio.gather(
            *(self._ask(w, {"op": "snapshot"}) for w in self.workers if w.ready),
            return_exceptions=True,
        )
        snapshots = [r for r in replies if isinstance(r, dict)]
        absorb(self.server, snapshots)

    async def reload(self) -> list[str]:
        if self.path is None:
            return ["no config file to reload (the server was not started with -c FILE)"]
        config, problems = await load(self.path)
        if config is None:
            return problems
        try:
            config = self._keep_ports(config)
        except OSError as exc:
            return [f"{self.path}: cannot bind: {exc}"]
        problems = await apply_config(self.server, config, self.path)
        if problems:
            return problems
        self.config = config
        message = {"op": "reload", "config": config.model_dump(mode="json"), "path": self.path}
        replies = await asyncio.gather(
            *(self._ask(w, message) for w in self.workers if w.ready), return_exceptions=True
        )
        for worker, reply in zip([w for w in self.workers if w.ready], replies, strict=True):
            if isinstance(reply, BaseException):
                problems.append(f"worker {worker.index}: no answer to the reload ({reply!r})")
            else:
                problems += [f"worker {worker.index}: {p}" for p in reply]
        return problems

    def _keep_ports(self, config: Config) -> Config:
        """Listeners of the new config that the running one has keep their reserved
        ports; new ones reserve theirs."""
        by_name = {lc.name: lc for lc in self.config.listeners}
        listeners, fresh = [], []
        for lc in config.listeners:
            old = by_name.get(lc.name)
            if lc.port == 0 and old is not None and old.host == lc.host:
                listeners.append(lc.model_copy(update={"bind": old.bind}))
            else:
                listeners.append(lc)
                fresh.append(lc)
        config = config.model_copy(update={"listeners": listeners})
        if fresh:
            config, sockets = reserve(config, {lc.name for lc in fresh})
            self._reserved += sockets
        return config

    # -- Consent: idle stops (``proxy.runtime.provided.Scaling``) ----------------------

    async def idle(self, pool: str, park: bool) -> float:
        """0.0 when every worker says ``pool`` is idle (``park``: and parked it); else
        the seconds until they all might be, and the workers that parked it unpark."""
        ready = [w for w in self.workers if w.ready]
        if len(ready) < self.count:
            return UNSURE  # one is starting: it may serve the pool at once
        message = {"op": "idle", "pool": pool, "park": park}
        replies = await asyncio.gather(*(self._ask(w, message) for w in ready),
                                       return_exceptions=True)  # fmt: skip
        waits = [r if isinstance(r, int | float) else UNSURE for r in replies]
        if max(waits) <= 0.0:
            return 0.0
        if park:
            self.resume(pool, ())
        return float(max(waits))

    def resume(self, pool: str, stopped: Collection[str]) -> None:
        self._broadcast({"op": "unpark", "pool": pool, "stopped": list(stopped)})

    # -- HealthSink: the supervisor probes, every worker hears ----------------------------

    def check_result(self, pool: str, address: str, ok: bool) -> None:
        self.server.check_result(pool, address, ok)
        self._broadcast({"op": "check", "pool": pool, "address": address, "ok": ok})

    def health_changed(self, pool: str, address: str, healthy: bool, reason: str) -> None:
        self.server.health_changed(pool, address, healthy, reason)
        self._broadcast({"op": "state", "upstreams": self._state()})

    def _state(self) -> list[list[Any]]:
        return [
            [name, u.address, u.healthy, u.enabled]
            for name, pool in self.server.pools.items()
            for u in pool.upstreams
        ]

    # -- running ---------------------------------------------------------------------------

    async def serve(self, on_bound: Callable[[], None] | None = None) -> int:
        """Start the supervisor and the workers; serve until stopped. The exit code.

        ``on_bound`` runs once the admin API and every listener's address are bound
        (``ProxyServer.serve``); systemd hears ``READY=1`` once every worker serves."""
        await self.server.start()
        self.server.ready = False  # until every worker serves
        for line in startup_lines(self.server):
            log.info("%s", line)
        self._install_signals()  # first: a signal sent to the pid in the file is handled
        if on_bound is not None:
            on_bound()
        for worker in self.workers:
            self._spawn(worker)
        self._spawn_task(self._broadcast_state())
        deadline = self.loop.time() + READY_TIMEOUT
        while not all(w.ready for w in self.workers) and not self._stopping:
            if self.loop.time() > deadline:
                log.error("workers did not start within %gs", READY_TIMEOUT)
                await self.stop(kill=True)
                return 1
            await asyncio.sleep(0.05)
        if not self._stopping:
            self.server.ready = True
            log.info("%d workers serving", self.count)
            notify.ready()
        await self._done.wait()
        return 0

    def _spawn(self, worker: Worker, delay: float = 0.0) -> None:
        self._spawn_task(self._run_worker(worker, delay))

    def _spawn_task(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_worker(self, worker: Worker, delay: float) -> None:
        """Start ``worker``, wait for it to exit, start it again unless stopping."""
        failures = 0
        while not self._stopping:
            if delay:
                await asyncio.sleep(delay)
                if self._stopping:
                    return
            code = await self._start_and_wait(worker)
            if self._stopping:
                return
            lived = self.loop.time() - worker.started_at
            failures = 0 if lived >= STABLE_AFTER else failures + 1
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, failures - 1))
            log.error(
                "worker %d (pid %s) exited unexpectedly (%s); starting it again in %gs",
                worker.index, worker.pid, _describe_exit(code), delay,
            )  # fmt: skip

    async def _start_and_wait(self, worker: Worker) -> int:
        ours, theirs = socket.socketpair()
        worker.ready = False
        worker.started_at = self.loop.time()
        level = logging.getLevelName(log.getEffectiveLevel()).lower()
        argv = [sys.executable, "-m", "proxy", "--log-level", level, "_worker",
                "--control-fd", str(theirs.fileno()), "--index", str(worker.index)]  # fmt: skip
        try:
            worker.proc = await asyncio.create_subprocess_exec(
                *argv, pass_fds=(theirs.fileno(), self.buckets.fd), start_new_session=False
            )
        finally:
            theirs.close()
        reader, writer = await asyncio.open_connection(sock=ours)
        worker.writer = writer
        worker.send({"op": "config", "config": self.config.model_dump(mode="json"),
                     "path": self.path, "buckets_fd": self.buckets.fd})  # fmt: skip
        worker.reader_task = self.loop.create_task(self._read(worker, reader))
        code = await worker.proc.wait()
        worker.ready = False
        writer.close()
        worker.reader_task.cancel()
        for future in worker.replies.values():
            if not future.done():
                future.set_exception(ConnectionError("the worker exited"))
        worker.replies.clear()
        return code

    async def _read(self, worker: Worker, reader: asyncio.StreamReader) -> None:
        while True:
            line = await reader.readline()
            if not line:
                return
            message = json.loads(line)
            if message.get("op") == "ready":
                worker.ready = True
                if worker.reopen:  # a SIGUSR1 came while it started: its handler is in
                    worker.reopen = False
                    self._signal(worker, signal.SIGUSR1)
                worker.send({"op": "state", "upstreams": self._state()})
                log.info("worker %d (pid %s) serving", worker.index, worker.pid)
            elif "id" in message:
                future = worker.replies.pop(message["id"], None)
                if future is not None and not future.done():
                    future.set_result(message.get("result"))

    async def _ask(self, worker: Worker, message: dict[str, Any]) -> Any:
        self._ids += 1
        ident = self._ids
        future: asyncio.Future[Any] = self.loop.create_future()
        worker.replies[ident] = future
        worker.send({**message, "id": ident})
        try:
            async with asyncio.timeout(REPLY_TIMEOUT):
                return await future
        finally:
            worker.replies.pop(ident, None)

    def _broadcast(self, message: Mapping[str, Any]) -> None:
        for worker in self.workers:
            if worker.ready:
                worker.send(message)

    async def _broadcast_state(self) -> None:
        while not self._stopping:
            await asyncio.sleep(STATE_INTERVAL)
            self._broadcast({"op": "state", "upstreams": self._state()})

    # -- stopping ---------------------------------------------------------------------------

    def _install_signals(self) -> None:
        def on_term() -> None:
            self.request_stop()

        def on_int() -> None:
            if self._stopping:
                log.info("second interrupt: stopping the workers now")
                self._signal_workers(signal.SIGKILL)
                return
            on_term()

        def on_hup() -> None:
            log.info("SIGHUP: reloading %s", self.path)
            self._spawn_task(self.server.reload())

        self.loop.add_signal_handler(signal.SIGTERM, on_term)
        self.loop.add_signal_handler(signal.SIGINT, on_int)
        def on_usr1() -> None:  # log rotation: every worker writes the access log
            self.server.reopen_logs()
            for worker in self.workers:
                if worker.ready:
                    self._signal(worker, signal.SIGUSR1)
                else:  # starting: told once it says it is ready
                    worker.reopen = True

        self.loop.add_signal_handler(signal.SIGHUP, on_hup)
        self.loop.add_signal_handler(signal.SIGUSR1, on_usr1)

    def request_stop(self) -> None:
        """SIGTERM's graceful stop of every worker, then of the supervisor."""
        if not self._stopping:
            log.info("shutting down: the workers finish their in-flight requests")
            notify.stopping()
            self._spawn_task(self.stop())

    def _signal_workers(self, sig: int) -> None:
        for worker in self.workers:
            self._signal(worker, sig)

    @staticmethod
    def _signal(worker: Worker, sig: int) -> None:
        if worker.proc is not None and worker.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                worker.proc.send_signal(sig)

    async def stop(self, kill: bool = False) -> None:
        """Stop restarting; TERM (or KILL) the workers, wait for them, stop serving."""
        self._stopping = True
        self.server.ready = False
        self._signal_workers(signal.SIGKILL if kill else signal.SIGTERM)
        procs = [w.proc for w in self.workers if w.proc is not None]
        try:
            async with asyncio.timeout(self.config.shutdown_timeout + 5.0):
                await asyncio.gather(*(p.wait() for p in procs))
        except TimeoutError:
            log.error("workers still running after the shutdown timeout; killing them")
            self._signal_workers(signal.SIGKILL)
            await asyncio.gather(*(p.wait() for p in procs))
        await self.server.shutdown(timeout=0.0)
        for sock in self._reserved:
            sock.close()
        self._done.set()

    def __repr__(self) -> str:
        ready = sum(w.ready for w in self.workers)
        return f"<Supervisor [{ready}/{self.count} workers ready]>"


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
