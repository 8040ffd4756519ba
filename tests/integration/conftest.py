"""Fixtures of the integration tests that need more than ``tests/conftest.py`` gives
every test: real gRPC servers and clients (``test_grpc*.py``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator

import grpc
import grpc.aio
import pytest

from proxy.runtime.server import ProxyServer
from tests.grpc_support import OPTIONS, GrpcServer
from tests.support import HOST


@pytest.fixture
def servers() -> Iterator[Callable[[str], GrpcServer]]:
    """``servers(name)``: a grpcio server on 127.0.0.1 that answers as ``name``;
    stopped after the test."""
    started: list[GrpcServer] = []

    def make(name: str) -> GrpcServer:
        server = GrpcServer(name).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
async def channel() -> AsyncIterator[Callable[[ProxyServer], grpc.aio.Channel]]:
    """``channel(proxy)``: a grpc.aio channel to the proxy's first listener; closed
    after the test."""
    opened: list[grpc.aio.Channel] = []

    def make(server: ProxyServer) -> grpc.aio.Channel:
        ch = grpc.aio.insecure_channel(f"{HOST}:{server.listeners[0].port}", options=OPTIONS)
        opened.append(ch)
        return ch

    yield make
    for ch in opened:
        await ch.close()
