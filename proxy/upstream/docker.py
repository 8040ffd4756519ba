"""The Docker provider: pools filled from containers' ``aiolb.*`` labels, followed live.

Theory of operation
-------------------
``DockerProvider`` keeps what it knows of the engine's containers (``Container``: id,
name, labels, state, health, address, ports) and turns it into upstreams, pool by pool
(``apply``): a container is an upstream of the pool its labels name while it is
*ready*: running, not paused, not being stopped, and with a ``HEALTHCHECK`` either
absent or ``healthy``. ``Pool.set_provided`` takes the result as ``set_discovered``
does for DNS: an address that stays keeps its ``Upstream`` (health, ejections, idle
connections), a container that leaves is drained (no new request; in-flight ones
finish).

The loop (``_run``): open the events stream (container events only), then list every
container and inspect the labelled ones, then apply each event as it comes: ``kill``
with SIGTERM or SIGKILL marks the container stopping (drained at once, before it
dies), ``destroy`` forgets it, anything else inspects it again (start, die, stop,
pause, unpause, health_status, ...). Listing after the stream is open means no event
is lost between the two. A stream that breaks (the engine restarts, a proxy in between
times out) is logged and opened again after a backoff (0.5 s doubling to 10 s), and
the list is read again: what changed meanwhile is found. While the engine cannot be
reached, the pools keep what they had and the file's pools keep serving.

A label names a pool the file does not have: ``pools_wanted`` says so, and the server
adds the pool (every default) and, when the labels ask, a route to it, through the
reload machinery (``ProxyServer.provider_changed``).

Scaling (``Scaler`` of ``proxy.upstream.hold``): ``wake`` starts the pool's stopped
labelled containers, ``stop`` stops its running ones. With several workers the
supervisor stops, and each worker first ``park``s the pool (drains its containers as a
stop would) once it agrees, and ``unpark``s it when the stop does not happen. Starting
and stopping need ``POST``: a read-only socket proxy refuses them (logged as such).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from pydantic import ValidationError

from proxy.config import UpstreamSpec
from proxy.config.providers import DockerProviderSpec
from proxy.config.values import format_address
from proxy.upstream.docker_api import DockerClient, DockerError

if TYPE_CHECKING:
    from proxy.upstream.pool import Pool

log = logging.getLogger("aiolb")

PREFIX: Final = "aiolb."
#: ``kill`` signals that mean the container is going away (``docker stop``, ``kill``)
STOPPING_SIGNALS: Final = frozenset({"15", "9", "SIGTERM", "SIGKILL", "TERM", "KILL"})
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 10.0
#: Seconds a stopped container is given to exit (``docker stop -t``) by ``idle_stop``.
STOP_GRACE: Final = 10
COMPOSE_SERVICE: Final = "com.docker.compose.service"


@dataclass
class Container:
    """What the provider keeps of one container (from ``docker inspect``)."""

    id: str
    name: str
    labels: dict[str, str]
    state: str  # running, exited, paused, created, restarting, dead
    health: str | None  # None: no HEALTHCHECK; starting, healthy, unhealthy
    host_network: bool
    networks: dict[str, str] = field(default_factory=dict)  # network -> IP address
    ports: list[int] = field(default_factory=list)  # exposed TCP ports
    stopping: bool = False

    @classmethod
    def inspected(cls, data: Mapping[str, Any]) -> Container:
        config = data.get("Config") or {}
        state = data.get("State") or {}
        health = state.get("Health") or {}
        settings = data.get("NetworkSettings") or {}
        mode = str((data.get("HostConfig") or {}).get("NetworkMode", ""))
        networks = {
            str(name): str(net.get("IPAddress") or "")
            for name, net in (settings.get("Networks") or {}).items()
            if isinstance(net, Mapping)
        }
        ports = sorted(
            int(key.split("/")[0])
            for key in (config.get("ExposedPorts") or {})
            if key.endswith("/tcp") and key.split("/")[0].isdigit()
        )
        return cls(
            id=str(data.get("Id", "")),
            name=str(data.get("Name", "")).lstrip("/"),
            labels={str(k): str(v) for k, v in (config.get("Labels") or {}).items()},
            state="paused" if state.get("Paused") else str(state.get("Status", "")),
            health=str(health["Status"]) if health.get("Status") else None,
            host_network=mode == "host",
            networks=networks,
            ports=ports,
        )

    @property
    def ready(self) -> bool:
        """Takes requests: running, not being stopped, healthy if it has a check."""
        return self.state == "running" and not self.stopping and self.health in (None, "healthy")

    @property
    def short_id(self) -> str:
        return self.id[:12]


def labelled(labels: Mapping[str, str], spec: DockerProviderSpec) -> bool:
    """Whether a container with these labels is the provider's."""
    enable = labels.get(PREFIX + "enable", "").strip().lower()
    if enable in ("true", "1", "yes"):
        return True
    if enable in ("false", "0", "no"):
        return False
    return spec.exposed_by_default


def pool_name(c: Container) -> str:
    """``aiolb.pool``; else the compose service's name; else the container's (Traefik)."""
    return c.labels.get(PREFIX + "pool") or c.labels.get(COMPOSE_SERVICE) or c.name


def upstream_spec(c: Container, spec: DockerProviderSpec) -> UpstreamSpec:
    """The upstream ``c``'s labels describe; raises ValueError saying what is wrong."""
    labels = c.labels
    port_label = labels.get(PREFIX + "port")
    if port_label is not None:
        if not port_label.strip().isdigit():
            raise ValueError(f"aiolb.port={port_label!r} is not a port number")
        port = int(port_label)
    elif len(c.ports) == 1:
        port = c.ports[0]
    else:
        exposed = ", ".join(map(str, c.ports)) or "none"
        raise ValueError(f"set aiolb.port (exposed ports: {exposed})")
    scheme = scheme_of(c)
    if scheme not in ("http", "https", "h2c"):
        raise ValueError(f"aiolb.scheme={scheme!r}: http, https or h2c")
    if scheme == "h2c":  # HTTP/2 with prior knowledge: the pool's http_version says so
        scheme = "http"
    host = address(c, spec)
    weight = labels.get(PREFIX + "weight", "1").strip()
    backup = labels.get(PREFIX + "backup", "false").strip().lower() in ("true", "1", "yes")
    try:
        return UpstreamSpec.model_validate({
            "url": f"{scheme}://{format_address(host, port)}",
            "name": c.name or None,
            "weight": weight,
            "backup": backup,
        })  # fmt: skip
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ValueError(problems) from None


def scheme_of(c: Container) -> str:
    """``aiolb.scheme``: ``http`` (default), ``https`` or ``h2c``."""
    return c.labels.get(PREFIX + "scheme", "http").strip().lower()


def address(c: Container, spec: DockerProviderSpec) -> str:
    """The container's IP address (``host_address`` on the host network)."""
    if c.host_network:
        return spec.host_address
    nets = {name: ip for name, ip in c.networks.items() if ip}
    if spec.network is not None:
        if spec.network not in nets:
            raise ValueError(f"not attached to network {spec.network!r}")
        return nets[spec.network]
    if not nets:
        raise ValueError("no network address (network_mode none?)")
    return nets[sorted(nets)[0]]


@dataclass(frozen=True)
class RouteLabels:
    """``aiolb.route.*`` of a pool the file does not have (the first container's)."""

    listener: str | None
    host: str | None
    path_prefix: str | None
    #: ``aiolb.scheme=h2c``: the pool speaks HTTP/2 with prior knowledge
    http2: bool = False


class DockerProvider:
    """Follows one engine; fills ``pools``; wakes and stops pools' containers."""

    def __init__(
        self,
        spec: DockerProviderSpec,
        changed: Callable[[], None],
        pools_wanted: Callable[[dict[str, RouteLabels]], None] | None = None,
    ) -> None:
        self.spec = spec
        self.client = DockerClient(spec)
        #: called after a pool's upstream set changed (the server syncs health checks)
        self.changed = changed
        #: called with the label-made pools (name -> route labels) when that set changes
        self.pools_wanted = pools_wanted
        self.containers: dict[str, Container] = {}
        self.pools: Mapping[str, Pool] = {}
        self.extra: dict[str, RouteLabels] = {}
        self.connected = False
        self.listed = asyncio.Event()  # the first list is applied, or the first try failed
        #: ids this process drained for an idle stop that another process decides
        #: (``park``); a ``kill`` event hands them to the engine's events
        self.parked: set[str] = set()
        self._last_error = ""
        self._warned: dict[str, str] = {}  # container id -> last label problem logged
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle --------------------------------------------------------------------

    async def start(self, pools: Mapping[str, Pool], wait: float = 5.0) -> None:
        """Start following the engine; wait up to ``wait`` seconds for the first list
        (so the first requests find upstreams). An engine that cannot be reached is
        logged and retried (the wait ends at the first failure); the file's pools serve
        meanwhile."""
        self.pools = pools
        self._task = asyncio.get_running_loop().create_task(self._run())
        try:
            async with asyncio.timeout(wait):
                await self.listed.wait()
        except TimeoutError:
            log.warning("docker: no container list from %s after %gs; going on without",
                        self.spec.endpoint, wait)  # fmt: skip

    def sync(self, pools: Mapping[str, Pool]) -> None:
        """The server's pools changed (a reload): fill the new ones."""
        self.pools = pools
        self.apply()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self.client.close()

    async def _run(self) -> None:
        backoff = BACKOFF_FIRST
        while True:
            try:
                async for event in self.client.events():
                    if not event:  # the stream is open: read the whole state now
                        await self._relist()
                        if not self.connected:
                            log.info("docker: following %s (%d containers labelled)",
                                     self.spec.endpoint, len(self.containers))  # fmt: skip
                        self.connected, backoff = True, BACKOFF_FIRST
                        self._last_error = ""
                        continue
                    await self._event(event)
            except DockerError as exc:
                lost = "lost" if self.connected else "cannot follow"
                # the same failure again and again is logged once, then at debug level
                level = logging.DEBUG if str(exc) == self._last_error else logging.WARNING
                self._last_error = str(exc)
                log.log(level, "docker: %s the engine: %s; trying again in %gs", lost, exc,
                        backoff)  # fmt: skip
            except Exception:  # a bug must not end the loop: keep serving
                log.exception("docker: unexpected error; trying again in %gs", backoff)
            self.connected = False
            self.listed.set()  # the first try is over: nobody waits for the engine
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    # -- the engine's state -----------------------------------------------------------

    async def _relist(self) -> None:
        found: dict[str, Container] = {}
        for summary in await self.client.containers():
            labels = summary.get("Labels") or {}
            if not labelled(labels, self.spec):
                continue
            ident = str(summary.get("Id", ""))
            data = await self.client.inspect(ident)
            if data is not None:
                c = Container.inspected(data)
                old = self.containers.get(ident)
                c.stopping = old is not None and old.stopping and c.state == "running"
                found[ident] = c
        self.containers = found
        self.apply()
        self.listed.set()

    async def _event(self, event: Mapping[str, Any]) -> None:
        actor = event.get("Actor") or {}
        ident = str(actor.get("ID") or event.get("id") or "")
        attributes = actor.get("Attributes") or {}
        action = str(event.get("Action") or event.get("status") or "")
        known = self.containers.get(ident)
        if known is None and not labelled(attributes, self.spec):
            return  # not ours (its labels are in the event's attributes)
        if action == "destroy":
            if self.containers.pop(ident, None) is not None:
                self.apply()
            return
        if action == "kill":
            signal = attributes.get("signal", "")
            if signal in STOPPING_SIGNALS:
                self.parked.discard(ident)  # going away: ``unpark`` must not keep it
            if known is not None and signal in STOPPING_SIGNALS and not known.stopping:
                known.stopping = True
                self.apply()
            return
        if action.startswith(("exec_", "attach", "resize", "top", "export", "commit")):
            return
        data = await self.client.inspect(ident)
        if data is None:
            self.containers.pop(ident, None)
        else:
            c = Container.inspected(data)
            if not labelled(c.labels, self.spec):
                self.containers.pop(ident, None)
            else:
                c.stopping = known is not None and known.stopping and c.state == "running"
                if action == "start":
                    c.stopping = False
                self.containers[ident] = c
        self.apply()

    # -- containers to upstreams ------------------------------------------------------

    def members(self) -> dict[str, dict[str, tuple[UpstreamSpec, tuple[str, str]]]]:
        """Pool name -> the ready containers' upstreams (address -> spec, (id, name))."""
        pools: dict[str, dict[str, tuple[UpstreamSpec, tuple[str, str]]]] = {}
        for c in sorted(self.containers.values(), key=lambda c: c.name):
            name = pool_name(c)
            members = pools.setdefault(name, {})
            if not c.ready:
                continue
            try:
                spec = upstream_spec(c, self.spec)
                pool = self.pools.get(name)
                if scheme_of(c) == "h2c" and pool is not None and not pool.http2:
                    raise ValueError(f'aiolb.scheme=h2c: pool {name} speaks HTTP/1.1 (set its '
                                     'http_version: "2")')  # fmt: skip
            except ValueError as exc:
                if self._warned.get(c.id) != str(exc):
                    self._warned[c.id] = str(exc)
                    log.warning("docker: container %s (%s) left out: %s", c.name, c.short_id, exc)
                continue
            members.setdefault(spec.address, (spec, (c.id, c.name)))
        return pools

    def apply(self) -> None:
        """Give every pool its ready containers; ask for pools the file lacks."""
        members = self.members()
        changed = False
        for name, pool in self.pools.items():
            found = members.get(name, {})
            before = set(pool.provided)
            if pool.set_provided(found):
                changed = True
                log.info("docker: pool %s: %s", name, _describe(before, found))
        extra = {
            name: self._route(name)
            for name in members
            if name not in self.pools or name in self.extra
        }
        if extra != self.extra:
            self.extra = extra
            if self.pools_wanted is not None:
                self.pools_wanted(extra)
        if changed:
            self.changed()

    def _route(self, pool: str) -> RouteLabels:
        for c in sorted(self.containers.values(), key=lambda c: c.name):
            if pool_name(c) == pool:
                get = c.labels.get
                return RouteLabels(
                    get(PREFIX + "route.listener"), get(PREFIX + "route.host"),
                    get(PREFIX + "route.path_prefix"), scheme_of(c) == "h2c",
                )  # fmt: skip
        return RouteLabels(None, None, None)

    # -- scaling (``proxy.upstream.hold.Scaler``) -------------------------------------

    def _of(self, pool: Pool, states: tuple[str, ...]) -> list[Container]:
        return [
            c for c in self.containers.values() if pool_name(c) == pool.name and c.state in states
        ]

    async def wake(self, pool: Pool) -> None:
        """Start the pool's stopped labelled containers (``docker start``)."""
        if not self.connected and not self.containers:
            raise DockerError(f"not connected to the engine at {self.spec.endpoint}"
                              f" ({self._last_error or 'connecting'})")  # fmt: skip
        deadline = asyncio.get_running_loop().time() + STOP_GRACE + 5
        while any(c.stopping for c in self._of(pool, ("running",))):
            if asyncio.get_running_loop().time() > deadline:  # an idle stop is under way:
                break  # start them once they are down (their events say so)
            await asyncio.sleep(0.1)
        stopped = self._of(pool, ("exited", "created"))
        if not stopped:
            if self._of(pool, ("running", "restarting", "paused")):
                return  # starting already, or not healthy yet: nothing to start
            raise DockerError(f"no container labelled for pool {pool.name} to start")
        names = ", ".join(c.name for c in stopped)
        log.info("docker: pool %s: starting %s", pool.name, names)
        results = await asyncio.gather(
            *(self.client.start(c.id) for c in stopped), return_exceptions=True
        )
        errors = [str(r) for r in results if isinstance(r, BaseException)]
        if errors:
            raise DockerError("; ".join(errors))

    async def stop(self, pool: Pool) -> list[str]:
        """Stop the pool's running labelled containers (``docker stop``): they are
        drained at once (their ``kill`` event), and their requests finish. The ids of
        those asked to stop."""
        running = self._drain(pool)
        if not running:
            return []
        log.info("docker: pool %s: stopping %s (idle)", pool.name,
                 ", ".join(c.name for c in running))  # fmt: skip
        results = await asyncio.gather(
            *(self.client.stop(c.id, STOP_GRACE) for c in running), return_exceptions=True
        )
        errors = [str(r) for r in results if isinstance(r, BaseException)]
        if errors:  # still running: they serve again
            for c, result in zip(running, results, strict=True):
                if isinstance(result, BaseException):
                    c.stopping = False
            self.apply()
            raise DockerError("; ".join(errors))
        return [c.id for c in running]

    def _drain(self, pool: Pool) -> list[Container]:
        """Mark the pool's running containers stopping (no new request); those."""
        running = [c for c in self._of(pool, ("running",)) if not c.stopping]
        for c in running:
            c.stopping = True
        if running:
            self.apply()
        return running

    def park(self, pool: Pool) -> int:
        """Drain the pool's running containers as ``stop`` does, without stopping them:
        another process (the supervisor) is about to, or ``unpark`` serves them again.
        A request that comes meanwhile is held and its wake waits for the stop to end
        (``wake``). How many were drained."""
        running = self._drain(pool)
        self.parked.update(c.id for c in running)
        return len(running)

    def unpark(self, pool: Pool, stopped: Collection[str] = ()) -> None:
        """Serve the parked containers of ``pool`` again, except ``stopped`` (the stop
        took them; their events say so) and any the engine is already stopping."""
        back = False
        for c in self.containers.values():
            if c.id in self.parked and pool_name(c) == pool.name:
                self.parked.discard(c.id)
                if c.id not in stopped and c.stopping and c.state == "running":
                    c.stopping = False
                    back = True
        if back:
            self.apply()

    def running(self, pool: Pool) -> int:
        """How many of the pool's containers run and are not being stopped."""
        return sum(not c.stopping for c in self._of(pool, ("running",)))

    def __repr__(self) -> str:
        state = "connected" if self.connected else "not connected"
        return f"<DockerProvider {self.spec.endpoint} [{state}, {len(self.containers)} containers]>"


def _describe(before: set[str], found: Mapping[str, tuple[UpstreamSpec, tuple[str, str]]]) -> str:
    added = [f"+{found[a][1][1]} ({a})" for a in found if a not in before]
    removed = [f"-{a}" for a in before if a not in found]
    return ", ".join(added + removed) or "changed"
