"""``scale_from_zero`` without Docker: requests held while a pool has no available
upstream, released when one becomes available, bounded by ``hold`` and
``max_pending``; a webhook wake. Real proxy and upstreams on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from proxy.config import Config
from proxy.runtime.server import ProxyServer
from tests.support import HOST, Recorder, make_config, proxy_url, unused_port, wait_for

MakeProxy = Callable[[Config], Awaitable[ProxyServer]]
MakeRecorder = Callable[..., Awaitable[Recorder]]


async def admin(server: ProxyServer, method: str, path: str) -> Any:
    assert server.admin is not None
    async with aiohttp.ClientSession() as session:
        url = f"http://{HOST}:{server.admin.port}{path}"
        async with session.request(method, url, headers={"X-Aiolb-Admin": "1"}) as r:
            assert r.status == 200, await r.text()
            return await r.json() if r.content_type == "application/json" else await r.text()


async def drain(server: ProxyServer, rec: Recorder, action: str = "drain") -> None:
    await admin(server, "POST", f"/api/pools/main/upstreams/{HOST}:{rec.port}/{action}")


async def get(url: str, timeout: float = 20) -> tuple[int, str, float]:
    began = time.monotonic()
    async with aiohttp.ClientSession() as session:
        async with session.get(url, timeout=aiohttp.ClientTimeout(timeout)) as r:
            return r.status, await r.text(), time.monotonic() - began


async def test_held_requests_go_once_an_upstream_is_back(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    rec = await recorders("a")
    server = await proxy(make_config([rec.url], pool={"scale_from_zero": {"hold": "10s"}}))
    await drain(server, rec)
    calls = [asyncio.create_task(get(proxy_url(server, f"/{i}"))) for i in range(3)]
    await wait_for(lambda: server.pools["main"].held == 3)
    metrics = await admin(server, "GET", "/metrics")
    assert 'aiolb_pending_requests{pool="main"} 3.0' in metrics
    pools = await admin(server, "GET", "/api/pools")
    assert pools["pools"][0]["held"] == 3
    assert rec.seen == []
    await drain(server, rec, "enable")
    answers = await asyncio.gather(*calls)
    assert [(status, body) for status, body, _ in answers] == [(200, "a")] * 3
    assert sorted(s.path for s in rec.seen) == ["/0", "/1", "/2"]
    assert server.pools["main"].held == 0


async def test_hold_runs_out_and_max_pending_refuses_at_once(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    rec = await recorders("a")
    spec = {"hold": "500ms", "max_pending": 1}
    server = await proxy(make_config([rec.url], pool={"scale_from_zero": spec}))
    await drain(server, rec)
    first = asyncio.create_task(get(proxy_url(server)))
    await wait_for(lambda: server.pools["main"].held == 1)
    status, _, waited = await get(proxy_url(server))
    assert status == 503 and waited < 0.4  # beyond max_pending: at once
    status, _, waited = await first
    assert status == 503 and 0.4 <= waited < 3  # the hold ran out
    metrics = await admin(server, "GET", "/metrics")
    assert 'aiolb_scale_actions_total{action="hold",pool="main",result="overflow"} 1.0' in metrics
    assert 'aiolb_pending_requests{pool="main"} 0.0' in metrics


async def test_a_client_that_leaves_is_no_longer_held(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    rec = await recorders("a")
    server = await proxy(make_config([rec.url], pool={"scale_from_zero": {"hold": "10s"}}))
    await drain(server, rec)
    _, writer = await asyncio.open_connection(HOST, server.listeners[0].port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await wait_for(lambda: server.pools["main"].held == 1)
    writer.close()
    await wait_for(lambda: server.pools["main"].held == 0)
    await drain(server, rec, "enable")
    status, body, _ = await get(proxy_url(server, "/after"))
    assert (status, body) == (200, "a")
    assert [s.path for s in rec.seen] == ["/after"]


async def test_the_first_upstream_whose_health_check_passes_answers(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    """An upstream that is not up yet (connection refused, active checks failing): the
    request waits, and goes to it once its checks pass; a webhook was told."""
    hook_calls: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.StreamResponse:
        hook_calls.append(json.loads(await request.read()))
        return web.json_response({})

    scaler = await recorders("scaler", {"/wake": hook})
    port = unused_port()
    pool = {
        "health_check": {"active": {"path": "/", "interval": "200ms", "timeout": "200ms",
                                    "healthy_threshold": 1, "initial_state": "unhealthy"}},
        "scale_from_zero": {"hold": "20s", "wake": {"webhook": f"{scaler.url}/wake"}},
    }  # fmt: skip
    server = await proxy(make_config([f"http://{HOST}:{port}"], pool=pool))
    held = asyncio.create_task(get(proxy_url(server)))
    await wait_for(lambda: hook_calls == [{"pool": "main", "pending": 1}])

    async def answer(request: web.Request) -> web.StreamResponse:
        return web.Response(text="late")

    late = web.Application()
    late.router.add_get("/", answer)
    runner = web.AppRunner(late)
    await runner.setup()
    try:
        await web.TCPSite(runner, HOST, port).start()
        status, body, _ = await held
        assert (status, body) == (200, "late")
        metrics = await admin(server, "GET", "/metrics")
        woken = 'aiolb_scale_actions_total{action="wake",pool="main",result="success"} 1.0'
        assert woken in metrics
    finally:
        await runner.cleanup()


async def test_a_pool_without_scale_from_zero_answers_503_at_once(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    rec = await recorders("a")
    server = await proxy(make_config([rec.url]))
    await drain(server, rec)
    status, _, waited = await get(proxy_url(server))
    assert status == 503 and waited < 1


async def test_a_held_request_keeps_its_body(proxy: MakeProxy, recorders: MakeRecorder) -> None:
    """A POST held while the pool is empty: its body arrives meanwhile and reaches the
    upstream whole once one is back (small: buffered; large: streamed after a pause)."""
    bodies: list[bytes] = []

    async def echo(request: web.Request) -> web.StreamResponse:
        bodies.append(await request.read())
        return web.Response(text=str(len(bodies[-1])))

    rec = await recorders("a", {"/echo": echo})
    server = await proxy(make_config([rec.url], pool={"scale_from_zero": {"hold": "10s"}}))
    await drain(server, rec)
    small, large = b"x" * 1000, bytes(range(256)) * 4096  # 1 KB and 1 MiB
    async with aiohttp.ClientSession() as session:
        calls = [
            asyncio.create_task(session.post(proxy_url(server, "/echo"), data=body))
            for body in (small, large)
        ]
        await wait_for(lambda: server.pools["main"].held == 2)
        await drain(server, rec, "enable")
        for call, body in zip(calls, (small, large), strict=True):
            async with await call as r:
                assert (r.status, await r.text()) == (200, str(len(body)))
    assert sorted(bodies, key=len) == [small, large]
