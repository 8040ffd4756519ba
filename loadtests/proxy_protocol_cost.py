"""What ``send_proxy_protocol`` costs: a connection per request instead of a pooled one.

One process, uvloop: an upstream that reads a PROXY header when one comes and answers
``ok`` with keep-alive, aiolb in front of it (a pool with ``send_proxy_protocol: v2``,
then the same pool without), and one keep-alive client sending requests one after
another, then 8 such clients at once. Prints requests per second and the upstream
connections opened for each.

    python loadtests/proxy_protocol_cost.py [--requests 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy.config import Config
from proxy.proxy_protocol import parse
from proxy.runtime.server import ProxyServer

HOST = "127.0.0.1"
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Upstream(asyncio.Protocol):
    opened = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        Upstream.opened += 1
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buf = b""
        self.header_done = False

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        if not self.header_done:
            if buf[:1] in (b"\r", b"P"):
                header = parse(buf)
                if header is None:
                    self.buf = buf
                    return
                buf = buf[header.length :]
            self.header_done = True
        while b"\r\n\r\n" in buf:
            _, _, buf = buf.partition(b"\r\n\r\n")
            self.transport.write(ANSWER)
        self.buf = buf


async def client(port: int, n: int) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    request = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    for _ in range(n):
        writer.write(request)
        await reader.readuntil(b"ok")
    writer.close()


async def run(send: str | None, n: int, clients: int) -> tuple[float, int]:
    loop = asyncio.get_running_loop()
    up = await loop.create_server(Upstream, HOST, 0)
    port = up.sockets[0].getsockname()[1]
    pool: dict[str, object] = {"upstreams": [{"url": f"http://{HOST}:{port}"}]}
    if send:
        pool["send_proxy_protocol"] = send
    listener = {
        "name": "b",
        "bind": f"{HOST}:0",
        "limits": {"max_requests_per_connection": None},
        "routes": [{"match": {"path_prefix": "/"}, "pool": "p"}],
    }
    config = Config.model_validate(
        {"listeners": [listener], "pools": {"p": pool}, "admin": {"bind": f"{HOST}:0"}}
    )
    server = ProxyServer(config)
    await server.start()
    front = server.listeners[0].port
    await client(front, 200)  # warm-up
    Upstream.opened = 0
    started = time.perf_counter()
    await asyncio.gather(*(client(front, n // clients) for _ in range(clients)))
    elapsed = time.perf_counter() - started
    opened = Upstream.opened
    await server.shutdown(1.0)
    up.close()
    return n / elapsed, opened


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    for clients in (1, 8):
        for send in (None, "v2"):
            rate, opened = await run(send, args.requests, clients)
            label = send or "none"
            print(f"{clients} client(s), send_proxy_protocol {label}: "
                  f"{rate:,.0f} requests/s, {opened} upstream connections opened")  # fmt: skip


if __name__ == "__main__":
    uvloop.run(main())
