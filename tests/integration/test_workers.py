"""``aiolb run`` as real processes: several workers behind a supervisor, and the
lifecycle (SIGTERM under load, SIGHUP reloads, a worker killed with SIGKILL).

Every test starts ``python -m proxy run`` on a config file and talks to it over
127.0.0.1 like a user would: requests to the listener, the admin API, signals.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.support import HOST, CertAuthority, Recorder, raw_exchange, wait_for

MakeRecorder = Callable[..., Awaitable[Recorder]]


def config_text(urls: list[str], workers: int, extra_pool: str = "", top: str = "") -> str:
    ups = "\n".join(f'      - url: "{u}"' for u in urls)
    return f"""\
listeners:
  - name: test
    bind: "127.0.0.1:0"
    routes: [{{pool: main}}]
pools:
  main:
    upstreams:
{ups}
{extra_pool}
admin: {{bind: "127.0.0.1:0"}}
workers: {workers}
shutdown_timeout: 10s
{top}"""


def metric(text: str, name: str) -> float:
    """The sum of every sample of ``name`` in Prometheus text."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))  # fmt: skip


class Load:
    """Clients sending GETs until stopped, half of them on a new connection each time
    (so that connections spread over the workers)."""

    def __init__(self, url: str, clients: int = 8) -> None:
        self.url = url
        self.clients = clients
        self.ok: Counter[str] = Counter()
        self.order: list[str] = []  # who answered, in order
        self.failures: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _client(self, fresh: bool) -> None:
        connector = aiohttp.TCPConnector(force_close=fresh)
        async with aiohttp.ClientSession(connector=connector) as session:
            while not self._stop.is_set():
                try:
                    async with session.get(self.url) as resp:
                        text = await resp.text()
                        if resp.status == 200:
                            self.ok[text] += 1
                            self.order.append(text)
                        else:
                            self.failures.append(f"{resp.status} {text[:80]}")
                except aiohttp.ClientError as exc:
                    self.failures.append(repr(exc))

    def start(self) -> Load:
        self._tasks = [asyncio.ensure_future(self._client(i % 2 == 0))
                       for i in range(self.clients)]  # fmt: skip
        return self

    @property
    def total(self) -> int:
        return self.ok.total()

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def test_workers_share_the_listener_and_metrics_total_them(
    aiolb: Any, recorders: MakeRecorder
) -> None:
    a = await recorders("a")
    proxy = await aiolb(config_text([a.url], workers=3), workers=3)
    assert len(proxy.worker_pids()) == 3
    load = Load(proxy.url).start()
    await wait_for(lambda: load.total >= 300, 20.0)
    await load.stop()
    assert load.failures == []
    text = await proxy.metrics()
    assert metric(text, "aiolb_requests_total") == load.total == len(a.seen)
    assert metric(text, "aiolb_request_duration_seconds_count") == load.total
    peers = {s.peer_port for s in a.seen}
    assert len(peers) >= 3  # connections from several workers' pools
    assert await proxy.stop() == 0


async def test_health_is_checked_once_and_every_worker_follows_it(
    aiolb: Any, recorders: MakeRecorder
) -> None:
    status = {"code": 200}

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(status=status["code"])

    a = await recorders("a")
    b = await recorders("b", {"/healthz": healthz})
    pool = ("    health_check: {active: {path: /healthz, interval: 100ms, timeout: 500ms, "
            "healthy_threshold: 1, unhealthy_threshold: 1}}")  # fmt: skip
    proxy = await aiolb(config_text([a.url, b.url], workers=3, extra_pool=pool), workers=3)
    def probes() -> int:
        return sum(s.path == "/healthz" for s in b.seen)

    loop = asyncio.get_running_loop()
    start, started = probes(), loop.time()
    await wait_for(lambda: probes() >= start + 10, 10.0)
    took = loop.time() - started
    assert took >= 0.8  # ~10 probes per second: once for the proxy, not once per worker

    load = Load(proxy.url).start()
    await wait_for(lambda: load.ok["b"] >= 20, 10.0)  # every worker sends to b
    status["code"] = 503
    await wait_for(lambda: proxy.logged("is DOWN") == 1, 5.0)
    # within about a second every worker has heard: then b gets nothing
    await wait_for(lambda: len(load.order) > 300 and "b" not in load.order[-300:], 10.0)
    await load.stop()
    assert load.failures == []
    assert await proxy.stop() == 0


async def test_a_killed_worker_is_replaced_and_service_continues(
    aiolb: Any, recorders: MakeRecorder
) -> None:
    a = await recorders("a")
    proxy = await aiolb(config_text([a.url], workers=2), workers=2)
    load = Load(proxy.url).start()
    await wait_for(lambda: load.total >= 100, 20.0)
    victim = proxy.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    await wait_for(lambda: proxy.logged("exited unexpectedly (killed by SIGKILL)") == 1, 10.0)
    await wait_for(lambda: len(proxy.worker_pids()) == 2 and victim not in proxy.worker_pids(),
                   10.0)  # fmt: skip
    await wait_for(lambda: proxy.logged("serving") >= 3 + 1, 10.0)  # the new one serves
    during = len(load.failures)  # connections queued on the killed worker are reset
    after = load.total
    await wait_for(lambda: load.total >= after + 300, 20.0)
    await load.stop()
    assert load.failures[during:] == []  # no lasting errors
    assert during <= 16
    assert await proxy.stop() == 0


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_under_load_completes_every_started_request(
    aiolb: Any, recorders: MakeRecorder, workers: int
) -> None:
    gate = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await gate.wait()  # in flight until the proxy is shutting down
        return web.Response(text="slow")

    a = await recorders("a", {"/": slow})
    proxy = await aiolb(config_text([a.url], workers=workers), workers=workers)
    async with aiohttp.ClientSession() as session:

        async def one() -> tuple[int, str]:
            async with session.get(proxy.url) as resp:
                return resp.status, await resp.text()

        requests = [asyncio.ensure_future(one()) for _ in range(20)]
        await wait_for(lambda: len(a.seen) == 20, 10.0)  # all started
        assert proxy.proc is not None
        proxy.proc.send_signal(signal.SIGTERM)
        await wait_for(lambda: proxy.logged("shutting down") >= 1, 10.0)
        gate.set()
        results = await asyncio.gather(*requests)
    assert results == [(200, "slow")] * 20
    assert await proxy.stop() == 0


@pytest.mark.parametrize("workers", [1, 2])
async def test_reload_under_load_fails_nothing_and_a_broken_file_changes_nothing(
    aiolb: Any, recorders: MakeRecorder, workers: int
) -> None:
    a, b = await recorders("a"), await recorders("b")
    proxy = await aiolb(config_text([a.url], workers=workers), workers=workers)
    load = Load(proxy.url).start()
    await wait_for(lambda: load.total >= 100, 20.0)
    assert proxy.proc is not None
    proxy.path.write_text(config_text([a.url, b.url], workers=workers))
    proxy.proc.send_signal(signal.SIGHUP)
    await wait_for(lambda: load.ok["b"] >= 50, 20.0)

    proxy.path.write_text("pools: {main: {upstreams: [{url: nope}]}}\n")
    proxy.proc.send_signal(signal.SIGHUP)
    await wait_for(lambda: proxy.logged("reload failed; the running config stays") == 1, 10.0)
    seen = load.ok.copy()
    await wait_for(lambda: load.ok["a"] > seen["a"] + 50 and load.ok["b"] > seen["b"] + 50)
    await load.stop()
    assert load.failures == []
    text = await proxy.metrics()
    assert 'aiolb_config_reloads_total{result="success"} 1.0' in text
    assert 'aiolb_config_reloads_total{result="failure"} 1.0' in text
    assert proxy.logged("aiolb.yaml:1: ") >= 1  # FILE:LINE of the broken file
    assert await proxy.stop() == 0


async def test_tls_and_tunnels_with_workers_are_summed_by_the_supervisor(
    aiolb: Any, ca: CertAuthority
) -> None:
    from websockets.asyncio.client import connect
    from websockets.asyncio.server import serve

    async def echo(ws: Any) -> None:
        async for message in ws:
            await ws.send(message)

    upstream = await serve(echo, HOST, 0)
    port = next(iter(upstream.sockets)).getsockname()[1]
    cert = ca.issue("ws.test")
    tls = f"    tls: {{certificates: [{{cert: {cert.cert}, key: {cert.key}}}]}}\n"
    text = config_text([f"http://{HOST}:{port}"], workers=2).replace(
        "    routes: [{pool: main}]\n", "    routes: [{pool: main}]\n" + tls
    )
    try:
        proxy = await aiolb(text, workers=2)
        sockets = []
        for _ in range(6):  # new connections: the kernel spreads them over both workers
            sockets.append(await connect(f"wss://ws.test:{proxy.port}/", ssl=ca.client_context(),
                                         host=HOST, port=proxy.port))  # fmt: skip
            await sockets[-1].send("hi")
            assert await sockets[-1].recv() == "hi"
        assert await raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == b""

        async def summed() -> bool:  # the supervisor's sums follow the workers' counters
            text = await proxy.metrics()
            return (metric(text, "aiolb_tunnels_active") == 6
                    and metric(text, "aiolb_tls_handshake_errors_total") == 1)  # fmt: skip

        await wait_for(summed, 10.0)
        assert 'reason="plaintext"' in await proxy.metrics()
        for ws in sockets:
            await ws.close()
        assert await proxy.stop() == 0
    finally:
        upstream.close()
        await upstream.wait_closed()
