"""Reload through ``POST /api/reload`` and SIGHUP: applied atomically, or not at all.

A reload that applies keeps listeners that did not move (and their connections),
keeps upstreams that stay (same objects: counters, drain, idle connections), lets
requests in flight finish, starts new listeners and drains removed ones. A reload
that fails changes nothing and says why with ``FILE:LINE``.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.config import load_config
from proxy.runtime.server import ProxyServer
from tests.admin_support import get_json, request_counts, samples, scrape, send
from tests.support import HOST, Recorder, proxy_url, wait_for

REPO = Path(__file__).resolve().parents[2]

MakeProxy = Callable[..., Awaitable[ProxyServer]]
MakeRecorder = Callable[..., Awaitable[Recorder]]


def yaml_config(
    upstreams: list[str], *, extra_listener: bool = False, weight: int = 1, port: int = 0
) -> str:
    """A config file's text: listener ``test`` (and ``extra``) in front of pool ``main``."""
    lines = [
        "listeners:",
        "  - name: test",
        f'    bind: "{HOST}:{port}"',
        "    routes: [{pool: main}]",
    ]
    if extra_listener:
        lines += ["  - name: extra", f'    bind: "{HOST}:0"', "    routes: [{pool: main}]"]
    lines += ["pools:", "  main:", "    upstreams:"]
    lines += [f'      - url: "{url}"\n        weight: {weight}' for url in upstreams]
    lines += ["admin:", f'  bind: "{HOST}:0"', ""]
    return "\n".join(lines)


async def start_from_file(proxy: MakeProxy, path: Path, text: str) -> ProxyServer:
    path.write_text(text)
    server = await proxy(load_config(path))
    server.config_path = str(path)
    return server


async def reload(server: ProxyServer) -> tuple[int, Any]:
    status, body, _ = await get_json(server, "/api/reload", "POST")
    return status, body


async def names(
    server: ProxyServer, n: int, path: str = "/x", port: int | None = None
) -> list[str]:
    """``n`` requests on a fresh connection each; which upstream answered."""
    url = proxy_url(server, path) if port is None else f"http://{HOST}:{port}{path}"
    out = []
    for _ in range(n):
        async with aiohttp.ClientSession() as session:
            status, text = await send(session, "GET", url)
            assert status == 200
            out.append(text)
    return out


async def test_reload_applies_a_changed_pool(
    recorders: MakeRecorder, proxy: MakeProxy, tmp_path: Path
) -> None:
    a, b = await recorders("a"), await recorders("b")
    path = tmp_path / "aiolb.yaml"
    server = await start_from_file(proxy, path, yaml_config([a.url]))
    port, old_a = server.listeners[0].port, server.pools["main"].upstreams[0]
    async with aiohttp.ClientSession() as keep_alive:
        assert [await send(keep_alive, "GET", proxy_url(server, "/x")) for _ in range(3)] == [
            (200, "a")] * 3  # fmt: skip
        path.write_text(yaml_config([a.url, b.url], weight=2))
        assert await reload(server) == (200, {"applied": True, "errors": [], "changes": [
            f"pool main: upstream {HOST}:{b.port} added, upstream {HOST}:{a.port} changed"]})
        assert server.listeners[0].port == port  # the same socket kept serving
        new_a = server.pools["main"].upstreams[0]
        assert new_a is old_a and new_a.weight == 2 and new_a.stats.total == 3
        assert sorted(await names(server, 4)) == ["a", "a", "b", "b"]
        # an existing keep-alive connection uses the new routes at once
        answers = [(await send(keep_alive, "GET", proxy_url(server, "/x")))[1] for _ in range(4)]
        assert sorted(answers) == ["a", "a", "b", "b"]
    text = await scrape(server)
    assert samples(text, "aiolb_config_reloads_total")[(("result", "success"),)] == 1
    counts = request_counts(text)
    assert counts[("test", "main", f"{HOST}:{a.port}", "GET", "200")] == 7  # monotonic
    assert counts[("test", "main", f"{HOST}:{b.port}", "GET", "200")] == 4


async def test_a_broken_file_changes_nothing(
    recorders: MakeRecorder, proxy: MakeProxy, tmp_path: Path
) -> None:
    a = await recorders("a")
    path = tmp_path / "aiolb.yaml"
    server = await start_from_file(proxy, path, yaml_config([a.url]))
    config, pools = server.config, server.pools
    path.write_text(yaml_config([a.url, "http://127.0.0.1:1"], weight=0))
    status, body = await reload(server)
    assert status == 400 and body["applied"] is False
    assert any(re.match(rf"{re.escape(str(path))}:\d+: .*weight: must be >= 1", e)
               for e in body["errors"]), body  # fmt: skip
    assert server.config is config and server.pools is pools
    assert await names(server, 2) == ["a", "a"]
    path.write_text("listeners: [\n")
    status, body = await reload(server)
    assert status == 400 and body["errors"][0].startswith(f"{path}:")
    text = await scrape(server)
    reloads = samples(text, "aiolb_config_reloads_total")
    assert reloads == {(("result", "success"),): 0.0, (("result", "failure"),): 2.0}


async def test_a_reload_refuses_what_check_refuses(
    recorders: MakeRecorder, proxy: MakeProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The preflight runs on reloads too: a file ``aiolb check`` refuses is not applied."""
    monkeypatch.delenv("AIOLB_ADMIN_TOKEN", raising=False)
    a = await recorders("a")
    path = tmp_path / "aiolb.yaml"
    server = await start_from_file(proxy, path, yaml_config([a.url]))
    public = 'admin:\n  bind: "0.0.0.0:0"'
    text = yaml_config([a.url]).replace(f'admin:\n  bind: "{HOST}:0"', public)
    path.write_text(text + f"access_log: {{path: {tmp_path}/no/such/dir/log}}\n")
    status, body = await reload(server)
    assert status == 400 and body["applied"] is False
    assert body["errors"] == [
        f"{path}:11: admin.bind: 0.0.0.0:0 is not a loopback address and no token is set: "
        "set admin.token or AIOLB_ADMIN_TOKEN, or bind the admin to 127.0.0.1",
        f"{path}:12: access_log.path: cannot create {tmp_path}/no/such/dir/log: directory "
        f"{tmp_path}/no/such/dir does not exist",
    ]


async def test_drain_and_counters_survive_a_reload(
    recorders: MakeRecorder, proxy: MakeProxy, tmp_path: Path
) -> None:
    a, b, c = await recorders("a"), await recorders("b"), await recorders("c")
    path = tmp_path / "aiolb.yaml"
    server = await start_from_file(proxy, path, yaml_config([a.url, b.url]))
    status, _, _ = await get_json(server, f"/api/pools/main/upstreams/{HOST}:{a.port}/drain",
                                  "POST")  # fmt: skip
    assert status == 200
    path.write_text(yaml_config([a.url, b.url, c.url]))
    assert (await reload(server))[0] == 200
    status, body, _ = await get_json(server, "/api/pools")
    states = {u["address"]: u["drained"] for u in body["pools"][0]["upstreams"]}
    assert states == {f"{HOST}:{a.port}": True, f"{HOST}:{b.port}": False,
                      f"{HOST}:{c.port}": False}  # fmt: skip
    assert sorted(set(await names(server, 6))) == ["b", "c"]


async def test_in_flight_requests_finish_on_a_removed_upstream(
    recorders: MakeRecorder, proxy: MakeProxy, tmp_path: Path
) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="a-slow")

    a, b = await recorders("a", {"/slow": slow}), await recorders("b")
    path = tmp_path / "aiolb.yaml"
    server = await start_from_file(proxy, path, yaml_config([a.url]))
    old_a = server.pools["main"].upstreams[0]
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(send(session, "GET", proxy_url(server, "/slow")))
        await wait_for(lambda: len(a.seen) == 1)
        path.write_text(yaml_config([b.url]))
        assert (await reload(server))[0] == 200
        assert await names(server, 2) == ["b", "b"]
        release.set()
        assert await task == (200, "a-slow")
    await wait_for(lambda: old_a.active == 0)
    assert not old_a.idle  # the removed upstream's connection was closed, not pooled


async def test_listeners_are_added_and_removed(
    recorders: MakeRecorder, proxy: MakeProxy, tmp_path: Path
) -> None:
    a = await recorders("a")
    path = tmp_path / "aiolb.yaml"
    server = await start_from_file(proxy, path, yaml_config([a.url]))
    first = server.listeners[0]
    path.write_text(yaml_config([a.url], extra_listener=True))
    assert (await reload(server))[0] == 200
    assert [lst.name for lst in server.listeners] == ["test", "extra"]
    assert server.listeners[0] is first
    extra_port = server.listeners[1].port
    assert await names(server, 1, port=extra_port) == ["a"]
    path.write_text(yaml_config([a.url]))
    assert (await reload(server))[0] == 200
    assert server.listeners == [first]
    try:
        _, writer = await asyncio.open_connection(HOST, extra_port)
    except OSError:
        pass  # refused: the removed listener no longer accepts
    else:
        writer.close()
        raise AssertionError("the removed listener still accepts connections")
    assert await names(server, 1) == ["a"]


async def test_a_busy_port_fails_the_reload_cleanly(
    recorders: MakeRecorder, proxy: MakeProxy, tmp_path: Path
) -> None:
    a = await recorders("a")
    path = tmp_path / "aiolb.yaml"
    server = await start_from_file(proxy, path, yaml_config([a.url]))
    busy = await asyncio.start_server(lambda r, w: None, HOST, 0)
    try:
        busy_port = busy.sockets[0].getsockname()[1]
        path.write_text(yaml_config([a.url], port=busy_port))
        status, body = await reload(server)
        assert status == 400 and "cannot bind" in body["errors"][0]
        assert len(server.listeners) == 1 and await names(server, 1) == ["a"]
    finally:
        busy.close()
        await busy.wait_closed()


async def test_sighup_reloads_a_running_aiolb(recorders: MakeRecorder, tmp_path: Path) -> None:
    a, b = await recorders("a"), await recorders("b")
    path = tmp_path / "aiolb.yaml"
    path.write_text(yaml_config([a.url]))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "-c", str(path),
        stderr=asyncio.subprocess.PIPE, cwd=REPO,
        env={k: v for k, v in os.environ.items() if k != "AIOLB_ADMIN_TOKEN"},
    )  # fmt: skip
    try:
        port, admin_url = await _ports_from_log(proxy_stderr(proc))
        drain = asyncio.create_task(proxy_stderr(proc).read())  # keep the pipe flowing
        assert await _names_at(port, 2) == ["a", "a"]
        path.write_text(yaml_config([a.url, b.url]))
        proc.send_signal(signal.SIGHUP)
        deadline = asyncio.get_running_loop().time() + 20
        while "b" not in await _names_at(port, 2):
            assert asyncio.get_running_loop().time() < deadline, "SIGHUP did not reload"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{admin_url}/metrics") as resp:
                assert 'aiolb_config_reloads_total{result="success"} 1.0' in await resp.text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert "Traceback" not in (await drain).decode()


def proxy_stderr(proc: asyncio.subprocess.Process) -> asyncio.StreamReader:
    assert proc.stderr is not None
    return proc.stderr


async def _ports_from_log(stderr: asyncio.StreamReader) -> tuple[int, str]:
    """The listener port and admin URL that ``aiolb run`` logs when it starts."""
    port, admin_url, seen = 0, "", ""
    while not (port and admin_url):
        line = (await asyncio.wait_for(stderr.readline(), 30)).decode()
        assert line, f"aiolb exited early: {seen}"
        seen += line
        if m := re.search(r"listener test serving on [\d.]+:(\d+)", line):
            port = int(m.group(1))
        if m := re.search(r"admin API on (http://\S+)", line):
            admin_url = m.group(1)
    return port, admin_url


async def _names_at(port: int, n: int) -> list[str]:
    out = []
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            out.append((await send(session, "GET", f"http://{HOST}:{port}/x"))[1])
    return out


HEALTH_POOL = """listeners:
  - name: test
    bind: "{host}:0"
    routes: [{{pool: main}}]
pools:
  main:
    upstreams:
{upstreams}
    health_check:
      active: {{path: /health, interval: 100ms, timeout: 1s, unhealthy_threshold: 1,
               healthy_threshold: 50}}
      passive: {{consecutive_failures: 3, consecutive_5xx: true, max_ejection_percent: 100}}
admin:
  bind: "{host}:0"
"""


def health_config(urls: list[str]) -> str:
    upstreams = "\n".join(f'      - url: "{url}"' for url in urls)
    return HEALTH_POOL.format(host=HOST, upstreams=upstreams)


async def test_health_verdicts_and_ejections_survive_a_reload(
    recorders: MakeRecorder, proxy: MakeProxy, tmp_path: Path
) -> None:
    """An upstream the active checks found DOWN stays down, and one passive health
    ejected stays ejected until the same time, when a reload adds an upstream."""
    b_fails = True

    async def b_health(request: web.Request) -> web.Response:
        return web.Response(status=503 if b_fails else 200)

    async def c_broken(request: web.Request) -> web.Response:
        return web.Response(status=503, text="c")

    a = await recorders("a")
    b = await recorders("b", {"/health": b_health})
    c = await recorders("c", {"/x": c_broken})
    d = await recorders("d")
    path = tmp_path / "aiolb.yaml"
    server = await start_from_file(proxy, path, health_config([a.url, b.url, c.url]))
    pool = server.pools["main"]
    up_b, up_c = pool.upstreams[1], pool.upstreams[2]
    await wait_for(lambda: not up_b.healthy)
    b_fails = False  # b now passes, but needs 50 passes in a row (5 s) to come back
    async with aiohttp.ClientSession() as session:
        while not up_c.ejected:
            await send(session, "GET", proxy_url(server, "/x"))
    until = up_c.ejected_until

    path.write_text(health_config([a.url, b.url, c.url, d.url]))
    assert (await reload(server))[0] == 200
    status, body, _ = await get_json(server, "/api/pools")
    assert status == 200
    ups = {u["address"]: u for u in body["pools"][0]["upstreams"]}
    assert ups[f"{HOST}:{b.port}"]["healthy"] is False
    assert ups[f"{HOST}:{c.port}"]["ejected"] is True
    assert ups[f"{HOST}:{d.port}"]["healthy"] is True
    new_pool = server.pools["main"]
    assert new_pool.upstream(f"{HOST}:{c.port}").ejected_until == until  # type: ignore[union-attr]
    assert sorted(set(await names(server, 8))) == ["a", "d"]


async def test_a_streaming_response_is_not_cut_by_a_reload(
    recorders: MakeRecorder, proxy: MakeProxy, tmp_path: Path
) -> None:
    """A long response that is streaming when its upstream and listener config change
    finishes whole, on the same client connection."""
    release = asyncio.Event()
    chunk = b"s" * 65536

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(16):
            await response.write(chunk)
        await release.wait()
        for _ in range(16):
            await response.write(chunk)
        await response.write_eof()
        return response

    a, b = await recorders("a", {"/stream": stream}), await recorders("b")
    path = tmp_path / "aiolb.yaml"
    server = await start_from_file(proxy, path, yaml_config([a.url]))
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy_url(server, "/stream")) as response:
            assert response.status == 200
            first = await response.content.readexactly(len(chunk))
            path.write_text(yaml_config([b.url], extra_listener=True))
            assert (await reload(server))[0] == 200
            assert await names(server, 2) == ["b", "b"]
            release.set()
            rest = await response.read()
        assert first + rest == chunk * 32
