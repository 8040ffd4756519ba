"""The proxy as one object: build state from a config, serve, drain, stop.

``ProxyServer`` is the explicit shared state handed down (STYLE 7, uvicorn's
``ServerState``): pools, listeners, the clock. Shutdown follows one fixed order
(STYLE 11): stop accepting → finish in-flight requests with keep-alive off → wait
with a deadline → close what is left.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from proxy.clock import Clock
from proxy.config import Config
from proxy.config import Listener as ListenerConfig
from proxy.http.headers import RequestIds
from proxy.metrics.access_log import AccessLog
from proxy.metrics.stats import Stats
from proxy.server.listener import Listener
from proxy.upstream.pool import Pool

log = logging.getLogger("aiolb")


def _resolution(config: Config) -> float:
    """Timer tick: a quarter of the shortest timeout, between 20 ms and 250 ms."""
    shortest = min(
        [min(lc.timeouts.header, lc.timeouts.idle, lc.timeouts.body) for lc in config.listeners]
        + [min(p.timeouts.response_header, p.timeouts.read) for p in config.pools.values()]
    )
    return max(0.02, min(0.25, shortest / 4))


class ProxyServer:
    """Pools and listeners built from one config, sharing one clock."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.config = config
        self.loop = loop or asyncio.get_running_loop()
        self.clock = Clock(self.loop, _resolution(config))
        self.request_ids = RequestIds()
        #: responses the proxy made before any pool was chosen (400, 404, 408, ...)
        self.stats = Stats()
        #: None unless ``access_log`` is configured; opening it may raise OSError
        self.access_log = AccessLog(config.access_log.path) if config.access_log else None
        self.pools = {name: Pool(name, pc) for name, pc in config.pools.items()}
        self.listeners = [self.make_listener(lc) for lc in config.listeners]
        self.ready = False
        self._stopped = asyncio.Event()

    def make_listener(self, lc: ListenerConfig) -> Listener:
        """A listener for ``lc`` over the current pools (not yet bound)."""
        return Listener(
            lc, self.pools, self.loop, self.clock, self.request_ids, self.stats,
            record=self.config.metrics.enabled, access_log=self.access_log,
        )

    async def start(self) -> None:
        """Bind every listener and start the clock; raises OSError if a bind fails."""
        for listener in self.listeners:
            await listener.start()
            self.clock.add_sweeper(listener.sweep)
            log.info("listener %s serving on %s", listener.name, self._where(listener))
        self.clock.add_sweeper(self._sweep_pools)
        if self.access_log is not None:
            self.clock.add_sweeper(self.access_log.flush)
        self.clock.start()
        self.ready = True

    def _sweep_pools(self, now: float) -> None:
        for pool in self.pools.values():
            pool.sweep(now)

    @staticmethod
    def _where(listener: Listener) -> str:
        return f"{listener.config.host}:{listener.port}"

    def in_flight(self) -> int:
        return sum(
            1 for lst in self.listeners for c in lst.connections if c.exchange is not None
        )

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Graceful drain: stop accepting, finish in-flight requests, then close."""
        self.ready = False
        for listener in self.listeners:
            listener.drain()
        deadline = self.loop.time() + timeout
        while any(lst.connections for lst in self.listeners) and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for listener in self.listeners:
            listener.close_all()
            if listener.server is not None:
                listener.server.close()
        for pool in self.pools.values():
            pool.close()
        self.clock.stop()
        if self.access_log is not None:
            self.access_log.close()
        self._stopped.set()

    def request_stop(self) -> None:
        """Start a graceful shutdown (from a signal handler)."""
        if not self._stopped.is_set() and not getattr(self, "_stopping", False):
            self._stopping = True
            self.loop.create_task(self.shutdown())

    async def serve(self) -> None:
        """Start, then serve until SIGTERM or SIGINT (a second SIGINT exits at once)."""
        await self.start()
        self._install_signals()
        await self._stopped.wait()

    def _install_signals(self) -> None:
        def on_term() -> None:
            log.info("shutting down: finishing in-flight requests")
            self.request_stop()

        def on_int() -> None:
            if getattr(self, "_stopping", False):
                log.info("second interrupt: exiting now")
                for listener in self.listeners:
                    listener.close_all()
                self._stopped.set()
                return
            on_term()

        try:
            self.loop.add_signal_handler(signal.SIGTERM, on_term)
            self.loop.add_signal_handler(signal.SIGINT, on_int)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass

    def __repr__(self) -> str:
        return f"<ProxyServer [{len(self.listeners)} listeners, {len(self.pools)} pools]>"
