"""Test support: real upstream servers and the real proxy on 127.0.0.1, port 0.

``Recorder`` upstreams are aiohttp apps that remember what they saw (method, path,
headers, the client port, i.e. which upstream connection carried the request).
``RawUpstream`` is an asyncio server answering with exact bytes, for framing cases
aiohttp cannot produce (1xx, close-delimited bodies, truncation, garbage).
``Aiolb`` is ``aiolb run -c FILE`` as a real process; ``aiolb_cli`` runs one command.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web

from proxy.config import Config
from proxy.runtime.server import ProxyServer
from proxy.upstream.connection import UpstreamConnection

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    raw_headers: list[tuple[bytes, bytes]]
    peer_port: int


@dataclass
class Recorder:
    """A real aiohttp upstream that records every request it receives."""

    name: str
    seen: list[Seen] = field(default_factory=list)
    runner: web.AppRunner | None = None
    port: int = 0
    scheme: str = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{HOST}:{self.port}"

    def record(self, request: web.Request) -> None:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.seen.append(
            Seen(request.method, request.path_qs, dict(request.headers),
                 list(request.raw_headers), peer[1] if peer else 0)
        )

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def recorder_app(rec: Recorder, extra: dict[str, Handler] | None = None) -> web.Application:
    async def default(request: web.Request) -> web.StreamResponse:
        rec.record(request)
        handler = (extra or {}).get(request.path)
        if handler is not None:
            return await handler(request)
        await request.read()
        return web.Response(text=rec.name, headers={"X-Upstream": rec.name})

    app = web.Application(client_max_size=1024**4)
    app.router.add_route("*", "/{tail:.*}", default)
    return app


async def start_recorder(
    name: str, extra: dict[str, Handler] | None = None, ssl_context: ssl.SSLContext | None = None
) -> Recorder:
    """A ``Recorder`` on 127.0.0.1, port 0; over TLS with ``ssl_context``."""
    rec = Recorder(name, scheme="https" if ssl_context is not None else "http")
    rec.runner = web.AppRunner(recorder_app(rec, extra), access_log=None)
    await rec.runner.setup()
    site = web.TCPSite(rec.runner, HOST, 0, ssl_context=ssl_context)
    await site.start()
    rec.port = rec.runner.addresses[0][1]
    return rec


class RawUpstream:
    """Answers each request head with ``responses[path]`` (exact bytes).

    A response of ``None`` means: read the request and never answer. After a
    response listed in ``close_after`` the connection is closed.
    """

    def __init__(self, responses: dict[bytes, bytes | None], close_after: set[bytes] | None = None):
        self.responses = responses
        self.close_after = close_after or set()
        self.heads: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0
        self.connections = 0

    async def start(self) -> RawUpstream:
        self.server = await asyncio.start_server(self._handle, HOST, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                path = head.split(b" ", 2)[1]
                await _skip_body(reader, head)
                answer = self.responses.get(path, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                if answer is None:
                    await reader.read()  # hold the connection open until the peer leaves
                    return
                writer.write(answer)
                await writer.drain()
                if path in self.close_after:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def _skip_body(reader: asyncio.StreamReader, head: bytes) -> None:
    lower = head.lower()
    if b"\r\ncontent-length:" in lower:
        n = int(lower.split(b"\r\ncontent-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(n)
    elif b"\r\ntransfer-encoding: chunked" in lower:
        while True:
            size = int((await reader.readline()).split(b";")[0].strip(), 16)
            await reader.readexactly(size + 2)
            if size == 0:
                return


def make_config(
    upstream_urls: list[str],
    *,
    pool: dict[str, Any] | None = None,
    listener: dict[str, Any] | None = None,
    routes: list[dict[str, Any]] | None = None,
    pools: dict[str, Any] | None = None,
    caches: dict[str, Any] | None = None,
) -> Config:
    """A one-listener config on port 0 in front of ``upstream_urls`` (``caches``: the
    config's ``caches`` section)."""
    main_pool = {"upstreams": [{"url": u} for u in upstream_urls], **(pool or {})}
    return Config.model_validate(
        {
            "listeners": [
                {
                    "name": "test",
                    "bind": f"{HOST}:0",
                    "routes": routes or [{"match": {"path_prefix": "/"}, "pool": "main"}],
                    **(listener or {}),
                }
            ],
            "pools": {"main": main_pool, **(pools or {})},
            "caches": caches or {},
            "admin": {"bind": f"{HOST}:0"},
        }
    )


async def start_proxy(config: Config) -> ProxyServer:
    server = ProxyServer(config)
    await server.start()
    return server


def proxy_url(server: ProxyServer, path: str = "/") -> str:
    return f"http://{HOST}:{server.listeners[0].port}{path}"


async def raw_exchange(port: int, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send ``data`` on a new connection and read until the proxy closes it."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """Read one Content-Length or chunked response: (status line, headers, body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if b"content-length" in headers:
        body = await reader.readexactly(int(headers[b"content-length"]))
    elif headers.get(b"transfer-encoding") == b"chunked":
        body = b""
        while True:
            size = int((await reader.readline()).strip(), 16)
            body += (await reader.readexactly(size + 2))[:-2]
            if size == 0:
                break
    else:
        body = b""
    return lines[0], headers, body


async def wait_for(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0
) -> None:
    """Wait until ``predicate()`` is true, polling, or fail after ``timeout``; an async
    predicate (one that returns an awaitable: a scrape, a request) is awaited."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        ok = predicate()
        if inspect.isawaitable(ok):
            ok = await ok
        if ok:
            return
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)


@dataclass
class CertFiles:
    """A certificate chain and its key written as PEM files (for a config)."""

    cert: str
    key: str
    leaf: trustme.LeafCert

    @property
    def entry(self) -> dict[str, str]:
        """``{cert, key}``, as a ``tls.certificates`` entry."""
        return {"cert": self.cert, "key": self.key}


class CertAuthority:
    """A trustme CA whose certificates are written under ``folder``."""

    def __init__(self, folder: Path, name: str = "ca") -> None:
        self.ca = trustme.CA()
        self.folder = folder
        self.name = name
        self.count = 0
        self.cert_file = str(folder / f"{name}.pem")
        self.ca.cert_pem.write_to_path(self.cert_file)

    def issue(self, *names: str, **kwargs: Any) -> CertFiles:
        """A certificate for ``names`` (``not_after=...`` for an expired one)."""
        self.count += 1
        leaf = self.ca.issue_cert(*names, **kwargs)
        stem = self.folder / f"{self.name}-{self.count}"
        cert, key = f"{stem}.pem", f"{stem}.key"
        leaf.cert_chain_pems[0].write_to_path(cert)
        for pem in leaf.cert_chain_pems[1:]:
            pem.write_to_path(cert, append=True)
        leaf.private_key_pem.write_to_path(key)
        return CertFiles(cert, key, leaf)

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts this CA (and nothing else), ALPN http/1.1."""
        context = ssl.create_default_context(cafile=self.cert_file)
        context.set_alpn_protocols(["http/1.1"])
        return context

    def server_context(self, *names: str) -> ssl.SSLContext:
        """A server context with a certificate of this CA for ``names``."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ca.issue_cert(*names).configure_cert(context)
        return context


async def tls_request(
    port: int, context: ssl.SSLContext, host: str, data: bytes, *, timeout: float = 5.0
) -> tuple[bytes, ssl.SSLObject]:
    """Send ``data`` over TLS (SNI ``host``) on a new connection; (everything read
    until the proxy closes, the connection's ``SSLObject``)."""
    reader, writer = await asyncio.open_connection(
        HOST, port, ssl=context, server_hostname=host
    )
    try:
        writer.write(data)
        await writer.drain()
        tls: ssl.SSLObject = writer.get_extra_info("ssl_object")
        return await asyncio.wait_for(reader.read(), timeout), tls
    finally:
        writer.close()


def sha256_stream() -> Any:
    return hashlib.sha256()


def counting_known(framed: list[int]) -> Callable[..., bool]:
    """``UpstreamConnection._known``, counting in ``framed[0]`` the responses it framed
    from a known head; the caller puts it in place (and takes it back)."""
    frame = UpstreamConnection._known

    def counting(conn: UpstreamConnection, ex: Any, data: bytes) -> bool:
        known = frame(conn, ex, data)
        framed[0] += known
        return known

    return counting


def unused_port() -> int:
    """A loopback port nobody listens on (the system picked it for port 0, then it was
    closed): connections are refused, and a config may name it for a fixed address."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def aiolb_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60, cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    """``python -m proxy ARGS`` as a user runs it (``env`` replaces the environment, less
    ``AIOLB_ADMIN_TOKEN`` unless it names it; ``cwd``: run there, with this checkout's
    ``proxy`` still the one imported)."""
    base = {k: v for k, v in os.environ.items() if k not in ("AIOLB_ADMIN_TOKEN", "AIOLB_CONFIG")}
    if cwd != REPO:
        base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), base.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], capture_output=True, text=True,
        timeout=timeout, cwd=cwd, env={**base, **(env or {})},
    )  # fmt: skip


class Aiolb:
    """A running ``aiolb run -c FILE`` and what it logged."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self.port = 0
        self.admin = ""
        self._reader: asyncio.Task[None] | None = None

    async def start(self, workers: int = 1, env: dict[str, str] | None = None) -> Aiolb:
        """Start it and wait until it serves (``env``: added to the environment, which
        has no ``AIOLB_ADMIN_TOKEN`` otherwise)."""
        base = {k: v for k, v in os.environ.items() if k != "AIOLB_ADMIN_TOKEN"}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "run", "-c", str(self.path),
            stderr=asyncio.subprocess.PIPE, cwd=REPO, env={**base, **(env or {})},
            start_new_session=True,  # its workers in its process group: ``stop`` ends all
        )  # fmt: skip
        self._reader = asyncio.ensure_future(self._read())
        await wait_for(lambda: self.port and self.admin and self.logged(
            f"{workers} workers serving" if workers > 1 else "serving on"), 30.0)  # fmt: skip
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while line := (await self.proc.stderr.readline()).decode():
            self.lines.append(line)
            if not self.port and (m := re.search(r"listener \S+ serving on [\d.]+:(\d+)", line)):
                self.port = int(m.group(1))
            if m := re.search(r"admin API on (http://\S+)", line):
                self.admin = m.group(1)

    def logged(self, text: str) -> int:
        return sum(text in line for line in self.lines)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/"

    def worker_pids(self) -> list[int]:
        assert self.proc is not None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        return sorted(int(p) for p in children.split())

    async def metrics(self) -> str:
        async with aiohttp.ClientSession() as s, s.get(f"{self.admin}/metrics") as resp:
            return await resp.text()

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` to the supervisor and wait for it; SIGKILL ends its workers too.
        A process of its group still holding its stderr 10 s later (a worker that
        outlived it) is killed, and the stop fails saying so, rather than waiting."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), 30)
        if sig == signal.SIGKILL:
            _kill_group(self.proc.pid)
        if self._reader is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._reader), 10)
            except TimeoutError:
                _kill_group(self.proc.pid)
                await self._reader
                raise AssertionError("a process of aiolb's outlived it by 10 s") from None
        return code


def _kill_group(pgid: int) -> None:
    """SIGKILL every process left in the group ``pgid`` (none: nothing happens)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


#: How a test that needs Redis fails on a machine without it.
REDIS_MISSING = "redis-server is not installed: apt-get install redis-server"


class RedisServer:
    """A real ``redis-server`` on a free loopback port with its files in ``folder``;
    ``kill`` ends it like a crash, ``start`` brings it back on the same port."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = unused_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> RedisServer:
        """Start it; a test fails (never skips: CI must run them all) with the line to
        install it when ``redis-server`` is not on the PATH."""
        if shutil.which("redis-server") is None:
            pytest.fail(REDIS_MISSING, pytrace=False)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", HOST, "--save", "",
             "--appendonly", "no", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        return self

    async def ready(self, timeout: float = 10.0) -> None:
        """Wait until it answers PING."""

        async def pong() -> bool:
            try:
                reader, writer = await asyncio.open_connection(HOST, self.port)
            except OSError:
                return False
            try:
                writer.write(b"PING\r\n")
                return await asyncio.wait_for(reader.readline(), 1.0) == b"+PONG\r\n"
            finally:
                writer.close()

        async def answers() -> bool:
            assert self.proc is not None and self.proc.poll() is None, "redis-server exited"
            return await pong()

        await wait_for(answers, timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
