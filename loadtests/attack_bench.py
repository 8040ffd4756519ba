"""The resource attacks of issue #23, run against aiolb, nginx and HAProxy on loopback.

One upstream (upstream.py, the aiohttp app of memory.py: it reads a POST body whole
before it answers, as an application does) and, for each target and
scenario, a freshly started proxy in front of its first port with a connection limit
of 64 (aiolb ``circuit_breaker``, nginx ``max_conns``, HAProxy ``maxconn``). The
attackers are asyncio tasks on raw sockets in this process; beside them a "normal"
client sends one ``GET /20b`` every 100 ms on a new connection with a 2 s timeout.

  slow-body   N connections (300) send a POST head with ``Content-Length: 200``, then
              one body byte per second, for ``--duration`` seconds (20).
  non-reader  N connections (100) each ask for 8 MiB and read nothing (a 4 KiB receive
              buffer); the send timeout is 5 s everywhere. Watched for 12 s.
  pipeline    N connections (200) send ``GET /20b`` and a pipelined POST head with
              ``Content-Length: 5`` and no body; the body timeout is 2 s. Watched 8 s.

The kernel's TCP table (/proc/net/tcp), sampled every 250 ms, tells how many upstream
connections the proxy holds and when it let go of each attacker's connection (its side
left ESTABLISHED: a FIN, even one stuck behind unread data, or a reset).

A benchmark, not a test: it prints one Markdown table per scenario, writes the JSON to
``--json-dir`` and exits 0 when every target started and answered. See README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import re
import shlex
import shutil
import signal
import socket
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bench
import harness
from harness import Child, Session, StartError, Upstream

TARGETS = ("aiolb", "aiolb-streaming", "nginx", "haproxy", "haproxy-buffered")
DEFAULT_TARGETS = TARGETS[:4]
SCENARIOS = ("slow-body", "non-reader", "pipeline")
HEAD_START_S = 1.0  # attackers start over this long, before the normal client starts
NORMAL_EVERY_S = 0.1
NORMAL_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 5.0
SAMPLE_EVERY_S = 0.25
SLOW_BODY_BYTES = 200
BIG_BYTES = 8 * 1024 * 1024
NON_READER_RCVBUF = 4096
NON_READER_EXTRA_S = 7.0  # watched for the send timeout plus this
PIPELINE_EXTRA_S = 6.0  # watched for the body timeout plus this
GRACE_S = 1.0  # "closed in time": within the timeout plus this
ESTABLISHED = "01"
NORMAL_GET = b"GET /20b HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
SLOW_HEAD = b"POST /upload HTTP/1.1\r\nHost: bench\r\nContent-Length: %d\r\n\r\n" % SLOW_BODY_BYTES
BIG_GET = b"GET /stream?bytes=%d HTTP/1.1\r\nHost: bench\r\n\r\n" % BIG_BYTES
PIPELINED = (b"GET /20b HTTP/1.1\r\nHost: bench\r\n\r\n"
             b"POST /upload HTTP/1.1\r\nHost: bench\r\nContent-Length: 5\r\n\r\n")  # fmt: skip
STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


# --- the targets' configs ------------------------------------------------------------


@dataclass(frozen=True)
class Knobs:
    """One scenario's timeouts, in seconds (None: each proxy's default)."""

    send: float | None = None  # aiolb timeouts.send, nginx send_timeout
    body: float | None = None  # aiolb timeouts.body, nginx client_body_timeout

    @property
    def client(self) -> str:
        """HAProxy has one client-side inactivity timeout for both."""
        value = self.send or self.body
        return f"{value:g}s" if value else "60s"


def knobs(scenario: str, args: argparse.Namespace) -> Knobs:
    if scenario == "non-reader":
        return Knobs(send=args.send_timeout)
    if scenario == "pipeline":
        return Knobs(body=args.body_timeout)
    return Knobs()


def aiolb_listener(k: Knobs, streaming: bool) -> str:
    timeouts = [f"{name}: {value:g}" for name, value in (("send", k.send), ("body", k.body))
                if value is not None]  # fmt: skip
    lines = f"    timeouts: {{{', '.join(timeouts)}}}\n" if timeouts else ""
    return lines + ("    limits: {body_buffer_size: 0}\n" if streaming else "")


def start_aiolb(bench_: AttackBench, k: Knobs, streaming: bool) -> tuple[Child, int]:
    session, limit = bench_.session, bench_.args.conn_limit
    port = session.port()
    pool = (f"    circuit_breaker: {{max_connections: {limit}, max_pending: {limit}, "
            "queue_timeout: 1}\n")  # fmt: skip
    config = harness.aiolb_config(session, port, bench_.upstream, pool=pool,
                                  ports=[bench_.upstream_port],
                                  listener=aiolb_listener(k, streaming))  # fmt: skip
    argv = [arg.replace("{config}", str(config)) for arg in bench_.args.aiolb_cmd]
    return harness.start(session, "aiolb", argv, port, cwd=harness.REPO), port


def start_nginx(bench_: AttackBench, k: Knobs) -> tuple[Child, int]:
    """One worker, ``proxy_http_version 1.1`` with upstream keep-alive, ``max_conns``
    on the server line (open source since 1.11.5; ``queue`` is nginx Plus only, so a
    request beyond the limit gets 502 at once), default buffering."""
    session, limit = bench_.session, bench_.args.conn_limit
    port = session.port()
    timeouts = "".join(f"        {name} {value:g}s;\n" for name, value in
                       (("send_timeout", k.send), ("client_body_timeout", k.body))
                       if value is not None)  # fmt: skip
    conf = (
        harness.nginx_common(session, "nginx", 1)
        + f"""
    upstream bench {{
        server 127.0.0.1:{bench_.upstream_port} max_conns={limit};
        keepalive {limit};
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;
{timeouts}        location / {{
            proxy_pass http://bench;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""
    )
    path = session.path("nginx.conf")
    path.write_text(conf)
    return harness.start(session, "nginx", harness.nginx_argv(session, path), port), port


def start_haproxy(bench_: AttackBench, k: Knobs, buffered: bool) -> tuple[Child, int]:
    """``maxconn`` on the server line; the rest waits in the queue for ``timeout queue``
    (1 s, as aiolb's ``queue_timeout``). HAProxy's one client-side timeout plays both
    nginx's ``send_timeout`` and ``client_body_timeout``. ``buffered``: ``option
    http-buffer-request`` (the body is waited for, within ``timeout http-request``,
    before a server is picked)."""
    session, limit = bench_.session, bench_.args.conn_limit
    port = session.port()
    conf = f"""global
    nbthread 1
    maxconn 5000

defaults
    mode http
    timeout connect 5s
    timeout client {k.client}
    timeout http-request 10s
    timeout server 60s
    timeout queue 1s
    http-reuse always
{"    option http-buffer-request" + chr(10) if buffered else ""}
frontend bench
    bind 127.0.0.1:{port}
    default_backend bench

backend bench
    server s1 127.0.0.1:{bench_.upstream_port} maxconn {limit}
"""
    path = session.path("haproxy.cfg")
    path.write_text(conf)
    argv = ["haproxy", "-db", "-f", str(path)]
    return harness.start(session, "haproxy", argv, port), port


# --- watching the kernel's TCP table -------------------------------------------------


def tcp_table() -> list[tuple[int, int, str]]:
    """(local port, remote port, state) of every IPv4 TCP socket on this machine."""
    rows = []
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            local, remote, state = line.split()[1:4]
            rows.append((int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16),
                         state))  # fmt: skip
    return rows


@dataclass
class Watch:
    """What the proxy holds: its upstream connections, and which attackers' connections
    its side still has ESTABLISHED (``opened``: attacker port -> when it connected)."""

    proxy_port: int
    upstream_port: int
    opened: dict[int, float] = field(default_factory=dict)
    closed_after: dict[int, float] = field(default_factory=dict)
    upstream_now: int = 0
    upstream_peak: int = 0

    def sample(self) -> None:
        now, held, upstream = time.monotonic(), set(), 0
        for local, remote, state in tcp_table():
            if state != ESTABLISHED:
                continue
            if remote == self.upstream_port:
                upstream += 1
            elif local == self.proxy_port:
                held.add(remote)
        self.upstream_now, self.upstream_peak = upstream, max(self.upstream_peak, upstream)
        for port, since in self.opened.items():
            if port not in held and port not in self.closed_after:
                self.closed_after[port] = now - since

    async def run(self, seconds: float) -> None:
        for _ in range(int(seconds / SAMPLE_EVERY_S) + 1):
            self.sample()
            await asyncio.sleep(SAMPLE_EVERY_S)

    def held(self) -> int:
        return len(self.opened) - len(self.closed_after)


# --- clients -------------------------------------------------------------------------


async def connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    try:
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), CONNECT_TIMEOUT_S)
    except BaseException:
        sock.close()
        raise
    return sock


async def normal_get(port: int) -> tuple[str, float]:
    """One ``GET /20b`` on a new connection: ("ok" | "NNN" | "timeout" | error, seconds)."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(NORMAL_TIMEOUT_S):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(NORMAL_GET)
                data = await reader.read(-1)
            finally:
                writer.close()
    except TimeoutError:
        return "timeout", NORMAL_TIMEOUT_S
    except OSError as exc:
        return type(exc).__name__, time.monotonic() - started
    found = STATUS_LINE.match(data)
    status = found.group(1).decode() if found else "no status"
    ok = status == "200" and data.endswith(b"\r\n\r\n" + b"x" * 20)
    return "ok" if ok else status, time.monotonic() - started


async def normal_load(port: int, seconds: float) -> list[tuple[str, float]]:
    """One request every 100 ms for ``seconds``, each its own task."""
    tasks, start = [], time.monotonic()
    for n in range(int(seconds / NORMAL_EVERY_S)):
        tasks.append(asyncio.create_task(normal_get(port)))
        await asyncio.sleep(max(0.0, start + (n + 1) * NORMAL_EVERY_S - time.monotonic()))
    return list(await asyncio.gather(*tasks))


def peek_answer(sock: socket.socket) -> str:
    """What the proxy has answered, looked at without reading it."""
    try:
        head = sock.recv(16, socket.MSG_PEEK)
    except BlockingIOError:
        return "answer: none"
    except OSError:
        return "answer: reset"
    if not head:
        return "answer: EOF"
    found = STATUS_LINE.match(head)
    return f"answer: {found.group(1).decode()}" if found else "answer: ?"


async def slow_body(port: int, watch: Watch, outcomes: Counter[str]) -> None:
    """A POST head, then a body byte a second; never the last one."""
    sock = await connect(port)
    watch.opened[sock.getsockname()[1]] = time.monotonic()
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_sendall(sock, SLOW_HEAD)
        for _ in range(SLOW_BODY_BYTES - 1):
            await asyncio.sleep(1.0)
            await loop.sock_sendall(sock, b"x")
    except OSError:
        outcomes["send failed"] += 1
    finally:
        outcomes[peek_answer(sock)] += 1
        sock.close()


async def non_reader(port: int, watch: Watch, outcomes: Counter[str]) -> None:
    """Ask for 8 MiB with a small receive buffer and read nothing, until cancelled."""
    sock = await connect(port, NON_READER_RCVBUF)
    watch.opened[sock.getsockname()[1]] = time.monotonic()
    try:
        await asyncio.get_running_loop().sock_sendall(sock, BIG_GET)
        await asyncio.Event().wait()
    except OSError:
        outcomes["send failed"] += 1
    finally:
        outcomes[peek_answer(sock)] += 1
        sock.close()


async def pipelined(port: int, wait_s: float, outcomes: Counter[str], closes: list[float]) -> None:
    """``GET`` + a POST head with no body in one write; read until the proxy closes."""
    sock = await connect(port)
    loop, data, started = asyncio.get_running_loop(), bytearray(), time.monotonic()
    try:
        await loop.sock_sendall(sock, PIPELINED)
        async with asyncio.timeout(wait_s):
            while chunk := await loop.sock_recv(sock, 65536):
                data += chunk
        closes.append(time.monotonic() - started)
    except TimeoutError:
        outcomes["still open"] += 1
    except OSError:
        closes.append(time.monotonic() - started)
        outcomes["reset"] += 1
    finally:
        sock.close()
    statuses = [m.decode() for m in STATUS_LINE.findall(bytes(data))]
    outcomes["GET answered"] += statuses[:1] == ["200"]
    outcomes["408"] += "408" in statuses
    outcomes["POST answered " + ",".join(statuses[1:])] += len(statuses) > 1


# --- scenarios -----------------------------------------------------------------------


Attacker = Callable[[], Awaitable[None]]


async def ramped(attacker: Attacker, delay: float) -> None:
    await asyncio.sleep(delay)
    await attacker()


async def attack(port: int, attacker: Attacker, count: int, watch: Watch, seconds: float,
                 outcomes: Counter[str]) -> list[tuple[str, float]]:  # fmt: skip
    """``count`` attackers, started evenly over the head start (a burst of 200 at once
    would overflow the connection limit by itself), and the watcher; then the normal
    client for the rest of ``seconds``; then every attacker still running is cancelled."""
    watcher = asyncio.create_task(watch.run(seconds + 1))
    tasks = [asyncio.create_task(ramped(attacker, n * HEAD_START_S / count)) for n in range(count)]
    await asyncio.sleep(HEAD_START_S)
    normal = await normal_load(port, seconds - HEAD_START_S)
    watch.sample()
    for task in (*tasks, watcher):
        task.cancel()
    for result in await asyncio.gather(*tasks, watcher, return_exceptions=True):
        if isinstance(result, Exception):
            outcomes[f"attacker: {type(result).__name__}"] += 1
    return normal


def percentile(values: Sequence[float], q: float) -> float | None:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else None


def normal_summary(normal: list[tuple[str, float]]) -> dict[str, Any]:
    ok = [seconds for outcome, seconds in normal if outcome == "ok"]
    failed = Counter(outcome for outcome, _ in normal if outcome != "ok")
    return {"normal_sent": len(normal), "normal_ok": len(ok), "normal_failed": dict(failed),
            "p50_ms": _ms(percentile(ok, 0.5)), "p99_ms": _ms(percentile(ok, 0.99))}  # fmt: skip


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def watch_summary(watch: Watch) -> dict[str, Any]:
    closes = list(watch.closed_after.values())
    return {"attackers_connected": len(watch.opened), "attackers_held_at_end": watch.held(),
            "upstream_peak": watch.upstream_peak, "upstream_at_end": watch.upstream_now,
            "closed_median_s": _round(statistics.median(closes) if closes else None),
            "closed_max_s": _round(max(closes) if closes else None)}  # fmt: skip


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


async def run_scenario(name: str, port: int, upstream_port: int,
                       args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    watch, outcomes = Watch(port, upstream_port), Counter[str]()
    closes: list[float] = []
    attacker: Attacker
    if name == "slow-body":
        count, seconds = args.slow_attackers, float(args.duration)
        attacker = lambda: slow_body(port, watch, outcomes)  # noqa: E731
    elif name == "non-reader":
        count, seconds = args.non_readers, args.send_timeout + NON_READER_EXTRA_S
        attacker = lambda: non_reader(port, watch, outcomes)  # noqa: E731
    else:
        count, seconds = args.pipelines, args.body_timeout + PIPELINE_EXTRA_S
        wait = seconds - 0.5
        attacker = lambda: pipelined(port, wait, outcomes, closes)  # noqa: E731
    normal = await attack(port, attacker, count, watch, seconds, outcomes)
    report = {"scenario": name, "attackers": count, "seconds": seconds,
              **normal_summary(normal), **watch_summary(watch)}  # fmt: skip
    if name == "pipeline":
        timeout = args.body_timeout + GRACE_S
        report |= {"closed_in_time": sum(c <= timeout for c in closes),
                   "closed_median_s": _round(statistics.median(closes) if closes else None),
                   "closed_max_s": _round(max(closes) if closes else None)}  # fmt: skip
    report["outcomes"] = {k: v for k, v in outcomes.items() if v}
    return report


# --- one target, one scenario --------------------------------------------------------


@dataclass
class AttackBench:
    args: argparse.Namespace
    session: Session
    upstream: Upstream

    @property
    def upstream_port(self) -> int:
        return self.upstream.ports[0]

    def start(self, target: str, scenario: str) -> tuple[Child, int]:
        k = knobs(scenario, self.args)
        if target in ("aiolb", "aiolb-streaming"):
            return start_aiolb(self, k, streaming=target == "aiolb-streaming")
        if target == "nginx":
            return start_nginx(self, k)
        if shutil.which("haproxy") is None:
            raise StartError("haproxy is not installed")
        return start_haproxy(self, k, buffered=target == "haproxy-buffered")

    def run(self, target: str, scenario: str) -> dict[str, Any]:
        base = {"target": target, "scenario": scenario}
        try:
            child, port = self.start(target, scenario)
        except (StartError, OSError) as exc:
            return base | {"status": "failed to start", "detail": str(exc)}
        try:
            check = asyncio.run(normal_get(port))[0]
            if check != "ok":
                return base | {"status": "not answering", "detail": check}
            return (
                base
                | {"status": "ok"}
                | asyncio.run(run_scenario(scenario, port, self.upstream_port, self.args))
            )
        finally:
            self.session.stop(child)


# --- report --------------------------------------------------------------------------


def failures(row: dict[str, Any]) -> str:
    failed = row["normal_failed"]
    if not failed:
        return "0"
    parts = ", ".join(f"{n} x {why}" for why, n in sorted(failed.items(), key=lambda kv: -kv[1]))
    return f"{sum(failed.values())} ({parts})"


def cell(value: Any) -> str:
    return "—" if value is None else str(value)


def answers(row: dict[str, Any]) -> str:
    """The attackers' answers by status ("none": nothing yet, "EOF": closed unanswered)."""
    found = {k.removeprefix("answer: "): v for k, v in row["outcomes"].items()
             if k.startswith("answer: ")}  # fmt: skip
    return ", ".join(f"{why} x {n}" for why, n in sorted(found.items(), key=lambda kv: -kv[1]))


def closed_cell(row: dict[str, Any]) -> str:
    if row["closed_median_s"] is None:
        return "none"
    return f"{row['closed_median_s']} / {row['closed_max_s']}"


COLUMNS: dict[str, list[tuple[str, Callable[[dict[str, Any]], str]]]] = {
    "slow-body": [
        ("attackers held at end", lambda r: f"{r['attackers_held_at_end']} of {r['attackers']}"),
        ("upstream conns peak", lambda r: cell(r["upstream_peak"])),
        ("attackers' answers", answers),
    ],
    "non-reader": [
        ("attackers closed", lambda r: f"{r['attackers'] - r['attackers_held_at_end']} of "
                                       f"{r['attackers']}"),
        ("closed after s (median / max)", closed_cell),
        ("upstream conns peak / end", lambda r: f"{r['upstream_peak']} / {r['upstream_at_end']}"),
        ("attackers' answers", answers),
    ],
    "pipeline": [
        ("GET answered", lambda r: cell(r["outcomes"].get("GET answered", 0))),
        ("408 seen", lambda r: cell(r["outcomes"].get("408", 0))),
        ("closed ≤ timeout + 1 s", lambda r: f"{r['closed_in_time']} of {r['attackers']}"),
        ("closed after s (median / max)", closed_cell),
        ("still open", lambda r: cell(r["outcomes"].get("still open", 0))),
    ],
}  # fmt: skip


def markdown(rows: list[dict[str, Any]], scenarios: Sequence[str]) -> str:
    out = []
    for scenario in scenarios:
        extra = COLUMNS[scenario]
        head = ["target", "normal OK", "normal failed", "p50 ms", "p99 ms",
                *(name for name, _ in extra)]  # fmt: skip
        out += [f"### {scenario}", "", "| " + " | ".join(head) + " |",
                "| --- |" + " ---: |" * (len(head) - 1)]  # fmt: skip
        for row in (r for r in rows if r["scenario"] == scenario):
            if row["status"] != "ok":
                out.append(f"| {row['target']} | {row['status']}: {row['detail']} |")
                continue
            cells = [row["target"], f"{row['normal_ok']} of {row['normal_sent']}",
                     failures(row), cell(row["p50_ms"]), cell(row["p99_ms"]),
                     *(render(row) for _, render in extra)]  # fmt: skip
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


# --- main ----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", type=bench.csv(TARGETS), default=list(DEFAULT_TARGETS))
    p.add_argument("--scenarios", type=bench.csv(SCENARIOS), default=list(SCENARIOS))
    p.add_argument("--slow-attackers", type=int, default=300)
    p.add_argument("--non-readers", type=int, default=100)
    p.add_argument("--pipelines", type=int, default=200)
    p.add_argument("--duration", type=int, default=20, help="seconds of slow-body")
    p.add_argument("--send-timeout", type=float, default=5.0, help="non-reader's send timeout")
    p.add_argument("--body-timeout", type=float, default=2.0, help="pipeline's body timeout")
    p.add_argument("--conn-limit", type=int, default=64, help="upstream connections per proxy")
    p.add_argument(
        "--aiolb-cmd",
        type=shlex.split,
        default=harness.default_aiolb_cmd(),
        help="command that runs aiolb; {config} is the generated YAML",
    )
    p.add_argument("--json-dir", type=Path, default=harness.HERE / "results")
    p.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    args = p.parse_args(argv)
    if args.duration <= HEAD_START_S:
        p.error(f"--duration must be more than {HEAD_START_S:g} s")
    return args


def run(args: argparse.Namespace, session: Session) -> dict[str, Any]:
    machine = bench.describe_machine(args.aiolb_cmd)
    machine["nofile_limit"] = harness.raise_nofile()
    upstream = harness.start_upstream(session, None, 1, "aiohttp")
    print(f"upstream: {upstream.note}, port {upstream.ports[0]}", flush=True)
    attack_bench, rows = AttackBench(args, session, upstream), []
    for target in args.targets:
        for scenario in args.scenarios:
            rows.append(attack_bench.run(target, scenario))
            print(f"   {target:<16} {scenario:<10} {brief(rows[-1])}", flush=True)
    return {"machine": machine, "upstream": upstream.note, "rows": rows,
            "options": {k: v for k, v in vars(args).items() if k != "json_dir"}}  # fmt: skip


def brief(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row['detail']}"
    return (
        f"normal ok {row['normal_ok']}/{row['normal_sent']}, failed {failures(row)}; "
        f"held at end {row['attackers_held_at_end']}, upstream peak {row['upstream_peak']}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with Session(keep_dir=args.keep_tmp) as session:
        if args.keep_tmp:
            print(f"configs and logs in {session.dir}")
        report = run(args, session)
    print()
    print(markdown(report["rows"], args.scenarios))
    print(f"JSON written to {harness.write_json(args.json_dir, 'attack', report)}")
    return 0 if all(row["status"] == "ok" for row in report["rows"]) else 1


if __name__ == "__main__":
    harness.run_main(main)
