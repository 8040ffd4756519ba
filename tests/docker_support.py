"""Test support for ``providers.docker``: a real private engine, labelled containers, and
a read-only socket proxy.

``Engine`` is ``loadtests/docker_engine.sh`` (dockerd with no bridge network under a
temp dir, the stand-in ``python:3.12-slim`` loaded): one per test session. Containers
run on the host network, each serving ``SERVER`` (it answers its ``NAME``) on its own
loopback port; on SIGTERM it keeps serving for ``GRACE`` seconds (an upstream behind a
balancer waits for the balancer to drain it, as a Kubernetes ``preStop`` does), then
exits. ``ReadOnlyProxy`` is a socket proxy in the manner of Tecnativa's
docker-socket-proxy: plain HTTP on TCP in front of the engine's unix socket, passing
only ``GET`` of ``/containers``, ``/events`` and ``/version`` (403 otherwise), and able
to cut every stream it carries (a lost events stream).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import ssl
import subprocess
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.support import HOST, REPO

ENGINE_SCRIPT = REPO / "loadtests" / "docker_engine.sh"
IMAGE = "python:3.12-slim"
GRACE = 1.0

#: The containers' server: answers its NAME; SIGTERM: serve GRACE seconds more, then exit.
SERVER = r"""
import http.server, os, signal, socketserver, sys, threading, time
NAME = os.environ.get("NAME", "?").encode()
PORT = int(sys.argv[1])
GRACE = float(sys.argv[2])
stopping = threading.Event()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(NAME)))
        if stopping.is_set():
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(NAME)
    def log_message(self, *args):
        pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
server = S(("127.0.0.1", PORT), H)
def later():
    time.sleep(GRACE)
    server.shutdown()
def term(*args):
    stopping.set()
    threading.Thread(target=later).start()
signal.signal(signal.SIGTERM, term)
server.serve_forever()
"""

HEALTH = "python -c \"import urllib.request,sys;urllib.request.urlopen('http://127.0.0.1:{port}/',timeout=1)\""


class Engine:
    """A private dockerd (``loadtests/docker_engine.sh``) for the test session."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.socket = folder / "docker.sock"
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.socket}"}
        self.started_in = 0.0

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> None:
        """Start the engine and load the stand-in image; raise RuntimeError saying why
        it cannot (the tests fail, never skip: docker.io and debootstrap are needed)."""
        for tool in ("docker", "dockerd"):
            if shutil.which(tool) is None:
                raise RuntimeError(
                    f"{tool} is not installed (apt-get install docker.io "
                    "debootstrap): the Docker provider's tests need an engine"
                )
        if os.geteuid() != 0:
            raise RuntimeError("starting a private dockerd needs root")
        began = time.monotonic()
        for step in (["start", str(self.folder)], ["base"]):
            done = subprocess.run(
                ["bash", str(ENGINE_SCRIPT), *step], env=self.env, capture_output=True,
                text=True, timeout=300,
            )  # fmt: skip
            if done.returncode != 0:
                raise RuntimeError(f"docker_engine.sh {step[0]} failed: {done.stderr[-2000:]}")
        self.started_in = time.monotonic() - began

    def stop(self) -> None:
        subprocess.run(["bash", str(ENGINE_SCRIPT), "stop", str(self.folder)], env=self.env,
                       capture_output=True, timeout=120)  # fmt: skip

    def restart(self) -> None:
        """Stop dockerd (its containers die with it) and start it again on the same
        data: containers with ``--restart always`` come back."""
        outside = (self.folder / "created-outside").read_text()
        pid = int((self.folder / "engine.pid").read_text())
        os.kill(pid, 15)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            status = (
                Path(f"/proc/{pid}/status").read_text() if Path(f"/proc/{pid}").exists() else ""
            )
            if re.search(r"State:\s+Z", status):
                break
            time.sleep(0.1)
        script = f". {ENGINE_SCRIPT}; engine_start {self.folder} && disown $ENGINE_PID"
        done = subprocess.run(["bash", "-c", script], env=self.env, capture_output=True,
                              text=True, timeout=90)  # fmt: skip
        (self.folder / "created-outside").write_text(outside)
        if done.returncode != 0:
            raise RuntimeError(f"dockerd did not restart: {done.stderr[-2000:]}")

    def docker(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(["docker", *args], env=self.env, capture_output=True, text=True,
                              timeout=60)  # fmt: skip
        if check and done.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)}: {done.stderr}")
        return done.stdout.strip()

    def run(
        self,
        name: str,
        port: int,
        labels: dict[str, str],
        *,
        health: bool = True,
        start: bool = True,
        extra: Sequence[str] = (),
    ) -> str:
        """A container serving ``name`` on ``port`` (host network); its id."""
        args = ["--name", name, "--network", "host", "-e", f"NAME={name}"]
        for key, value in labels.items():
            args += ["-l", f"{key}={value}"]
        if health:
            args += ["--health-cmd", HEALTH.format(port=port), "--health-interval", "1s",
                     "--health-timeout", "2s", "--health-retries", "3"]  # fmt: skip
        args += [*extra, IMAGE, "python", "-c", SERVER, str(port), str(GRACE)]
        return self.docker("run" if start else "create", *(["-d"] if start else []), *args)

    def state(self, name: str) -> str:
        return self.docker("inspect", "-f", "{{.State.Status}}", name, check=False)

    def remove_all(self) -> None:
        ids = self.docker("ps", "-aq").split()
        if ids:
            self.docker("rm", "-f", *ids, check=False)


class ReadOnlyProxy:
    """Plain HTTP on ``127.0.0.1:PORT`` in front of the engine's socket: only ``GET`` of
    ``/containers...``, ``/events`` and ``/version`` pass (any API version prefix);
    anything else is 403. ``cut()`` ends every response in flight (the events stream)
    and refuses new requests (503) until ``resume()``."""

    ALLOWED = re.compile(r"^(/v[0-9.]+)?/(containers(/.*)?|events|version)$")

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.runner: web.AppRunner | None = None
        self.port = 0
        self.refused: list[str] = []
        self.down = False
        self.tls: ssl.SSLContext | None = None
        self._streams: dict[int, tuple[web.Request, asyncio.Task[Any] | None]] = {}
        self._session: aiohttp.ClientSession | None = None

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls else 'tcp'}://{HOST}:{self.port}"

    async def start(self, tls: ssl.SSLContext | None = None) -> None:
        """Serve on a free port; with ``tls``, HTTPS (as ``dockerd --tlsverify``)."""
        self.tls = tls
        self._session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(self.socket_path))
        )
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, HOST, 0, ssl_context=tls)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.method != "GET" or not self.ALLOWED.match(request.path):
            self.refused.append(f"{request.method} {request.path}")
            return web.json_response({"message": "forbidden by the read-only proxy"}, status=403)
        if self.down:
            return web.json_response({"message": "proxy down"}, status=503)
        assert self._session is not None
        timeout = aiohttp.ClientTimeout(total=None)
        async with self._session.get(
            "http://docker" + request.path_qs, timeout=timeout
        ) as upstream:
            response = web.StreamResponse(status=upstream.status)
            response.content_type = upstream.content_type
            await response.prepare(request)
            self._streams[id(request)] = (request, asyncio.current_task())
            try:
                async for chunk in upstream.content.iter_any():
                    if self.down:
                        break
                    await response.write(chunk)
            finally:
                self._streams.pop(id(request), None)
            if self.down and request.transport is not None:
                request.transport.close()  # cut: the client sees the stream end
                return response
            await response.write_eof()
            return response

    def cut(self) -> None:
        self.down = True
        for request, task in list(self._streams.values()):
            if request.transport is not None:
                request.transport.close()
            if task is not None:  # it may wait for the engine's next event: end it now
                task.cancel()

    def resume(self) -> None:
        self.down = False

    async def stop(self) -> None:
        self.cut()
        if self.runner is not None:
            await self.runner.cleanup()
        if self._session is not None:
            await self._session.close()


async def steady_load(
    url: str, stop: asyncio.Event, workers: int = 4, counts: Counter[str] | None = None
) -> tuple[int, list[str], set[str]]:
    """Requests to ``url`` from ``workers`` clients until ``stop``: (answered, failures,
    the bodies seen); ``counts``, if given, counts the answers by body as they come."""
    failures: list[str] = []
    bodies: set[str] = set()
    answered = 0

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal answered
        while not stop.is_set():
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as r:
                    body = await r.text()
                    if r.status != 200:
                        failures.append(f"{r.status} {body[:100]}")
                    else:
                        bodies.add(body)
                        answered += 1
                        if counts is not None:
                            counts[body] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                failures.append(repr(exc))
            await asyncio.sleep(0.005)

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session) for _ in range(workers)))
    return answered, failures, bodies
