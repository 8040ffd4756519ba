"""The span exporter: a bounded queue in the worker's event loop, posted in batches.

Theory of operation
-------------------
A sampled request's spans are encoded when it ends and appended to ``queue`` (``add``:
no await, no lock, no thread). Nothing else runs per request. The server's clock calls
``tick`` on every tick: when a batch is due (``BATCH`` spans queued, or ``INTERVAL``
since the last export) and no export is in flight, one task POSTs the batch
(OTLP/HTTP protobuf) with aiohttp's client; the next batch waits for it. A full queue
(``MAX_QUEUE``: the collector is slow or down) drops new spans, and so does a failed
export: both count in ``dropped`` (``aiolb_trace_spans_dropped_total``), with a
warning at most once a minute. The HTTP session is made on the first export, in the
loop of the process that exports: a worker's, never the supervisor's before a fork.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Final

import aiohttp

from proxy import __version__
from proxy.tracing.otlp import export_request

if TYPE_CHECKING:
    from proxy.config.models import TracingSpec

log = logging.getLogger("aiolb")

#: Spans held while an export is in flight or the collector is down; then dropped.
MAX_QUEUE: Final = 4096
#: Spans per export request, and the queue length that sends one before the interval.
BATCH: Final = 512
#: An export at least this often while spans wait (s).
INTERVAL: Final = 1.0
#: One export request may take this long (s), then its spans count as dropped.
TIMEOUT: Final = 10.0
_WARN_EVERY: Final = 60.0


class Exporter:
    """OTLP/HTTP export of encoded spans for one process (``tracing.endpoint``)."""

    __slots__ = (
        "_last", "_session", "_task", "_warned", "dropped", "endpoint", "exported",
        "headers", "queue", "resource",
    )  # fmt: skip

    def __init__(self, config: TracingSpec) -> None:
        self.endpoint = config.url
        self.headers = {"Content-Type": "application/x-protobuf", **config.headers}
        self.resource = {"service.name": config.service_name}
        self.queue: list[bytes] = []
        self.exported = 0
        self.dropped = 0
        self._last = time.monotonic()
        self._warned = 0.0
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    def add(self, spans: list[bytes]) -> None:
        """Queue one request's spans, or drop them when the queue is full (never waits)."""
        queue = self.queue
        if len(queue) + len(spans) > MAX_QUEUE:
            self.dropped += len(spans)
            self._warn("the trace export queue is full (collector slow or down)")
            return
        queue += spans

    def tick(self, now: float = 0.0) -> None:
        """A clock sweeper: start an export when a batch is due and none is in flight."""
        queue = self.queue
        if not queue or self._task is not None:
            return
        mono = time.monotonic()
        if len(queue) < BATCH and mono - self._last < INTERVAL:
            return
        self._last = mono
        batch, self.queue = queue[:BATCH], queue[BATCH:]
        self._task = asyncio.get_running_loop().create_task(self._post(batch))

    async def _post(self, batch: list[bytes]) -> None:
        body = export_request(self.resource, ("aiolb", __version__), batch)
        try:
            if self._session is None:
                self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT))
            async with self._session.post(self.endpoint, data=body, headers=self.headers) as r:
                await r.read()
                if r.status >= 300:
                    raise OSError(f"HTTP {r.status}")
            self.exported += len(batch)
        except (TimeoutError, OSError, aiohttp.ClientError) as exc:
            self.dropped += len(batch)
            self._warn(f"trace export to {self.endpoint} failed: {exc or type(exc).__name__}")
        finally:
            self._task = None

    async def close(self, timeout: float = 2.0) -> None:
        """Export what is queued (within ``timeout``), then close the session."""
        try:
            async with asyncio.timeout(timeout):
                while self.queue or self._task is not None:
                    if self._task is not None:
                        await asyncio.shield(self._task)
                    else:
                        self._last = 0.0
                        self.tick()
        except TimeoutError:
            self.dropped += len(self.queue)
            self.queue = []
        if self._task is not None:
            self._task.cancel()
        if self._session is not None:
            await self._session.close()

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._warned >= _WARN_EVERY:
            self._warned = now
            log.warning("%s (%d spans dropped so far)", message, self.dropped)

    def __repr__(self) -> str:
        busy = "exporting" if self._task is not None else "idle"
        return (f"<Exporter {self.endpoint} [{len(self.queue)} queued, {busy}, "
                f"{self.exported} exported, {self.dropped} dropped]>")  # fmt: skip
