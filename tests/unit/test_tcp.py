"""``proxy.tcp``: ``ack_now`` and ``write_pieces`` on real sockets."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from proxy.tcp import JOIN_BELOW, TCP_QUICKACK, ack_now, write_pieces
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


class _Recorder:
    """A transport that records the calls ``write_pieces`` makes."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def write(self, data: Any) -> None:
        self.calls.append(("write", data))

    def writelines(self, data: Any) -> None:
        self.calls.append(("writelines", list(data)))


def test_write_pieces_joins_small_writes_and_passes_large_ones_uncopied():
    one, big = memoryview(b"b" * (JOIN_BELOW + 1)), b"c" * (JOIN_BELOW + 1)
    t = _Recorder()
    write_pieces(t, [one])
    write_pieces(t, [b"head\r\n", b"\r\n", b"body"])
    write_pieces(t, [b"head\r\n\r\n", big])
    assert t.calls[0] == ("write", one) and t.calls[0][1] is one  # alone: as it is
    assert t.calls[1] == ("write", b"head\r\n\r\nbody")  # small: one buffer
    assert t.calls[2][0] == "writelines" and t.calls[2][1][1] is big  # large: no copy


async def test_write_pieces_reaches_the_peer_intact():
    received = bytearray()
    done = asyncio.Event()
    expected = 4 + 3 * (JOIN_BELOW + 1) + 10

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while len(received) < expected:
            chunk = await reader.read(65536)
            if not chunk:
                break
            received.extend(chunk)
        done.set()
        writer.close()

    server = await asyncio.start_server(serve, HOST, 0)
    try:
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_connection(_Client, HOST, port)
        view = memoryview(b"v" * (JOIN_BELOW + 1))
        pieces = [
            [b"abcd"],
            [view],  # one piece: a memoryview written as it is
            [b"x" * (JOIN_BELOW + 1), view[:]],  # large: a vector
            [b"0123", b"456", b"789"],  # small: joined
        ]
        for p in pieces:
            write_pieces(transport, p)
        await asyncio.wait_for(done.wait(), 5)
        want = b"abcd" + b"v" * (JOIN_BELOW + 1) + b"x" * (JOIN_BELOW + 1)
        want += b"v" * (JOIN_BELOW + 1) + b"0123456789"
        assert bytes(received) == want
        transport.close()
    finally:
        server.close()
        await server.wait_closed()
