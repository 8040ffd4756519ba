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
webhook) and, on the clock's tick, stops pools idle for ``idle_stop``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from pydantic import ValidationError

from proxy.config import Config, MatchSpec, PoolSpec, RouteSpec
from proxy.config.providers import WebhookSpec
from proxy.upstream.docker import DockerProvider, RouteLabels
from proxy.upstream.hold import Scaler, Webhook
from proxy.upstream.pool import Pool

log = logging.getLogger("aiolb")


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


class Scaling:
    """The scalers of ``scale_from_zero`` pools, and ``idle_stop``."""

    def __init__(self, docker: DockerProvider | None, stops: bool) -> None:
        self.docker = docker
        #: this process stops idle pools (one process: a worker sees only its share)
        self.stops = stops
        self._webhooks: dict[str, Webhook] = {}
        self._tasks: set[asyncio.Task[None]] = set()

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
        """On the clock's tick: stop the pools idle for their ``idle_stop``."""
        docker = self.docker
        if not self.stops or docker is None:
            return
        now = time.monotonic()
        for pool in pools.values():
            scale = pool.scale
            if scale is not None and scale.idle(now) and docker.running(pool):
                scale.last_active = now  # one stop per idle period
                task = asyncio.get_running_loop().create_task(self._stop(docker, pool))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _stop(self, docker: DockerProvider, pool: Pool) -> None:
        scale = pool.scale
        assert scale is not None
        try:
            stopped = await docker.stop(pool)
        except Exception as exc:
            scale.count_action("stop", "failure")
            log.error("pool %s: idle stop failed: %s", pool.name, exc)
            return
        if stopped:
            scale.count_action("stop", "success")
            log.info("pool %s: stopped %d containers after %gs idle", pool.name, stopped,
                     scale.spec.idle_stop or 0)  # fmt: skip

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
