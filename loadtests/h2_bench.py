"""HTTP/2 and gRPC throughput of aiolb next to nginx and HAProxy, measured with h2load.

What it measures (issue 25, "Speed"): requests/s of HTTP/2 clients (``h2load``, h2c with
prior knowledge) through aiolb, nginx (``listen ... http2``) and HAProxy (``bind ...
proto h2``), each one process on one core, in front of the same upstream, for every
combination of

- the client's shape: ``1x100`` (one connection, 100 concurrent streams) and ``64x10``
  (64 connections, 10 streams each);
- the body: ``20b`` and ``64k`` (a GET of a fixed 20-byte or 64 KiB file);
- the upstream protocol: ``h1`` (h2->h1: the proxy speaks HTTP/1.1 keep-alive to the
  upstream) and ``h2`` (h2->h2: HTTP/2 with prior knowledge to the upstream; nginx 1.22
  cannot proxy HTTP/2 to an upstream, so it has no h2->h2 row).

The upstream is nginx (``--upstream-workers``, default one per load core) serving the
bodies over HTTP/1.1 on two ports and h2c on two others; each proxy balances over the
two ports of a kind. ``direct`` is h2load against the upstream's h2c port (the ceiling,
measured in the h2->h2 scenarios only). Pinning as bench.py: the proxy under test on
CPU 1, h2load and the upstream on the others.

Every target starts once; then ``--rounds`` interleaved rounds: per scenario, every
target in turn (the order rotated each round): a check (two concurrent streams on one
HTTP/2 connection: status 200, the body's size), a 1 s h2load warm-up, the timed h2load
run (``--duration``). A run counts only when h2load reports every request succeeded
(0 failed, errored or timed out, only 2xx) and the DATA bytes add up to the body size;
otherwise the row says ``errors`` and its rate is not used. The table gives medians,
ratios to nginx (and to HAProxy) taken within each round (the machine's drift falls on
both sides) with their range, p50/p99 latency (from h2load's ``--log-file``, unless
``--no-latency``: writing it costs h2load ~10% on the load core), the proxy's CPU time
per request (its process tree's user+system time over the run: less noisy than req/s
on a shared machine) and each core's busy percent.

The gRPC load: a grpcio server (``grpc.aio``, generic handlers on raw bytes: ``Unary``
echoes, ``Stream`` streams messages until cancelled) and a grpcio client (``grpc.aio``,
one channel) in processes of their own on the load core: ``unary``: ``--grpc-concurrency``
calls in flight for ``--duration`` s (calls/s, p50/p99), ``stream``: one server-streaming
call (messages/s); directly and through aiolb (a listener with ``h2c``, a pool with
``http_version: "2"``), interleaved in the same rounds; the ratio is aiolb / direct.

``--profile`` instead runs aiolb under cProfile for one scenario (default
``1x100-20b-h1``) and prints where its time goes: the top functions by own time and the
sums by package (the ``h2``/``hpack``/``hyperframe`` codec, aiolb's ``proxy``, the rest).

A benchmark, not a test. Run from the repository root with the project's venv::

    python loadtests/h2_bench.py                          # 3 rounds of 5 s (~10 min)
    python loadtests/h2_bench.py --rounds 5 --duration 4
    python loadtests/h2_bench.py --rounds 1 --duration 2 --shapes 1x100 --bodies 20b --no-grpc
    python loadtests/h2_bench.py --grpc-only --rounds 5
    python loadtests/h2_bench.py --profile --duration 10

Writes ``loadtests/results/h2-bench-YYYYmmdd-HHMMSS.json`` (``h2-profile-...`` for
``--profile``). Exit status 0 when every run completed and every check passed, whatever
the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import json
import os
import pstats
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import bench
import h2.config
import h2.connection
import h2.events
import harness
from harness import Child, Pinning, Session, StartError

SHAPES = {"1x100": (1, 100), "64x10": (64, 10)}
BODIES = {"20b": 20, "64k": 64 * 1024}
UPSTREAM_PROTOCOLS = ("h1", "h2")
TARGETS = ("aiolb", "nginx", "haproxy", "direct")
REFERENCE = "nginx"
WARMUP_S = 1
NOISE_BUSY_PERCENT = 15.0
GRPC_SERVICE = "bench.Load"
GRPC_KINDS = ("unary", "stream")
#: Which (target, upstream protocol) pairs exist, and why the others do not.
NOT_MEASURED = {
    ("nginx", "h2"): "nginx 1.22 cannot proxy HTTP/2 to upstreams",
    ("direct", "h1"): "h2load speaks HTTP/2 only; direct is in the h2->h2 tables",
}


@dataclass(frozen=True)
class Scenario:
    shape: str
    body: str
    upstream: str  # "h1" or "h2": what the proxy speaks to the upstream

    @property
    def name(self) -> str:
        return f"{self.shape}-{self.body}-{self.upstream}"

    @property
    def about(self) -> str:
        clients, streams = SHAPES[self.shape]
        return (f"h2->{self.upstream}, {clients} connection(s) x {streams} streams, "
                f"GET {self.body}")  # fmt: skip

    @property
    def size(self) -> int:
        return BODIES[self.body]


@dataclass
class Result:
    target: str
    scenario: str
    #: "ok", "errors" (h2load saw failures), "bad answer" (the check), "not answering",
    #: "h2load failed", "failed to start", "not measured"
    status: str
    rps: float | None = None
    requests: int = 0
    failed: int = 0  # failed + errored + timeout, as h2load counts them
    non_2xx: int = 0
    data_bytes: int = 0
    mean_us: float | None = None
    p50_us: float | None = None
    p99_us: float | None = None
    cpu_us_per_request: float | None = None  # the proxy's process tree
    cpu_busy: dict[int, float] = field(default_factory=dict)
    detail: str | None = None
    round: int = 0


@dataclass
class Running:
    """A started target: its listening port per upstream protocol, the processes whose
    CPU time it is charged."""

    name: str
    child: Child | None
    ports: dict[str, int]
    pids: list[int] = field(default_factory=list)
    grpc_port: int | None = None


@dataclass(frozen=True)
class Ports:
    """The upstream's ports: HTTP/1.1 and h2c, two of each; the gRPC server's."""

    h1: tuple[int, int]
    h2: tuple[int, int]
    grpc: int


# --- upstream and proxies --------------------------------------------------------------


def upstream_conf(session: Session, ports: Ports, workers: int) -> Path:
    docroot = session.path("docroot")
    docroot.mkdir(mode=0o755)
    for name, size in BODIES.items():
        (docroot / name).write_bytes(b"x" * size)
        (docroot / name).chmod(0o644)
    listens = "\n".join(
        [f"        listen 127.0.0.1:{p};" for p in ports.h1]
        + [f"        listen 127.0.0.1:{p} http2;" for p in ports.h2]
    )
    conf = harness.nginx_common(session, "upstream", workers) + f"""
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    open_file_cache max=64 inactive=60s;
    default_type application/octet-stream;
    server {{
{listens}
        root {docroot};
        location / {{ }}
    }}
}}
"""
    path = session.path("upstream-nginx.conf")
    path.write_text(conf)
    return path


def start_upstream(session: Session, cpus: str | None, workers: int) -> Ports:
    ports = Ports((session.port(), session.port()), (session.port(), session.port()),
                  session.port())  # fmt: skip
    argv = harness.nginx_argv(session, upstream_conf(session, ports, workers))
    harness.start(session, "upstream-nginx", argv, ports.h2[1], cpus=cpus)
    for port in (*ports.h1, ports.h2[0]):
        harness.wait_port(None, port)
    return ports


def start_grpc_server(session: Session, ports: Ports, cpus: str | None) -> Child:
    argv = [sys.executable, str(Path(__file__).resolve()), "--grpc-server", str(ports.grpc)]
    return harness.start(session, "upstream-grpc", argv, ports.grpc, cpus=cpus)


def aiolb_yaml(session: Session, ports: Ports, listen: dict[str, int], grpc_port: int) -> Path:
    """The aiolb under test; ``max_requests_per_connection`` lifted as nginx's
    ``keepalive_requests`` is (both end an HTTP/2 connection with GOAWAY after 1000
    requests by default, which h2load counts as failures)."""
    def urls(pair: Sequence[int]) -> str:
        return ", ".join(f'{{url: "http://127.0.0.1:{p}"}}' for p in pair)

    listeners = "".join(
        f"""  - name: {name}
    bind: "127.0.0.1:{port}"
    protocols: [http/1.1, h2c]
    limits: {{max_requests_per_connection: null}}
    routes: [{{pool: {name}}}]
"""
        for name, port in [*listen.items(), ("grpc", grpc_port)]
    )
    text = f"""workers: 1
listeners:
{listeners}pools:
  h1:
    upstreams: [{urls(ports.h1)}]
  h2:
    http_version: "2"
    upstreams: [{urls(ports.h2)}]
  grpc:
    http_version: "2"
    upstreams: [{urls([ports.grpc])}]
admin:
  bind: "127.0.0.1:{session.port()}"
"""
    path = session.path("aiolb.yaml")
    path.write_text(text)
    return path


def start_aiolb(
    session: Session, ports: Ports, cpus: str | None, cmd: Sequence[str], name: str = "aiolb"
) -> Running:
    listen = {"h1": session.port(), "h2": session.port()}
    grpc_port = session.port()
    config = str(aiolb_yaml(session, ports, listen, grpc_port))
    argv = [arg.replace("{config}", config) for arg in cmd]
    child = harness.start(session, name, argv, listen["h1"], cpus=cpus, cwd=harness.REPO)
    for port in (listen["h2"], grpc_port):
        harness.wait_port(child, port)
    return Running("aiolb", child, listen, grpc_port=grpc_port)


def start_nginx(session: Session, ports: Ports, cpus: str | None) -> Running:
    """One worker; HTTP/1.1 keep-alive to the upstream as bench.py's nginx (``keepalive
    64``, the default proxy buffers); h2c from clients, ``keepalive_requests`` raised so
    that the client's connection is not closed after 1000 requests."""
    port = session.port()
    conf = harness.nginx_common(session, "nginx", 1) + f"""
    keepalive_requests 1000000;
    upstream h1 {{
        server 127.0.0.1:{ports.h1[0]};
        server 127.0.0.1:{ports.h1[1]};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} http2;
        location / {{
            proxy_pass http://h1;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""
    path = session.path("nginx.conf")
    path.write_text(conf)
    child = harness.start(session, "nginx", harness.nginx_argv(session, path), port, cpus=cpus)
    return Running("nginx", child, {"h1": port})


def start_haproxy(session: Session, ports: Ports, cpus: str | None) -> Running:
    """One thread; h2c from clients (``proto h2``), HTTP/1.1 or HTTP/2 (``server ...
    proto h2``) to the upstream, ``http-reuse always`` as bench.py's."""
    listen = {"h1": session.port(), "h2": session.port()}
    servers = {
        kind: "\n".join(
            f"    server s{i} 127.0.0.1:{p}" + (" proto h2" if kind == "h2" else "")
            for i, p in enumerate(pair, 1)
        )
        for kind, pair in (("h1", ports.h1), ("h2", ports.h2))
    }
    conf = harness.haproxy_common() + f"""
frontend h2h1
    bind 127.0.0.1:{listen["h1"]} proto h2
    default_backend h1

frontend h2h2
    bind 127.0.0.1:{listen["h2"]} proto h2
    default_backend h2

backend h1
    balance roundrobin
{servers["h1"]}

backend h2
    balance roundrobin
{servers["h2"]}
"""
    path = session.path("haproxy.cfg")
    path.write_text(conf)
    argv = ["haproxy", "-db", "-f", str(path)]
    child = harness.start(session, "haproxy", argv, listen["h1"], cpus=cpus)
    harness.wait_port(child, listen["h2"])
    return Running("haproxy", child, listen)


# --- checks and h2load ---------------------------------------------------------------------


class NoAnswer(Exception):
    """The target accepted no connection or answered no stream in time."""


def check_h2(
    port: int, path: str, size: int, streams: int = 2, timeout: float = 10.0
) -> str | None:
    """``streams`` concurrent GETs on one prior-knowledge HTTP/2 connection: each must
    answer 200 with ``size`` body bytes. Returns what was wrong, or None; raises
    NoAnswer when nothing came back."""
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    conn.initiate_connection()
    ids = []
    for _ in range(streams):
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [
            (b":method", b"GET"), (b":scheme", b"http"),
            (b":authority", b"127.0.0.1:%d" % port), (b":path", path.encode()),
        ], end_stream=True)  # fmt: skip
        ids.append(sid)
    status: dict[int, bytes] = {}
    body = dict.fromkeys(ids, 0)
    ended: set[int] = set()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(conn.data_to_send())
            while len(ended) < streams:
                data = sock.recv(65536)
                if not data:
                    raise NoAnswer(f"connection closed after {len(ended)} of {streams} streams")
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived):
                        status[ev.stream_id] = dict(ev.headers).get(b":status", b"?")
                    elif isinstance(ev, h2.events.DataReceived):
                        body[ev.stream_id] += len(ev.data)
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    elif isinstance(ev, h2.events.StreamEnded):
                        ended.add(ev.stream_id)
                    elif isinstance(ev, h2.events.StreamReset):
                        return f"stream {ev.stream_id} reset, error code {ev.error_code}"
                    elif isinstance(ev, h2.events.ConnectionTerminated):
                        raise NoAnswer(f"GOAWAY, error code {ev.error_code}")
                sock.sendall(conn.data_to_send())
    except OSError as exc:
        raise NoAnswer(f"{type(exc).__name__}: {exc}") from exc
    for sid in ids:
        if status.get(sid) != b"200":
            return f"status {status.get(sid, b'none').decode()}"
        if body[sid] != size:
            return f"body {body[sid]} bytes, expected {size}"
    return None


_H2LOAD_PATTERNS = {
    "rps": r"finished in [0-9.]+\w+, ([0-9.]+) req/s",
    "requests": r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, "
    r"(\d+) failed, (\d+) errored, (\d+) timeout",
    "codes": r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx",
    "data": r"traffic: .*?, [0-9.]+\w*B \((\d+)\) data",
    "mean": r"time for request:\s+\S+\s+\S+\s+([0-9.]+)(us|ms|s)\b",
}


def parse_h2load(text: str) -> dict[str, Any]:
    """The figures of h2load's summary; raises RuntimeError when one is missing."""
    found = {k: re.search(p, text) for k, p in _H2LOAD_PATTERNS.items()}
    missing = [k for k, m in found.items() if m is None and k != "mean"]
    if missing:
        raise RuntimeError(f"h2load output lacks {missing}:\n{text[-1500:]}")
    req, codes, data = found["requests"], found["codes"], found["data"]
    assert req is not None and codes is not None and data is not None and found["rps"]
    mean = found["mean"]
    scale = {"us": 1.0, "ms": 1e3, "s": 1e6}
    return {
        "rps": float(found["rps"].group(1)),
        "total": int(req.group(1)),
        "done": int(req.group(2)),
        "succeeded": int(req.group(3)),
        "failed": int(req.group(4)) + int(req.group(5)) + int(req.group(6)),
        "2xx": int(codes.group(1)),
        "non_2xx": sum(int(codes.group(i)) for i in (2, 3, 4)),
        "data_bytes": int(data.group(1)),
        "mean_us": float(mean.group(1)) * scale[mean.group(2)] if mean else None,
    }


def latency_percentiles(log: Path) -> tuple[float | None, float | None]:
    """p50 and p99 in µs of the 2xx rows of an h2load ``--log-file``."""
    times = []
    with log.open() as rows:
        for row in rows:
            cols = row.split("\t")
            if len(cols) >= 3 and cols[1] == "200":
                times.append(int(cols[2]))
    if not times:
        return None, None
    times.sort()
    return float(times[len(times) // 2]), float(times[min(len(times) - 1, len(times) * 99 // 100)])


# --- the run -------------------------------------------------------------------------------


@dataclass
class H2Bench:
    args: argparse.Namespace
    session: Session
    pin: Pinning
    ports: Ports
    running: dict[str, Running] = field(default_factory=dict)
    #: called with True just before a timed h2load run starts, False when it ended
    on_timed: Callable[[bool], object] = lambda started: None

    def h2load(
        self, url: str, scenario: Scenario, seconds: int, log: Path | None
    ) -> tuple[dict[str, Any], str]:
        clients, streams = SHAPES[scenario.shape]
        argv = ["h2load", "-c", str(clients), "-m", str(streams), "-t", "1", "-D", str(seconds)]
        if log is not None:
            argv += ["--log-file", str(log)]
        done = subprocess.run(
            harness.pinned([*argv, url], self.pin.load), capture_output=True, text=True,
            timeout=seconds + 60, check=False, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        text = done.stdout + done.stderr
        return parse_h2load(text), text

    def measure(self, run: Running, scenario: Scenario) -> Result:
        port = run.ports.get(scenario.upstream)
        if port is None:
            why = NOT_MEASURED.get((run.name, scenario.upstream), "no listener")
            return Result(run.name, scenario.name, "not measured", detail=why)
        path = f"/{scenario.body}"
        try:
            problem = check_h2(port, path, scenario.size)
        except NoAnswer as exc:
            return Result(run.name, scenario.name, "not answering", detail=str(exc))
        if problem:
            return Result(run.name, scenario.name, "bad answer", detail=problem)
        url = f"http://127.0.0.1:{port}{path}"
        log = None if self.args.no_latency else self.session.path("h2load-requests.tsv")
        try:
            self.h2load(url, scenario, WARMUP_S, None)
            before = harness.cpu_times()
            spent = harness.cpu_seconds(run.pids)
            self.on_timed(True)
            data, _ = self.h2load(url, scenario, self.args.duration, log)
            self.on_timed(False)
            spent = harness.cpu_seconds(run.pids) - spent
            busy = harness.cpu_busy(before, harness.cpu_times())
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            return Result(run.name, scenario.name, "h2load failed", detail=str(exc)[-500:])
        result = Result(
            run.name, scenario.name, "ok", rps=data["rps"], requests=data["succeeded"],
            failed=data["failed"], non_2xx=data["non_2xx"], data_bytes=data["data_bytes"],
            mean_us=data["mean_us"], cpu_busy=busy,
        )  # fmt: skip
        if run.pids and data["succeeded"]:
            result.cpu_us_per_request = spent * 1e6 / data["succeeded"]
        clients, streams = SHAPES[scenario.shape]
        low = data["succeeded"] * scenario.size
        high = (data["total"] + clients * streams) * scenario.size
        problems = []
        if data["failed"] or data["non_2xx"]:
            problems.append(f"{data['failed']} failed/errored/timed out, {data['non_2xx']} non-2xx")
        if not data["succeeded"]:
            problems.append("no request succeeded")
        if not low <= data["data_bytes"] <= high:
            problems.append(f"{data['data_bytes']} DATA bytes for {data['succeeded']} responses "
                       f"of {scenario.size}")  # fmt: skip
        if problems:
            result.status = "errors"
            result.detail = "; ".join(problems)
        elif log is not None:
            result.p50_us, result.p99_us = latency_percentiles(log)
        if log is not None:
            log.unlink(missing_ok=True)
        return result

    def start(self, target: str) -> Running:
        session, ports, cpus = self.session, self.ports, self.pin.proxy
        if target == "direct":
            return Running("direct", None, {"h2": ports.h2[0]}, grpc_port=ports.grpc)
        if target == "aiolb":
            run = start_aiolb(session, ports, cpus, self.args.aiolb_cmd)
        elif target == "nginx":
            run = start_nginx(session, ports, cpus)
        else:
            run = start_haproxy(session, ports, cpus)
        assert run.child is not None
        run.pids = harness.process_tree(run.child.pid)
        return run

    def grpc(self, run: Running, kind: str) -> Result:
        name = f"grpc-{kind}"
        if run.grpc_port is None:
            return Result(run.name, name, "not measured", detail="no gRPC listener")
        before = harness.cpu_times()
        spent = harness.cpu_seconds(run.pids)
        argv = [
            sys.executable, str(Path(__file__).resolve()), "--grpc-client",
            f"127.0.0.1:{run.grpc_port}", "--grpc-kind", kind,
            "--duration", str(self.args.duration),
            "--grpc-concurrency", str(self.args.grpc_concurrency),
            "--grpc-message", str(self.args.grpc_message),
        ]  # fmt: skip
        child = self.session.spawn(f"grpc-client-{run.name}-{kind}", argv, self.pin.load)
        try:
            child.proc.wait(timeout=self.args.duration + WARMUP_S + 60)
        except subprocess.TimeoutExpired:
            self.session.stop(child)
            return Result(run.name, name, "not answering", detail="the gRPC client hung")
        self.session.children.remove(child)
        spent = harness.cpu_seconds(run.pids) - spent
        busy = harness.cpu_busy(before, harness.cpu_times())
        lines = [ln for ln in child.log.read_text().splitlines() if ln.startswith("GRPC_JSON ")]
        if not lines:
            return Result(run.name, name, "h2load failed", detail=f"gRPC client: {child.tail()}")
        data = json.loads(lines[-1].removeprefix("GRPC_JSON "))
        result = Result(
            run.name, name, data["status"], rps=data.get("rate"), requests=data.get("count", 0),
            failed=data.get("errors", 0), p50_us=data.get("p50_us"), p99_us=data.get("p99_us"),
            cpu_busy=busy, detail=data.get("detail"),
        )  # fmt: skip
        if result.status == "ok" and result.failed:
            result.status = "errors"
        if run.pids and result.requests:
            result.cpu_us_per_request = spent * 1e6 / result.requests
        return result

    def rounds(self) -> list[Result]:
        args = self.args
        scenarios = [Scenario(s, b, u) for u in args.upstreams for s in args.shapes
                     for b in args.bodies]  # fmt: skip
        if args.grpc_only:
            scenarios = []
        results: list[Result] = []
        for target in args.targets:
            try:
                self.running[target] = self.start(target)
            except (StartError, OSError) as exc:
                print(f"   {target} failed to start: {exc}", flush=True)
                results += [Result(target, s.name, "failed to start", detail=str(exc))
                            for s in scenarios]  # fmt: skip
        names = list(self.running)
        for n in range(1, args.rounds + 1):
            print(f"-- round {n} of {args.rounds}", flush=True)
            turn = (n - 1) % len(names) if names else 0
            order = names[turn:] + names[:turn]
            for scenario in scenarios:
                for target in order:
                    result = self.measure(self.running[target], scenario)
                    result.round = n
                    results.append(result)
                    if result.status != "not measured":
                        print(f"   {scenario.name:<16} {target:<8} {summary(result)}", flush=True)
            if not args.grpc:
                continue
            for kind in GRPC_KINDS:
                for target in order:
                    if target not in ("aiolb", "direct"):
                        continue
                    result = self.grpc(self.running[target], kind)
                    result.round = n
                    results.append(result)
                    print(f"   grpc-{kind:<11} {target:<8} {summary(result)}", flush=True)
        return results


def summary(result: Result) -> str:
    if result.status != "ok":
        return f"{result.status}: {result.detail}"
    lat = f"p99 {result.p99_us / 1000:.2f} ms" if result.p99_us else ""
    cpu = (f"  {result.cpu_us_per_request:.0f} µs CPU/req"
           if result.cpu_us_per_request is not None else "")  # fmt: skip
    return f"{result.rps or 0:>10,.0f}/s  {lat}{cpu}  busy {result.cpu_busy}"


# --- report ----------------------------------------------------------------------------------


@dataclass
class Row:
    target: str
    scenario: str
    status: str
    rps: float | None = None
    rps_range: tuple[float, float] | None = None
    p50_us: float | None = None
    p99_us: float | None = None
    cpu_us_per_request: float | None = None
    cpu_busy: dict[int, float] = field(default_factory=dict)
    ok_rounds: int = 0
    rounds: int = 0
    #: per-round ratios to the reference targets: {"nginx": [...], "haproxy": [...]}
    ratios: dict[str, list[float]] = field(default_factory=dict)
    detail: str | None = None


def combine(results: list[Result], references: Sequence[str]) -> list[Row]:
    ok = [r for r in results if r.status == "ok" and r.rps]
    by_round = {(r.target, r.scenario, r.round): r for r in ok}
    rows = []
    for target, scenario in dict.fromkeys((r.target, r.scenario) for r in results):
        mine = [r for r in results if (r.target, r.scenario) == (target, scenario)]
        good = [r for r in mine if r.status == "ok" and r.rps]
        if not good:
            bad = mine[0]
            rows.append(Row(target, scenario, bad.status, rounds=len(mine), detail=bad.detail))
            continue

        def med(values: list[float | None]) -> float | None:
            known = [v for v in values if v is not None]
            return statistics.median(known) if known else None

        rates = [r.rps or 0.0 for r in good]
        row = Row(
            target, scenario, "ok" if len(good) == len(mine) else "errors in some rounds",
            rps=statistics.median(rates), rps_range=(min(rates), max(rates)),
            p50_us=med([r.p50_us for r in good]), p99_us=med([r.p99_us for r in good]),
            cpu_us_per_request=med([r.cpu_us_per_request for r in good]),
            cpu_busy={c: statistics.median(r.cpu_busy.get(c, 0.0) for r in good)
                      for c in good[0].cpu_busy},
            ok_rounds=len(good), rounds=len(mine),
            detail=next((r.detail for r in mine if r.status != "ok"), None),
        )  # fmt: skip
        for ref in references:
            for r in good:
                other = by_round.get((ref, scenario, r.round))
                if other is not None and other.rps and r.rps:
                    row.ratios.setdefault(ref, []).append(r.rps / other.rps)
        rows.append(row)
    return rows


def spread(ratios: list[float] | None) -> str:
    return bench.spread(ratios) if ratios else "—"


def busy_cell(row: Row, pin: Pinning) -> str:
    if not row.cpu_busy or pin.proxy is None or pin.load is None:
        return "—"
    load = [row.cpu_busy.get(int(c), 0.0) for c in pin.load.split(",")]
    return f"{row.cpu_busy.get(int(pin.proxy), 0.0):.0f} / {sum(load) / len(load):.0f}"


def ms(value: float | None) -> str:
    return f"{value / 1000:.2f}" if value else "—"


def h2_tables(rows: list[Row], scenarios: Sequence[Scenario], pin: Pinning) -> str:
    out = []
    head = ("| target | requests/s (range) | vs nginx | vs haproxy | p50 ms | p99 ms "
            "| proxy CPU µs/req | CPU % proxy / load | ok rounds |")  # fmt: skip
    for scenario in scenarios:
        mine = sorted((r for r in rows if r.scenario == scenario.name),
                      key=lambda r: TARGETS.index(r.target))  # fmt: skip
        out += [f"### {scenario.name}: {scenario.about}", "", head, "| --- |" + " ---: |" * 8]
        for row in mine:
            if row.rps is None:
                out.append(f"| {row.target} | {row.status}: {row.detail or ''} "
                           "| | | | | | | |")  # fmt: skip
                continue
            assert row.rps_range is not None
            cpu = f"{row.cpu_us_per_request:.0f}" if row.cpu_us_per_request is not None else "—"
            cells = [
                row.target,
                f"{row.rps:,.0f} ({row.rps_range[0]:,.0f}-{row.rps_range[1]:,.0f})",
                spread(row.ratios.get("nginx")), spread(row.ratios.get("haproxy")),
                ms(row.p50_us), ms(row.p99_us), cpu, busy_cell(row, pin),
                f"{row.ok_rounds}/{row.rounds}",
            ]  # fmt: skip
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def grpc_table(rows: list[Row], pin: Pinning) -> str:
    out = ["### gRPC: grpcio client and server, directly and through aiolb", "",
           "| call | target | calls or messages/s (range) | aiolb / direct | p50 ms | p99 ms "
           "| aiolb CPU µs/call | CPU % proxy / load | ok rounds |",
           "| --- | --- |" + " ---: |" * 7]  # fmt: skip
    for row in rows:
        if not row.scenario.startswith("grpc-"):
            continue
        call = row.scenario.removeprefix("grpc-")
        if row.rps is None:
            out.append(f"| {call} | {row.target} | {row.status}: {row.detail or ''} "
                       "| | | | | | |")  # fmt: skip
            continue
        assert row.rps_range is not None
        cpu = f"{row.cpu_us_per_request:.0f}" if row.cpu_us_per_request is not None else "—"
        cells = [
            call, row.target,
            f"{row.rps:,.0f} ({row.rps_range[0]:,.0f}-{row.rps_range[1]:,.0f})",
            spread(row.ratios.get("direct")), ms(row.p50_us), ms(row.p99_us), cpu,
            busy_cell(row, pin), f"{row.ok_rounds}/{row.rounds}",
        ]  # fmt: skip
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def verdicts(rows: list[Row]) -> list[str]:
    """The issue's targets: aiolb >= 0.5 x nginx at 20 B and >= 1.0 x at 64 KiB (h2->h1;
    nginx has no h2->h2, where HAProxy stands in)."""
    lines = []
    for row in rows:
        if row.target != "aiolb" or row.scenario.startswith("grpc-"):
            continue
        goal = 0.5 if "-20b-" in row.scenario else 1.0
        ref = "nginx" if row.scenario.endswith("-h1") else "haproxy"
        ratios = row.ratios.get(ref)
        if not ratios:
            lines.append(f"{row.scenario}: no ratio to {ref} ({row.status})")
            continue
        middle = statistics.median(ratios)
        met = "met" if middle >= goal else "NOT met"
        lines.append(f"{row.scenario}: aiolb / {ref} = {spread(ratios)}, target >= {goal}: {met}"
                     + ("" if ref == "nginx" else " (against HAProxy: nginx has no h2->h2)"))
    return lines


def noise_warnings(results: list[Result], pin: Pinning) -> list[str]:
    """The proxy core should be idle while h2load talks to the upstream directly."""
    if pin.proxy is None:
        return []
    return [
        f"warning: round {r.round}: CPU {pin.proxy} was {r.cpu_busy.get(int(pin.proxy), 0):.0f}% "
        f"busy during direct/{r.scenario} although nothing of this benchmark ran there"
        for r in results
        if r.target == "direct" and r.cpu_busy.get(int(pin.proxy), 0.0) > NOISE_BUSY_PERCENT
    ]


# --- gRPC server and client (run as children of this script) ---------------------------------


def grpc_server(port: int) -> None:
    import grpc

    async def unary(request: bytes, context: Any) -> bytes:
        return request

    async def stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
        count, size = (int(x) for x in request.split())
        message = b"x" * size
        sent = 0
        while count == 0 or sent < count:
            yield message
            sent += 1

    async def serve() -> None:
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
        }
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(GRPC_SERVICE, handlers),)
        )
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())


async def grpc_load(
    target: str, kind: str, seconds: float, concurrency: int, size: int
) -> dict[str, Any]:
    """Check one call of each kind, then ``WARMUP_S`` of load uncounted and ``seconds``
    counted: calls (unary) or messages (stream) completed within the window."""
    import grpc

    payload = b"x" * size
    async with grpc.aio.insecure_channel(target) as channel:
        unary = channel.unary_unary(f"/{GRPC_SERVICE}/Unary")
        stream = channel.unary_stream(f"/{GRPC_SERVICE}/Stream")
        try:
            echoed = await unary(b"check", timeout=10)
            messages = [m async for m in stream(b"3 %d" % size, timeout=10)]
        except grpc.aio.AioRpcError as exc:
            return {"status": "not answering", "detail": f"{exc.code()}: {exc.details()}"}
        if echoed != b"check" or [len(m) for m in messages] != [size] * 3:
            return {"status": "bad answer", "detail": f"echo {echoed!r}, stream {messages!r}"}
        start = time.perf_counter() + WARMUP_S
        end = start + seconds
        latencies: list[float] = []
        errors: dict[str, int] = {}
        count = 0
        if kind == "unary":

            async def worker() -> None:
                while (sent := time.perf_counter()) < end:
                    try:
                        answer = await unary(payload, timeout=10)
                    except grpc.aio.AioRpcError as exc:
                        errors[str(exc.code())] = errors.get(str(exc.code()), 0) + 1
                        continue
                    now = time.perf_counter()
                    if answer != payload:
                        errors["bad echo"] = errors.get("bad echo", 0) + 1
                    elif start <= now <= end:
                        latencies.append(now - sent)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
            count = len(latencies)
        else:
            call = stream(b"0 %d" % size)
            try:
                async for message in call:
                    now = time.perf_counter()
                    if len(message) != size:
                        errors["bad message"] = errors.get("bad message", 0) + 1
                    if now >= end:
                        break
                    if now >= start:
                        count += 1
            except grpc.aio.AioRpcError as exc:
                errors[str(exc.code())] = 1
            call.cancel()
    latencies.sort()
    result: dict[str, Any] = {
        "status": "ok", "rate": count / seconds, "count": count,
        "errors": sum(errors.values()), "detail": str(errors) if errors else None,
    }  # fmt: skip
    if latencies:
        result["p50_us"] = latencies[len(latencies) // 2] * 1e6
        result["p99_us"] = latencies[len(latencies) * 99 // 100] * 1e6
    return result


# --- profile ---------------------------------------------------------------------------------


def group_of(filename: str) -> str:
    if filename.startswith(str(harness.REPO / "proxy")):
        return "aiolb (proxy/)"
    for package in ("h2", "hpack", "hyperframe"):
        if f"/{package}/" in filename:
            return "h2 library (h2, hpack, hyperframe)"
    if "asyncio" in filename or "uvloop" in filename:
        return "event loop (asyncio, uvloop)"
    if filename.startswith("~") or filename == "":
        return "builtins (C functions)"
    return "other Python"


def profiled_aiolb(config: str, stats_path: str) -> int:
    """aiolb's ``run -c CONFIG`` in this process under cProfile: SIGUSR2 starts a fresh
    profile (the start-up, the check and the warm-up left out), a second SIGUSR2 writes
    it to ``stats_path`` and stops profiling."""
    import cProfile

    sys.path.insert(0, str(harness.REPO))
    from proxy.cli import main as aiolb_main

    profiler = cProfile.Profile()
    state = {"signals": 0}

    def toggle(signum: int, frame: object) -> None:
        state["signals"] += 1
        if state["signals"] == 1:
            profiler.enable()
        else:
            profiler.disable()
            profiler.dump_stats(stats_path + ".part")
            os.replace(stats_path + ".part", stats_path)

    signal.signal(signal.SIGUSR2, toggle)
    return int(aiolb_main(["run", "-c", config]) or 0)


def profile_report(stats_path: Path, top: int) -> dict[str, Any]:
    stats = pstats.Stats(str(stats_path))
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values())
    groups: dict[str, float] = {}
    rows = []
    for (filename, line, func), (_, ncalls, tottime, cumtime, _) in raw.items():
        group = group_of(filename)
        groups[group] = groups.get(group, 0.0) + tottime
        where = filename
        for base in (str(harness.REPO) + "/", "site-packages/"):
            where = where.split(base, 1)[-1]
        rows.append({"function": f"{where}:{line}({func})", "file": filename,
                     "group": group, "calls": ncalls, "tottime_s": tottime,
                     "cumtime_s": cumtime})  # fmt: skip
    rows.sort(key=lambda r: -r["tottime_s"])
    text = io.StringIO()
    stats.stream = text  # type: ignore[attr-defined]
    stats.sort_stats("cumulative").print_stats(40)
    return {"total_s": total, "groups": groups, "top": rows[:top], "cumulative": text.getvalue()}


def run_profile(args: argparse.Namespace, session: Session, pin: Pinning) -> dict[str, Any]:
    shape, body, upstream = args.profile_scenario.split("-")
    scenario = Scenario(shape, body, upstream)
    ports = start_upstream(session, pin.load, upstream_workers(args, pin))
    stats_path = session.path("aiolb.prof")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--profile-child", "{config}",
           str(stats_path)]  # fmt: skip
    run = start_aiolb(session, ports, pin.proxy, cmd)
    assert run.child is not None
    run.pids = harness.process_tree(run.child.pid)
    h2b = H2Bench(args, session, pin, ports)
    child = run.child

    def toggle(started: bool) -> None:
        os.kill(child.pid, signal.SIGUSR2)

    h2b.on_timed = toggle
    result = h2b.measure(run, scenario)
    print(f"{scenario.name} under cProfile: {summary(result)}", flush=True)
    deadline = time.monotonic() + 30
    while not stats_path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    session.stop(run.child)
    if not stats_path.exists():
        raise StartError(f"aiolb wrote no profile:\n{run.child.tail()}")
    report = profile_report(stats_path, args.profile_top)
    requests = max(1, result.requests)
    print(f"\nProfile of aiolb, {scenario.about}: the timed run only, {result.requests} "
          "requests\n")  # fmt: skip
    print("| where | own time s | share |\n| --- | ---: | ---: |")
    for group, seconds in sorted(report["groups"].items(), key=lambda kv: -kv[1]):
        print(f"| {group} | {seconds:.2f} | {100 * seconds / report['total_s']:.0f}% |")
    print(f"\nTop {args.profile_top} by own time (µs per request under cProfile, which "
          "inflates many small calls: compare them with each other, not with req/s)\n")
    print("| function | group | calls | own s | µs/req |\n| --- | --- | ---: | ---: | ---: |")
    for row in report["top"]:
        print(f"| `{row['function']}` | {row['group'].split(' ')[0]} | {row['calls']} "
              f"| {row['tottime_s']:.2f} | {row['tottime_s'] * 1e6 / requests:.1f} |")
    return {"scenario": scenario.name, "result": asdict(result), "profile": report}


# --- main ------------------------------------------------------------------------------------


def csv(choices: Sequence[str]) -> Any:
    return bench.csv(choices)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per timed run")
    parser.add_argument("--shapes", type=csv(tuple(SHAPES)), default=list(SHAPES))
    parser.add_argument("--bodies", type=csv(tuple(BODIES)), default=list(BODIES))
    parser.add_argument("--upstreams", type=csv(UPSTREAM_PROTOCOLS),
                        default=list(UPSTREAM_PROTOCOLS))  # fmt: skip
    parser.add_argument("--targets", type=csv(TARGETS), default=list(TARGETS))
    parser.add_argument("--no-grpc", dest="grpc", action="store_false", help="skip the gRPC load")
    parser.add_argument("--grpc-only", action="store_true", help="only the gRPC load")
    parser.add_argument("--grpc-concurrency", type=int, default=50, help="unary calls in flight")
    parser.add_argument("--grpc-message", type=int, default=100, help="bytes per gRPC message")
    parser.add_argument("--no-latency", action="store_true",
                        help="no h2load --log-file (no p50/p99; h2load ~10%% faster)")
    parser.add_argument("--upstream-workers", type=int, default=0)
    parser.add_argument("--aiolb-cmd", type=shlex.split, default=harness.default_aiolb_cmd(),
                        help="command that runs aiolb; {config} is replaced by the YAML path")
    parser.add_argument("--no-pin", action="store_true", help="let all processes share all cores")
    parser.add_argument("--json-dir", type=Path, default=harness.HERE / "results")
    parser.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    parser.add_argument("--profile", action="store_true",
                        help="run aiolb under cProfile for --profile-scenario instead")
    parser.add_argument("--profile-scenario", default="1x100-20b-h1",
                        help="SHAPE-BODY-UPSTREAM (default: %(default)s)")
    parser.add_argument("--profile-top", type=int, default=25)
    # the children this script starts for the gRPC load
    parser.add_argument("--grpc-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--grpc-client", metavar="HOST:PORT", help=argparse.SUPPRESS)
    parser.add_argument("--profile-child", nargs=2, metavar=("CONFIG", "STATS"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--grpc-kind", choices=GRPC_KINDS, default="unary", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.grpc_only:
        args.grpc = True
    if not args.grpc and "direct" in args.targets and "h2" not in args.upstreams:
        args.targets.remove("direct")
    return args


def upstream_workers(args: argparse.Namespace, pin: Pinning) -> int:
    if args.upstream_workers > 0:
        return int(args.upstream_workers)
    return len(pin.load.split(",")) if pin.load else 1


def describe(args: argparse.Namespace) -> dict[str, Any]:
    machine = bench.describe_machine(args.aiolb_cmd)
    machine.pop("wrk", None)
    machine["h2load"] = bench.first_line(["h2load", "--version"])
    machine["nofile_limit"] = harness.raise_nofile()
    return machine


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.profile_child is not None:
        return profiled_aiolb(*args.profile_child)
    if args.grpc_server is not None:
        grpc_server(args.grpc_server)
        return 0
    if args.grpc_client is not None:
        data = asyncio.run(grpc_load(args.grpc_client, args.grpc_kind, args.duration,
                                     args.grpc_concurrency, args.grpc_message))  # fmt: skip
        print("GRPC_JSON " + json.dumps(data), flush=True)
        return 0
    for tool in ("h2load", "nginx", "haproxy"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    pin = harness.UNPINNED if args.no_pin else harness.plan_pinning()
    print(f"pinning: {pin.note}", flush=True)
    started = dt.datetime.now().isoformat(timespec="seconds")
    machine = describe(args)
    with Session(keep_dir=args.keep_tmp) as session:
        if args.keep_tmp:
            print(f"configs and logs in {session.dir}")
        if args.profile:
            report = run_profile(args, session, pin)
            report.update(started=started, machine=machine, options=vars(args))
            print(f"\nJSON written to {harness.write_json(args.json_dir, 'h2-profile', report)}")
            return 0
        ports = start_upstream(session, pin.load, upstream_workers(args, pin))
        if args.grpc:
            start_grpc_server(session, ports, pin.load)
        h2b = H2Bench(args, session, pin, ports)
        results = h2b.rounds()
    machine["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    scenarios = [] if args.grpc_only else [
        Scenario(s, b, u) for u in args.upstreams for s in args.shapes for b in args.bodies
    ]  # fmt: skip
    h2_rows = combine([r for r in results if not r.scenario.startswith("grpc-")],
                      ("nginx", "haproxy"))  # fmt: skip
    grpc_rows = combine([r for r in results if r.scenario.startswith("grpc-")], ("direct",))
    print(f"\nMedians of {args.rounds} interleaved rounds of {args.duration} s; ratios: the "
          "median of the rounds' ratios (their range).\n")  # fmt: skip
    if scenarios:
        print(h2_tables(h2_rows, scenarios, pin))
    if grpc_rows:
        print(grpc_table(grpc_rows, pin))
    targets = verdicts(h2_rows)
    warnings = noise_warnings(results, pin)
    for line in targets + warnings:
        print(line)
    report = {
        "started": started,
        "finished": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine,
        "pinning": asdict(pin),
        "upstream": asdict(ports),
        "options": {**vars(args), "warmup_s": WARMUP_S},
        "results": [asdict(r) for r in results],
        "combined": [asdict(r) for r in h2_rows + grpc_rows],
        "targets": targets,
        "warnings": warnings,
    }
    print(f"JSON written to {harness.write_json(args.json_dir, 'h2-bench', report)}")
    return 0 if all(r.status in ("ok", "not measured") for r in results) else 1


if __name__ == "__main__":
    harness.run_main(main)
