"""TLS to upstreams: ``https://`` urls verified against the pool's CA (or the system's),
the SNI name, client certificates, ``verify: false`` only when written out, pooled TLS
connections reused, and health checks over TLS."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from proxy.config import Config
from proxy.runtime.server import ProxyServer
from tests.support import HOST, CertAuthority, Recorder, make_config, proxy_url, wait_for

REPO = Path(__file__).resolve().parents[2]
MakeProxy = Callable[[Config], Awaitable[ProxyServer]]
MakeRecorder = Callable[..., Awaitable[Recorder]]


async def get(url: str, times: int = 1) -> list[tuple[int, str]]:
    """``times`` requests on one keep-alive client connection."""
    out = []
    async with aiohttp.ClientSession() as session:
        for _ in range(times):
            async with session.get(url) as resp:
                out.append((resp.status, await resp.text()))
    return out


async def test_an_https_upstream_with_its_own_ca(
    recorders: MakeRecorder, proxy: MakeProxy, tmp_path: Path
) -> None:
    upstream_ca = CertAuthority(tmp_path, "upstreams")
    up = await recorders("secure", ssl_context=upstream_ca.server_context("127.0.0.1"))
    assert up.url.startswith("https://")
    server = await proxy(make_config([up.url], pool={"tls": {"ca": upstream_ca.cert_file}}))
    assert await get(proxy_url(server, "/s"), times=5) == [(200, "secure")] * 5
    upstream = server.pools["main"].upstreams[0]
    assert upstream.stats.connections_opened == 1  # the pooled TLS connection was reused
    assert up.seen[0].headers["X-Forwarded-Proto"] == "http"
    # the system's store does not know that CA: refused, 502, and the reason logged
    server = await proxy(make_config([up.url], pool={"retries": {"attempts": 1}}))
    assert await get(proxy_url(server)) == [
        (502, "502 Bad Gateway: no connection to the upstream could be made\n")
    ]
    assert server.pools["main"].upstreams[0].stats.connect_errors == 1


async def test_server_name_client_certificate_and_verify_false(
    proxy: MakeProxy, tmp_path: Path
) -> None:
    upstream_ca, clients = CertAuthority(tmp_path, "upstreams"), CertAuthority(tmp_path, "c")
    context = upstream_ca.server_context("api.internal")  # a name, not the address
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=clients.cert_file)
    seen: list[Any] = []
    sni: list[str | None] = []
    context.sni_callback = lambda _sock, name, _ctx: sni.append(name)

    async def handler(request: web.Request) -> web.Response:
        tls = request.transport.get_extra_info("ssl_object") if request.transport else None
        seen.append(tls.getpeercert() if tls else None)
        return web.Response(text="mtls")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, HOST, 0, ssl_context=context).start()
    port = runner.addresses[0][1]
    try:
        mine = clients.issue("proxy.internal")
        tls = {"ca": upstream_ca.cert_file, "server_name": "api.internal",
               "cert": mine.cert, "key": mine.key}  # fmt: skip
        server = await proxy(make_config([f"https://{HOST}:{port}"], pool={"tls": tls}))
        assert await get(proxy_url(server)) == [(200, "mtls")]
        assert sni == ["api.internal"]
        assert seen[0]["subjectAltName"] == (("DNS", "proxy.internal"),)
        # without the client certificate the upstream refuses the handshake: 502
        tls = {"ca": upstream_ca.cert_file, "server_name": "api.internal"}
        server = await proxy(make_config([f"https://{HOST}:{port}"],
                                         pool={"tls": tls, "retries": {"attempts": 1}}))
        assert (await get(proxy_url(server)))[0][0] == 502
        # verify: false takes any certificate (with the client certificate still sent)
        tls = {"verify": False, "cert": mine.cert, "key": mine.key}
        server = await proxy(make_config([f"https://{HOST}:{port}"], pool={"tls": tls}))
        assert await get(proxy_url(server)) == [(200, "mtls")]
    finally:
        await runner.cleanup()


async def test_verify_false_is_a_warning_at_check_and_at_start(tmp_path: Path) -> None:
    path = tmp_path / "lax.yaml"
    path.write_text(yaml.safe_dump({
        "listeners": [{"name": "public", "bind": f"{HOST}:0", "routes": [{"pool": "web"}]}],
        "pools": {"web": {"upstreams": [{"url": "https://127.0.0.1:9"}],
                          "tls": {"verify": False}}},
        "admin": {"bind": f"{HOST}:0"},
    }, sort_keys=False))  # fmt: skip
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if "verify" in text)
    warning = (f"{path}:{line}: pools.web.tls.verify: warning: certificate verification of the "
               "https upstreams is off (verify: false)")  # fmt: skip
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "proxy", "check", "-c", str(path)],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0 and done.stderr.strip() == warning
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "-c", str(path), cwd=REPO,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        first = await asyncio.wait_for(proc.stderr.readline(), 20)
        assert b"WARNING" in first and warning.encode() in first
    finally:
        proc.terminate()
        await proc.wait()


async def test_health_checks_use_tls_for_https_upstreams(
    recorders: MakeRecorder, proxy: MakeProxy, tmp_path: Path
) -> None:
    upstream_ca, stranger = CertAuthority(tmp_path, "upstreams"), CertAuthority(tmp_path, "x")
    up = await recorders("secure", ssl_context=upstream_ca.server_context("127.0.0.1"))
    active = {"active": {"path": "/healthz", "interval": 0.05, "timeout": 1,
                         "healthy_threshold": 1, "unhealthy_threshold": 1}}  # fmt: skip
    for kind in ("http", "tcp"):
        check = {"active": {**active["active"], "type": kind}}
        good = await proxy(make_config(
            [up.url], pool={"tls": {"ca": upstream_ca.cert_file}, "health_check": check}
        ))  # fmt: skip
        bad = await proxy(make_config(
            [up.url], pool={"tls": {"ca": stranger.cert_file}, "health_check": check}
        ))  # fmt: skip
        good_up, bad_up = good.pools["main"].upstreams[0], bad.pools["main"].upstreams[0]
        await wait_for(lambda g=good_up, b=bad_up: not b.healthy
                       and g.health_checks.get("success", 0) >= 2)  # fmt: skip
        assert good_up.healthy and good_up.health_checks.get("failure", 0) == 0, kind
        assert bad_up.health_checks.get("success", 0) == 0, kind
    assert any(seen.path == "/healthz" for seen in up.seen)
