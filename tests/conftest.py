"""Shared fixtures: upstreams and the proxy, started and stopped per test."""

from __future__ import annotations

import signal
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from proxy.config import Config
from proxy.forwarding.exchange import Exchange
from proxy.forwarding.states import checked
from proxy.runtime.server import ProxyServer
from proxy.server.protocol import ClientConnection
from tests.docker_support import Engine
from tests.support import (
    Aiolb,
    CertAuthority,
    RawUpstream,
    Recorder,
    RedisServer,
    start_proxy,
    start_recorder,
)

# Every exchange the suite runs in this process checks its state transitions against
# the table in proxy/forwarding/states.py: a move the table does not list fails.
ClientConnection.exchange_type = checked(Exchange)


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Any]:
    """The proxy ships on uvloop: test on it."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
def ca(tmp_path: Path) -> CertAuthority:
    """A certificate authority of this test; its files go to ``tmp_path``."""
    return CertAuthority(tmp_path)


@pytest.fixture
async def recorders() -> AsyncIterator[Callable[..., Awaitable[Recorder]]]:
    started: list[Recorder] = []

    async def make(
        name: str, extra: dict[str, Any] | None = None, ssl_context: ssl.SSLContext | None = None
    ) -> Recorder:
        rec = await start_recorder(name, extra, ssl_context)
        started.append(rec)
        return rec

    yield make
    for rec in started:
        await rec.stop()


@pytest.fixture
async def proxy() -> AsyncIterator[Callable[[Config], Awaitable[ProxyServer]]]:
    started: list[ProxyServer] = []

    async def make(config: Config) -> ProxyServer:
        server = await start_proxy(config)
        started.append(server)
        return server

    yield make
    for server in started:
        await server.shutdown(timeout=1.0)


@pytest.fixture
async def raw_upstreams() -> AsyncIterator[Callable[..., Awaitable[RawUpstream]]]:
    """``RawUpstream`` servers (exact response bytes), stopped after the test."""
    started: list[RawUpstream] = []

    async def make(responses: dict[bytes, bytes | None], **kwargs: Any) -> RawUpstream:
        raw = await RawUpstream(responses, **kwargs).start()
        started.append(raw)
        return raw

    yield make
    for raw in started:
        await raw.stop()


@pytest.fixture
async def aiolb(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Aiolb]]]:
    """``aiolb run`` on a config text (written to ``tmp_path/aiolb.yaml``), as a process;
    killed after the test, which fails if it printed a traceback."""
    started: list[Aiolb] = []

    async def make(text: str, workers: int = 1, env: dict[str, str] | None = None) -> Aiolb:
        path = tmp_path / "aiolb.yaml"
        path.write_text(text)
        proc = await Aiolb(path).start(workers, env)
        started.append(proc)
        return proc

    yield make
    for proc in started:
        if proc.proc is not None and proc.proc.returncode is None:
            await proc.stop(signal.SIGKILL)
    for proc in started:
        assert "Traceback" not in "".join(proc.lines), "".join(proc.lines)


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A real redis-server on a free port (files in a temp dir), stopped after the test."""
    folder = tmp_path / "redis"
    folder.mkdir()
    server = RedisServer(folder).start()
    try:
        await server.ready()
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """A private Docker engine (``loadtests/docker_engine.sh``) for the whole session;
    a machine that cannot start one fails the tests that need it, saying why."""
    engine = Engine(tmp_path_factory.mktemp("docker") / "engine")
    try:
        engine.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        engine.stop()
        pytest.fail(f"no Docker engine for the provider's tests: {exc}", pytrace=False)
    try:
        yield engine
    finally:
        engine.stop()
