"""Instructions per request in a real aiolb process, by route filter (a measurement).

``filter_bench.py``'s ratios move with whatever else runs on a shared VM, and
``hotpath_count.py`` has no sockets, so it cannot time a filter that waits on I/O (the
Redis ``rate_limit``). This runs one aiolb under ``valgrind --tool=callgrind`` with its
instrumentation off, with a listener per variant (``none``: no filters; ``memory``: the
memory-store ``rate_limit``; ``redis``: the Redis one, on a redis-server started here),
all in front of one small uvloop upstream (its own process, not counted). After a
warm-up it turns the instrumentation on (``callgrind_control -i on``), sends a fixed
number of requests from ``--connections`` keep-alive connections (in this process, not
counted), turns it off, dumps, and divides. Each variant runs ``--rounds`` times,
interleaved.

User-space instructions only: the kernel's share (the syscalls, Redis's round trips)
is not in it. Under callgrind aiolb runs about 50 times slower, so more decisions share
each Redis round trip than at full speed: the line gives the requests per ``EVALSHA``
seen. Needs valgrind and redis-server. Run from the repository root:

    python loadtests/filter_count.py                  # 3,200 requests a variant, twice
    python loadtests/filter_count.py --requests 6400 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
#: The upstream: a fixed 20-byte answer to every request head, pipelined or not.
UPSTREAM = """
import asyncio, sys, uvloop
ANSWER = b"HTTP/1.1 200 OK\\r\\nContent-Length: 20\\r\\n\\r\\n01234567890123456789"
class Answer(asyncio.Protocol):
    def connection_made(self, transport): self.transport, self.buffer = transport, b""
    def data_received(self, data):
        self.buffer += data
        n = self.buffer.count(b"\\r\\n\\r\\n")
        if n:
            self.buffer = self.buffer[self.buffer.rfind(b"\\r\\n\\r\\n") + 4 :]
            self.transport.write(ANSWER * n)
async def main():
    await asyncio.get_running_loop().create_server(Answer, "127.0.0.1", int(sys.argv[1]))
    await asyncio.Event().wait()
uvloop.run(main())
"""
VARIANTS = {
    "none": "[]",
    "memory": "[{rate_limit: {rate: 100000000/s, key: route}}]",
    "redis": '[{rate_limit: {rate: 100000000/s, key: route, store: {type: redis, url: "REDIS", '
             "timeout: 1s}}}]",
}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(ports: dict[str, int], upstream: int, redis: str) -> str:
    listeners = "".join(
        f'  - name: {name}\n    bind: "127.0.0.1:{ports[name]}"\n'
        f"    routes: [{{pool: bench, filters: {VARIANTS[name].replace('REDIS', redis)}}}]\n"
        for name in VARIANTS
    )
    return (
        f"listeners:\n{listeners}pools:\n  bench:\n"
        f'    upstreams: [{{url: "http://127.0.0.1:{upstream}"}}]\n'
        f'admin:\n  bind: "127.0.0.1:{free_port()}"\n'
    )


async def one_connection(port: int, n: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(n):
        writer.write(REQUEST)
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head[:80]
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        assert length is not None, head[:200]
        await reader.readexactly(int(length.group(1)))
    writer.close()


async def load(port: int, connections: int, each: int) -> None:
    await asyncio.gather(*(one_connection(port, each) for _ in range(connections)))


async def evalsha_calls(port: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n")
    size = int((await reader.readline())[1:])
    text = await reader.readexactly(size + 2)
    writer.close()
    found = re.search(rb"cmdstat_evalsha:calls=(\d+)", text)
    return int(found.group(1)) if found else 0


async def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {port}") from None
            await asyncio.sleep(0.5)


def control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


async def dumped(out: Path, before: set[Path], timeout: float = 30) -> None:
    """Wait until a dump written since ``before`` is whole (its ``totals:`` line)."""
    deadline = time.monotonic() + timeout
    while True:
        new = set(out.parent.glob(out.name + ".*")) - before
        if new and all(re.search(rb"^totals:", p.read_bytes(), re.MULTILINE) for p in new):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"callgrind wrote no whole dump in {timeout:g}s")
        await asyncio.sleep(0.05)


def counted(out: Path, before: set[Path]) -> int:
    """The instructions in the dumps written since ``before``."""
    total = 0
    for dump in sorted(set(out.parent.glob(out.name + ".*")) - before):
        # ``summary:`` may say 0 where ``totals:`` has the count: the larger of them
        found = re.findall(r"^(?:summary|totals):\s+(\d+)", dump.read_text(), re.MULTILINE)
        total += max(map(int, found), default=0)
    return total


async def measure(args: argparse.Namespace, aiolb: subprocess.Popen[bytes], out: Path,
                  ports: dict[str, int], redis_port: int) -> None:  # fmt: skip
    await wait_port(ports["redis"], aiolb)
    each = max(1, args.requests // args.connections)
    sent = each * args.connections
    for name in VARIANTS:  # warm-up: imports, connections, the script loaded
        await load(ports[name], args.connections, 20)
    results: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_ in range(args.rounds):
        for name, port in ports.items():
            calls = await evalsha_calls(redis_port)
            before = set(out.parent.glob(out.name + ".*"))
            control(aiolb.pid, "-z")
            control(aiolb.pid, "-i", "on")
            await load(port, args.connections, each)
            control(aiolb.pid, "-i", "off")
            control(aiolb.pid, "-d")
            await dumped(out, before)
            per = counted(out, before) / sent
            results[name].append(per)
            shared = ""
            if name == "redis":
                commands = await evalsha_calls(redis_port) - calls
                shared = f", {sent / max(commands, 1):.1f} requests per EVALSHA"
            print(f"round {round_ + 1} {name:<7} {per:>9,.0f} instructions per request{shared}",
                  flush=True)  # fmt: skip
    print()
    reference = min(results["none"])
    for name, values in results.items():
        print(f"{name:<7} {min(values):>9,.0f} (ratio of none's to it: "
              f"{reference / min(values):.2f})")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3200, help="per variant and round")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control", "redis-server"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory() as tmp:
        upstream, redis_port = free_port(), free_port()
        ports = {name: free_port() for name in VARIANTS}
        path = Path(tmp) / "aiolb.yaml"
        path.write_text(config(ports, upstream, f"redis://127.0.0.1:{redis_port}/0"))
        out = Path(tmp) / "cg.out"
        redis = ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", tmp]  # fmt: skip
        children = [
            subprocess.Popen([sys.executable, "-c", UPSTREAM, str(upstream)]),
            subprocess.Popen(redis, stdout=subprocess.DEVNULL),
        ]
        aiolb = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
             sys.executable, "-m", "proxy", "run", "-c", str(path)],
            cwd=ROOT, env=dict(os.environ, PYTHONHASHSEED="0"),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        children.append(aiolb)
        try:
            asyncio.run(measure(args, aiolb, out, ports, redis_port))
        finally:
            for child in children:
                child.terminate()
            for child in children:
                child.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
