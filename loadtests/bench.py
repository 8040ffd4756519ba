"""Throughput and latency of aiolb next to nginx and HAProxy, measured with wrk.

Starts an upstream (nginx serving fixed bodies on two ports, or an aiohttp fallback),
then for each target (direct, aiolb, nginx, haproxy) starts it on a free loopback port,
checks each scenario with two requests on one connection, warms up for 1 s, runs wrk, and finally
prints one Markdown table per scenario and writes everything as JSON. See README.md.

``--rounds N`` starts every target once and takes N interleaved turns (round, pinning,
scenario, target). The table then gives medians, and the ratios to nginx are medians of
ratios taken within each round, so the machine's drift (tens of percent within minutes
on a shared VM) falls on both sides of every ratio; their range is printed too.

The ``https*`` scenarios run the same requests over TLS (a second listener on every
proxy with one ECDSA P-256 certificate; wrk speaks TLS), ``handshake`` sends each
request with ``Connection: close``, so every request is a new TCP connection and a new
TLS handshake, resumed from a session ticket (wrk keeps its sessions, as browsers do);
``handshake-full`` makes every one a full handshake (``openssl s_time -new``, as many
processes as ``--threads``, GETs of the 20-byte body; requests/s is handshakes/s, and
there are no latency percentiles). ``direct`` and
``passthrough`` have no TLS listener; those rows say so.

``--pinning pinned,unpinned`` (the default) measures both ways in the same run: pinned,
the proxy under test has a core to itself and wrk and the upstream share the other;
unpinned, every process may use every core, as a user runs it. Between the two the
running processes are moved (``sched_setaffinity``), not restarted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import platform
import re
import shlex
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import harness
from harness import Child, Pinning, Session, StartError, Upstream

WRK_SCRIPT = harness.HERE / "wrk" / "report.lua"
WARMUP_S = 1
WRK_TIMEOUT = "2s"
TARGETS = (
    "direct",
    "aiolb",
    "nginx",
    "haproxy",
    "passthrough",
    "aiolb-nometrics",
    "aiolb-accesslog",
)
DEFAULT_TARGETS = TARGETS[:5]
REFERENCE = "nginx"
PINNINGS = ("pinned", "unpinned")
NOISE_BUSY_PERCENT = 15.0


@dataclass(frozen=True)
class Scenario:
    name: str
    path: str
    upload_bytes: int
    expect_bytes: int | None
    about: str
    tls: bool = False  # over the target's TLS listener
    close: bool = False  # ``Connection: close``: a new connection (and handshake) per request
    full: bool = False  # ``openssl s_time -new``: a full handshake per request, not wrk

    @property
    def method(self) -> str:
        return "POST" if self.upload_bytes else "GET"


SCENARIOS = {
    "20b": Scenario("20b", "/20b", 0, 20, "GET, 20-byte response body"),
    "64k": Scenario("64k", "/64k", 0, 64 * 1024, "GET, 64 KiB response body"),
    "1m": Scenario("1m", "/1m", 0, 1024 * 1024, "GET, 1 MiB response body"),
    "upload64k": Scenario("upload64k", "/upload", 64 * 1024, None, "POST 64 KiB, small answer"),
    "https20b": Scenario("https20b", "/20b", 0, 20, "HTTPS keep-alive, 20-byte body", tls=True),
    "https64k": Scenario("https64k", "/64k", 0, 64 * 1024, "HTTPS keep-alive, 64 KiB body",
                         tls=True),
    "handshake": Scenario("handshake", "/20b", 0, 20, "HTTPS, Connection: close: a new TLS "
                          "connection per request (sessions resumed)", tls=True, close=True),
    "handshake-full": Scenario("handshake-full", "/20b", 0, 20, "HTTPS, a new connection and "
                               "a full handshake per request (openssl s_time -new)", tls=True,
                               close=True, full=True),
}
#: The scenarios a run without ``--scenarios`` measures (the TLS ones on request).
DEFAULT_SCENARIOS = ("20b", "64k", "1m", "upload64k")
#: Targets with a TLS listener (``--scenarios https20b,...``).
TLS_TARGETS = ("aiolb", "nginx", "haproxy", "aiolb-nometrics", "aiolb-accesslog")


@dataclass
class Result:
    target: str
    scenario: str
    #: "ok", "failed to start", "not answering", "no responses", "wrk failed",
    #: "no TLS listener"
    status: str
    rps: float | None = None
    p50_us: int | None = None
    p90_us: int | None = None
    p99_us: int | None = None
    errors: int | None = None
    wrk: dict[str, Any] = field(default_factory=dict)
    check: str | None = None  # problem found by the one-request check, None when fine
    cpu_busy: dict[int, float] = field(default_factory=dict)  # percent per CPU, timed run
    detail: str | None = None
    round: int = 0  # with --rounds: which one (from 1); 0 for a single pass
    pinning: str = "pinned"  # "pinned" or "unpinned" (see --pinning)
    #: with --rounds, on the combined row: per-round req/s and p99 ratios to nginx
    rps_ratios: list[float] = field(default_factory=list)
    p99_ratios: list[float] = field(default_factory=list)
    #: CPU seconds of the target's processes over the timed run, where charged
    cpu_s: float | None = None


# --- command line ----------------------------------------------------------------------


def add_run_options(parser: argparse.ArgumentParser, duration: int, rounds: int) -> None:
    """The options of the benchmarks that compare variants within one pinning
    (balancer_bench, filter_bench, cache_bench): wrk's runs, how aiolb and the upstream
    start, pinning and output."""
    parser.add_argument("--duration", type=int, default=duration, help="seconds per timed wrk run")
    parser.add_argument("--rounds", type=int, default=rounds, help="interleaved runs; medians")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--aiolb-cmd",
        type=shlex.split,
        default=harness.default_aiolb_cmd(),
        help="command that runs aiolb; {config} is replaced by the generated YAML path",
    )
    parser.add_argument("--upstream", choices=("nginx", "aiohttp"), default="nginx")
    parser.add_argument("--upstream-workers", type=int, default=0)
    parser.add_argument("--no-pin", action="store_true", help="let all processes share all cores")
    parser.add_argument("--json-dir", type=Path, default=harness.HERE / "results")
    parser.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")


def csv(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {list(choices)}")
        return items

    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", type=csv(tuple(SCENARIOS)), default=list(DEFAULT_SCENARIOS),
                        help="default: %(default)s; TLS: https20b,https64k,handshake")
    parser.add_argument("--targets", type=csv(TARGETS), default=list(DEFAULT_TARGETS))
    parser.add_argument("--duration", type=int, default=6, help="seconds per timed wrk run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="start every target once and take this many interleaved turns; medians and "
        "per-round ratios (default: one pass, one target at a time)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--aiolb-cmd",
        type=shlex.split,
        default=harness.default_aiolb_cmd(),
        help="command that runs aiolb; {config} is replaced by the generated YAML path "
        "(default: %(default)s, run from the repository root)",
    )
    parser.add_argument("--upstream", choices=("nginx", "aiohttp"), default="nginx")
    parser.add_argument(
        "--upstream-workers",
        type=int,
        default=0,
        help="nginx upstream workers (default: one per core left to wrk and the upstream)",
    )
    parser.add_argument(
        "--pinning",
        type=csv(PINNINGS),
        default=list(PINNINGS),
        help="pinned: the proxy on a core of its own; unpinned: every process on every "
        "core, as a user runs it (default: both, interleaved)",
    )
    parser.add_argument("--no-pin", action="store_true", help="same as --pinning unpinned")
    parser.add_argument("--json-dir", type=Path, default=harness.HERE / "results")
    parser.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    args = parser.parse_args(argv)
    if args.no_pin:
        args.pinning = ["unpinned"]
    return args


# --- machine ---------------------------------------------------------------------------


def first_line(argv: Sequence[str]) -> str:
    if shutil.which(argv[0]) is None:
        return "not installed"
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=20, check=False, cwd=harness.REPO
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def aiolb_version(cmd: Sequence[str]) -> str:
    """`<cmd up to run> version`, e.g. `python -m proxy version`."""
    if "run" not in cmd:
        return "unknown"
    return first_line([*cmd[: list(cmd).index("run")], "version"])


def describe_machine(aiolb_cmd: Sequence[str]) -> dict[str, Any]:
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cpus": sorted(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "python": sys.version.split()[0],
        "nginx": first_line(["nginx", "-v"]),
        "haproxy": first_line(["haproxy", "-v"]),
        "wrk": first_line(["wrk", "-v"]),
        "aiolb": aiolb_version(aiolb_cmd),
    }


# --- one target ------------------------------------------------------------------------


class NoAnswer(Exception):
    """The target accepted no request or answered none within the check's timeout."""


def check_once(port: int, scenario: Scenario) -> str | None:
    """Two requests on one connection: status 200, right body size, keep-alive works.

    Returns what was wrong with an answer, or None; raises NoAnswer when none came.
    """
    conn: http.client.HTTPConnection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    if scenario.tls:
        conn = http.client.HTTPSConnection(
            "127.0.0.1", port, timeout=10, context=ssl._create_unverified_context()
        )
    body = b"x" * scenario.upload_bytes if scenario.upload_bytes else None
    try:
        for _ in range(2):
            conn.request(scenario.method, scenario.path, body=body)
            response = conn.getresponse()
            data = response.read()
            if response.status != 200:
                return f"status {response.status}"
            if scenario.expect_bytes is not None and len(data) != scenario.expect_bytes:
                return f"body {len(data)} bytes, expected {scenario.expect_bytes}"
    except (OSError, http.client.HTTPException) as exc:
        raise NoAnswer(f"{type(exc).__name__}: {exc}") from exc
    finally:
        conn.close()
    return None


def wrk_argv(
    args: argparse.Namespace, url: str, seconds: int, close: bool = False
) -> list[str]:
    argv = ["wrk", "-t", str(args.threads), "-c", str(args.connections), "-d", f"{seconds}s"]
    if close:
        argv += ["-H", "Connection: close"]
    return [*argv, "--timeout", WRK_TIMEOUT, "-s", str(WRK_SCRIPT), url]


def parse_wrk(text: str) -> dict[str, Any]:
    for line in text.splitlines():
        if line.startswith("WRK_JSON "):
            return dict(json.loads(line.removeprefix("WRK_JSON ")))
    raise RuntimeError(f"no WRK_JSON line in wrk output:\n{text[-2000:]}")


def to_result(target: str, scenario: Scenario, data: dict[str, Any], check: str | None) -> Result:
    latency = data["latency_us"]
    return Result(
        target,
        scenario.name,
        "ok",
        rps=data["requests"] / (data["duration_us"] / 1e6),
        p50_us=latency["p50"],
        p90_us=latency["p90"],
        p99_us=latency["p99"],
        errors=sum(data["errors"].values()),
        wrk=data,
        check=check,
    )


@dataclass
class Bench:
    """What every run shares: options, temp dir and children, upstream, pinning.

    ``pin`` is the pinning in force; ``pinned`` the plan for the pinned mode."""

    args: argparse.Namespace
    session: Session
    upstream: Upstream
    pin: Pinning
    pinned: Pinning | None = None
    mode: str = "pinned"
    #: each running target's TLS port (targets without one are absent)
    tls_ports: dict[str, int] = field(default_factory=dict)
    #: processes whose CPU time a target's timed run is charged (``Result.cpu_s``)
    charged: dict[str, list[int]] = field(default_factory=dict)

    def use(self, mode: str) -> None:
        """Switch every running process to ``mode``'s pinning: the upstream to the load
        CPUs, the proxies under test to the proxy CPU (or all of them to every CPU)."""
        if self.pinned is None:
            self.pinned = self.pin
        self.mode = mode
        self.pin = self.pinned if mode == "pinned" else harness.UNPINNED
        for child in self.session.children:
            load = child.name.startswith("upstream")
            harness.set_affinity(child.pid, self.pin.load if load else self.pin.proxy)

    def wrk(self, target: str, port: int, scenario: Scenario, seconds: int) -> dict[str, Any]:
        scheme = "https" if scenario.tls else "http"
        url = f"{scheme}://127.0.0.1:{port}{scenario.path}"
        env = {**os.environ, "WRK_BODY_BYTES": str(scenario.upload_bytes)}
        log = self.session.path(f"wrk-{target}-{scenario.name}-{seconds}s.log")
        with log.open("wb") as out:
            subprocess.run(
                harness.pinned(wrk_argv(self.args, url, seconds, scenario.close), self.pin.load),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                timeout=seconds + 30,
                check=False,
            )
        return parse_wrk(log.read_text(errors="replace"))

    def s_time(self, port: int, scenario: Scenario, seconds: int) -> float:
        """Full handshakes (and GETs) per second from ``--threads`` s_time processes."""
        argv = ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new", "-time",
                str(seconds), "-www", scenario.path]  # fmt: skip
        started = time.perf_counter()
        procs = [
            subprocess.Popen(harness.pinned(argv, self.pin.load), stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
            for _ in range(self.args.threads)
        ]  # fmt: skip
        total = 0
        for proc in procs:
            out, _ = proc.communicate(timeout=seconds + 30)
            found = re.search(rb"(\d+) connections in [0-9.]+s", out)
            total += int(found.group(1)) if found else 0
        return total / (time.perf_counter() - started)

    def measure_full(self, target: str, port: int, scenario: Scenario) -> Result:
        self.s_time(port, scenario, WARMUP_S)
        before = harness.cpu_times()
        rate = self.s_time(port, scenario, self.args.duration)
        busy = harness.cpu_busy(before, harness.cpu_times())
        result = Result(target, scenario.name, "ok", rps=rate, p50_us=0, p90_us=0, p99_us=0,
                        errors=0, cpu_busy=busy, pinning=self.mode)  # fmt: skip
        return result if rate else Result(target, scenario.name, "no responses")

    def measure(self, target: str, port: int, scenario: Scenario) -> Result:
        if scenario.tls:
            tls_port = self.tls_ports.get(target)
            if tls_port is None:
                return Result(target, scenario.name, "no TLS listener", detail="not measured")
            port = tls_port
            if scenario.full:
                return self.measure_full(target, port, scenario)
        try:
            problem = check_once(port, scenario)
        except NoAnswer as exc:
            return Result(target, scenario.name, "not answering", detail=str(exc))
        try:
            self.wrk(target, port, scenario, WARMUP_S)
            before = harness.cpu_times()
            spent = harness.cpu_seconds(self.charged.get(target, []))
            data = self.wrk(target, port, scenario, self.args.duration)
            busy = harness.cpu_busy(before, harness.cpu_times())
            spent = harness.cpu_seconds(self.charged.get(target, [])) - spent
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            return Result(target, scenario.name, "wrk failed", check=problem, detail=str(exc))
        if not data["requests"]:
            detail = f"wrk completed no request; errors {data['errors']}"
            return Result(target, scenario.name, "no responses", check=problem, detail=detail)
        result = to_result(target, scenario, data, problem)
        result.cpu_busy = busy
        result.cpu_s = spent if target in self.charged else None
        result.pinning = self.mode
        return result

    def start(self, target: str) -> tuple[Child | None, int]:
        session, upstream, cpus = self.session, self.upstream, self.pin.proxy
        if target == "direct":
            return None, upstream.ports[0]
        if target == "passthrough":
            return harness.start_passthrough(session, upstream, cpus)
        tls_port = None
        if target in TLS_TARGETS and any(SCENARIOS[s].tls for s in self.args.scenarios):
            tls_port = self.tls_ports[target] = session.port()
        if target in harness.AIOLB_VARIANTS:
            extra = harness.AIOLB_VARIANTS[target]
            return harness.start_aiolb(
                session, upstream, cpus, self.args.aiolb_cmd, extra, tls_port=tls_port
            )
        if target == "nginx":
            return harness.start_nginx_proxy(session, upstream, cpus, tls_port=tls_port)
        return harness.start_haproxy(session, upstream, cpus, tls_port=tls_port)

    def target(self, target: str) -> list[Result]:
        scenarios = [SCENARIOS[name] for name in self.args.scenarios]
        print(f"== {target}", flush=True)
        try:
            child, port = self.start(target)
        except (StartError, OSError) as exc:
            return failed_to_start(target, scenarios, exc)
        results = []
        try:
            for mode in self.args.pinning:
                self.use(mode)
                for scenario in scenarios:
                    results.append(self.measure(target, port, scenario))
                    print(f"   {mode:<8} {scenario.name:<10} {summary(results[-1])}", flush=True)
        finally:
            if child is not None:
                self.session.stop(child)
        return results

    def rounds(self, targets: Sequence[str], count: int) -> list[Result]:
        """Every target started once, then ``count`` turns of (scenario, target)."""
        scenarios = [SCENARIOS[name] for name in self.args.scenarios]
        running: dict[str, tuple[Child | None, int]] = {}
        results: list[Result] = []
        try:
            for target in targets:
                try:
                    running[target] = self.start(target)
                except (StartError, OSError) as exc:
                    results += failed_to_start(target, scenarios, exc)
            for n in range(1, count + 1):
                print(f"-- round {n} of {count}", flush=True)
                for mode in self.args.pinning:
                    self.use(mode)
                    for scenario in scenarios:
                        for target, (_, port) in running.items():
                            result = self.measure(target, port, scenario)
                            result.round = n
                            results.append(result)
                            print(f"   {mode:<8} {target:<16} {scenario.name:<10} "
                                  f"{summary(result)}", flush=True)  # fmt: skip
        finally:
            for child, _ in running.values():
                if child is not None:
                    self.session.stop(child)
        return results


def failed_to_start(target: str, scenarios: Sequence[Scenario], exc: Exception) -> list[Result]:
    print(f"   {target} failed to start: {exc}", flush=True)
    return [Result(target, s.name, "failed to start", detail=str(exc)) for s in scenarios]


def rows_of(results: list[Result], pinning: str, scenario: str) -> list[Result]:
    """Results of one table: one pinning mode, one scenario ("failed to start" rows,
    which have no mode, in every table)."""
    return [
        r for r in results
        if r.scenario == scenario and (r.pinning == pinning or r.status == "failed to start")
    ]  # fmt: skip


def combine_rounds(results: list[Result]) -> list[Result]:
    """One row per (scenario, target): medians over the rounds, and the ratios to nginx
    taken within each round (``rps_ratios``, ``p99_ratios``)."""
    ok = [r for r in results if r.status == "ok"]
    ref = {(r.pinning, r.scenario, r.round): r for r in ok if r.target == REFERENCE}
    rows: list[Result] = []
    keys = dict.fromkeys((r.pinning, r.scenario, r.target) for r in results)
    for pinning, scenario, target in keys:
        key = (pinning, scenario, target)
        mine = [r for r in ok if (r.pinning, r.scenario, r.target) == key]
        if not mine:
            rows.append(next(r for r in results if (r.pinning, r.scenario, r.target) == key))
            continue
        row = Result(
            target, scenario, "ok",
            rps=statistics.median(r.rps or 0.0 for r in mine),
            p50_us=int(statistics.median(r.p50_us or 0 for r in mine)),
            p90_us=int(statistics.median(r.p90_us or 0 for r in mine)),
            p99_us=int(statistics.median(r.p99_us or 0 for r in mine)),
            errors=sum(r.errors or 0 for r in mine),
            check=next((r.check for r in mine if r.check), None),
            cpu_busy={
                cpu: statistics.median(r.cpu_busy.get(cpu, 0.0) for r in mine)
                for cpu in mine[0].cpu_busy
            },
            round=len(mine),
            pinning=pinning,
        )  # fmt: skip
        for r in mine:
            other = ref.get((pinning, scenario, r.round))
            if other is not None and other.rps and r.rps:
                row.rps_ratios.append(r.rps / other.rps)
                if other.p99_us and r.p99_us:  # none for handshake-full
                    row.p99_ratios.append(r.p99_us / other.p99_us)
        rows.append(row)
    return rows


def summary(result: Result) -> str:
    if result.status != "ok":
        return f"{result.status}: {result.detail}"
    assert result.rps is not None and result.p99_us is not None
    text = f"{result.rps:>10,.0f} req/s  p99 {result.p99_us / 1000:.2f} ms  errors {result.errors}"
    return text + (f"  CHECK FAILED: {result.check}" if result.check else "")


# --- report ----------------------------------------------------------------------------


def ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "—"
    return f"{value / reference:.2f}"


def spread(ratios: list[float]) -> str:
    """The median of per-round ratios, and their range when there are several."""
    middle = f"{statistics.median(ratios):.2f}"
    if len(ratios) < 2:
        return middle
    return f"{middle} ({min(ratios):.2f}-{max(ratios):.2f})"


def cpu_cell(result: Result, pin: Pinning) -> str:
    """Busy percent of the proxy's core / of the wrk+upstream cores during the timed run."""
    busy = result.cpu_busy
    if not busy:
        return "—"
    if pin.proxy is None or pin.load is None:
        return f"{sum(busy.values()) / len(busy):.0f} (all)"
    load = [busy.get(int(cpu), 0.0) for cpu in pin.load.split(",")]
    return f"{busy.get(int(pin.proxy), 0.0):.0f} / {sum(load) / len(load):.0f}"


def table_row(result: Result, ref: Result | None, pin: Pinning) -> str:
    if result.status != "ok":
        why = (result.detail or "").splitlines()[0] if result.status != "failed to start" else ""
        return f"| {result.target} | {result.status} | | | {why} | | | |"
    assert result.rps is not None and result.p50_us is not None and result.p99_us is not None
    errors = str(result.errors) + (f" (check: {result.check})" if result.check else "")
    ref_rps = ref.rps if ref else None
    ref_p99 = ref.p99_us if ref else None
    cells = [
        result.target,
        f"{result.rps:,.0f}",
        f"{result.p50_us / 1000:.2f}",
        f"{result.p99_us / 1000:.2f}",
        errors,
        spread(result.rps_ratios) if result.rps_ratios else ratio(result.rps, ref_rps),
        spread(result.p99_ratios) if result.p99_ratios else ratio(result.p99_us, ref_p99),
        cpu_cell(result, pin),
    ]
    return "| " + " | ".join(cells) + " |"


def markdown(
    results: list[Result], scenarios: Sequence[str], pinnings: Sequence[str], pin: Pinning
) -> str:
    """One table per pinning mode and scenario; ``pin``: the pinned mode's plan."""
    out = []
    for pinning in pinnings:
        mode_pin = pin if pinning == "pinned" else harness.UNPINNED
        cpu = "CPU % proxy core / wrk+upstream" if mode_pin.proxy else "CPU % (all cores)"
        head = (
            "| target | requests/s | p50 ms | p99 ms | errors | req/s vs nginx | p99 vs nginx "
            f"| {cpu} |"
        )
        for name in scenarios:
            rows = rows_of(results, pinning, name)
            ref = next((r for r in rows if r.target == REFERENCE and r.status == "ok"), None)
            out += [f"### {name}, {pinning}: {SCENARIOS[name].about}", "", head,
                    "| --- |" + " ---: |" * 7]  # fmt: skip
            out += [table_row(r, ref, mode_pin) for r in rows]
            out.append("")
    return "\n".join(out)


def noise_warnings(results: list[Result], pin: Pinning) -> list[str]:
    """The proxy core should be idle while wrk talks to the upstream directly."""
    if pin.proxy is None:
        return []
    lines = []
    for result in results:
        busy = result.cpu_busy.get(int(pin.proxy), 0.0)
        pinned = result.pinning == "pinned"
        if pinned and result.target == "direct" and busy > NOISE_BUSY_PERCENT:
            lines.append(
                f"warning: CPU {pin.proxy} was {busy:.0f}% busy during direct/{result.scenario} "
                "although nothing of this benchmark ran there: other load shares this machine, "
                "so the numbers are noisy"
            )
    return lines


# --- main ------------------------------------------------------------------------------


def check_tools() -> None:
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt-get install wrk)")


def load_workers(args: argparse.Namespace, pin: Pinning) -> int:
    if args.upstream_workers > 0:
        return int(args.upstream_workers)
    return len(pin.load.split(",")) if pin.load else max(1, (os.cpu_count() or 2) // 2)


def run(args: argparse.Namespace, session: Session, pin: Pinning) -> dict[str, Any]:
    machine = describe_machine(args.aiolb_cmd)
    machine["nofile_limit"] = harness.raise_nofile()
    print(f"pinning: {pin.note}")
    upstream = harness.start_upstream(session, pin.load, load_workers(args, pin), args.upstream)
    print(f"upstream: {upstream.note} on ports {upstream.ports}", flush=True)
    started = dt.datetime.now().isoformat(timespec="seconds")
    bench = Bench(args, session, upstream, pin)
    if args.rounds > 1:
        results = bench.rounds(args.targets, args.rounds)
    else:
        results = [result for target in args.targets for result in bench.target(target)]
    machine["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    return {
        "started": started,
        "finished": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine,
        "pinning": asdict(pin),
        "upstream": asdict(upstream),
        "options": {**vars(args), "warmup_s": WARMUP_S, "wrk_timeout": WRK_TIMEOUT},
        "results": results,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    check_tools()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    pin = harness.plan_pinning() if "pinned" in args.pinning else harness.UNPINNED
    with Session(keep_dir=args.keep_tmp) as session:
        if args.keep_tmp:
            print(f"configs and logs in {session.dir}")
        report = run(args, session, pin)
    results: list[Result] = report["results"]
    rows = combine_rounds(results) if args.rounds > 1 else results
    print()
    if args.rounds > 1:
        print(f"Medians of {args.rounds} interleaved rounds; ratios: the median of the rounds' "
              "ratios (their range).\n")  # fmt: skip
    print(markdown(rows, args.scenarios, args.pinning, pin))
    report["warnings"] = noise_warnings(results, pin)
    for line in report["warnings"]:
        print(line)
    report["results"] = [asdict(r) for r in results]
    if args.rounds > 1:
        report["combined"] = [asdict(r) for r in rows]
    print(f"JSON written to {harness.write_json(args.json_dir, 'bench', report)}")
    return 0 if all(r.status == "ok" and not r.check for r in results) else 1


if __name__ == "__main__":
    harness.run_main(main)
