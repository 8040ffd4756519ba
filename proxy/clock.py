"""A coarse clock and the one timer that enforces every deadline.

Per request, setting a timeout costs one attribute read (``clock.now``) and one store:
no ``call_later`` handle per request. A single periodic tick refreshes ``clock.now``
and asks each registered sweeper to act on what has expired, like nginx's cached
time and timer tree.

A deadline is ``clock.now + timeout``, and ``clock.now`` may be up to one tick old when
it is read: taken as is, a timeout would fire up to one tick early. So a tick does not
hand its sweepers the time it read but a *horizon* one tick (and the loop clock's
grain) earlier: every deadline at or before the horizon was set from a ``now`` read at
least its timeout ago, so none fires before its configured value, and each fires
within two ticks after it. That costs nothing per request (the deadlines stay one add
from ``clock.now``); a fresh ``loop.time()`` per deadline would.

Why one tick is enough: a callback that reads ``clock.now`` runs in a loop iteration
that began before the next tick was due (timers run first in an iteration), so what it
reacts to arrived before ``now + resolution``. uvloop's clock is whole milliseconds of
a clock that may lag by up to one (``CLOCK_MONOTONIC_COARSE``): ``GRAIN`` covers it.
Sweepers that set a new deadline from the horizon they are given stay consistent: it
is compared with later horizons only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger("aiolb")

NEVER = float("inf")
#: What a loop clock reading may lag the real time by (uvloop: whole ms, coarse clock).
GRAIN = 0.001


class Clock:
    """``now`` is ``loop.time()`` as of the last tick; sweepers get the horizon."""

    __slots__ = ("_handle", "_loop", "_resolution", "_slack", "_sweepers", "now")

    def __init__(self, loop: asyncio.AbstractEventLoop, resolution: float = 0.25) -> None:
        self._loop = loop
        self._slack = 0.0
        self.resolution = resolution
        self.now = loop.time()
        self._sweepers: list[Callable[[float], None]] = []
        self._handle: asyncio.TimerHandle | None = None

    @property
    def resolution(self) -> float:
        """Seconds between ticks (a reload may change it)."""
        return self._resolution

    @resolution.setter
    def resolution(self, seconds: float) -> None:
        # never shrink the slack: deadlines set during longer ticks are still pending
        # (after a reload that shortens the tick they may fire up to the old tick late)
        self._resolution = seconds
        self._slack = max(self._slack, seconds + GRAIN)

    def add_sweeper(self, sweeper: Callable[[float], None]) -> None:
        """Call ``sweeper(horizon)`` on every tick: every deadline at or before the
        horizon has passed (see the module's docstring)."""
        self._sweepers.append(sweeper)

    def remove_sweeper(self, sweeper: Callable[[float], None]) -> None:
        try:
            self._sweepers.remove(sweeper)
        except ValueError:
            pass

    def start(self) -> None:
        if self._handle is None:
            self._handle = self._loop.call_later(self._resolution, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        self.now = now = self._loop.time()
        horizon = now - self._slack
        for sweeper in tuple(self._sweepers):
            try:
                sweeper(horizon)
            except Exception:  # a bug in one sweeper must not stop every timeout
                log.exception("timer sweep failed")
        self._handle = self._loop.call_later(self._resolution, self._tick)

    def __repr__(self) -> str:
        return f"<Clock [now {self.now:.3f}, {len(self._sweepers)} sweepers]>"
