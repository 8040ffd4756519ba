"""``aiolb demo``: three demo upstreams on loopback and the proxy in front of them.

The upstreams are small aiohttp apps in the same event loop, each answering with its
own name, so round robin is visible with plain curl.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from aiohttp import web

from proxy.config import Config
from proxy.errors import BindError
from proxy.runtime.server import ProxyServer

log = logging.getLogger("aiolb")

DEMO_NAMES = ("demo-1", "demo-2", "demo-3")
DEMO_ADMIN_PORT = 9901  # the documented default; a free port if it is taken


class DemoPortBusy(Exception):
    """The proxy port of ``aiolb demo`` is taken (one line: what to do)."""


def demo_app(name: str) -> web.Application:
    """An upstream that says who it is, echoes the path, and has /healthz."""

    async def hello(request: web.Request) -> web.Response:
        text = f"Hello from {name}: {request.method} {request.path_qs}\n"
        return web.Response(text=text, headers={"X-Upstream": name})

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/{tail:.*}", hello)
    return app


async def start_upstream(
    name: str, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, int]:
    """Start one demo upstream; returns its runner and bound port."""
    runner = web.AppRunner(demo_app(name), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server
    assert server is not None
    sockets = getattr(server, "sockets", None) or []
    return runner, sockets[0].getsockname()[1]


def demo_config(proxy_port: int, upstream_ports: list[int], admin_port: int) -> Config:
    return Config.model_validate(
        {
            "listeners": [
                {
                    "name": "demo",
                    "bind": f"127.0.0.1:{proxy_port}",
                    "routes": [{"match": {"path_prefix": "/"}, "pool": "demo"}],
                }
            ],
            "pools": {
                "demo": {
                    "balancer": "round_robin",
                    "upstreams": [{"url": f"http://127.0.0.1:{p}"} for p in upstream_ports],
                }
            },
            "admin": {"bind": f"127.0.0.1:{admin_port}"},
        }
    )


async def run_demo(
    port: int = 8080, out: TextIO = sys.stdout, admin_port: int = DEMO_ADMIN_PORT
) -> None:
    """Serve the demo until SIGINT/SIGTERM. A busy ``admin_port`` moves the admin API to
    a free port (and the banner says so); a busy ``port`` raises ``DemoPortBusy``."""
    runners: list[web.AppRunner] = []
    ports: list[int] = []
    try:
        for name in DEMO_NAMES:
            runner, up_port = await start_upstream(name)
            runners.append(runner)
            ports.append(up_port)
        server = ProxyServer(demo_config(port, ports, admin_port))
        server.admin_fallback = True  # another aiolb on 9901 must not stop the demo
        try:
            await server.start()
        except BindError as exc:
            raise DemoPortBusy(
                f"cannot listen on 127.0.0.1:{port}: {exc.reason}; choose another port with "
                "--port N (--port 0: any free port)"
            ) from None
        bound = server.listeners[0].port
        assert server.admin is not None  # the demo always serves the admin API
        moved_from = admin_port if admin_port not in (0, server.admin.port) else None
        _print_banner(out, bound, ports, server.admin.url, moved_from)
        server._install_signals()
        await server._stopped.wait()
    finally:
        for runner in runners:
            await runner.cleanup()


def _print_banner(
    out: TextIO, port: int, ports: list[int], admin_url: str, moved_from: int | None
) -> None:
    """What to curl; ``moved_from``: the admin port asked for, when it was busy."""
    url = f"http://127.0.0.1:{port}"
    lines = [f"aiolb demo: proxy on {url} in front of {len(ports)} upstreams (round robin)"]
    if moved_from is not None:
        lines += [
            "",
            f"NOTE: port {moved_from} is busy (another aiolb?), so this demo's admin API "
            f"and dashboard are on {admin_url},",
            f"      NOT on http://127.0.0.1:{moved_from} (--admin-port N picks another).",
            "",
        ]
    lines += [f"  {name}  http://127.0.0.1:{p}" for name, p in zip(DEMO_NAMES, ports, strict=True)]
    lines += [
        "",
        "Try:",
        f"  curl -i {url}/",
        f"  for i in 1 2 3 4 5 6; do curl -s {url}/hello; done",
        "",
        f"Admin: dashboard {admin_url}/  metrics {admin_url}/metrics",
        f"  curl -s {admin_url}/api/pools",
        f"  curl -s -X POST -H 'X-Aiolb-Admin: 1' "
        f"{admin_url}/api/pools/demo/upstreams/127.0.0.1:{ports[0]}/drain",
        "",
        "Press Ctrl-C to stop.",
    ]
    print("\n".join(lines), file=out, flush=True)
