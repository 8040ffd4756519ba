"""WebSocket echo through aiolb and nginx, same run: messages per second, and the memory
that open tunnels cost.

    python loadtests/ws_bench.py                      # 3 interleaved rounds, 5 s each
    python loadtests/ws_bench.py --rounds 5 --duration 8 --tunnels 1000

The upstream is an echo server (uvloop): it answers the Upgrade with a correct ``101``
(``Sec-WebSocket-Accept``), then sends back every byte it reads. The load generator
(``--processes`` processes, ``--connections`` WebSocket connections in all) opens the
connections through the proxy, then on each keeps ``--window`` messages in flight: a
message is one masked binary frame of ``--size`` payload bytes, as a browser sends it,
and it counts as echoed when its bytes are back (the echo returns the frame as it was,
masked, which a real client would refuse; the proxies never look inside frames, so
what they carry is the traffic of a real chat or ticker). Both proxies are byte tunnels
after the ``101``; nginx is configured as its WebSocket guide says (``Upgrade`` and
``Connection`` passed, ``proxy_read_timeout 1h``).

Rounds interleave (round, then target) and the ratio is the median of each round's
aiolb / nginx. ``--tunnels N`` then opens N idle tunnels through each proxy in turn and
reports the resident memory they added (the proxy's RSS, its workers included).
Results: Markdown on stdout and JSON in ``loadtests/results/``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import multiprocessing
import os
import statistics
import struct
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import harness
from harness import Child, Session

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TARGETS = ("aiolb", "nginx")


# --- the echo upstream ---------------------------------------------------------------------


class _Echo(asyncio.Protocol):
    """Answers the Upgrade, then echoes bytes."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.open:
            self.transport.write(data)
            return
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            return
        key = b""
        for line in self.head[:end].split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-key":
                key = value.strip()
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                             b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept
                             + b"\r\n\r\n")  # fmt: skip
        self.open = True
        rest = self.head[end + 4 :]
        self.head = b""
        if rest:
            self.transport.write(rest)


def run_echo(port: int) -> None:
    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Echo, "127.0.0.1", port, backlog=4096)
        await server.serve_forever()

    uvloop.run(main())


# --- the load generator ------------------------------------------------------------------------


def frame(size: int) -> bytes:
    """One masked binary frame with ``size`` payload bytes (a client's message)."""
    mask = os.urandom(4)
    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(b"m" * size))
    if size < 126:
        head = struct.pack("!BB", 0x82, 0x80 | size)
    else:
        head = struct.pack("!BBH", 0x82, 0x80 | 126, size)
    return head + mask + payload


def upgrade_request(port: int) -> bytes:
    key = base64.b64encode(os.urandom(16))
    return (b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n"
            b"\r\n" % (port, key))  # fmt: skip


class _Client(asyncio.Protocol):
    """One WebSocket connection keeping ``window`` messages in flight."""

    def __init__(self, message: bytes, window: int, counts: list[int], ready: asyncio.Future[None]):
        self.message = message
        self.window = window
        self.counts = counts
        self.ready = ready
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.pending = 0  # bytes of echoed messages not yet complete
        self.running = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def start(self) -> None:
        assert self.transport is not None
        self.running = True
        self.transport.write(self.message * self.window)

    def data_received(self, data: bytes) -> None:
        if self.head is not None and not self.ready.done():
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end >= 0:
                ok = self.head.startswith(b"HTTP/1.1 101")
                self.head = b""
                if ok:
                    self.ready.set_result(None)
                else:
                    self.ready.set_exception(RuntimeError("no 101"))
            return
        self.pending += len(data)
        done, self.pending = divmod(self.pending, len(self.message))
        if done:
            self.counts[0] += done
            if self.running and self.transport is not None:
                self.transport.write(self.message * done)


def generate(port: int, connections: int, seconds: float, size: int, window: int,
             queue: Any) -> None:  # fmt: skip
    """One load process: ``connections`` tunnels, then echo for ``seconds``; puts the
    number of messages echoed during the timed part on ``queue``."""
    import uvloop

    async def main() -> int:
        loop = asyncio.get_running_loop()
        message = frame(size)
        counts = [0]
        clients: list[_Client] = []
        for _ in range(connections):
            ready: asyncio.Future[None] = loop.create_future()
            _, client = await loop.create_connection(
                lambda r=ready: _Client(message, window, counts, r), "127.0.0.1", port
            )
            assert client.transport is not None
            client.transport.write(upgrade_request(port))
            await asyncio.wait_for(ready, 10)
            clients.append(client)
        for client in clients:
            client.start()
        await asyncio.sleep(0.5)  # warm up
        start_count, started = counts[0], time.perf_counter()
        await asyncio.sleep(seconds)
        done, elapsed = counts[0] - start_count, time.perf_counter() - started
        for client in clients:
            client.running = False
            if client.transport is not None:
                client.transport.close()
        return int(done / elapsed)

    queue.put(uvloop.run(main()))


def measure(port: int, args: argparse.Namespace, cpus: str | None) -> float:
    """Messages per second through ``port``, summed over the load processes."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    per = max(1, args.connections // args.processes)
    procs = [context.Process(target=generate, args=(port, per, args.duration, args.size,
                                                   args.window, queue))
             for _ in range(args.processes)]
    for proc in procs:
        proc.start()
        if cpus:
            harness.set_affinity(proc.pid, cpus)
    rates = [queue.get(timeout=args.duration + 60) for _ in procs]
    for proc in procs:
        proc.join(10)
    return float(sum(rates))


# --- tunnels' memory ---------------------------------------------------------------------------


async def hold_tunnels(port: int, count: int) -> list[asyncio.Transport]:
    loop = asyncio.get_running_loop()
    held = []
    for _ in range(count):
        ready: asyncio.Future[None] = loop.create_future()
        transport, _client = await loop.create_connection(
            lambda r=ready: _Client(b"x", 1, [0], r), "127.0.0.1", port
        )
        transport.write(upgrade_request(port))
        await asyncio.wait_for(ready, 10)
        held.append(transport)
    return held


def tunnel_memory(child: Child, port: int, count: int) -> dict[str, float]:
    """RSS of ``child`` before and with ``count`` idle tunnels open through it."""
    import uvloop

    before = harness.rss_kib(child.pid)

    async def main() -> float:
        held = await hold_tunnels(port, count)
        await asyncio.sleep(1.0)
        during = harness.rss_kib(child.pid)
        for transport in held:
            transport.close()
        return during

    during = uvloop.run(main())
    return {"before_mib": before / 1024, "with_tunnels_mib": during / 1024,
            "added_kib_per_tunnel": (during - before) / count}  # fmt: skip


# --- targets ------------------------------------------------------------------------------------


def start_nginx_ws(session: Session, echo_port: int, cpus: str | None) -> tuple[Child, int]:
    """nginx as a WebSocket proxy (its documented setup), one worker."""
    port = session.port()
    conf = harness.nginx_common(session, "nginx-ws", 1) + f"""
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    upstream echo {{ server 127.0.0.1:{echo_port}; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://echo;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_read_timeout 1h;
        }}
    }}
}}
"""
    path = session.path("nginx-ws.conf")
    path.write_text(conf)
    return harness.start(session, "nginx-ws", harness.nginx_argv(session, path), port,
                         cpus=cpus), port  # fmt: skip


def start_aiolb_ws(session: Session, echo_port: int, cpus: str | None) -> tuple[Child, int]:
    port = session.port()
    upstream = harness.Upstream("echo", (echo_port, echo_port), "echo")
    config = harness.aiolb_config(session, port, upstream, ports=[echo_port])
    argv = [sys.executable, "-m", "proxy", "run", "-c", str(config)]
    return harness.start(session, "aiolb", argv, port, cpus=cpus, cwd=harness.REPO), port


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per timed run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--processes", type=int, default=2, help="load generator processes")
    parser.add_argument("--size", type=int, default=32, help="payload bytes per message")
    parser.add_argument("--window", type=int, default=4, help="messages in flight per connection")
    parser.add_argument("--tunnels", type=int, default=0, help="then hold N idle tunnels: RSS")
    parser.add_argument("--no-pin", action="store_true", help="every process on every core")
    parser.add_argument("--json-dir", type=Path, default=harness.HERE / "results")
    return parser.parse_args(argv)


def main() -> int:
    args = parse_args()
    harness.raise_nofile()
    pin = harness.UNPINNED if args.no_pin else harness.plan_pinning()
    print(f"pinning: {pin.note}")
    report: dict[str, Any] = {"options": vars(args), "pinning": pin.note, "rounds": []}
    with Session() as session:
        echo_port = session.port()
        echo = session.spawn("echo", [sys.executable, "-c",
                                      f"import ws_bench; ws_bench.run_echo({echo_port})"],
                             cpus=pin.load, cwd=harness.HERE)  # fmt: skip
        harness.wait_port(echo, echo_port)
        running = {"aiolb": start_aiolb_ws(session, echo_port, pin.proxy),
                   "nginx": start_nginx_ws(session, echo_port, pin.proxy)}  # fmt: skip
        for n in range(1, args.rounds + 1):
            rates = {}
            for target, (_, port) in running.items():
                before = harness.cpu_times()
                rates[target] = measure(port, args, pin.load)
                busy = harness.cpu_busy(before, harness.cpu_times())
                print(f"round {n}: {target:<6} {rates[target]:>10,.0f} messages/s  CPU {busy}",
                      flush=True)  # fmt: skip
            report["rounds"].append(rates)
        if args.tunnels:
            report["memory"] = {}
            for target, (child, port) in running.items():
                report["memory"][target] = tunnel_memory(child, port, args.tunnels)
    ratios = [r["aiolb"] / r["nginx"] for r in report["rounds"] if r["nginx"]]
    print("\n| target | messages/s (median) | aiolb / nginx (range) |\n| --- | ---: | ---: |")
    for target in TARGETS:
        median = statistics.median(r[target] for r in report["rounds"])
        cell = (f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
                if target == "aiolb" and ratios else "1.00")  # fmt: skip
        print(f"| {target} | {median:,.0f} | {cell} |")
    for target, mem in report.get("memory", {}).items():
        print(f"{target}: {args.tunnels} idle tunnels: RSS {mem['before_mib']:.1f} -> "
              f"{mem['with_tunnels_mib']:.1f} MiB ({mem['added_kib_per_tunnel']:.1f} KiB each)")
    print(f"JSON written to {harness.write_json(args.json_dir, 'ws_bench', report)}")
    return 0


if __name__ == "__main__":
    harness.run_main(main)
