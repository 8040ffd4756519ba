"""The Redis rate limit's client cost: CPU µs per decision in the proxy's process for
three ways of asking Redis, with ``--concurrency`` decisions always under way.

- ``redis-py``: one ``EVALSHA`` per decision through redis-py's pooled client (aiolb
  before issue 28);
- ``redis-py pipeline``: the decisions of one loop iteration in one redis-py pipeline
  (``pipeline(transaction=False)``, one ``execute`` per batch);
- ``pipe``: ``proxy.filters.redis_store.RedisBuckets`` (the RESP pipe it uses now).

Starts its own redis-server. Not a test: a measurement. From the repository root:

    python loadtests/redis_decisions.py --decisions 20000 --concurrency 64 [--keys 1]

With ``--keys 1000`` (the default) concurrent decisions rarely share a bucket: the
pipe's pipelining alone; with ``--keys 1`` they all do, and the pipe sends one command
per iteration (see ``redis_store``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

from proxy.filters.redis_store import TOKEN_BUCKET, RedisBuckets
from proxy.redis_client import redis_client

Take = Callable[[bytes], Awaitable[Any]]
RATE, SIZE = 1e8, 1e8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_of(pid: int) -> float:
    """The CPU seconds process ``pid`` has used (user + system)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(take: Take, decisions: int, concurrency: int, redis_pid: int,
                  keys: int) -> tuple[float, float, float]:  # fmt: skip
    """(decisions a second, CPU µs per decision of this process, of redis-server)."""
    left = decisions

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await take(b"bench:%d" % (left % keys))

    wall, cpu, redis = time.perf_counter(), time.process_time(), cpu_of(redis_pid)
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    redis = cpu_of(redis_pid) - redis
    return decisions / wall, cpu / decisions * 1e6, redis / decisions * 1e6


def redis_py(url: str) -> tuple[Take, Any]:
    client = redis_client(url, 1.0)
    script = client.register_script(TOKEN_BUCKET)

    async def take(key: bytes) -> Any:
        return await script(keys=[key], args=[repr(RATE), repr(SIZE), "1"])

    return take, client


def redis_py_pipeline(url: str) -> tuple[Take, Any]:
    client = redis_client(url, 1.0)
    script = client.register_script(TOKEN_BUCKET)
    batch: list[tuple[bytes, asyncio.Future[Any]]] = []

    async def send(items: list[tuple[bytes, asyncio.Future[Any]]]) -> None:
        pipe = client.pipeline(transaction=False)
        for key, _ in items:
            pipe.evalsha(script.sha, 1, key, repr(RATE), repr(SIZE), "1")
        for (_, fut), result in zip(items, await pipe.execute(), strict=True):
            fut.set_result(result)

    def flush() -> None:
        items = batch[:]
        batch.clear()
        asyncio.get_running_loop().create_task(send(items))

    async def take(key: bytes) -> Any:
        fut = asyncio.get_running_loop().create_future()
        if not batch:
            asyncio.get_running_loop().call_soon(flush)
        batch.append((key, fut))
        return await fut

    return take, client


def pipe(url: str) -> tuple[Take, Any]:
    store = RedisBuckets(url, 1.0)

    async def take(key: bytes) -> Any:
        return await store.take(key, RATE, SIZE)

    class Closer:
        async def aclose(self) -> None:
            await store.close()

    return take, Closer()


async def main(args: argparse.Namespace) -> None:
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", folder]  # fmt: skip
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        try:
            await asyncio.sleep(0.5)
            url = f"redis://127.0.0.1:{port}/0"
            loader = redis_client(url, 1.0)
            await loader.script_load(TOKEN_BUCKET)  # the pipelined variant needs it loaded
            await loader.aclose()
            print("| client | decisions/s | proxy CPU µs each | redis-server CPU µs each |\n"
                  "| --- | ---: | ---: | ---: |")  # fmt: skip
            for name in ("redis-py", "redis-py pipeline", "pipe"):
                if name == "pipe":
                    take, closer = pipe(url)
                else:
                    take, closer = (redis_py if name == "redis-py" else redis_py_pipeline)(url)
                await measure(take, 1000, args.concurrency, proc.pid, args.keys)  # warm up
                rate, cost, redis = await measure(
                    take, args.decisions, args.concurrency, proc.pid, args.keys
                )
                print(f"| {name} | {rate:,.0f} | {cost:.1f} | {redis:.1f} |", flush=True)
                await closer.aclose()
        finally:
            proc.kill()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--keys", type=int, default=1000, help="buckets (1: all on one)")
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed")
    import uvloop

    uvloop.run(main(parser.parse_args()))
