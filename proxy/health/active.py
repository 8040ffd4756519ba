"""Active health checks: probe every upstream on a timer, report what changes.

Theory of operation
-------------------
One ``HealthChecker`` per process that probes (the whole proxy: with several worker
processes only the supervisor probes and passes verdicts on, see ARCHITECTURE.md). It
knows upstreams by ``(pool name, address)`` and a probe spec, not by the ``Upstream``
objects that serve traffic, so the process that probes need not be the one that
serves. ``sync`` makes the running probes match a set of pools: new upstreams get a
probe loop, removed ones lose theirs, kept ones keep their rise/fall state (a reload
does not reset health).

Each probe loop waits ``interval`` plus a random part of ``jitter`` (probes of many
upstreams do not march in step), probes, and feeds the result into its
``RiseFall``. Every result goes to ``sink.check_result``; a flip goes to
``sink.health_changed`` with the reason, and is logged once, here.

HTTP probes use aiohttp with a new connection each time (``force_close``, as HAProxy
does): a probe that reuses a pooled connection would not notice that the upstream
stopped accepting. TCP probes only connect. gRPC probes (``grpc_probe``) make one
``grpc.health.v1.Health/Check`` call on a new HTTP/2 connection. An ``https://``
upstream is probed over TLS with the pool's context and server name (a TCP probe
completes the handshake), so an upstream whose certificate stops verifying goes down
like one that stops answering; a gRPC probe needs ALPN ``h2``, which the pool's
context may not offer, so it uses a context of its own built from the same settings
(``CheckTarget.tls``), one per pool context. A probe never raises: whatever goes wrong
is a failed probe with a reason.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from proxy.config import ActiveHealthCheckSpec, UpstreamTLSSpec
from proxy.config.values import format_address
from proxy.health import grpc_probe
from proxy.health.state import RiseFall
from proxy.tcp import connect_sending
from proxy.tls import client_context

log = logging.getLogger("aiolb")


class HealthSink(Protocol):
    """Where verdicts go (``ProxyServer`` in one process; the workers' channel later)."""

    def check_result(self, pool: str, address: str, ok: bool) -> None: ...

    def health_changed(self, pool: str, address: str, healthy: bool, reason: str) -> None: ...


@dataclass(frozen=True, slots=True)
class CheckTarget:
    """One upstream to probe: identity, where to connect, how to probe."""

    pool: str
    address: str
    host: str
    port: int
    check: ActiveHealthCheckSpec
    initially_healthy: bool = True
    #: the pool's TLS context for an https upstream (None: plain) and the SNI name
    ssl: ssl.SSLContext | None = None
    server_name: str | None = None
    #: the pool's TLS settings, from which a grpc probe builds its own context (ALPN h2)
    tls: UpstreamTLSSpec | None = None
    #: the PROXY header a ``send_proxy_protocol`` pool's probes send first (``LOCAL``
    #: or ``UNKNOWN``: no client); None: none
    proxy_header: bytes | None = None


class _Prober:
    __slots__ = ("state", "target", "task")

    def __init__(self, target: CheckTarget, state: RiseFall) -> None:
        self.target = target
        self.state = state
        self.task: asyncio.Task[None] | None = None


def describe(exc: BaseException, timeout: float) -> str:
    """A short reason for a failed probe: ``connection refused``, ``timeout after 1s``."""
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return f"timeout after {timeout:g}s"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        cert_error = exc.certificate_error
        if isinstance(cert_error, ssl.SSLCertVerificationError) and cert_error.verify_message:
            return f"certificate verify failed: {cert_error.verify_message}"
        return f"TLS: {cert_error}"
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {str(exc.reason or exc).lower()}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        exc = exc.os_error
    if isinstance(exc, OSError) and exc.errno:  # uvloop's strerror names the address
        return os.strerror(exc.errno).lower()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


class HealthChecker:
    def __init__(self, sink: HealthSink) -> None:
        self.sink = sink
        self._probers: dict[tuple[str, str], _Prober] = {}
        self._session: aiohttp.ClientSession | None = None
        #: a pool's TLS context -> the one its grpc probes use (ALPN h2)
        self._h2_contexts: dict[ssl.SSLContext, ssl.SSLContext] = {}

    def sync(self, targets: Iterable[CheckTarget]) -> None:
        """Probe exactly ``targets`` from now on (call from the event loop)."""
        wanted = {(t.pool, t.address): t for t in targets}
        for key in [k for k in self._probers if k not in wanted]:
            gone = self._probers.pop(key)
            if gone.task is not None:
                gone.task.cancel()
        for key, target in wanted.items():
            prober = self._probers.get(key)
            if prober is not None and prober.target == target:
                continue
            check = target.check
            if prober is None:
                state = RiseFall(
                    check.healthy_threshold, check.unhealthy_threshold, target.initially_healthy
                )
                prober = self._probers[key] = _Prober(target, state)
            else:  # the check changed: same state, new thresholds and spec
                if prober.task is not None:
                    prober.task.cancel()
                prober.target = target
                prober.state.rise = check.healthy_threshold
                prober.state.fall = check.unhealthy_threshold
            prober.task = asyncio.get_running_loop().create_task(self._run(prober))
        used = {t.ssl for t in wanted.values()}
        for context in [c for c in self._h2_contexts if c not in used]:
            del self._h2_contexts[context]

    def healthy(self, pool: str, address: str) -> bool | None:
        """The current verdict for one upstream; None when it is not probed."""
        prober = self._probers.get((pool, address))
        return None if prober is None else prober.state.healthy

    async def close(self) -> None:
        tasks = [p.task for p in self._probers.values() if p.task is not None]
        self._probers.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self, prober: _Prober) -> None:
        check = prober.target.check
        await asyncio.sleep(random.uniform(0, check.spread))  # spread the first round
        while True:
            ok, reason = await self.probe(prober.target)
            self._record(prober, ok, reason)
            await asyncio.sleep(check.interval + random.uniform(0, check.spread))

    def _record(self, prober: _Prober, ok: bool, reason: str) -> None:
        t = prober.target
        state = prober.state
        self.sink.check_result(t.pool, t.address, ok)
        if not state.record(ok, reason):
            return
        if ok:
            log.warning(
                "upstream %s/%s is UP: %d consecutive checks passed", t.pool, t.address,
                state.rise,
            )  # fmt: skip
        else:
            log.warning(
                "upstream %s/%s is DOWN: %d consecutive checks failed (last: %s)",
                t.pool, t.address, state.fall, reason,
            )  # fmt: skip
        self.sink.health_changed(t.pool, t.address, ok, reason)

    async def probe(self, target: CheckTarget) -> tuple[bool, str]:
        """One probe: (passed, reason); the reason says what failed."""
        check = target.check
        try:
            async with asyncio.timeout(check.timeout):
                if check.type == "tcp":
                    _, writer = await _open(target, target.ssl)
                    writer.close()
                    return True, "connected"
                if check.type == "grpc":
                    return await self._grpc(target)
                if target.proxy_header is not None:
                    return await _http_after_header(target)
                return await self._http(target)
        except (OSError, TimeoutError, aiohttp.ClientError) as exc:
            return False, describe(exc, check.timeout)
        except Exception as exc:  # a probe's own bug must not end its loop
            log.debug("probe of %s/%s failed", target.pool, target.address, exc_info=True)
            return False, f"probe error: {describe(exc, check.timeout)}"

    async def _grpc(self, target: CheckTarget) -> tuple[bool, str]:
        check = target.check
        context = None
        if target.ssl is not None:
            context = self._h2_contexts.get(target.ssl)
            if context is None:
                context = self._h2_contexts[target.ssl] = client_context(target.tls)
                context.set_alpn_protocols(grpc_probe.ALPN)
        return await grpc_probe.check(
            target.host, target.port, service=check.service,
            authority=check.host or format_address(target.host, target.port),
            timeout=check.timeout, context=context, server_name=target.server_name,
            first=target.proxy_header,
        )  # fmt: skip

    async def _http(self, target: CheckTarget) -> tuple[bool, str]:
        check = target.check
        if self._session is None:
            connector = aiohttp.TCPConnector(force_close=True, limit=0)
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        scheme = "https" if target.ssl is not None else "http"
        url = f"{scheme}://{format_address(target.host, target.port)}{check.path}"
        headers = {"Host": check.host} if check.host else {}
        tls: dict[str, Any] = {}
        if target.ssl is not None:
            tls = {"ssl": target.ssl, "server_hostname": target.server_name}
        async with self._session.request(
            check.method, url, headers=headers, allow_redirects=False, **tls
        ) as response:
            status = response.status
        for low, high in check.expected_status:
            if low <= status <= high:
                return True, f"status {status}"
        return False, f"status {status}"

    def __repr__(self) -> str:
        down = sum(not p.state.healthy for p in self._probers.values())
        return f"<HealthChecker [{len(self._probers)} upstreams, {down} down]>"


async def _open(
    target: CheckTarget, context: ssl.SSLContext | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to ``target`` (TLS with ``context``), its PROXY header first."""
    host, port, first = target.host, target.port, target.proxy_header
    name = target.server_name if context is not None else None
    if first is None:
        return await asyncio.open_connection(host, port, ssl=context, server_hostname=name)
    sock = await connect_sending(asyncio.get_running_loop(), host, port, first)
    return await asyncio.open_connection(sock=sock, ssl=context, server_hostname=name)


async def _http_after_header(target: CheckTarget) -> tuple[bool, str]:
    """The HTTP probe of a pool that sends a PROXY header (aiohttp cannot write bytes
    before a request): one HTTP/1.1 request on its own connection, the status line read."""
    check = target.check
    reader, writer = await _open(target, target.ssl)
    try:
        host = check.host or format_address(target.host, target.port)
        head = f"{check.method} {check.path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        writer.write(head.encode())
        line = await reader.readline()
    finally:
        writer.close()
    parts = line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        return False, "no HTTP response" if not line else "a malformed HTTP status line"
    status = int(parts[1])
    for low, high in check.expected_status:
        if low <= status <= high:
            return True, f"status {status}"
    return False, f"status {status}"
