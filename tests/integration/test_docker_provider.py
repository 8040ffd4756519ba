"""``providers.docker`` and ``scale_from_zero`` against a real Docker engine.

One private engine for the session (``docker_engine``, ``loadtests/docker_engine.sh``);
labelled containers run the stand-in ``python:3.12-slim`` on the host network, each
answering its name on its own loopback port, with a ``HEALTHCHECK``. The proxy runs in
this process and talks to the engine's API (its unix socket, or a read-only socket
proxy on TCP).
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.config import Config
from proxy.runtime.server import ProxyServer
from tests.docker_support import Engine, ReadOnlyProxy, steady_load
from tests.support import (
    HOST,
    CertAuthority,
    proxy_url,
    start_proxy,
    unused_port,
    wait_for,
)

pytestmark = pytest.mark.timeout(180)


def docker_config(endpoint: str, pools: dict[str, Any], **docker: Any) -> Config:
    first = next(iter(pools))
    return Config.model_validate({
        "providers": {"docker": {"endpoint": endpoint, **docker}},
        "listeners": [{"name": "test", "bind": f"{HOST}:0",
                       "routes": [{"match": {"path_prefix": "/"}, "pool": first}]}],
        "pools": pools,
        "admin": {"bind": f"{HOST}:0"},
    })  # fmt: skip


@pytest.fixture
def engine(docker_engine: Engine) -> Iterator[Engine]:
    """The session's engine, with no container left from another test."""
    docker_engine.remove_all()
    yield docker_engine
    docker_engine.remove_all()


@pytest.fixture
async def servers() -> AsyncIterator[list[ProxyServer]]:
    started: list[ProxyServer] = []
    yield started
    for server in started:
        await server.shutdown(timeout=2)


def names(server: ProxyServer, pool: str) -> set[str]:
    return {u.name for u in server.pools[pool].upstreams if u.available}


async def api_pools(server: ProxyServer) -> dict[str, Any]:
    assert server.admin is not None
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{HOST}:{server.admin.port}/api/pools") as r:
            data: dict[str, Any] = await r.json()
            return {p["name"]: p for p in data["pools"]}


async def scrape(server: ProxyServer) -> str:
    assert server.admin is not None
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{HOST}:{server.admin.port}/metrics") as r:
            return await r.text()


async def test_scale_one_three_one_under_load(
    engine: Engine, servers: list[ProxyServer], caplog: pytest.LogCaptureFixture
) -> None:
    """1 -> 3 -> 1 labelled containers under a steady load: every request answered 200,
    new containers get traffic once healthy, stopped ones are drained first."""
    caplog.set_level(logging.INFO, "aiolb")
    labels = {"aiolb.enable": "true", "aiolb.pool": "web"}
    ports = [unused_port() for _ in range(3)]
    engine.run("web-1", ports[0], {**labels, "aiolb.port": str(ports[0])})
    config = docker_config(engine.endpoint, {"web": {"upstreams": []}})
    server = await start_proxy(config)
    servers.append(server)
    await wait_for(lambda: names(server, "web") == {"web-1"}, timeout=15)

    stop = asyncio.Event()
    counts: Counter[str] = Counter()
    load = asyncio.create_task(steady_load(proxy_url(server), stop, counts=counts))
    ran = time.monotonic()
    for i in (1, 2):
        await asyncio.to_thread(engine.run, f"web-{i + 1}", ports[i],
                                {**labels, "aiolb.port": str(ports[i])})  # fmt: skip
    await wait_for(lambda: names(server, "web") == {"web-1", "web-2", "web-3"}, timeout=20)
    to_traffic = time.monotonic() - ran
    pools = await api_pools(server)
    ups = {u["name"]: u for u in pools["web"]["upstreams"]}
    assert ups["web-2"]["source"] == "docker"
    assert ups["web-2"]["container"]["name"] == "web-2"
    assert len(ups["web-2"]["container"]["id"]) == 12
    await wait_for(lambda: all(u.stats.total > 0 for u in server.pools["web"].upstreams), 10)
    for name in ("web-2", "web-3"):  # docker stop under load: drained, then gone
        await asyncio.to_thread(engine.docker, "stop", name)
    await wait_for(lambda: names(server, "web") == {"web-1"}, timeout=10)
    left = counts["web-1"]  # the load keeps running on the one left
    await wait_for(lambda: counts["web-1"] >= left + 50, timeout=10)
    stop.set()
    answered, failures, bodies = await load
    assert failures == []
    assert bodies == {"web-1", "web-2", "web-3"}
    assert answered > 100
    print(f"docker run to traffic on both new containers: {to_traffic:.1f}s; "
          f"{answered} requests, 0 failed")  # fmt: skip
    assert len(server.pools["web"].upstreams) == 1


async def test_lost_events_stream_through_read_only_proxy(
    engine: Engine, servers: list[ProxyServer], caplog: pytest.LogCaptureFixture
) -> None:
    """``tcp://`` through a read-only socket proxy: membership works on GET alone; a
    cut events stream is logged and followed again, and a container started meanwhile
    is found; wake: docker needs POST, and the refusal is a clear logged error."""
    caplog.set_level(logging.INFO, "aiolb")
    socket_proxy = ReadOnlyProxy(engine.socket)
    await socket_proxy.start()
    try:
        port_a, port_b = unused_port(), unused_port()
        engine.run("ro-a", port_a, {"aiolb.enable": "true", "aiolb.pool": "ro",
                                    "aiolb.port": str(port_a)})  # fmt: skip
        config = docker_config(socket_proxy.endpoint, {
            "ro": {"upstreams": []},
            "sleepy": {"upstreams": [], "scale_from_zero": {"hold": "1s", "wake": "docker"}},
        })  # fmt: skip
        server = await start_proxy(config)
        servers.append(server)
        await wait_for(lambda: names(server, "ro") == {"ro-a"}, timeout=15)

        socket_proxy.cut()
        await wait_for(lambda: server.docker is not None and not server.docker.connected, 5)
        engine.run("ro-b", port_b, {"aiolb.enable": "true", "aiolb.pool": "ro",
                                    "aiolb.port": str(port_b)})  # fmt: skip
        await asyncio.to_thread(engine.docker, "stop", "ro-a")
        socket_proxy.resume()
        await wait_for(lambda: names(server, "ro") == {"ro-b"}, timeout=20)
        assert "docker: lost the engine" in caplog.text

        engine.run("sleepy-1", unused_port(), {"aiolb.enable": "true", "aiolb.pool": "sleepy"},
                   start=False, health=False, extra=["--expose", "80"])  # fmt: skip
        await wait_for(lambda: server.docker is not None and any(
            c.name == "sleepy-1" for c in server.docker.containers.values()), 10)  # fmt: skip
        async with aiohttp.ClientSession() as session:
            host = f"http://{HOST}:{server.listeners[0].port}/"
            async with session.get(host, headers={"Host": "x"}) as r:
                assert r.status == 200  # the ro pool still serves
        # the sleepy pool: no route names it; its hold wakes, the proxy refuses the POST
        hold = server.pools["sleepy"].scale
        assert hold is not None
        hold.wake()
        await wait_for(lambda: ("wake", "failure") in hold.actions, 10)
        assert any(r.startswith("POST /v1.30/containers/") for r in socket_proxy.refused)
        assert "wake failed" in caplog.text
        assert "read-only socket proxy? wake: docker needs POST" in caplog.text
        assert engine.state("sleepy-1") == "created"
    finally:
        await socket_proxy.stop()


async def test_https_endpoint_with_client_certificate(
    engine: Engine, servers: list[ProxyServer], ca: CertAuthority
) -> None:
    """``https://`` with ``tls: {ca, cert, key}``: the engine's API behind TLS that
    requires a client certificate (``dockerd --tlsverify``)."""
    server_side = ca.server_context(HOST)
    server_side.verify_mode = ssl.CERT_REQUIRED
    server_side.load_verify_locations(ca.cert_file)
    client = ca.issue("aiolb-client")
    socket_proxy = ReadOnlyProxy(engine.socket)
    await socket_proxy.start(server_side)
    try:
        port = unused_port()
        engine.run("tls-1", port, {"aiolb.enable": "true", "aiolb.pool": "web",
                                   "aiolb.port": str(port)}, health=False)  # fmt: skip
        tls = {"ca": ca.cert_file, "cert": client.cert, "key": client.key}
        config = docker_config(socket_proxy.endpoint, {"web": {"upstreams": []}}, tls=tls)
        server = await start_proxy(config)
        servers.append(server)
        await wait_for(lambda: names(server, "web") == {"tls-1"}, timeout=15)
    finally:
        await socket_proxy.stop()


async def test_scale_from_zero_and_idle_stop(
    engine: Engine, servers: list[ProxyServer], caplog: pytest.LogCaptureFixture
) -> None:
    """A pool whose only container is stopped: the first request is held, the
    container started, and the request answered once it is healthy; the pending gauge
    counts it meanwhile; after idle_stop with no request, aiolb stops it again."""
    caplog.set_level(logging.INFO, "aiolb")
    port = unused_port()
    engine.run("reports-1", port, {"aiolb.enable": "true", "aiolb.pool": "reports",
                                   "aiolb.port": str(port)}, start=False)  # fmt: skip
    config = docker_config(engine.endpoint, {"reports": {
        "upstreams": [],
        "scale_from_zero": {"hold": "30s", "max_pending": 5, "wake": "docker",
                            "idle_stop": "2s"},
    }})  # fmt: skip
    server = await start_proxy(config)
    servers.append(server)
    assert names(server, "reports") == set()

    async with aiohttp.ClientSession() as session:
        began = time.monotonic()
        timeout = aiohttp.ClientTimeout(40)
        first = asyncio.create_task(session.get(proxy_url(server), timeout=timeout))
        await wait_for(lambda: server.pools["reports"].held == 1, 5)
        assert 'aiolb_pending_requests{pool="reports"} 1.0' in await scrape(server)
        async with await first as r:
            body = await r.text()
        waited = time.monotonic() - began
        assert (r.status, body) == (200, "reports-1")
        print(f"first request from zero answered after {waited:.1f}s")
        metrics = await scrape(server)
        woken = 'aiolb_scale_actions_total{action="wake",pool="reports",result="success"} 1.0'
        assert woken in metrics
        assert 'aiolb_pending_requests{pool="reports"} 0.0' in metrics
        assert "pool reports: waking it (1 requests held)" in caplog.text

    await wait_for(lambda: engine.state("reports-1") == "exited", timeout=20)
    await wait_for(lambda: names(server, "reports") == set(), 5)
    metrics = await scrape(server)
    stopped = 'aiolb_scale_actions_total{action="stop",pool="reports",result="success"} 1.0'
    assert stopped in metrics
    assert "pool reports: stopped 1 containers after 2s idle" in caplog.text
    async with aiohttp.ClientSession() as session:  # asleep again: the next request wakes it
        async with session.get(proxy_url(server), timeout=aiohttp.ClientTimeout(40)) as r:
            assert (r.status, await r.text()) == (200, "reports-1")
    assert server.pools["reports"].scale_actions[("wake", "success")] == 2


async def test_label_made_pool_and_route(
    engine: Engine, servers: list[ProxyServer], tmp_path: Path
) -> None:
    """A container naming a pool the file lacks, with route labels: the pool and its
    route are added (before the file's catch-all) and serve, a reload of the file keeps
    them; once no container names it, the pool and its route go again."""
    port = unused_port()
    config = docker_config(
        engine.endpoint, {"web": {"upstreams": [{"url": f"http://{HOST}:{unused_port()}"}]}}
    )
    path = tmp_path / "aiolb.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    server = ProxyServer(config, config_path=str(path))
    await server.start()
    servers.append(server)
    labels = {"aiolb.enable": "true", "aiolb.pool": "api", "aiolb.port": str(port),
              "aiolb.route.path_prefix": "/api/"}  # fmt: skip
    engine.run("api-1", port, labels)
    await wait_for(lambda: "api" in server.pools and names(server, "api") == {"api-1"}, 20)
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy_url(server, "/api/x")) as r:
            assert (r.status, await r.text()) == (200, "api-1")
    routes = [r.pool for r in server.config.listeners[0].routes]
    assert routes == ["api", "web"]
    kept = server.pools["api"].upstreams[0]
    assert await server.reload() == []  # the file again: the label-made pool stays
    assert [r.pool for r in server.config.listeners[0].routes] == ["api", "web"]
    assert server.pools["api"].upstreams == [kept]
    await asyncio.to_thread(engine.docker, "pause", "api-1")  # paused: out, and back
    await wait_for(lambda: names(server, "api") == set(), 10)
    await asyncio.to_thread(engine.docker, "unpause", "api-1")
    await wait_for(lambda: names(server, "api") == {"api-1"}, 10)
    await asyncio.to_thread(engine.docker, "rm", "-f", "api-1")
    await wait_for(lambda: "api" not in server.pools, 10)
    assert [r.pool for r in server.config.listeners[0].routes] == ["web"]


def workers_config(endpoint: str, idle_stop: str) -> str:
    """``aiolb run`` with two workers and one ``scale_from_zero`` pool, ``sleepy``."""
    return yaml.safe_dump({
        "providers": {"docker": {"endpoint": endpoint}},
        "listeners": [{"name": "test", "bind": f"{HOST}:0", "routes": [{"pool": "sleepy"}]}],
        "pools": {"sleepy": {"upstreams": [], "scale_from_zero": {
            "hold": "30s", "wake": "docker", "idle_stop": idle_stop}}},
        "admin": {"bind": f"{HOST}:0"},
        "workers": 2,
        "shutdown_timeout": "2s",
    })  # fmt: skip


def scale_actions(text: str, action: str) -> float:
    """``aiolb_scale_actions_total`` of pool ``sleepy`` for ``action``, result success."""
    sample = f'aiolb_scale_actions_total{{action="{action}",pool="sleepy",result="success"}} '
    lines = [line for line in text.splitlines() if line.startswith(sample)]
    return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0


def upstream_conns(pids: list[int], port: int) -> dict[int, int]:
    """Open connections to ``127.0.0.1:port`` by process, among ``pids`` (``ss``)."""
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"( dport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    found = {pid: 0 for pid in pids}
    for pid in map(int, re.findall(r"pid=(\d+)", out)):
        if pid in found:
            found[pid] += 1
    return found


async def get(url: str, fresh: bool = True) -> tuple[int, str]:
    connector = aiohttp.TCPConnector(force_close=fresh)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(url, timeout=aiohttp.ClientTimeout(30)) as r:
            return r.status, await r.text()


async def test_idle_stop_with_two_workers(engine: Engine, aiolb: Any) -> None:
    """``workers: 2``: requests through both workers, then idle: the supervisor stops
    the pool's container once (one stop counted, one logged, none by a worker), and
    the next request, whichever worker takes it, wakes it again."""
    port = unused_port()
    engine.run("sleepy-1", port, {"aiolb.enable": "true", "aiolb.pool": "sleepy",
                                  "aiolb.port": str(port)}, start=False)  # fmt: skip
    proxy = await aiolb(workers_config(engine.endpoint, "1s"), workers=2)
    pids = proxy.worker_pids()
    assert len(pids) == 2
    assert await get(proxy.url) == (200, "sleepy-1")  # the first request wakes it

    async def both_served() -> bool:  # new connections until each worker has one open
        assert await get(proxy.url) == (200, "sleepy-1")  # the worker keeps its own
        return all(upstream_conns(pids, port).values())

    await wait_for(both_served, 10)
    served = time.monotonic()
    await wait_for(lambda: engine.state("sleepy-1") == "exited", 15)
    idle = time.monotonic() - served
    assert engine.docker("ps", "-q", "--filter", "name=sleepy-1") == ""
    await wait_for(lambda: proxy.logged("pool sleepy: stopped 1 containers after 1s idle"), 5)
    metrics = await proxy.metrics()
    assert scale_actions(metrics, "stop") == 1
    assert proxy.logged("docker: pool sleepy: stopping sleepy-1 (idle)") == 1  # one process
    woken = scale_actions(metrics, "wake")

    assert await get(proxy.url) == (200, "sleepy-1")  # asleep: the next request wakes it
    metrics = await proxy.metrics()
    assert scale_actions(metrics, "wake") >= woken + 1
    assert scale_actions(metrics, "stop") == 1  # not again before 1s idle from now
    print(f"two workers: stopped {idle:.1f}s after the last request; woken again")


async def test_idle_stop_waits_for_the_busy_worker(engine: Engine, aiolb: Any) -> None:
    """``workers: 2``, one keep-alive client: one worker is busy, the other sees no
    request; the supervisor asks, again and again, and does not stop the pool; once
    the client goes, it does."""
    port = unused_port()
    engine.run("busy-1", port, {"aiolb.enable": "true", "aiolb.pool": "sleepy",
                                "aiolb.port": str(port)}, start=False)  # fmt: skip
    proxy = await aiolb(workers_config(engine.endpoint, "1s"), workers=2,
                        env={"AIOLB_LOG_LEVEL": "debug"})  # fmt: skip
    declined = "pool sleepy: not idle in every worker"
    stop = asyncio.Event()
    answered = 0

    async def one_client() -> None:  # one connection: one worker
        nonlocal answered
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector) as session:
            while not stop.is_set():
                async with session.get(proxy.url, timeout=aiohttp.ClientTimeout(30)) as r:
                    assert (r.status, await r.text()) == (200, "busy-1")
                answered += 1
                await asyncio.sleep(0.05)

    client = asyncio.create_task(one_client())
    await wait_for(lambda: answered > 0 or client.done(), 20)
    conns = upstream_conns(proxy.worker_pids(), port)
    assert sorted(conns.values()) == [0, 1]  # one worker busy, the other idle
    asked = proxy.logged(declined)
    await wait_for(lambda: proxy.logged(declined) >= asked + 3 or client.done(), 10)
    assert engine.state("busy-1") == "running"
    assert scale_actions(await proxy.metrics(), "stop") == 0
    stop.set()
    await client
    await wait_for(lambda: engine.state("busy-1") == "exited", 15)
    assert scale_actions(await proxy.metrics(), "stop") == 1


async def test_engine_restart_finds_what_started_meanwhile(
    engine: Engine, servers: list[ProxyServer], caplog: pytest.LogCaptureFixture
) -> None:
    """The engine restarts (the events stream dies with it): the provider says so,
    reconnects, lists again, and finds the container the engine started again
    (``--restart always``) and one run before the provider was back. Last in this
    file: it restarts the session's engine."""
    caplog.set_level(logging.INFO, "aiolb")
    port_a, port_b = unused_port(), unused_port()
    labels = {"aiolb.enable": "true", "aiolb.pool": "web"}
    engine.run("rs-a", port_a, {**labels, "aiolb.port": str(port_a)},
               extra=["--restart", "always"])  # fmt: skip
    server = await start_proxy(docker_config(engine.endpoint, {"web": {"upstreams": []}}))
    servers.append(server)
    await wait_for(lambda: names(server, "web") == {"rs-a"}, timeout=15)
    docker = server.docker
    assert docker is not None
    await asyncio.to_thread(engine.restart)
    await asyncio.to_thread(engine.run, "rs-b", port_b, {**labels, "aiolb.port": str(port_b)})
    await wait_for(lambda: names(server, "web") == {"rs-a", "rs-b"}, timeout=30)
    assert "docker: lost the engine" in caplog.text
    async with aiohttp.ClientSession() as session:
        seen = set()
        for _ in range(6):
            async with session.get(proxy_url(server)) as r:
                assert r.status == 200
                seen.add(await r.text())
    assert seen == {"rs-a", "rs-b"}
