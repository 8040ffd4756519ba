"""Shared fixtures: upstreams and the proxy, started and stopped per test."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop

from proxy.config import Config
from proxy.runtime.server import ProxyServer
from tests.support import CertAuthority, RawUpstream, Recorder, start_proxy, start_recorder


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
