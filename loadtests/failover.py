"""Failover under load: wrk sends GET /20b through aiolb while upstreams are killed.

Starts three upstreams (``upstream.py``, one process per port, so that each can be killed
on its own) and aiolb with one round-robin pool over them, active and passive health
checks and retries. wrk runs for the whole test; meanwhile round 1 SIGKILLs upstream #2
and restarts it on the same port, round 2 (``--rounds 2``) does the same to #2 and #3
at once. A thread polls the admin API (``GET /api/pools``) every ``--poll-ms`` and the
script reports, per killed upstream: time from the kill to "available": false (time to
eject), to the last attempt the proxy sent it (requests + connect errors stop
increasing), and from the restart (the port accepts again) to "available": true and to
its first answered request (time to return). Client-visible errors are wrk's connect,
read, write, timeout and status (>399) errors; the target is 0 (every request is a GET,
so every failure is retryable). Prints Markdown tables, the WARNING/ERROR lines of
aiolb's log, and writes JSON to ``loadtests/results/``. See README.md.

    python -m loadtests.failover                  # 2 rounds, 25 s
    python -m loadtests.failover --quick          # 1 round, 8 s
    python loadtests/failover.py --rounds 1 --interval 500ms --keep-tmp
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import itertools
import json
import re
import shlex
import signal
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import bench
import harness
from harness import Child, Pinning, Session, StartError

from proxy.config.values import parse_duration

POOL = "web"
PATH = "/20b"
UPSTREAMS = 3
#: which upstreams (0-based) each round kills: round 1 the second, round 2 two of three
ROUND_VICTIMS = ((1,), (1, 2))
FIELDS = (
    "available",
    "healthy",
    "ejected",  # absent from older /api/pools: None, then ejected_until tells
    "ejected_until",
    "ejections",
    "requests",
    "connect_errors",
    "active",
    "connections",
)
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) (WARNING|ERROR|CRITICAL) ")
METRIC_LINE = re.compile(r"^(aiolb_requests_total|aiolb_retries_total)\{([^}]*)\} (\S+)$")


# --- command line ----------------------------------------------------------------------


def seconds(text: str) -> float:
    try:
        value = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add(
        "--rounds",
        type=int,
        choices=(1, 2),
        default=2,
        help="1: kill upstream #2; 2: then kill #2 and #3 together (default 2)",
    )
    add("--kill-at", type=seconds, default=5.0, help="seconds of load before the first kill")
    add("--down", type=seconds, default=5.0, help="seconds an upstream stays dead")
    add(
        "--gap",
        type=seconds,
        default=5.0,
        help="seconds from a restart to the next kill (or to the end)",
    )
    add(
        "--duration",
        type=seconds,
        default=None,
        help="wrk seconds (default: kill-at + rounds x (down + gap))",
    )
    add(
        "--quick",
        action="store_true",
        help="short run: 1 round, kill at 2 s, down 3 s, gap 3 s (8 s)",
    )
    # the pool's health checks and retries
    add("--interval", type=seconds, default=1.0, help="active check interval (1s)")
    add("--check-timeout", type=seconds, default=0.5, help="active check timeout (500ms)")
    add("--healthy-threshold", type=int, default=2)
    add("--unhealthy-threshold", type=int, default=2)
    add("--consecutive-failures", type=int, default=5, help="passive: failures that eject")
    add("--ejection-time", type=seconds, default=30.0, help="passive: ejection time (30s)")
    add("--max-ejection-percent", type=int, default=50)
    add("--attempts", type=int, default=2, help="retries.attempts, the first included")
    # load and measurement
    add("--connections", type=int, default=32)
    add("--threads", type=int, default=1)
    add(
        "--access-log",
        action="store_true",
        help="aiolb writes an access log; its non-2xx lines are summarised (status, attempts)",
    )
    add("--poll-ms", type=float, default=20.0, help="admin API poll period")
    add(
        "--aiolb-cmd",
        type=shlex.split,
        default=harness.default_aiolb_cmd(),
        help="command that runs aiolb; {config} is replaced by the generated YAML path",
    )
    add("--no-pin", action="store_true", help="let all processes share all cores")
    add("--json-dir", type=Path, default=harness.HERE / "results")
    add("--keep-tmp", action="store_true", help="keep configs and logs")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.kill_at, args.down, args.gap = 1, 2.0, 3.0, 3.0
    needed = args.kill_at + args.rounds * (args.down + args.gap)
    if args.duration is None:
        args.duration = needed
    elif args.duration < needed:
        parser.error(f"--duration {args.duration:g} is shorter than the schedule ({needed:g} s)")
    return args


# --- configuration ---------------------------------------------------------------------


def aiolb_config(
    args: argparse.Namespace, session: Session, port: int, admin: int, ports: Sequence[int]
) -> Path:
    upstreams = "\n".join(f'      - {{url: "http://127.0.0.1:{p}"}}' for p in ports)
    text = f"""listeners:
  - name: failover
    bind: "127.0.0.1:{port}"
    routes:
      - match: {{path_prefix: "/"}}
        pool: {POOL}
pools:
  {POOL}:
    upstreams:
{upstreams}
    health_check:
      active:
        path: /healthz
        interval: {args.interval}
        timeout: {args.check_timeout}
        healthy_threshold: {args.healthy_threshold}
        unhealthy_threshold: {args.unhealthy_threshold}
      passive:
        consecutive_failures: {args.consecutive_failures}
        ejection_time: {args.ejection_time}
        max_ejection_percent: {args.max_ejection_percent}
    retries:
      attempts: {args.attempts}
      retry_on: [connect_failure, reset_before_response]
admin:
  bind: "127.0.0.1:{admin}"
"""
    if args.access_log:
        text += f"access_log: {{path: {session.path('access.log')}}}\n"
    path = session.path("aiolb.yaml")
    path.write_text(text)
    return path


# --- admin API -------------------------------------------------------------------------


def get(port: int, path: str, timeout: float = 5.0) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"GET {path}: status {response.status}")
        return body
    finally:
        conn.close()


def metrics(admin: int) -> dict[str, Any]:
    """Answers of the proxy itself by status, answers by upstreams, retries: from /metrics."""
    own: dict[str, int] = {}
    upstream = 0
    retries = 0
    for line in get(admin, "/metrics").decode().splitlines():
        match = METRIC_LINE.match(line)
        if not match:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match[2]))
        value = int(float(match[3]))
        if match[1] == "aiolb_retries_total":
            retries += value
        elif labels.get("upstream"):
            upstream += value
        else:
            own[labels.get("code", "?")] = own.get(labels.get("code", "?"), 0) + value
    return {"proxy_answered": own, "upstream_answered": upstream, "retries": retries}


def diff(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    own = {
        code: n - before["proxy_answered"].get(code, 0)
        for code, n in after["proxy_answered"].items()
        if n - before["proxy_answered"].get(code, 0)
    }
    return {
        "proxy_answered": own,
        "upstream_answered": after["upstream_answered"] - before["upstream_answered"],
        "retries": after["retries"] - before["retries"],
    }


@dataclass
class Sample:
    t: float  # monotonic, middle of the request
    took: float  # seconds the admin API took to answer
    retries: int
    retries_denied: int | None  # by the retry budget (None: not in this /api/pools)
    upstreams: dict[str, dict[str, Any]]


class Poller(threading.Thread):
    """GET /api/pools every `period` seconds on one keep-alive connection."""

    def __init__(self, admin: int, period: float) -> None:
        super().__init__(name="admin-poller", daemon=True)
        self.admin = admin
        self.period = period
        self.samples: list[Sample] = []
        self.failures: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        due = time.monotonic()
        while not self.halt.is_set():
            start = time.monotonic()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.admin, timeout=5)
                conn.request("GET", "/api/pools")
                data = json.loads(conn.getresponse().read())
            except (OSError, http.client.HTTPException, ValueError) as exc:
                self.failures.append(f"{time.monotonic():.3f} {type(exc).__name__}: {exc}")
                if conn is not None:
                    conn.close()
                conn = None
                data = None
            end = time.monotonic()
            if data is not None:
                pool = next(p for p in data["pools"] if p["name"] == POOL)
                ups = {u["address"]: {k: u.get(k) for k in FIELDS} for u in pool["upstreams"]}
                self.samples.append(
                    Sample(
                        (start + end) / 2,
                        end - start,
                        pool["retries"],
                        pool.get("retries_denied"),
                        ups,
                    )
                )
            due += self.period
            now = time.monotonic()
            if due < now:  # fell behind (slow answer): the next poll at once, no catching up
                due = now
            self.halt.wait(due - now)
        if conn is not None:
            conn.close()


# --- the run ---------------------------------------------------------------------------


@dataclass
class Backend:
    index: int  # 0-based; printed as #index+1
    port: int
    child: Child | None
    starts: int = 1

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class Event:
    kind: str  # "kill" or "restart"
    round: int
    upstream: str
    at: float  # monotonic, just before the signal / the spawn
    done: float  # monotonic: process reaped / port accepting again
    wall: float


@dataclass
class Round:
    round: int
    victims: list[str]
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)


class Failover:
    def __init__(self, args: argparse.Namespace, session: Session, pin: Pinning) -> None:
        self.args = args
        self.session = session
        self.pin = pin
        self.backends: list[Backend] = []
        self.events: list[Event] = []
        self.rounds: list[Round] = []

    def start_backend(self, backend: Backend) -> None:
        name = f"upstream{backend.index + 1}" + (f"-{backend.starts}" if backend.starts > 1 else "")
        argv = harness.aiohttp_upstream_argv([backend.port])
        backend.child = harness.start(self.session, name, argv, backend.port, cpus=self.pin.load)

    def kill(self, backend: Backend, rnd: int) -> None:
        assert backend.child is not None
        at, wall = time.monotonic(), time.time()
        self.session.kill(backend.child)
        backend.child = None
        self.events.append(Event("kill", rnd, backend.address, at, time.monotonic(), wall))

    def restart(self, backends: Sequence[Backend], rnd: int) -> None:
        spawned = []
        for backend in backends:  # spawn all, then wait for all: they start in parallel
            backend.starts += 1
            name = f"upstream{backend.index + 1}-{backend.starts}"
            argv = harness.aiohttp_upstream_argv([backend.port])
            at, wall = time.monotonic(), time.time()
            backend.child = self.session.spawn(name, argv, self.pin.load)
            spawned.append((backend, at, wall))
        for backend, at, wall in spawned:
            harness.wait_port(backend.child, backend.port)
            self.events.append(Event("restart", rnd, backend.address, at, time.monotonic(), wall))

    def run(self) -> dict[str, Any]:
        args, session, pin = self.args, self.session, self.pin
        ports = [session.port() for _ in range(UPSTREAMS)]
        self.backends = [Backend(i, port, None) for i, port in enumerate(ports)]
        for backend in self.backends:
            self.start_backend(backend)
        port, admin = session.port(), session.port()
        config = aiolb_config(args, session, port, admin, ports)
        argv = [arg.replace("{config}", str(config)) for arg in args.aiolb_cmd]
        aiolb = harness.start(session, "aiolb", argv, port, cpus=pin.proxy, cwd=harness.REPO)
        self.check(port, admin)

        poller = Poller(admin, args.poll_ms / 1000)
        poller.start()
        wrk_argv = [*bench.wrk_argv(args, f"http://127.0.0.1:{port}{PATH}", 0)]
        wrk_argv[wrk_argv.index("-d") + 1] = f"{args.duration:g}s"
        before = metrics(admin)
        cpu_before = harness.cpu_times()
        t0, wall0 = time.monotonic(), time.time()
        wrk = session.spawn("wrk", wrk_argv, pin.load)
        try:
            self.schedule(t0, admin)
            wrk.proc.wait(timeout=args.duration + 30)
            session.children.remove(wrk)
        finally:
            poller.halt.set()
            poller.join(timeout=10)
        end = time.monotonic()
        busy = harness.cpu_busy(cpu_before, harness.cpu_times())
        after = metrics(admin)
        data = bench.parse_wrk(wrk.tail(200))
        session.stop(aiolb)
        log = aiolb_warnings(aiolb, wall0)
        failed = failed_requests(session.path("access.log")) if args.access_log else None
        return {
            "config": config.read_text(),
            "wrk": data,
            "wrk_argv": wrk_argv,
            "t0": t0,
            "end": end,
            "whole_run": diff(after, before),
            "before": before,
            "after": after,
            "samples": poller.samples,
            "poll_failures": poller.failures,
            "log": log,
            "access_log_failures": failed,
            "cpu_busy": busy,
        }

    def check(self, port: int, admin: int) -> None:
        """Every upstream answers through the proxy, and the admin API sees all available."""
        for _ in range(UPSTREAMS):
            status = bench.check_once(port, bench.SCENARIOS["20b"])
            if status is not None:
                raise StartError(f"check request through aiolb: {status}")
        pools = json.loads(get(admin, "/api/pools"))
        pool = next(p for p in pools["pools"] if p["name"] == POOL)
        if pool["available"] != UPSTREAMS:
            raise StartError(f"only {pool['available']} of {UPSTREAMS} upstreams available")

    def schedule(self, t0: float, admin: int) -> None:
        args = self.args
        for rnd in range(args.rounds):
            victims = [self.backends[i] for i in ROUND_VICTIMS[rnd]]
            record = Round(rnd + 1, [b.address for b in victims])
            self.rounds.append(record)
            kill_at = t0 + args.kill_at + rnd * (args.down + args.gap)
            sleep_until(kill_at)
            record.metrics["before_kill"] = metrics(admin)
            for backend in victims:
                self.kill(backend, rnd + 1)
            sleep_until(kill_at + args.down)
            record.metrics["before_restart"] = metrics(admin)
            self.restart(victims, rnd + 1)


def sleep_until(deadline: float) -> None:
    left = deadline - time.monotonic()
    if left > 0:
        time.sleep(left)


def aiolb_warnings(aiolb: Child, wall0: float) -> list[str]:
    """aiolb's WARNING and worse lines, each prefixed with seconds since wrk started."""
    lines = []
    for line in aiolb.log.read_text(errors="replace").splitlines():
        match = LOG_LINE.match(line)
        if match is None:
            if line.startswith(("Traceback", "  ")) and lines:  # a traceback goes along
                lines.append(line)
            continue
        stamp = time.mktime(time.strptime(match[1], "%Y-%m-%d %H:%M:%S")) + int(match[2]) / 1000
        lines.append(f"{stamp - wall0:+8.3f}s {line}")
    return lines


def failed_requests(path: Path) -> dict[str, Any]:
    """Access log lines with a status >= 400: counts by (status, attempts), the first 10."""
    counts: dict[str, int] = {}
    first_lines: list[str] = []
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("status", 0) >= 400:
                key = f"status {entry['status']}, {entry.get('attempts')} attempt(s)"
                counts[key] = counts.get(key, 0) + 1
                if len(first_lines) < 10:
                    first_lines.append(line)
    return {"counts": counts, "first": first_lines}


# --- analysis --------------------------------------------------------------------------


def first(samples: Sequence[Sample], since: float, until: float, test: Any) -> Sample | None:
    return next((s for s in samples if since <= s.t < until and test(s)), None)


def is_ejected(sample: Sample, address: str) -> bool:
    up = sample.upstreams[address]
    return bool(up["ejected"] or up["ejected_until"])


def attempts(sample: Sample, address: str) -> int:
    up = sample.upstreams[address]
    return int(up["requests"]) + int(up["connect_errors"])


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def measure_victim(
    samples: Sequence[Sample], events: Sequence[Event], rnd: Round, address: str, end: float
) -> dict[str, Any]:
    kill = next(
        e for e in events if e.kind == "kill" and e.round == rnd.round and e.upstream == address
    )
    back = next(
        e for e in events if e.kind == "restart" and e.round == rnd.round and e.upstream == address
    )
    down = [s for s in samples if kill.at <= s.t < back.at]
    gone = first(samples, kill.at, back.at, lambda s: not s.upstreams[address]["available"])
    ejected = first(samples, kill.at, back.at, lambda s: is_ejected(s, address))
    unhealthy = first(samples, kill.at, back.at, lambda s: not s.upstreams[address]["healthy"])
    flapped = gone is not None and any(
        s.upstreams[address]["available"] for s in down if s.t > gone.t
    )
    # the proxy's last attempt on it: requests + connect errors stop increasing
    stopped = None
    if down:
        final = attempts(down[-1], address)
        stopped = next(s for s in down if attempts(s, address) == final)
    last_before = [s for s in samples if s.t < kill.at]
    after_kill = None
    if down and last_before:
        after_kill = attempts(down[-1], address) - attempts(last_before[-1], address)
    at_restart = down[-1].upstreams[address]["requests"] if down else None
    available = first(samples, back.done, end, lambda s: s.upstreams[address]["available"])
    traffic = first(
        samples,
        back.done,
        end,
        lambda s: at_restart is not None and s.upstreams[address]["requests"] > at_restart,
    )
    how = []
    if ejected is not None and gone is not None and ejected.t <= gone.t:
        how.append("passive ejection")
    if unhealthy is not None and gone is not None and unhealthy.t <= gone.t:
        how.append("active check DOWN")
    conn_errors = None
    if down and last_before:
        before_errors = last_before[-1].upstreams[address]["connect_errors"]
        conn_errors = down[-1].upstreams[address]["connect_errors"] - before_errors
    return {
        "round": rnd.round,
        "upstream": address,
        "unavailable_ms": ms(gone.t - kill.at) if gone else None,
        "unavailable_by": " + ".join(how) or None,
        "ejected_ms": ms(ejected.t - kill.at) if ejected else None,
        "active_down_ms": ms(unhealthy.t - kill.at) if unhealthy else None,
        "stopped_receiving_ms": ms(stopped.t - kill.at) if stopped else None,
        "attempts_after_kill": after_kill,
        "connect_errors_while_down": conn_errors,
        "flapped_while_down": flapped,
        "restart_to_listening_ms": ms(back.done - back.at),
        "available_after_restart_ms": ms(available.t - back.done) if available else None,
        "traffic_after_restart_ms": ms(traffic.t - back.done) if traffic else None,
    }


def timeline(samples: Sequence[Sample], t0: float) -> dict[str, list[list[Any]]]:
    """Per upstream: [seconds since wrk started, available, healthy, ejected] at each change."""
    out: dict[str, list[list[Any]]] = {}
    last: dict[str, tuple[Any, ...]] = {}
    for sample in samples:
        for address, up in sample.upstreams.items():
            state = (up["available"], up["healthy"], bool(up["ejected"] or up["ejected_until"]))
            if last.get(address) != state:
                out.setdefault(address, []).append([round(sample.t - t0, 3), *state])
                last[address] = state
    return out


def per_second(samples: Sequence[Sample], t0: float) -> dict[str, list[int]]:
    """Per upstream: requests answered in each whole second since wrk started."""
    out: dict[str, list[int]] = {}
    for address in samples[0].upstreams if samples else ():
        counts: list[int] = []
        previous = samples[0].upstreams[address]["requests"]
        second = 1
        for sample in samples:
            while sample.t - t0 >= second:
                now = sample.upstreams[address]["requests"]
                counts.append(now - previous)
                previous = now
                second += 1
        out[address] = counts
    return out


def analyse(fo: Failover, raw: dict[str, Any]) -> dict[str, Any]:
    samples: list[Sample] = raw["samples"]
    victims = [
        measure_victim(samples, fo.events, rnd, address, raw["end"])
        for rnd in fo.rounds
        for address in rnd.victims
    ]
    wrk = raw["wrk"]
    # /metrics snapshots before each kill and each restart, and after wrk ended
    marks = [("steady", raw["before"])]
    for rnd in fo.rounds:
        marks.append((f"round {rnd.round}: down", rnd.metrics["before_kill"]))
        marks.append((f"round {rnd.round}: back", rnd.metrics["before_restart"]))
    marks.append(("", raw["after"]))
    phases = [
        {"phase": label, **diff(nxt, snap)} for (label, snap), (_, nxt) in itertools.pairwise(marks)
    ]
    denied = None
    if samples and samples[0].retries_denied is not None:
        denied = (samples[-1].retries_denied or 0) - samples[0].retries_denied
    gaps = [b.t - a.t for a, b in itertools.pairwise(samples)]
    took = [s.took for s in samples]
    return {
        "client_errors": sum(wrk["errors"].values()),
        "requests": wrk["requests"],
        "rps": round(wrk["requests"] / (wrk["duration_us"] / 1e6), 1),
        "cpu_busy": raw["cpu_busy"],
        "victims": victims,
        "phases": phases,
        "retries_denied": denied,
        "polls": {
            "count": len(samples),
            "failed": len(raw["poll_failures"]),
            "gap_ms_p50": ms(statistics.median(gaps)) if gaps else None,
            "gap_ms_max": ms(max(gaps)) if gaps else None,
            "answer_ms_p50": ms(statistics.median(took)) if took else None,
            "answer_ms_max": ms(max(took)) if took else None,
        },
    }


def problems(summary: dict[str, Any]) -> list[str]:
    found = []
    if summary["client_errors"]:
        found.append(f"{summary['client_errors']} client-visible errors (target 0)")
    for v in summary["victims"]:
        who = f"round {v['round']} {v['upstream']}"
        if v["unavailable_ms"] is None:
            found.append(f"{who}: never became unavailable while dead")
        if v["flapped_while_down"]:
            found.append(f"{who}: available again while still dead")
        if v["available_after_restart_ms"] is None:
            found.append(f"{who}: not available again after the restart")
        elif v["traffic_after_restart_ms"] is None:
            found.append(f"{who}: available again but received no request")
    return found


# --- report ----------------------------------------------------------------------------


def cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"
    return str(value)


def cpu_cell(busy: dict[int, float], pin: Pinning) -> str:
    """Busy percent of the proxy's core / of the other cores while wrk ran (as bench.py)."""
    return bench.cpu_cell(bench.Result("aiolb", "20b", "ok", cpu_busy=busy), pin)


def markdown(summary: dict[str, Any], wrk: dict[str, Any], pin: Pinning) -> str:
    errors = wrk["errors"]
    detail = ", ".join(f"{k} {v}" for k, v in errors.items())
    lat = wrk["latency_us"]
    out = [
        "| client errors | requests | req/s | p50 ms | p99 ms | max ms "
        "| CPU % proxy core / wrk+upstreams |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {summary['client_errors']} ({detail}) | {summary['requests']:,} "
        f"| {summary['rps']:,.0f} | {lat['p50'] / 1000:.2f} | {lat['p99'] / 1000:.2f} "
        f"| {lat['max'] / 1000:.0f} | {cpu_cell(summary['cpu_busy'], pin)} |",
        "",
        "Per killed upstream (ms; kill → …, then restart = port accepting again → …):",
        "",
        "| round | upstream | eject (unavailable) | by | passive ejection | active DOWN "
        "| stop receiving | connect errors while down | restart → listening "
        "| return (available) | return (traffic) |",
        "| ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for v in summary["victims"]:
        cells = [
            v["round"],
            v["upstream"],
            v["unavailable_ms"],
            v["unavailable_by"],
            v["ejected_ms"],
            v["active_down_ms"],
            v["stopped_receiving_ms"],
            v["connect_errors_while_down"],
            v["restart_to_listening_ms"],
            v["available_after_restart_ms"],
            v["traffic_after_restart_ms"],
        ]
        out.append("| " + " | ".join(cell(c) for c in cells) + " |")
    out += [
        "",
        "| phase | answered by upstreams | answered by aiolb itself | retries |",
        "| --- | ---: | --- | ---: |",
    ]
    for phase in summary["phases"]:
        own = ", ".join(f"{n} x {code}" for code, n in sorted(phase["proxy_answered"].items()))
        out.append(
            f"| {phase['phase']} | {phase['upstream_answered']:,} | {own or '0'} "
            f"| {phase['retries']:,} |"
        )
    if summary["retries_denied"] is not None:
        out += ["", f"retries denied by the retry budget: {summary['retries_denied']}"]
    polls = summary["polls"]
    out += [
        "",
        f"admin API polled {polls['count']} times: every {cell(polls['gap_ms_p50'])} ms "
        f"(max gap {cell(polls['gap_ms_max'])} ms), answers in {cell(polls['answer_ms_p50'])}"
        f" ms (max {cell(polls['answer_ms_max'])}), {polls['failed']} failed; times above "
        "are at the middle of the first poll that saw the change",
    ]
    return "\n".join(out)


# --- main ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    bench.check_tools()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    pin = (
        harness.Pinning(None, None, "not pinned: --no-pin")
        if args.no_pin
        else harness.plan_pinning()
    )
    machine = bench.describe_machine(args.aiolb_cmd)
    machine["nofile_limit"] = harness.raise_nofile()
    machine["commit"] = bench.first_line(["git", "rev-parse", "--short", "HEAD"])
    machine["proxy_modified"] = bench.first_line(["git", "status", "--porcelain", "proxy"])
    print(f"pinning: {pin.note}")
    schedule = [f"wrk {args.duration:g} s"]
    for rnd in range(args.rounds):
        at = args.kill_at + rnd * (args.down + args.gap)
        who = " and ".join(f"#{i + 1}" for i in ROUND_VICTIMS[rnd])
        schedule.append(f"kill {who} at {at:g} s, restart at {at + args.down:g} s")
    print("schedule: " + "; ".join(schedule), flush=True)
    started = dt.datetime.now().isoformat(timespec="seconds")
    with Session(keep_dir=args.keep_tmp) as session:
        if args.keep_tmp:
            print(f"configs and logs in {session.dir}")
        fo = Failover(args, session, pin)
        try:
            raw = fo.run()
        except (StartError, bench.NoAnswer, OSError, RuntimeError) as exc:
            print(f"failed: {exc}", file=sys.stderr)
            return 2
    summary = analyse(fo, raw)
    print()
    print(markdown(summary, raw["wrk"], pin))
    print()
    print(f"aiolb WARNING/ERROR lines ({len(raw['log'])}; seconds since wrk started):")
    for line in raw["log"]:
        print("  " + line)
    if raw["access_log_failures"] is not None:
        failed = raw["access_log_failures"]
        counts = ", ".join(f"{n} x {key}" for key, n in failed["counts"].items()) or "none"
        print(f"access log, requests answered >= 400: {counts}")
        for line in failed["first"]:
            print("  " + line)
    found = problems(summary)
    for line in found:
        print(f"PROBLEM: {line}")
    if not found:
        print("target met: 0 client errors, every killed upstream ejected and returned")
    report = {
        "started": started,
        "finished": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine,
        "pinning": asdict(pin),
        "options": vars(args),
        "config": raw["config"],
        "wrk_argv": raw["wrk_argv"],
        "wrk": raw["wrk"],
        "summary": summary,
        "whole_run": raw["whole_run"],
        "events": [
            {
                **asdict(e),
                "at_s": round(e.at - raw["t0"], 3),
                "done_s": round(e.done - raw["t0"], 3),
            }
            for e in fo.events
        ],
        "timeline": timeline(raw["samples"], raw["t0"]),
        "requests_per_second": per_second(raw["samples"], raw["t0"]),
        "poll_failures": raw["poll_failures"],
        "aiolb_log": raw["log"],
        "access_log_failures": raw["access_log_failures"],
        "problems": found,
    }
    print(f"JSON written to {harness.write_json(args.json_dir, 'failover', report)}")
    return 1 if found else 0


if __name__ == "__main__":
    harness.run_main(main)
