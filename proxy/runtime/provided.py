"""What providers add to the file's config, and the scaling of pools.

``merge`` is the config the server runs: the file's, plus a pool (every default, no
upstream of its own; ``http_version: "2"`` when its first container says
``aiolb.scheme=h2c``) for each pool name a container label gave that the file lacks,
and, when its labels ask (``aiolb.route.host`` / ``path_prefix``), a route to it on
``aiolb.route.listener`` (default: the first listener). Those routes come before the
file's, the most specific first (a host before none, a longer prefix first): a file's
catch-all ``/`` route must not hide them. The server applies the result through the
reload machinery (``apply_config``), so every upstream keeps its state.

``Scaling`` attaches each ``scale_from_zero`` pool's scaler (the Docker provider or a
webhook) and, on the clock's tick, stops pools idle for ``idle_stop``: with several
workers, the supervisor stops a pool once every worker agrees it is idle, and parks it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection, Coroutine, Mapping
from typing import Any, Final, Protocol

from pydantic import ValidationError

from proxy.config import Config, MatchSpec, PoolSpec, RouteSpec
from proxy.config.providers import WebhookSpec
from proxy.upstream.docker import DockerProvider, RouteLabels
from proxy.upstream.hold import Scaler, Webhook
from proxy.upstream.pool import Pool

log = logging.getLogger("aiolb")

#: A worker's answer when it cannot say (the pool is gone, or has no ``idle_stop``
#: there, as during a reload): ask again after this many seconds.
UNSURE: Final = 1.0
#: The shortest wait a worker that is not idle answers (the clock's tick is 0.25 s).
MIN_WAIT: Final = 0.05


def merge(config: Config, extra: Mapping[str, RouteLabels]) -> Config:
    """``config`` with the label-made pools and their routes (see the module)."""
    if not extra:
        return config
    pools = dict(config.pools)
    routes: dict[str, list[RouteSpec]] = {}
    first = config.listeners[0].name
    for name, labels in sorted(extra.items()):
        if name in pools:
            continue
        try:
            http_version = "2" if labels.http2 else "1.1"
            pools[name] = PoolSpec.model_validate({"upstreams": [], "http_version": http_version})
        except ValidationError:
            continue
        if labels.host is None and labels.path_prefix is None:
            continue
        listener = labels.listener or first
        if all(lc.name != listener for lc in config.listeners):
            log.warning("docker: pool %s: aiolb.route.listener=%s: no such listener",
                        name, listener)  # fmt: skip
            continue
        try:
            match = MatchSpec.model_validate(
                {"host": labels.host, "path_prefix": labels.path_prefix or "/"}
            )
            route = RouteSpec(match=match, pool=name, name=f"docker-{name}")
        except ValidationError as exc:
            log.warning("docker: pool %s: route labels refused: %s", name,
                        "; ".join(e["msg"] for e in exc.errors()))  # fmt: skip
            continue
        routes.setdefault(listener, []).append(route)
    listeners = []
    for lc in config.listeners:
        added = sorted(
            routes.get(lc.name, []),
            key=lambda r: (r.match.host is None, -len(r.match.path_prefix)),
        )
        listeners.append(lc.model_copy(update={"routes": [*added, *lc.routes]}) if added else lc)
    return config.model_copy(update={"pools": pools, "listeners": listeners})


class Consent(Protocol):
    """The workers' say in an idle stop (``proxy.runtime.workers.Supervisor``)."""

    async def idle(self, pool: str, park: bool) -> float:
        """Ask every worker whether ``pool`` had no request for its ``idle_stop``;
        ``park``: and if so, to park it (``Scaling.park``). 0.0: every worker agreed
        (and parked it); else the seconds until they all might (those that parked it
        are told to serve it again)."""

    def resume(self, pool: str, stopped: Collection[str]) -> None:
        """The stop is over: every worker serves its parked containers of ``pool``
        again, except the ``stopped`` ones (container ids)."""


class Scaling:
    """The scalers of ``scale_from_zero`` pools, and ``idle_stop``.

    Idle stops, by role: a single process stops a pool once its ``Hold.idle`` says so.
    With workers, each worker sees only its share of the requests, so the supervisor
    decides and stops, and the workers keep their ``Hold``'s idle clock on the tick.
    For a pool with running containers, the supervisor asks every worker (``Consent``)
    how long until it is idle, then waits that long (the longest answer) before asking
    again; once all say idle, it asks again with ``park``: a worker that is still idle
    drains the pool's containers (``DockerProvider.park``: a request that comes from
    now on is held, and its wake waits for the stop to end and starts them again) and
    agrees. Only if every worker parked does the supervisor stop the containers (one
    process, one stop); else, or when the stop fails, the workers ``unpark``.
    """

    def __init__(self, docker: DockerProvider | None, role: str) -> None:
        self.docker = docker
        #: ``single`` stops idle pools; ``supervisor`` stops them when ``consent``
        #: agrees; ``worker`` keeps the idle clocks and parks when asked
        self.role = role
        self.consent: Consent | None = None
        self._webhooks: dict[str, Webhook] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._asked_at: dict[str, float] = {}  # supervisor: pool -> when to ask again
        self._deciding: set[str] = set()

    def attach(self, pools: Mapping[str, Pool]) -> None:
        """Give every ``scale_from_zero`` pool its scaler (after a start or reload)."""
        for pool in pools.values():
            scale = pool.scale
            if scale is None:
                continue
            wake = scale.spec.wake
            scaler: Scaler | None = None
            if wake == "docker":
                scaler = self.docker
            elif isinstance(wake, WebhookSpec):
                hook = self._webhooks.get(wake.webhook)
                if hook is None:
                    hook = self._webhooks[wake.webhook] = Webhook(wake)
                scaler = hook
            scale.scaler = scaler

    def sweep(self, pools: Mapping[str, Pool]) -> None:
        """On the clock's tick: keep the idle clocks, stop the pools idle for their
        ``idle_stop`` (see the class)."""
        docker = self.docker
        if docker is None:
            return
        now = time.monotonic()
        for pool in pools.values():
            scale = pool.scale
            if scale is None or scale.spec.idle_stop is None:
                continue
            if self.role == "worker":
                scale.idle(now)  # the clock the supervisor asks about
            elif self.role == "single":
                if scale.idle(now) and docker.running(pool):
                    scale.last_active = now  # one stop per idle period
                    self._spawn(self._stop(docker, pool))
            elif (
                self.consent is not None
                and pool.name not in self._deciding
                and now >= self._asked_at.get(pool.name, 0.0)
                and docker.running(pool)
            ):
                self._deciding.add(pool.name)
                self._spawn(self._decide(docker, pool, self.consent))

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _decide(self, docker: DockerProvider, pool: Pool, consent: Consent) -> None:
        """The supervisor's idle stop of ``pool``: when every worker agrees (the class)."""
        name = pool.name
        try:
            wait = await consent.idle(name, park=False)
            if wait == 0.0:
                wait = await consent.idle(name, park=True)
            if wait > 0.0:
                log.debug("pool %s: not idle in every worker; asking again in %.2fs",
                          name, wait)  # fmt: skip
                self._asked_at[name] = time.monotonic() + wait
                return
            stopped = await self._stop(docker, pool)
            consent.resume(name, stopped)
            scale = pool.scale
            idle_stop = scale.spec.idle_stop if scale is not None else None
            self._asked_at[name] = time.monotonic() + (idle_stop or UNSURE)
        finally:
            self._deciding.discard(name)

    def park(self, pool: Pool | None, park: bool) -> float:
        """A worker's answer to ``Consent.idle``: 0.0 when ``pool`` had no request for
        its ``idle_stop`` (and, ``park``, its containers are drained), else the seconds
        until it might."""
        docker = self.docker
        scale = pool.scale if pool is not None else None
        if pool is None or scale is None or docker is None or scale.spec.idle_stop is None:
            return UNSURE
        now = time.monotonic()
        if not scale.idle(now):
            return max(scale.idle_left(now), MIN_WAIT)
        if park:
            docker.park(pool)
        return 0.0

    def unpark(self, pool: Pool | None, stopped: Collection[str]) -> None:
        """A worker hears that the stop is over (``Consent.resume``)."""
        if pool is not None and self.docker is not None:
            self.docker.unpark(pool, stopped)

    async def _stop(self, docker: DockerProvider, pool: Pool) -> list[str]:
        """Stop ``pool``'s containers, count and log it; the ids stopped."""
        scale = pool.scale
        assert scale is not None
        try:
            stopped = await docker.stop(pool)
        except Exception as exc:
            scale.count_action("stop", "failure")
            log.error("pool %s: idle stop failed: %s", pool.name, exc)
            return []
        if stopped:
            scale.count_action("stop", "success")
            log.info("pool %s: stopped %d containers after %gs idle", pool.name,
                     len(stopped), scale.spec.idle_stop or 0)  # fmt: skip
        return stopped

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
