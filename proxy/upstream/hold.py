"""Scale from zero: requests held while a pool has no available upstream, and its wake.

Theory of operation
-------------------
A pool with ``scale_from_zero`` has a ``Hold``. When the balancer finds no upstream
(``Attempts.dispatch`` gets None, the one place this costs anything), the request is
parked here instead of answered 503: a ``Claim`` in ``Hold.held``, a plain deque, and
no task or timer of its own. The claim stands in the exchange's ``ticket`` slot, so the
exchange's own machinery applies: its deadline (``Waiter.queued``) is swept on the
clock's tick and calls ``Claim.expire`` (503 after ``hold``), a client that goes away
calls ``Claim.cancel``. Beyond ``max_pending`` held requests, 503 at once.

The first held request wakes the pool (``Scaler.wake``: start its stopped containers,
or POST a webhook): one wake at a time per pool, at most one a second. When the pool's
balancer is rebuilt with an available upstream (``Pool.rebuild``: a container became
healthy, an active check passed), one ``call_soon`` releases every held request in
arrival order: each picks again and is sent (``Held.unheld``).

``idle_stop``: ``Hold.idle`` says when the pool has had no request (nothing held, none
in flight, ``Pool.requests`` unchanged) for that long; the server's sweep then asks the
scaler to stop it (with several workers, once every worker's ``Hold`` says so:
``proxy.runtime.provided.Scaling``). Wakes and stops are counted by action and result
(``aiolb_scale_actions_total``) and logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Final, Protocol

import aiohttp

from proxy.config.providers import ScaleFromZeroSpec, WebhookSpec

if TYPE_CHECKING:
    from proxy.upstream.pool import Pool

log = logging.getLogger("aiolb")

#: Seconds between two wakes of one pool (a webhook is not called per request).
WAKE_INTERVAL: Final = 1.0
WEBHOOK_TIMEOUT: Final = 10.0


class Held(Protocol):
    """A request held for an upstream (the exchange)."""

    def queued(self, deadline: float) -> None:
        """Wait until ``deadline`` (the requester's clock), then ``Claim.expire``."""

    def unheld(self, target: bytes | None) -> None:
        """The pool has an upstream: pick and send ``target``; None: the hold ran out
        (503)."""


class Scaler(Protocol):
    """What wakes and stops pools (``proxy.upstream.docker``, webhooks)."""

    def wake(self, pool: Pool) -> Awaitable[None]:
        """Make ``pool`` have upstreams (raises on failure, with a message)."""

    def stop(self, pool: Pool) -> Awaitable[Sequence[str]]:
        """Stop ``pool``'s running containers; the ids of those asked to stop."""


class Claim:
    """One held request; the exchange's ``ticket`` while it waits."""

    __slots__ = ("hold", "target", "waiter")

    def __init__(self, hold: Hold, waiter: Held, target: bytes) -> None:
        self.hold = hold
        self.waiter: Held | None = waiter
        self.target = target

    def cancel(self) -> None:
        """The requester went away."""
        if self.waiter is not None:
            self.waiter = None
            self.hold.count -= 1

    def expire(self) -> bool:
        """The hold ran out: 503."""
        waiter = self.waiter
        if waiter is None:
            return False
        self.cancel()
        self.hold.expired += 1
        waiter.unheld(None)
        return True

    def __repr__(self) -> str:
        return f"<Claim [{'held' if self.waiter is not None else 'left'}]>"


class Hold:
    """A pool's held requests, and when to wake it and put it back to sleep."""

    __slots__ = (
        "_releasing",
        "_task",
        "actions",
        "count",
        "expired",
        "held",
        "last_active",
        "own",
        "pool",
        "scaler",
        "seen_requests",
        "spec",
        "waking_since",
        "woken_at",
    )

    def __init__(self, pool: Pool, spec: ScaleFromZeroSpec) -> None:
        self.pool = pool
        self.spec = spec
        self.held: deque[Claim] = deque()
        self.count = 0  # live claims in ``held`` (cancelled ones leave lazily)
        self.expired = 0  # requests the hold ran out for
        #: who wakes and stops (set by the server; None: only hold)
        self.scaler: Scaler | None = None
        #: (action, result) -> times: ``aiolb_scale_actions_total``; ``own``: those this
        #: process took (the same dict, except in a supervisor, whose ``actions`` are its
        #: own plus the workers' sums: ``proxy.runtime.totals.absorb``)
        self.actions: dict[tuple[str, str], int] = {}
        self.own = self.actions
        self.woken_at = -WAKE_INTERVAL  # monotonic time of the last wake started
        self.waking_since: float | None = None  # a wake runs (monotonic start)
        self.last_active = time.monotonic()
        self.seen_requests = 0
        self._releasing = False
        self._task: asyncio.Task[None] | None = None

    def hold(self, waiter: Held, target: bytes, now: float) -> Claim | None:
        """Park ``waiter`` until an upstream is available; None when ``max_pending``
        wait already (503 at once). ``now``: the waiter's clock."""
        if self.count >= self.spec.max_pending:
            return None
        claim = Claim(self, waiter, target)
        self.held.append(claim)
        self.count += 1
        waiter.queued(now + self.spec.hold)
        self.wake()
        return claim

    def ready(self) -> None:
        """The pool has an available upstream: release the held requests, once this
        loop iteration is over (``Pool.rebuild`` may run inside an exchange)."""
        if self.count and not self._releasing:
            self._releasing = True
            asyncio.get_running_loop().call_soon(self._release)

    def _release(self) -> None:
        self._releasing = False
        held = self.held
        while held:
            if not any(u.available for u in self.pool.upstreams):
                return  # gone again: the rest keep waiting
            claim = held.popleft()
            waiter = claim.waiter
            if waiter is not None:
                claim.cancel()
                waiter.unheld(claim.target)

    # -- waking and stopping ----------------------------------------------------------

    def wake(self) -> None:
        """Ask the scaler to wake the pool, unless a wake runs or ran within a second."""
        scaler = self.scaler
        now = time.monotonic()
        if scaler is None or self.waking_since is not None:
            return
        if now - self.woken_at < WAKE_INTERVAL:
            return
        self.woken_at = self.waking_since = now
        self._task = asyncio.get_running_loop().create_task(self._wake(scaler))

    async def _wake(self, scaler: Scaler) -> None:
        name = self.pool.name
        log.info("pool %s: waking it (%d requests held)", name, self.count)
        try:
            await scaler.wake(self.pool)
        except Exception as exc:
            self.count_action("wake", "failure")
            log.error("pool %s: wake failed: %s", name, exc)
        else:
            self.count_action("wake", "success")
        finally:
            self.waking_since = None
            self._task = None

    def count_action(self, action: str, result: str) -> None:
        key = (action, result)
        self.own[key] = self.own.get(key, 0) + 1
        if self.actions is not self.own:
            self.actions[key] = self.actions.get(key, 0) + 1

    def idle(self, now: float) -> bool:
        """``idle_stop`` is due: no request held, in flight or new for that long (call
        on the clock's tick; ``now`` is monotonic)."""
        stop_after = self.spec.idle_stop
        if stop_after is None:
            return False
        pool = self.pool
        if (
            pool.requests != self.seen_requests
            or self.count
            or self.waking_since is not None
            or any(u.active for u in pool.upstreams)
        ):
            self.seen_requests = pool.requests
            self.last_active = now
            return False
        return now - self.last_active >= stop_after

    def idle_left(self, now: float) -> float:
        """Seconds until ``idle`` may be due (0.0: it is; call ``idle`` first)."""
        stop_after = self.spec.idle_stop
        if stop_after is None:
            return float("inf")
        return max(0.0, stop_after - (now - self.last_active))

    def adopt(self, previous: Hold) -> None:
        """A reload replaced the pool: carry the held requests, the counters and the
        idle clock (the claims refer to this hold from now on)."""
        self.held, self.count, self.expired = previous.held, previous.count, previous.expired
        for claim in self.held:
            claim.hold = self
        self.actions, self.own = previous.actions, previous.own
        self.last_active, self.seen_requests = previous.last_active, previous.seen_requests
        self.woken_at, self.waking_since = previous.woken_at, previous.waking_since
        previous.held, previous.count = deque(), 0

    def __repr__(self) -> str:
        waking = ", waking" if self.waking_since is not None else ""
        return f"<Hold {self.pool.name} [{self.count} held{waking}]>"


class Webhook:
    """``wake: {webhook: URL}``: POST ``{"pool": NAME, "pending": N}`` (a 2xx is a
    success); stopping is the scaler's business (``stop`` does nothing)."""

    def __init__(self, spec: WebhookSpec) -> None:
        self.url = spec.webhook

    async def wake(self, pool: Pool) -> None:
        body = json.dumps({"pool": pool.name, "pending": pool.scale.count if pool.scale else 0})
        timeout = aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                headers = {"Content-Type": "application/json"}
                async with session.post(self.url, data=body, headers=headers) as r:
                    if r.status >= 300:
                        raise RuntimeError(f"webhook {self.url} answered {r.status}")
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise RuntimeError(f"webhook {self.url}: {exc or type(exc).__name__}") from None

    async def stop(self, pool: Pool) -> Sequence[str]:
        return ()
