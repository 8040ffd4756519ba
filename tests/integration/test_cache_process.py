"""The response cache in a real ``aiolb run`` process: memory stays flat while a body
far larger than ``max_object_size`` passes a cached route, a large body streams into
Redis without being held (Redis slower than the upstream holds the upstream back) and
comes back byte-identical, and with ``workers: 2`` on one Redis one worker stores what the other
serves, through a Redis outage under load and back."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web

from tests.admin_support import samples
from tests.support import HOST, Aiolb, RawUpstream, Recorder, RedisServer, wait_for

MakeAiolb = Callable[..., Awaitable[Aiolb]]
MakeRecorder = Callable[..., Awaitable[Recorder]]

MIB = 1024 * 1024
BLOCK = bytes(range(256)) * 4096  # 1 MiB


def config(upstream: str, store: str = "memory", workers: int = 1,
           max_object_size: str = "8MiB") -> str:  # fmt: skip
    return f"""listeners:
  - name: public
    bind: "{HOST}:0"
    routes:
      - pool: web
        cache: main
        filters:
          - python: tests.filter_support:WorkerPid
caches:
  main:
    store: {store}
    max_object_size: {max_object_size}
pools:
  web:
    upstreams: [{{url: "{upstream}"}}]
admin:
  bind: "{HOST}:0"
workers: {workers}
"""


class BigUpstream(RawUpstream):
    """Answers every request with ``size`` bytes of ``BLOCK``s, cacheable for a
    minute, chunked (no length known in advance) or with a ``Content-Length``."""

    def __init__(self, size: int, chunked: bool) -> None:
        super().__init__({})
        self.size, self.chunked = size, chunked
        self.calls = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                self.calls += 1
                framing = (b"Transfer-Encoding: chunked" if self.chunked
                           else b"Content-Length: %d" % self.size)  # fmt: skip
                writer.write(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\n%s\r\n\r\n"
                             % framing)  # fmt: skip
                for _ in range(self.size // len(BLOCK)):
                    if self.chunked:
                        writer.write(b"%x\r\n" % len(BLOCK))
                    writer.write(BLOCK)
                    if self.chunked:
                        writer.write(b"\r\n")
                    await writer.drain()
                if self.chunked:
                    writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def expected_crc(size: int) -> int:
    crc = 0
    for _ in range(size // len(BLOCK)):
        crc = zlib.crc32(BLOCK, crc)
    return crc


def rss(pid: int) -> int:
    """Resident bytes of process ``pid`` (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


async def download(url: str, pid: int) -> tuple[int, int, Any, int]:
    """GET ``url`` (a new connection): (bytes, their CRC-32, headers, the largest RSS
    growth of ``pid`` seen while it came, sampled every 10 ms)."""
    base = rss(pid)
    peak = base
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss(pid))
            await asyncio.sleep(0.01)

    sampler = asyncio.ensure_future(sample())
    size = crc = 0
    try:
        async with aiohttp.ClientSession() as session, session.get(url) as resp:
            assert resp.status == 200
            async for chunk in resp.content.iter_chunked(MIB):
                size += len(chunk)
                crc = zlib.crc32(chunk, crc)
            headers = resp.headers
    finally:
        done.set()
        await sampler
    return size, crc, headers, peak - base


async def stored_in(redis_server: RedisServer, timeout: float = 10.0) -> None:
    """Wait until an entry is committed to Redis (its key record is there)."""
    client = aioredis.from_url(redis_server.url)
    try:
        await wait_for(lambda: client.keys("aiolb:k:*"), timeout)
    finally:
        await client.aclose()


async def cache_report(proc: Aiolb) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"{proc.admin}/api/caches") as resp:
        body: dict[str, Any] = await resp.json()
        return body["caches"][0]


async def test_a_1_gib_response_passes_a_cached_route_with_memory_flat(
    aiolb: MakeAiolb,
) -> None:
    size = 1024 * MIB
    up = BigUpstream(size, chunked=True)  # no length: kept until it is too big
    await up.start()
    try:
        proc = await aiolb(config(up.url))
        assert proc.proc is not None
        got, crc, headers, growth = await download(f"{proc.url}big", proc.proc.pid)
        assert (got, crc) == (size, expected_crc(size))
        assert growth < 48 * MIB, f"RSS grew by {growth / MIB:.0f} MiB"
        report = await cache_report(proc)
        assert (report["bytes"], report["entries"], report["stored"]) == (0, 0, 0)
        got, _, headers, _ = await download(f"{proc.url}big", proc.proc.pid)
        assert got == size and not headers["Cache-Status"].startswith("aiolb; hit")
        assert up.calls == 2  # nothing was kept: the upstream answered both
    finally:
        await up.stop()


async def test_a_large_body_streams_into_redis_with_memory_flat_and_comes_back_whole(
    aiolb: MakeAiolb, redis_server: RedisServer,
) -> None:  # fmt: skip
    size = 96 * MIB
    up = BigUpstream(size, chunked=False)
    await up.start()
    store = f'{{type: redis, url: "{redis_server.url}"}}'
    try:
        proc = await aiolb(config(up.url, store, max_object_size="128MiB"))
        assert proc.proc is not None
        got, crc, headers, growth = await download(f"{proc.url}big", proc.proc.pid)
        assert (got, crc) == (size, expected_crc(size))
        assert headers["Cache-Status"] == "aiolb; fwd=miss; stored"
        assert growth < 40 * MIB, f"RSS grew by {growth / MIB:.0f} MiB while storing"
        await stored_in(redis_server)
        got, crc, headers, _ = await download(f"{proc.url}big", proc.proc.pid)
        assert (got, crc) == (size, expected_crc(size))
        assert headers["Cache-Status"].startswith("aiolb; hit"), proc.lines[-5:]
        assert up.calls == 1
    finally:
        await up.stop()


async def test_two_workers_on_one_redis_share_hits_and_ride_out_an_outage_under_load(
    aiolb: MakeAiolb, recorders: MakeRecorder, redis_server: RedisServer,
) -> None:  # fmt: skip
    calls: dict[str, int] = {}

    async def counted(request: web.Request) -> web.Response:
        calls[request.path_qs] = calls.get(request.path_qs, 0) + 1
        return web.Response(text=f"{request.path_qs} {calls[request.path_qs]}",
                            headers={"Cache-Control": "max-age=60"})  # fmt: skip

    paths = [*(f"/p{i}" for i in range(200)), "/c", "/fresh"]
    rec = await recorders("a", dict.fromkeys(paths, counted))
    store = f'{{type: redis, url: "{redis_server.url}"}}'
    proc = await aiolb(config(rec.url, store, workers=2), workers=2)
    workers = {str(pid) for pid in proc.worker_pids()}
    assert len(workers) == 2

    async def get(path: str) -> tuple[int, str, str, str]:
        reader, writer = await asyncio.open_connection(HOST, proc.port)  # a new connection
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n"
                         .encode())  # fmt: skip
            data = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        lines = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
        return (int(head.split()[1]), body.decode(), lines.get("Cache-Status", ""),
                lines.get("X-Worker-Pid", ""))  # fmt: skip

    # one worker stores, the other serves the hit
    status, body, cache_status, _ = await get("/c")
    assert (status, body, cache_status) == (200, "/c 1", "aiolb; fwd=miss; stored")
    await stored_in(redis_server)
    hits: set[str] = set()
    for _ in range(200):
        status, body, cache_status, pid = await get("/c")
        assert (status, body) == (200, "/c 1") and cache_status.startswith("aiolb; hit")
        hits.add(pid)
        if hits == workers:
            break
    assert hits == workers, hits  # the worker that did not store served it too
    assert calls["/c"] == 1

    # Redis killed while 16 clients keep asking: every request still succeeds
    answers: list[tuple[int, str, str]] = []
    stop = asyncio.Event()

    async def load(n: int) -> None:
        i = 0
        while not stop.is_set():
            path = "/c" if i % 2 else f"/p{(n * 7 + i) % 200}"
            status, body, _, _ = await get(path)
            answers.append((status, body, path))
            i += 1

    clients = [asyncio.ensure_future(load(n)) for n in range(16)]
    try:
        await wait_for(lambda: len(answers) >= 100, 10.0)
        redis_server.kill()
        killed_at = len(answers)
        await wait_for(lambda: len(answers) >= killed_at + 300, 20.0)
    finally:
        stop.set()
        await asyncio.gather(*clients)
    assert [a for a in answers if a[0] != 200 or not a[1].startswith(a[2] + " ")] == []
    assert proc.logged("bypass the cache") in (1, 2), proc.lines  # once per worker at most
    text = await proc.metrics()
    assert samples(text, "aiolb_cache_errors_total")[(("cache", "main"),)] >= 1

    # Redis back: caching resumes by itself
    redis_server.start()
    await redis_server.ready()

    async def resumed() -> bool:
        await get("/fresh")  # stored by whichever worker answers, once Redis is tried again
        return (await get("/fresh"))[2].startswith("aiolb; hit")

    await wait_for(resumed, 15.0)
