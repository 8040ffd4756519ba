"""A coarse clock and the one timer that enforces every deadline.

Per request, setting a timeout costs one attribute read (``clock.now``) and one store:
no ``call_later`` handle per request. A single periodic tick refreshes ``clock.now``
and asks each registered sweeper to act on what has expired, like nginx's cached
time and timer tree. Timeouts therefore fire within one tick (``resolution``) of
their deadline.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger("aiolb")

NEVER = float("inf")


class Clock:
    """``now`` is ``loop.time()`` as of the last tick."""

    __slots__ = ("_handle", "_loop", "_sweepers", "now", "resolution")

    def __init__(self, loop: asyncio.AbstractEventLoop, resolution: float = 0.25) -> None:
        self._loop = loop
        self.resolution = resolution
        self.now = loop.time()
        self._sweepers: list[Callable[[float], None]] = []
        self._handle: asyncio.TimerHandle | None = None

    def add_sweeper(self, sweeper: Callable[[float], None]) -> None:
        """Call ``sweeper(now)`` on every tick."""
        self._sweepers.append(sweeper)

    def remove_sweeper(self, sweeper: Callable[[float], None]) -> None:
        try:
            self._sweepers.remove(sweeper)
        except ValueError:
            pass

    def start(self) -> None:
        if self._handle is None:
            self._handle = self._loop.call_later(self.resolution, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        self.now = now = self._loop.time()
        for sweeper in tuple(self._sweepers):
            try:
                sweeper(now)
            except Exception:  # a bug in one sweeper must not stop every timeout
                log.exception("timer sweep failed")
        self._handle = self._loop.call_later(self.resolution, self._tick)

    def __repr__(self) -> str:
        return f"<Clock [now {self.now:.3f}, {len(self._sweepers)} sweepers]>"
