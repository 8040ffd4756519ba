"""Memory use of aiolb with many idle connections and with very large bodies.

Three tests, each against a freshly started proxy in front of the aiohttp upstream
(upstream.py), measuring the proxy's RSS (VmRSS from /proc, summed over the process and
its children) against a baseline taken just before the test:

  idle      N keep-alive client connections (default 10,000), each sends one request and
            stays open; RSS after they are all open. Target: at most 60 MB added.
  download  a 1 GiB response streamed through the proxy; the client pauses 2 s after the
            headers (so the proxy must push back on the upstream), then reads and
            discards. Peak RSS while it runs. Target: at most 16 MB added.
  upload    a 1 GiB request body through the proxy; the upstream waits 2 s before it
            starts reading (so the proxy must push back on the client), then counts the
            bytes. Peak RSS while it runs. Target: at most 16 MB added.

MB here is 10^6 bytes. A benchmark script, not a pytest test: it prints a table and
exits 0 when everything passed, 1 when something failed, 2 when the proxy did not start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shlex
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType

import harness
from harness import Child, Session, StartError, Upstream

MB = 1_000_000
GIB = 1 << 30
IDLE_LIMIT_MB = 60.0
STREAM_LIMIT_MB = 16.0
CONNECT_CONCURRENCY = 200
SETTLE_S = 1.0
REUSE_SAMPLE = 100
SAMPLE_INTERVAL_S = 0.02
READ_SIZE = 1 << 20
CHUNK = b"\0" * (256 * 1024)
GET_20B = b"GET /20b HTTP/1.1\r\nHost: bench\r\n\r\n"
TESTS = ("idle", "download", "upload")


@dataclass
class Outcome:
    test: str
    baseline_kib: int
    measured_kib: int  # RSS after (idle) or peak RSS during the transfer
    limit_mb: float
    ok: bool  # the traffic itself went through as it should
    notes: str

    @property
    def added_mb(self) -> float:
        return (self.measured_kib - self.baseline_kib) * 1024 / MB

    @property
    def passed(self) -> bool:
        return self.ok and self.added_mb <= self.limit_mb


class Sampler:
    """Samples the RSS of a process tree in the background and keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.tree = harness.process_tree(pid)
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    def now(self) -> int:
        return harness.rss_kib(self.tree[0], self.tree)

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self.now())
            await asyncio.sleep(SAMPLE_INTERVAL_S)

    async def __aenter__(self) -> Sampler:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.peak = max(self.peak, self.now())


# --- minimal HTTP/1.1 client -----------------------------------------------------------


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    status_line, *lines = head.split("\r\n")
    headers = {}
    for line in lines:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers


async def read_exactly(reader: asyncio.StreamReader, size: int, keep: bytearray | None) -> int:
    left = size
    while left > 0:
        data = await reader.read(min(left, READ_SIZE))
        if not data:
            raise ConnectionError(f"connection closed with {left} body bytes missing")
        if keep is not None:
            keep += data
        left -= len(data)
    return size


async def read_chunked(reader: asyncio.StreamReader, keep: bytearray | None) -> int:
    total = 0
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                pass
            return total
        total += await read_exactly(reader, size, keep)
        await reader.readexactly(2)


async def read_body(
    reader: asyncio.StreamReader, headers: dict[str, str], keep: bytearray | None = None
) -> int:
    """Read (and drop, unless `keep` is given) one response body; returns its length."""
    if "chunked" in headers.get("transfer-encoding", ""):
        return await read_chunked(reader, keep)
    return await read_exactly(reader, int(headers.get("content-length", "0")), keep)


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(GET_20B)
    status, headers = await read_head(reader)
    await read_body(reader, headers)
    if status != 200:
        raise RuntimeError(f"status {status}")


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, limit=READ_SIZE)


# --- tests -----------------------------------------------------------------------------


async def open_idle(
    port: int, gate: asyncio.Semaphore
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    async with gate:
        reader, writer = await asyncio.wait_for(connect(port), 30)
        try:
            await asyncio.wait_for(exchange(reader, writer), 30)
        except BaseException:
            writer.close()
            raise
        return reader, writer


async def reuse(conns: Sequence[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> int:
    """How many of `conns` still answer a second request."""
    results = await asyncio.gather(
        *(asyncio.wait_for(exchange(r, w), 10) for r, w in conns), return_exceptions=True
    )
    return sum(not isinstance(result, BaseException) for result in results)


async def idle_test(port: int, pid: int, count: int, _size: int, _stall: float) -> Outcome:
    reader, writer = await connect(port)
    await exchange(reader, writer)
    writer.close()
    sampler = Sampler(pid)
    baseline = sampler.now()
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    started = time.monotonic()
    results = await asyncio.gather(
        *(open_idle(port, gate) for _ in range(count)), return_exceptions=True
    )
    opened = time.monotonic() - started
    conns = [r for r in results if not isinstance(r, BaseException)]
    failures = Counter(type(r).__name__ for r in results if isinstance(r, BaseException))
    await asyncio.sleep(SETTLE_S)
    after = sampler.now()
    still_open = sum(not r.at_eof() for r, _ in conns)
    reused = await reuse(conns[:REUSE_SAMPLE])
    for _, w in conns:
        w.close()
    notes = f"{len(conns)}/{count} opened in {opened:.1f}s, {still_open} open after {SETTLE_S:.0f}s"
    notes += f", {reused}/{min(REUSE_SAMPLE, len(conns))} answered a 2nd request"
    if failures:
        notes += f", failures: {dict(failures)}"
    ok = len(conns) == count == still_open and reused == min(REUSE_SAMPLE, count)
    return Outcome(
        f"{count:,} idle keep-alive connections", baseline, after, IDLE_LIMIT_MB, ok, notes
    )


def rate(size: int, seconds: float) -> str:
    return f"{size / MB:,.0f} MB in {seconds:.1f}s ({size / MB / max(seconds, 1e-9):,.0f} MB/s)"


async def download_test(port: int, pid: int, _count: int, size: int, stall: float) -> Outcome:
    reader, writer = await connect(port)
    await exchange(reader, writer)
    async with Sampler(pid) as sampler:
        baseline = sampler.now()
        started = time.monotonic()
        writer.write(f"GET /stream?bytes={size} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        status, headers = await read_head(reader)
        await asyncio.sleep(stall)
        got = await read_body(reader, headers)
        elapsed = time.monotonic() - started
    writer.close()
    notes = f"status {status}, {rate(got, elapsed)}, client paused {stall:g}s after the headers"
    ok = status == 200 and got == size
    return Outcome(
        f"{size / GIB:g} GiB download", baseline, sampler.peak, STREAM_LIMIT_MB, ok, notes
    )


async def send_body(writer: asyncio.StreamWriter, size: int) -> None:
    left = size
    while left > 0:
        n = min(left, len(CHUNK))
        writer.write(CHUNK if n == len(CHUNK) else CHUNK[:n])
        await writer.drain()
        left -= n


async def upload_test(port: int, pid: int, _count: int, size: int, stall: float) -> Outcome:
    reader, writer = await connect(port)
    await exchange(reader, writer)
    head = f"POST /upload?stall={stall:g} HTTP/1.1\r\nHost: bench\r\nContent-Length: {size}\r\n"
    head += "Content-Type: application/octet-stream\r\n\r\n"
    async with Sampler(pid) as sampler:
        baseline = sampler.now()
        started = time.monotonic()
        writer.write(head.encode())
        await send_body(writer, size)
        status, headers = await read_head(reader)
        answer = bytearray()
        await read_body(reader, headers, answer)
        elapsed = time.monotonic() - started
    writer.close()
    counted = answer.decode(errors="replace").strip()
    notes = f"status {status}, {rate(size, elapsed)}, upstream counted {counted or '?'} bytes"
    notes += f", upstream paused {stall:g}s before reading"
    ok = status == 200 and counted == str(size)
    return Outcome(f"{size / GIB:g} GiB upload", baseline, sampler.peak, STREAM_LIMIT_MB, ok, notes)


TestFn = Callable[[int, int, int, int, float], Awaitable[Outcome]]
TEST_FUNCS: dict[str, TestFn] = {
    "idle": idle_test,
    "download": download_test,
    "upload": upload_test,
}
TEST_LIMITS = {"idle": IDLE_LIMIT_MB, "download": STREAM_LIMIT_MB, "upload": STREAM_LIMIT_MB}


# --- running ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", default=",".join(TESTS), help="comma-separated: %(default)s")
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--bytes", type=int, default=GIB, help="download/upload size")
    parser.add_argument("--stall", type=float, default=2.0, help="seconds of back-pressure")
    parser.add_argument("--target", choices=("aiolb", "nginx", "haproxy"), default="aiolb")
    parser.add_argument(
        "--aiolb-cmd",
        type=shlex.split,
        default=harness.default_aiolb_cmd(),
        help="command that runs aiolb; {config} is replaced by the YAML path",
    )
    parser.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    args = parser.parse_args(argv)
    args.tests = [t.strip() for t in args.tests.split(",") if t.strip()]
    unknown = set(args.tests) - set(TESTS)
    if unknown:
        parser.error(f"unknown tests {sorted(unknown)}; choose from {list(TESTS)}")
    return args


def start_target(
    session: Session, args: argparse.Namespace, upstream: Upstream
) -> tuple[Child, int]:
    if args.target == "aiolb":
        return harness.start_aiolb(session, upstream, None, args.aiolb_cmd)
    if args.target == "nginx":
        return harness.start_nginx_proxy(session, upstream, None)
    return harness.start_haproxy(session, upstream, None)


def run_one(session: Session, args: argparse.Namespace, upstream: Upstream, test: str) -> Outcome:
    """Start a fresh proxy, run one test against it, stop it."""
    child, port = start_target(session, args, upstream)
    print(f"-- {test}: {args.target} pid {child.pid} on port {port}", flush=True)
    try:
        coro = TEST_FUNCS[test](port, child.pid, args.connections, args.bytes, args.stall)
        return asyncio.run(asyncio.wait_for(coro, timeout=300))
    except (OSError, RuntimeError, ValueError, EOFError, asyncio.LimitOverrunError) as exc:
        tail = child.tail(5).replace("\n", " / ")
        notes = f"{type(exc).__name__}: {exc}; {args.target} log: {tail}"
        return Outcome(test, 0, 0, TEST_LIMITS[test], False, notes)
    finally:
        session.stop(child)


def table(outcomes: Sequence[Outcome]) -> str:
    lines = [
        "| test | baseline MB | measured MB | added MB | target | result | notes |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for o in outcomes:
        result = "pass" if o.passed else "FAIL"
        cells = [
            o.test,
            f"{o.baseline_kib * 1024 / MB:.1f}",
            f"{o.measured_kib * 1024 / MB:.1f}",
            f"{o.added_mb:.1f}",
            f"≤ {o.limit_mb:g}",
            result,
            o.notes,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fit_connections(args: argparse.Namespace) -> None:
    limit = harness.raise_nofile(max(65536, 2 * args.connections + 1000))
    if limit < args.connections + 500:
        print(
            f"warning: open-file limit is {limit}; idle test reduced to {limit - 500} connections"
        )
        args.connections = limit - 500


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    fit_connections(args)
    outcomes = []
    with Session(keep_dir=args.keep_tmp) as session:
        upstream = harness.start_upstream(session, None, 1, "aiohttp")
        print(f"upstream: {upstream.note} on ports {upstream.ports}; logs in {session.dir}")
        for test in args.tests:
            try:
                outcomes.append(run_one(session, args, upstream, test))
            except StartError as exc:
                print(f"{args.target} failed to start: {exc}")
                return 2
    print()
    print(f"RSS of {args.target} (VmRSS of its process tree; MB = 10^6 bytes)")
    print()
    print(table(outcomes))
    return 0 if all(o.passed for o in outcomes) else 1


if __name__ == "__main__":
    harness.run_main(main)
