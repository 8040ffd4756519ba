"""Active gRPC health checks (``type: grpc``) against a real grpcio server and its
``grpc.health.v1`` servicer on 127.0.0.1: the verdict as ``/api/pools`` shows it, the
reason in the log line, over h2c and over TLS with ALPN h2.

The proxy does not forward HTTP/2 yet: these tests read the health verdict only. Times
are waited for with deadlines (``wait_for``), never slept.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from proxy.config import Config
from proxy.runtime.server import ProxyServer
from tests.admin_support import get_json
from tests.support import HOST, CertAuthority, Recorder, make_config, wait_for

MakeProxy = Callable[[Config], Awaitable[ProxyServer]]
MakeRecorder = Callable[..., Awaitable[Recorder]]

FAST_GRPC = {"type": "grpc", "service": "svc", "interval": "100ms", "timeout": "500ms",
             "healthy_threshold": 2, "unhealthy_threshold": 2}  # fmt: skip
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthServer:
    """A grpcio server (its own threads) with the standard health servicer, on a port
    that stays the same across ``stop`` and ``start``."""

    def __init__(self, credentials: grpc.ServerCredentials | None = None) -> None:
        self.credentials = credentials
        self.servicer = health.HealthServicer()
        self.port = 0
        self.server: grpc.Server | None = None

    def start(self) -> HealthServer:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)
        address = f"{HOST}:{self.port}"
        if self.credentials is None:
            self.port = server.add_insecure_port(address)
        else:
            self.port = server.add_secure_port(address, self.credentials)
        assert self.port
        server.start()
        self.server = server
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(None).wait(5)
            self.server = None

    def set(self, service: str, status: Any) -> None:
        self.servicer.set(service, status)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"


@pytest.fixture
def health_servers() -> Iterator[Callable[..., HealthServer]]:
    started: list[HealthServer] = []

    def make(credentials: grpc.ServerCredentials | None = None) -> HealthServer:
        server = HealthServer(credentials).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


async def pool_health(server: ProxyServer, pool: str = "main") -> dict[str, bool]:
    """``/api/pools``: upstream address -> healthy, for one pool."""
    status, body, _ = await get_json(server, "/api/pools")
    assert status == 200
    [found] = [p for p in body["pools"] if p["name"] == pool]
    return {u["address"]: u["healthy"] for u in found["upstreams"]}


def healthy_is(server: ProxyServer, address: str, want: bool) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return (await pool_health(server))[address] is want

    return check


def downs(caplog: pytest.LogCaptureFixture, address: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if f"{address} is DOWN" in r.getMessage()]


async def test_grpc_check_follows_the_serving_status_and_the_server(
    proxy: MakeProxy,
    health_servers: Callable[..., HealthServer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SERVING is healthy; NOT_SERVING, SERVICE_UNKNOWN and a stopped server go down
    within the thresholds, each with its reason; SERVING again comes back."""
    caplog.set_level(logging.INFO, "aiolb")
    grpc_up = health_servers()
    grpc_up.set("svc", SERVING)
    address = grpc_up.address
    server = await proxy(make_config([f"http://{address}"], pool={
        "http_version": "2", "health_check": {"active": FAST_GRPC}}))  # fmt: skip
    upstream = server.pools["main"].upstreams[0]
    await wait_for(lambda: upstream.health_checks.get("success", 0) >= 2)
    assert await pool_health(server) == {address: True}

    for status, reason in [(NOT_SERVING, "NOT_SERVING"), (SERVICE_UNKNOWN, "SERVICE_UNKNOWN")]:
        grpc_up.set("svc", status)
        await wait_for(healthy_is(server, address, False))
        assert downs(caplog, address)[-1].endswith(f"checks failed (last: {reason})")
        grpc_up.set("svc", SERVING)
        await wait_for(healthy_is(server, address, True))

    grpc_up.stop()
    await wait_for(healthy_is(server, address, False))
    assert downs(caplog, address)[-1].endswith("(last: connection refused)")
    grpc_up.start()  # the same port, serving again
    grpc_up.set("svc", SERVING)
    await wait_for(healthy_is(server, address, True))
    assert len(downs(caplog, address)) == 3


async def test_a_service_the_server_does_not_know_is_unhealthy(
    proxy: MakeProxy,
    health_servers: Callable[..., HealthServer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two pools probe one server: the service it serves passes, another name fails with
    the status grpcio's servicer answers (NOT_FOUND), and ``service: ""`` asks about the
    server as a whole."""
    caplog.set_level(logging.INFO, "aiolb")
    grpc_up = health_servers()
    grpc_up.set("svc", SERVING)
    url = f"http://{grpc_up.address}"
    server = await proxy(make_config([url], pool={"health_check": {"active": FAST_GRPC}},
        pools={"other": {"upstreams": [{"url": url}], "health_check": {
                   "active": {**FAST_GRPC, "service": "not.Known"}}},
               "whole": {"upstreams": [{"url": url}], "health_check": {
                   "active": {**FAST_GRPC, "service": ""}}}}))  # fmt: skip
    other = server.pools["other"].upstreams[0]
    await wait_for(lambda: not other.healthy)
    assert downs(caplog, f"other/{grpc_up.address}") == [
        f"upstream other/{grpc_up.address} is DOWN: 2 consecutive checks failed "
        "(last: grpc-status 5 NOT_FOUND)"
    ]
    main, whole = server.pools["main"].upstreams[0], server.pools["whole"].upstreams[0]
    await wait_for(lambda: main.health_checks.get("success", 0) >= 2)
    await wait_for(lambda: whole.health_checks.get("success", 0) >= 2)
    assert main.healthy and whole.healthy and not main.health_checks.get("failure")


async def test_grpc_check_over_tls_offers_h2_and_verifies_the_certificate(
    proxy: MakeProxy,
    health_servers: Callable[..., HealthServer],
    ca: CertAuthority,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An https:// upstream is probed over TLS with ALPN h2 (grpcio refuses a handshake
    without it), though the pool's own context offers http/1.1; a certificate from
    another CA fails the check with the verifier's reason."""
    caplog.set_level(logging.INFO, "aiolb")
    leaf = ca.ca.issue_cert(HOST)
    credentials = grpc.ssl_server_credentials(
        [(leaf.private_key_pem.bytes(), b"".join(p.bytes() for p in leaf.cert_chain_pems))]
    )
    grpc_up = health_servers(credentials)
    grpc_up.set("svc", SERVING)
    url = f"https://{grpc_up.address}"
    stranger = CertAuthority(ca.folder, "stranger")
    server = await proxy(make_config([url], pool={
            "tls": {"ca": ca.cert_file}, "health_check": {"active": FAST_GRPC}},
        pools={"strangers": {"upstreams": [{"url": url}], "tls": {"ca": stranger.cert_file},
                             "health_check": {"active": FAST_GRPC}}}))  # fmt: skip
    trusted, untrusted = server.pools["main"].upstreams[0], server.pools["strangers"].upstreams[0]
    await wait_for(lambda: trusted.health_checks.get("success", 0) >= 2)
    await wait_for(lambda: not untrusted.healthy)
    assert trusted.healthy and not trusted.health_checks.get("failure")
    [down] = downs(caplog, f"strangers/{grpc_up.address}")
    assert "(last: certificate verify failed: " in down
    grpc_up.set("svc", NOT_SERVING)
    await wait_for(lambda: not trusted.healthy)


@pytest.fixture
async def silent_server() -> AsyncIterator[int]:
    """A port that accepts and reads, and never answers."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    listener = await asyncio.start_server(hold, HOST, 0)
    yield listener.sockets[0].getsockname()[1]
    listener.close()
    await listener.wait_closed()


async def test_an_http1_server_and_a_silent_one_fail_with_their_reasons(
    proxy: MakeProxy,
    recorders: MakeRecorder,
    silent_server: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "aiolb")
    web = await recorders("web")
    silent = f"{HOST}:{silent_server}"
    check = {**FAST_GRPC, "timeout": "200ms"}
    server = await proxy(make_config([web.url, f"http://{silent}"], pool={
        "health_check": {"active": check}}))  # fmt: skip
    await wait_for(lambda: not any(u.healthy for u in server.pools["main"].upstreams))
    [http1] = downs(caplog, web.url.removeprefix("http://"))
    assert http1.endswith("(last: not HTTP/2: the upstream answered HTTP/1.x)"), http1
    [timeout] = downs(caplog, silent)
    assert timeout.endswith("(last: timeout after 0.2s)"), timeout
