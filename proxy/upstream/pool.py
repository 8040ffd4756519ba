"""Upstreams, their idle keep-alive connections, and pools of upstreams.

Bookkeeping is synchronous (STYLE 2): ``take_idle`` and ``put_idle`` decide in plain
code which connection to reuse or close, and ``proxy.upstream.acquire`` how a request
gets one (reuse, open, wait: the connection limit); the only await is opening one.
Idle connections are kept LIFO: the most recently used is reused first (the most
likely alive), so under a steady load the same connections serve every request and
the ones a past peak opened sit at the cold end until ``timeouts.idle`` closes them.
By default every connection that ends a response cleanly is kept (up to
``max_connections``): a cap below the concurrency would close connections that the
next burst of requests opens again.

A pool's balancer sees only the available upstreams (primaries, or the backups when
no primary is available) and is rebuilt whenever that set changes, never per request.
With ``slow_start``, an upstream that becomes available again ramps from 10% to 100%
of its weight (``proxy.balancing.slow_start``): the pool passes effective weights to
the balancer and, while a ramp runs, ``sweep`` rebuilds it every tenth of the ramp.
"""

from __future__ import annotations

import ssl
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from proxy.balancing import REGISTRY, Balancer, RequestView, SlowStart
from proxy.config.values import format_address
from proxy.health.outlier import OutlierDetector, readmit
from proxy.metrics.stats import Stats
from proxy.proxy_protocol import BUILDERS, Addresses
from proxy.tls import client_context
from proxy.upstream.acquire import assign, carry_out
from proxy.upstream.hold import Hold
from proxy.upstream.retry import RetryPolicy

if TYPE_CHECKING:
    from proxy.config import PoolSpec, UpstreamSpec
    from proxy.upstream.acquire import Ticket
    from proxy.upstream.connection import UpstreamConnection
    from proxy.upstream.h2 import H2Upstream

NO_RAMP = float("inf")


class Upstream:
    """One upstream server of a pool: identity, weight, live counters, idle connections."""

    __slots__ = (
        "active",
        "address",
        "backup",
        "conns",
        "container",
        "eject_level",
        "ejected",
        "ejected_until",
        "ejections",
        "enabled",
        "failures",
        "h2",
        "h2_opening",
        "health_checks",
        "healthy",
        "host",
        "idle",
        "max_connections",
        "max_idle",
        "name",
        "observed_at",
        "owned",
        "passes",
        "pool",
        "port",
        "private",
        "returned_at",
        "server_name",
        "ssl",
        "stats",
        "tls_key",
        "tunnels",
        "waiting",
        "weight",
    )

    def __init__(self, spec: UpstreamSpec, pool: Pool) -> None:
        self.host: str = spec.host
        self.port: int = spec.port
        self.address: str = spec.address
        #: the config's ``name``, else the address (the dashboard's and logs' label)
        self.name: str = spec.label
        self.weight: int = spec.weight
        self.backup: bool = spec.backup
        self.pool = pool
        #: TLS for ``https://`` upstreams (None: plain), the SNI and verification name,
        #: and what they were built from (a reload that changes it closes idle connections)
        self.ssl: ssl.SSLContext | None = pool.tls_context if spec.https else None
        self.server_name: str | None = None
        if self.ssl is not None:
            self.server_name = pool.tls_server_name or spec.host
        self.tls_key = (spec.https, pool.tls_spec)
        self.active = 0
        self.tunnels = 0  # open Upgrade tunnels (``proxy.server.tunnel``)
        self.enabled = True
        #: the active checks' verdict (``initial_state`` until the first flip)
        self.healthy = pool.initially_healthy
        # passive health (``proxy.health.outlier``)
        self.failures = 0  # consecutive failed attempts
        self.ejected = False
        self.ejected_until = 0.0  # loop time
        self.ejections = 0  # times ejected, for aiolb_upstream_ejections_total
        self.eject_level = 0  # the ejection time multiplier
        self.returned_at = 0.0
        #: perf_counter before which ``Pool.observe`` is not given another sample
        self.observed_at = 0.0
        #: active probe results by ``success``/``failure``, for aiolb_health_checks_total
        self.health_checks: dict[str, int] = {}
        self.passes = 0  # consecutive passed probes (ends an ejection at healthy_threshold)
        # circuit breaking (``proxy.upstream.acquire``): open connections (connecting,
        # busy or idle), and the requests waiting for one when ``max_connections`` are open
        self.max_connections = spec.max_connections or pool.max_connections
        self.conns = 0
        self.waiting: deque[Ticket] = deque()
        self.idle: deque[UpstreamConnection] = deque()
        #: idle connections kept (the pool's ``max_idle_connections``, by default as many
        #: as may be open; 0 once removed)
        self.max_idle = self.max_connections if pool.max_idle is None else pool.max_idle
        #: the pool sends a PROXY header: a connection carries one client's addresses,
        #: so its idle connections are kept apart by the header they sent (``owned``,
        #: never in ``idle``) and reused only for a request that would send the same
        #: one (``take_own``, from ``proxy.upstream.acquire``)
        self.private = pool.send_proxy is not None
        self.owned: dict[bytes, list[UpstreamConnection]] = {}
        if self.private:
            self.max_idle = 0
        #: a pool with ``http_version: "2"``: the multiplexed connections (``proxy.
        #: upstream.h2``), and how many are being opened; None: HTTP/1.1
        self.h2: list[H2Upstream] | None = [] if pool.http2 else None
        self.h2_opening = 0
        self.stats = Stats()
        #: ``(id, name)`` of the Docker container it stands for (``providers.docker``);
        #: None: from the file or DNS
        self.container: tuple[str, str] | None = None

    @property
    def available(self) -> bool:
        """Healthy, enabled (not drained by an operator) and not ejected."""
        return self.healthy and self.enabled and not self.ejected

    def begin_request(self) -> None:
        """A request starts on this upstream (the balancer's index follows)."""
        self.active += 1
        track = self.pool.track
        if track is not None:
            track(self)

    def end_request(self) -> None:
        self.active -= 1
        track = self.pool.track
        if track is not None:
            track(self)

    def take_idle(self) -> UpstreamConnection | None:
        """The most recently released live idle connection, or None (HTTP/2: a new
        stream on the most recent connection with room for one)."""
        if self.h2 is not None:
            for h2 in reversed(self.h2):
                if h2.room() > 0:
                    return h2.open_stream()  # type: ignore[return-value]
            return None
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.reusable():
                return conn
            conn.close()
        return None

    def h2_settling(self) -> bool:
        """An HTTP/2 connection is open but has not said its stream limit yet (its
        SETTINGS): requests wait for it rather than open another."""
        return any(not (conn.settled or conn.goaway) for conn in self.h2 or ())

    def put_idle(self, conn: UpstreamConnection, now: float) -> None:
        """Keep a connection that ended a message cleanly, or close it if the pool is full.

        A request waiting for a connection (``max_connections`` reached) gets it first.
        """
        if not conn.reusable():
            conn.close()
            return
        if conn.reading_paused:
            conn.resume_reading(conn.reading_paused)  # every reason: the message is over
        if self.waiting and not self.private:  # the first waiter takes it (``assign``)
            self.idle.append(conn)
            carry_out(assign(self))
        elif len(self.idle) < self.max_idle:
            conn.idle_since = now
            self.idle.append(conn)
        elif self.private and not self.waiting:  # kept for its own client only
            conn.idle_since = now
            owned = self.owned
            mine = owned.pop(conn.proxy_key, [])  # to the end: the dict's order is LRU
            mine.append(conn)
            owned[conn.proxy_key] = mine
        else:  # (a private pool's, when requests wait: its slot serves them)
            conn.close()

    def take_own(self, key: bytes) -> UpstreamConnection | None:
        """An idle connection that sent the PROXY header ``key`` (a ``private``
        upstream's), or None."""
        owned = self.owned
        mine = owned.get(key)
        while mine:
            conn = mine.pop()
            if not mine:
                del owned[key]
            if conn.reusable():
                return conn
            conn.close()
        return None

    def evict_own(self) -> None:
        """Requests wait and every slot is taken: close the least recently used idle
        connection kept for another client (its close lets a waiter open one)."""
        for key, mine in self.owned.items():
            conn = mine.pop(0)
            if not mine:
                del self.owned[key]
            conn.close()
            return

    def serve_waiting(self) -> None:
        """Room opened (an HTTP/2 stream ended, a connection's settings changed): the
        requests waiting for a session get it in turn."""
        carry_out(assign(self))

    def connection_closed(self) -> None:
        """An open connection ended (or a connect failed): a waiting request may open one."""
        self.conns -= 1
        if self.waiting:
            carry_out(assign(self))

    def forget(self, conn: UpstreamConnection) -> None:
        """Remove a connection that closed while idle."""
        try:
            self.idle.remove(conn)
        except ValueError:
            pass
        if self.owned:
            mine = self.owned.get(conn.proxy_key)
            if mine is not None and conn in mine:
                mine.remove(conn)
                if not mine:
                    del self.owned[conn.proxy_key]

    def close_idle(self, older_than: float, now: float = 0.0) -> None:
        h2 = self.h2
        if h2:
            for conn in tuple(h2):
                if older_than == float("inf"):  # removed, or new settings: no new stream
                    conn.retire()
                else:
                    conn.check_idle(now, older_than)
        idle = self.idle
        while idle and idle[0].idle_since < older_than:
            idle.popleft().close()
        if self.owned:
            for mine in tuple(self.owned.values()):
                for old in [c for c in mine if c.idle_since < older_than]:
                    old.close()  # ``forget`` takes it out

    def __repr__(self) -> str:
        state = "up" if self.healthy else "down"
        if self.ejected:
            state += ", ejected"
        if not self.enabled:
            state += ", drained"
        return (
            f"<Upstream {self.address} [{state}, weight {self.weight} | "
            f"Requests: {self.active} active, {len(self.waiting)} waiting | "
            f"Connections: {self.conns} open, {len(self.idle)} idle]>"
        )


class Pool:
    """A named set of upstreams behind one balancer."""

    __slots__ = (
        "_balancer",
        "_by_address",
        "_factory",
        "_options",
        "_ramp_due",
        "_slow_start",
        "active_check",
        "clock",
        "connect_timeout",
        "discovered",
        "dns_refresh",
        "dns_resolver",
        "dns_specs",
        "fast_path",
        "http2",
        "idle_timeout",
        "initially_healthy",
        "max_connections",
        "max_idle",
        "max_pending",
        "name",
        "observe",
        "outlier",
        "overflows",
        "pending",
        "pick",
        "provided",
        "queue_timeout",
        "read_timeout",
        "requests",
        "response_header_timeout",
        "retries",
        "retry",
        "scale",
        "send_proxy",
        "send_timeout",
        "static_addresses",
        "stats",
        "tls_context",
        "tls_server_name",
        "tls_spec",
        "track",
        "tunnel_idle",
        "upstreams",
    )

    def __init__(self, name: str, config: PoolSpec) -> None:
        self.name = name
        active = config.health_check.active
        #: the active probe spec (``proxy.health.active``); None: not probed
        self.active_check = active
        self.initially_healthy = active is None or active.initial_state == "healthy"
        passive = config.health_check.passive
        #: passive health; None when ``health_check.passive`` is off
        self.outlier = OutlierDetector(passive) if passive is not None else None
        self.retry = RetryPolicy(config.retries)
        breaker = config.circuit_breaker
        self.max_connections = breaker.max_connections
        self.max_pending = breaker.max_pending
        #: a response read whole with a known head is relayed in one step
        #: (``Exchange.relay_whole``); False: always the general path (tests compare them)
        self.fast_path = True
        #: ``send_proxy_protocol``: builds the PROXY header of a new connection from the
        #: client's addresses (None: a health probe's); None: no header sent
        self.send_proxy: Callable[[Addresses | None], bytes] | None = (
            BUILDERS[config.send_proxy_protocol] if config.send_proxy_protocol else None
        )
        self.queue_timeout = breaker.queue_timeout
        self.pending = 0  # requests waiting for a connection (``Upstream.waiting``)
        self.overflows = 0  # requests refused (503) because max_pending were waiting
        self.requests = 0  # requests routed to this pool (deposits of the retry budget)
        self._factory = REGISTRY[config.balancer.name]
        self._options: Mapping[str, Any] = config.balancer.options
        t = config.timeouts
        self.connect_timeout = t.connect
        per_try = config.retries.per_try_timeout
        self.response_header_timeout = min(t.response_header, per_try or t.response_header)
        self.idle_timeout = t.idle
        self.read_timeout = t.read
        self.send_timeout = t.send
        self.tunnel_idle = t.tunnel_idle
        #: the client context of the https upstreams (built once per pool; raises
        #: ``TLSFileError`` on a bad file), None when the pool has none
        self.tls_spec = config.tls
        # a pool a provider fills may get https:// upstreams later
        has_https = any(spec.https for spec in config.upstreams) or not config.upstreams
        #: HTTP/2 to the upstreams (``http_version: "2"``)
        self.http2 = config.http_version == "2"
        self.tls_context = client_context(config.tls, self.http2) if has_https else None
        self.tls_server_name = config.tls.server_name if config.tls is not None else None
        #: ``max_idle_connections``; None: each upstream's ``max_connections``
        self.max_idle: int | None = config.max_idle_connections
        static = [spec for spec in config.upstreams if not spec.dns]
        self.static_addresses = frozenset(spec.address for spec in static)
        self.upstreams = [Upstream(spec, self) for spec in static]
        self._by_address = {u.address: u for u in self.upstreams}
        # ``dns://name:port`` entries (``proxy.upstream.discovery``), keyed "name:port":
        # the spec each resolved address inherits (its ``host`` is the name to resolve)
        # and the addresses found so far
        self.dns_specs = {spec.address: spec for spec in config.upstreams if spec.dns}
        self.discovered: dict[str, list[str]] = {key: [] for key in self.dns_specs}
        self.dns_refresh = config.dns_refresh
        self.dns_resolver = config.dns_resolver
        #: upstreams a provider (``proxy.upstream.docker``) put here: by address, the
        #: spec and the container's ``(id, name)``
        self.provided: dict[str, tuple[UpstreamSpec, tuple[str, str]]] = {}
        #: ``scale_from_zero`` (``proxy.upstream.hold``): requests held while no upstream
        #: is available; None: 503 at once
        self.scale: Hold | None = None
        if config.scale_from_zero is not None:
            self.scale = Hold(self, config.scale_from_zero)
        #: responses the proxy made itself for this pool (upstream ""): 502, 503, 504
        self.stats = Stats()
        #: requests sent again (a stale pooled connection; other upstreams later)
        self.retries = 0
        self._balancer: Balancer = self._factory([], self._options)
        #: ``pick(request)``: an available upstream for this request, or None (the 503
        #: path). The balancer's own bound method, set on every rebuild: one call, not two.
        self.pick: Callable[[RequestView], Upstream | None] = self._balancer.pick
        #: ``observe(upstream, seconds, now)`` when the balancer learns from latency, else
        #: None: ``seconds`` from sending to the response head, ``now`` its perf_counter.
        self.observe: Callable[[Upstream, float, float], None] | None = None
        #: ``track(upstream)`` after ``upstream.active`` changes, if the balancer indexes it.
        self.track: Callable[[Upstream], None] | None = None
        #: monotonic seconds, for slow-start ramps (replaceable in tests)
        self.clock: Callable[[], float] = time.monotonic
        slow = config.slow_start
        self._slow_start = SlowStart(slow) if slow else None
        self._ramp_due = NO_RAMP
        self.rebuild()

    def rebuild(self) -> None:
        """Rebuild the balancer over the upstreams available now (call on any change)."""
        live = [u for u in self.upstreams if u.available]
        chosen = [u for u in live if not u.backup] or [u for u in live if u.backup]
        weights = self._ramp(live, chosen)
        old, new = self._balancer, self._factory(chosen, self._options, weights)
        inherit = getattr(new, "inherit", None)
        if inherit is not None:  # carry learned state (e.g. latency averages) across
            inherit(old, time.perf_counter())  # the clock ``observe`` is given
        self._balancer = new
        self.pick = new.pick
        self.observe = getattr(new, "observe", None)
        self.track = getattr(new, "on_active_change", None)
        scale = self.scale
        if scale is not None and chosen and scale.count:  # held requests go now
            scale.ready()

    def _ramp(self, live: list[Upstream], chosen: list[Upstream]) -> list[float] | None:
        """Slow-start weights for ``chosen`` (None: none ramping); schedules the next step."""
        slow = self._slow_start
        if slow is None:
            return None
        now = self.clock()
        slow.update(live, now)
        weights = slow.weights(chosen, now)
        self._ramp_due = now + slow.step if slow.ramping(now) else NO_RAMP
        return weights

    def sweep(self, now: float) -> None:
        """Close idle connections unused for longer than ``timeouts.idle``; step ramps."""
        older_than = now - self.idle_timeout
        for upstream in self.upstreams:
            if upstream.idle or upstream.h2 or upstream.owned:
                upstream.close_idle(older_than, now)
        outlier = self.outlier
        returned = outlier is not None and outlier.sweep(self.upstreams, self.clock())
        if returned or (self._ramp_due != NO_RAMP and self.clock() >= self._ramp_due):
            self.rebuild()

    # -- verdicts: passive (from the exchange) and active (from the health checker) ----

    def failure(self, upstream: Upstream, reason: str) -> None:
        """An attempt on ``upstream`` failed (connect, timeout, reset, bad response)."""
        outlier = self.outlier
        if outlier is not None and outlier.failure(
            upstream, self.upstreams, self.clock(), reason
        ):
            self.rebuild()

    def set_discovered(self, key: str, hosts: list[str]) -> bool:
        """The ``dns://`` entry ``key`` now resolves to ``hosts``; True when that changed
        the upstream set. Upstreams whose address stays are kept with all their state;
        removed ones get no new requests, their in-flight ones finish, and their
        connections are closed (idle ones now, busy ones when released)."""
        if self.discovered.get(key) == hosts:
            return False
        self.discovered[key] = list(hosts)
        self._assemble()
        return True

    def set_provided(self, found: dict[str, tuple[UpstreamSpec, tuple[str, str]]]) -> bool:
        """A provider's upstreams for this pool are now ``found`` (by address: the spec
        and the container's ``(id, name)``); True when that changed the set. As for
        ``set_discovered``: addresses that stay keep their ``Upstream``, removed ones
        drain (in-flight requests finish, no new ones)."""
        if found == self.provided:
            return False
        self.provided = dict(found)
        self._assemble()
        return True

    def _assemble(self) -> None:
        """The upstream list again from its sources: the file's static upstreams, the
        ``dns://`` entries' addresses, the provider's; then the balancer."""
        static = [u for u in self.upstreams if u.address in self.static_addresses]
        seen = set(self.static_addresses)
        wanted: list[Upstream] = []
        for k, spec in self.dns_specs.items():
            for host in self.discovered[k]:
                address = format_address(host, spec.port)
                if address in seen:  # listed twice (or also as a static upstream)
                    continue
                seen.add(address)
                old = self._by_address.get(address)
                wanted.append(old if old is not None else Upstream(spec.resolved(host), self))
        for address, (spec, container) in self.provided.items():
            if address in seen:
                continue
            seen.add(address)
            old = self._by_address.get(address)
            if old is None:
                old = Upstream(spec, self)
            old.weight, old.backup, old.name = spec.weight, spec.backup, spec.label
            old.container = container
            wanted.append(old)
        for upstream in self.upstreams:
            if upstream.address not in seen:
                upstream.max_idle = 0
                upstream.close_idle(float("inf"))
        self.upstreams = static + wanted
        self._by_address = {u.address: u for u in self.upstreams}
        self.rebuild()

    @property
    def held(self) -> int:
        """Requests held for an upstream to become ready (``scale_from_zero``)."""
        scale = self.scale
        return scale.count if scale is not None else 0

    @property
    def scale_actions(self) -> dict[tuple[str, str], int]:
        """``scale_from_zero`` wakes, stops and overflows by (action, result)."""
        scale = self.scale
        return scale.actions if scale is not None else {}

    def upstream(self, address: str) -> Upstream | None:
        """The upstream with this ``host:port``, or None."""
        return self._by_address.get(address)

    def set_healthy(self, upstream: Upstream, healthy: bool) -> None:
        """The active checks' verdict changed. Coming back healthy also ends an ejection
        (Envoy's ``successful_active_health_check_uneject_host``)."""
        upstream.healthy = healthy
        if healthy and upstream.ejected:
            readmit(upstream, self.clock(), "active health checks pass")
        self.rebuild()

    def check_result(self, upstream: Upstream, ok: bool) -> None:
        """Count one active probe of ``upstream``; ``healthy_threshold`` passes in a row
        end an ejection."""
        key = "success" if ok else "failure"
        upstream.health_checks[key] = upstream.health_checks.get(key, 0) + 1
        if not ok:
            upstream.passes = 0
            return
        upstream.passes += 1
        check = self.active_check
        if check is not None and upstream.passes >= check.healthy_threshold:
            self.checks_pass(upstream)

    def checks_pass(self, upstream: Upstream) -> None:
        """Active checks have passed ``healthy_threshold`` times in a row while the
        upstream stayed healthy: an ejection (passive) ends now."""
        if upstream.ejected:
            readmit(upstream, self.clock(), "active health checks pass")
            self.rebuild()

    def adopt(self, previous: Pool) -> None:
        """Take over the state of ``previous``, the same-named pool of the config being
        replaced by a reload (call once, before this pool serves).

        Counters (``stats``, ``retries``) carry on, so they stay monotonic. An upstream
        whose address is in both pools stays the *same object*, given the new weight,
        backup flag and pool: its health, drain, in-flight count, statistics and idle
        connections carry over, and requests still running on it (started through the
        old pool) end into the right counters. Learned balancer state and a slow-start
        ramp in progress carry over too.
        """
        self.stats = previous.stats
        self.retries = previous.retries
        self.overflows = previous.overflows
        self.requests = previous.requests
        budget, new_budget = previous.retry.budget, self.retry.budget
        budget.retune(new_budget.ratio * 100, new_budget.rate)
        self.retry.budget = budget  # the balance carries on: spent tokens stay spent
        for key in self.discovered:  # dns:// entries in both: start from the last answer
            hosts = previous.discovered.get(key)
            if hosts:
                self.set_discovered(key, hosts)
        if previous.provided:  # the provider's upstreams stay until it says otherwise
            self.set_provided(previous.provided)
        kept = {u.address: u for u in previous.upstreams}
        for i, fresh in enumerate(self.upstreams):
            old = kept.get(fresh.address)
            if old is not None:
                old.weight, old.backup, old.pool = fresh.weight, fresh.backup, self
                old.name = fresh.name
                old.max_idle = fresh.max_idle
                if old.private != fresh.private:  # sent a PROXY header, or not: none kept
                    old.private = fresh.private
                    old.close_idle(float("inf"))
                    for conn in old.h2 or ():
                        conn.retire()
                old.max_connections = fresh.max_connections
                if old.tls_key != fresh.tls_key:  # new TLS settings: no old connection
                    old.close_idle(float("inf"))
                if (old.h2 is None) != (fresh.h2 is None):  # the HTTP version changed
                    old.close_idle(float("inf"))
                    for conn in old.h2 or ():
                        conn.retire()
                    old.h2 = fresh.h2
                old.ssl, old.server_name, old.tls_key = fresh.ssl, fresh.server_name, fresh.tls_key
                self.upstreams[i] = old
        self._by_address = {u.address: u for u in self.upstreams}
        slow = self._slow_start
        if slow is not None:  # primed with the fresh objects: prime it again, or carry
            carried = previous._slow_start
            self._slow_start = carried if carried is not None else SlowStart(slow.duration)
            self._slow_start.duration = slow.duration
        if self.scale is not None and previous.scale is not None:
            self.scale.adopt(previous.scale)
        self._balancer = previous._balancer  # what ``inherit`` learns from
        self.rebuild()

    def retire(self) -> None:
        """This pool was replaced by a reload: close the idle connections of upstreams no
        other pool adopted, and every connection they release later."""
        self.max_idle = 0
        for upstream in self.upstreams:
            if upstream.pool is self:
                upstream.max_idle = 0
                upstream.close_idle(float("inf"))

    def close(self) -> None:
        for upstream in self.upstreams:
            upstream.close_idle(float("inf"))

    def __repr__(self) -> str:
        up = sum(u.available for u in self.upstreams)
        ramp = ", slow start ramping" if self._ramp_due != NO_RAMP else ""
        return (
            f"<Pool {self.name} [{up}/{len(self.upstreams)} available{ramp}, "
            f"{self._balancer!r}]>"
        )
