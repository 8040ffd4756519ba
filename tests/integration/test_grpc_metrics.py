"""The gRPC status of a call as operators see it (issue 25): the access log's
``grpc_status`` field and ``aiolb_grpc_responses_total{pool, grpc_status}``, for calls a
real grpcio server answered, the proxy answered for the pool, and no route took; an
HTTP/1.1 request beside them adds neither."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import grpc.aio

from proxy.config import Config
from proxy.runtime.server import ProxyServer
from tests.admin_support import samples, scrape
from tests.grpc_support import SERVICE, GrpcServer
from tests.support import HOST, make_config, wait_for

MakeProxy = Callable[[Config], Awaitable[ProxyServer]]
FIELDS = ["method", "path", "status", "pool", "grpc_status"]


def logged_config(url: str, log: Path) -> Config:
    """The main pool over HTTP/2 for ``/t.Echo/`` calls, nothing else routed, an h2c
    listener, and an access log file of ``FIELDS``."""
    config = make_config(
        [url], pool={"http_version": "2"}, listener={"protocols": ["http/1.1", "h2c"]},
        routes=[{"match": {"path_prefix": f"/{SERVICE}/"}, "pool": "main"}],
    )  # fmt: skip
    access_log = {"path": str(log), "format": FIELDS}
    return Config.model_validate({**config.model_dump(), "access_log": access_log})


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def logged(path: Path, count: int) -> list[dict[str, Any]]:
    """The first ``count`` lines, once written (after their exchanges were counted)."""
    await wait_for(lambda: len(lines(path)) >= count)
    return lines(path)[:count]


async def grpc_counts(server: ProxyServer) -> dict[tuple[str, str], int]:
    """``aiolb_grpc_responses_total`` as (pool, grpc_status) -> count."""
    found = samples(await scrape(server), "aiolb_grpc_responses_total")
    return {(dict(k)["pool"], dict(k)["grpc_status"]): int(v) for k, v in found.items()}


async def call(ch: grpc.aio.Channel, name: str, message: bytes) -> grpc.StatusCode:
    try:
        await ch.unary_unary(f"/{SERVICE}/{name}")(message, timeout=5)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_each_call_is_logged_and_counted_by_its_status(
    proxy: MakeProxy, servers: Callable[[str], GrpcServer], channel: Any, tmp_path: Path
) -> None:
    a = servers("a")
    log = tmp_path / "access.log"
    server = await proxy(logged_config(a.url, log))
    ch = channel(server)

    assert await call(ch, "Unary", b"hi") == grpc.StatusCode.OK
    assert await call(ch, "Fail", b"x") == grpc.StatusCode.INVALID_ARGUMENT
    a.stop()  # the proxy answers for the pool: no connection to the upstream
    assert await call(ch, "Unary", b"hi") == grpc.StatusCode.UNAVAILABLE
    # no route: the proxy's 404 as UNIMPLEMENTED, logged, but counted on no pool
    missing = await ch.unary_unary("/other.Service/Call")(b"", timeout=5).code()
    assert missing == grpc.StatusCode.UNIMPLEMENTED

    got = [(line["path"], line["pool"], line["grpc_status"]) for line in await logged(log, 4)]
    assert got == [
        (f"/{SERVICE}/Unary", "main", 0), (f"/{SERVICE}/Fail", "main", 3),
        (f"/{SERVICE}/Unary", "main", 14), ("/other.Service/Call", "", 12),
    ]  # fmt: skip
    assert await grpc_counts(server) == {
        ("main", "OK"): 1, ("main", "INVALID_ARGUMENT"): 1, ("main", "UNAVAILABLE"): 1,
    }  # fmt: skip


async def test_an_http1_request_logs_no_grpc_status_and_counts_nothing(
    proxy: MakeProxy, servers: Callable[[str], GrpcServer], channel: Any, tmp_path: Path
) -> None:
    a = servers("a")
    log = tmp_path / "access.log"
    server = await proxy(logged_config(a.url, log))
    assert await call(channel(server), "Unary", b"hi") == grpc.StatusCode.OK
    before = await grpc_counts(server)
    assert before == {("main", "OK"): 1}

    # HTTP/1.1 to the same route (its HTTP/2 upstream answers what it makes of it)
    # and to none (a 404): neither is a gRPC call
    url = f"http://{HOST}:{server.listeners[0].port}"
    async with aiohttp.ClientSession() as session:
        for path in (f"/{SERVICE}/Unary", "/nowhere"):
            async with session.get(url + path) as resp:
                await resp.read()

    first, routed, unrouted = await logged(log, 3)
    assert first["grpc_status"] == 0
    assert (routed["method"], routed["pool"], routed["grpc_status"]) == ("GET", "main", None)
    assert (unrouted["status"], unrouted["grpc_status"]) == (404, None)
    assert await grpc_counts(server) == before
