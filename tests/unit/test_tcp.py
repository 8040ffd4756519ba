"""``proxy.tcp.ack_now`` on real sockets."""

from __future__ import annotations

import asyncio
import socket

from proxy.tcp import TCP_QUICKACK, ack_now
from tests.support import HOST


class _Client(asyncio.Protocol):
    def __init__(self) -> None:
        self.lost = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(None)


async def test_ack_now_sets_quickack_and_never_raises():
    accepted: list[asyncio.StreamWriter] = []
    server = await asyncio.start_server(lambda r, w: accepted.append(w), HOST, 0)
    try:
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        transport, client = await loop.create_connection(_Client, HOST, port)
        sock = transport.get_extra_info("socket")
        if TCP_QUICKACK is not None:  # Linux; elsewhere ack_now only returns
            sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 0)
            assert sock.getsockopt(socket.IPPROTO_TCP, TCP_QUICKACK) == 0
            ack_now(transport)
            assert sock.getsockopt(socket.IPPROTO_TCP, TCP_QUICKACK) == 1
        transport.abort()
        await asyncio.wait_for(client.lost, 5)
        ack_now(transport)  # on a closed socket: no exception
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()
