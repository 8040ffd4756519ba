"""The architecture's ceiling: a featureless uvloop + httptools pass-through proxy.

Not aiolb and not for use: it forwards each request's raw bytes to a pooled upstream
connection (round robin over the given ports) and the raw response bytes back, using
httptools only to find where messages end. No header rewriting, routing, timeouts,
metrics, retries or error handling. ``bench.py --targets ...,passthrough`` runs it next
to aiolb so that a run shows how much of the gap to nginx is Python's event loop and
sockets (this row) and how much is aiolb's features (the difference to this row); it
is the "protocol pass-through" of the design's anchor measurements.

    python loadtests/passthrough.py PORT UPSTREAM_PORT[,UPSTREAM_PORT...]
"""

from __future__ import annotations

import asyncio
import sys

import httptools
import uvloop


class Upstream(asyncio.Protocol):
    def __init__(self, idle: list[Upstream]) -> None:
        self.idle = idle
        self.parser = httptools.HttpResponseParser(self)
        self.client: Client | None = None
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.client is not None:
            self.client.transport.write(data)
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        client, self.client = self.client, None
        self.idle.append(self)
        if client is not None:
            client.upstream = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.idle:
            self.idle.remove(self)
        if self.client is not None:
            self.client.transport.close()


class Client(asyncio.Protocol):
    """One request at a time (no pipelining): its bytes are held until its head is
    complete and an upstream connection is at hand, then streamed through."""

    def __init__(self, proxy: PassThrough) -> None:
        self.proxy = proxy
        self.parser = httptools.HttpRequestParser(self)
        self.held: list[bytes] = []
        self.upstream: Upstream | None = None
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.upstream is None:
            self.held.append(data)
        else:
            self.upstream.transport.write(data)
        self.parser.feed_data(data)

    def on_headers_complete(self) -> None:
        port, idle = self.proxy.next()
        if idle:
            self.attach(idle.pop())
        else:
            asyncio.get_running_loop().create_task(self.connect(port, idle))

    def attach(self, upstream: Upstream) -> None:
        upstream.client = self
        self.upstream = upstream
        held, self.held = self.held, []
        upstream.transport.writelines(held)

    async def connect(self, port: int, idle: list[Upstream]) -> None:
        loop = asyncio.get_running_loop()
        _, upstream = await loop.create_connection(lambda: Upstream(idle), "127.0.0.1", port)
        self.attach(upstream)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.client = None
            self.upstream.transport.close()


class PassThrough:
    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.pools: list[list[Upstream]] = [[] for _ in ports]
        self.turn = 0

    def next(self) -> tuple[int, list[Upstream]]:
        """Round robin: the next upstream's port and its idle connections."""
        i = self.turn % len(self.ports)
        self.turn += 1
        return self.ports[i], self.pools[i]


async def main(port: int, ports: list[int]) -> None:
    proxy = PassThrough(ports)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(proxy), "127.0.0.1", port, backlog=1024)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), [int(p) for p in sys.argv[2].split(",")]))
