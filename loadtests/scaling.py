"""Scaling of aiolb's worker processes next to nginx's, measured with wrk.

Starts bench.py's upstream (nginx serving fixed bodies on two ports) once, then for each
worker count (``--workers 1,2,4``) starts aiolb with ``workers: N`` and nginx as a proxy
with ``worker_processes N`` (both on SO_REUSEPORT listeners), checks each with two
requests, warms up, and runs wrk on the ``20b`` scenario (GET, 20-byte body,
keep-alive). The proxy under test gets N cores of its own (``taskset``); wrk and the
upstream share the others. Reports req/s, p50, p99, the speed-up over one worker and the
ratio to nginx at the same count, and how the work was spread over the worker processes
(CPU time of each from ``/proc/PID/stat``, connections of each from ``ss``; for aiolb
also what the supervisor's ``/metrics`` counted against what wrk counted). Goal (the
issue): 4 aiolb workers serve at least 3.4 x the requests/s of one.

Not a test: a measurement, meaningful only on a machine with enough cores (the N proxy
cores plus at least max(2, N) for wrk and the upstream). With fewer it still runs, but
says the figures are core-starved (``"core_starved": true`` in the JSON). Run from the
repository root:

    python loadtests/scaling.py                          # workers 1,2,4, 8 s each
    python loadtests/scaling.py --quick --workers 1,2    # smoke run, 2 s each
    python loadtests/scaling.py --workers 1,2,4,8 --rounds 3 --connections 256
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import bench
import harness
from bench import Bench, NoAnswer, Result
from harness import Child, Pinning, Session, StartError

TARGETS = ("aiolb", "nginx")
REFERENCE = "nginx"
SCENARIO = bench.SCENARIOS["20b"]
GOAL_WORKERS, GOAL_SPEEDUP = 4, 3.4  # the issue: 4 workers >= 3.4 x one worker's req/s
UNEVEN_RATIO = 0.8  # least busy worker below this share of the busiest: a warning
LOAD_BOUND_PERCENT = 90.0  # wrk+upstream cores this busy: they may cap the proxy
READY_TIMEOUT_S = 30.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
LOG_PROBLEM = re.compile(
    r" (WARNING|ERROR|CRITICAL) |Traceback|exited unexpectedly|\[(emerg|alert|crit|error)\]"
)
#: nginx's `worker_rlimit_nofile 50000` above the hard limit: harmless (the limit stays)
LOG_HARMLESS = re.compile(r"setrlimit\(RLIMIT_NOFILE")


@dataclass
class ScaleResult(Result):
    """bench.py's result plus the worker count and how the work was spread."""

    workers: int = 1
    cpus: str | None = None  # the proxy's taskset list
    processes: list[dict[str, Any]] = field(default_factory=list)  # per process: CPU time
    connections: dict[str, int] = field(default_factory=dict)  # role -> client connections
    upstream_connections: dict[str, int] = field(default_factory=dict)  # role -> to upstreams
    metrics_requests: int | None = None  # aiolb: /metrics requests counted in the timed run
    exit_code: int | None = None
    round: int = 1
    log_problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Plan:
    """Which CPUs the proxy (the first N of `proxy` for N workers) and the load get."""

    proxy: list[int]  # empty: not pinned
    load: list[int]
    idle: list[int]  # hyperthread siblings of the proxy's cores, left unused
    core_starved: bool
    note: str

    def pin(self, workers: int) -> Pinning:
        if not self.proxy:
            return Pinning(None, None, self.note)
        proxy = ",".join(str(c) for c in self.proxy[:workers])
        return Pinning(proxy, ",".join(str(c) for c in self.load), self.note)


# --- command line ----------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    try:
        values = sorted({int(item) for item in text.split(",") if item.strip()})
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from exc
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError("worker counts must be >= 1")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int_list, default=[1, 2, 4], help="e.g. 1,2,4")
    parser.add_argument("--targets", type=bench.csv(TARGETS), default=list(TARGETS))
    parser.add_argument("--duration", type=int, default=8, help="seconds per timed wrk run")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of wrk before each run")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved runs; medians")
    parser.add_argument("--quick", action="store_true", help="--duration 2 --warmup 1")
    parser.add_argument(
        "--connections", type=int, default=128, help="wrk -c, the same for every count"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="wrk -t (default: half the load CPUs)"
    )
    parser.add_argument(
        "--upstream-workers",
        type=int,
        default=0,
        help="nginx upstream workers (default: the load CPUs wrk does not get)",
    )
    parser.add_argument(
        "--load-cpus",
        type=int,
        default=0,
        help="CPUs wrk and the upstream need besides the proxy's (default: max(2, max workers))",
    )
    parser.add_argument(
        "--nginx-no-reuseport",
        action="store_true",
        help="nginx workers share one listening socket (nginx's default) instead of one "
        "SO_REUSEPORT socket each like aiolb's",
    )
    parser.add_argument(
        "--aiolb-cmd",
        type=shlex.split,
        default=harness.default_aiolb_cmd(),
        help="command that runs aiolb; {config} is replaced by the generated YAML path, "
        "which sets `workers: N` (default: %(default)s)",
    )
    parser.add_argument("--no-pin", action="store_true", help="every process on every core")
    parser.add_argument("--json-dir", type=Path, default=harness.HERE / "results")
    parser.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = 2, 1
    return args


# --- CPUs ------------------------------------------------------------------------------


def physical_cores(cpus: Sequence[int]) -> list[list[int]]:
    """`cpus` grouped by physical core (hyperthreads together), in CPU order."""
    groups: dict[tuple[str, str], list[int]] = {}
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            key = ((topo / "physical_package_id").read_text(), (topo / "core_id").read_text())
        except OSError:
            key = ("cpu", str(cpu))
        groups.setdefault(key, []).append(cpu)
    return sorted(groups.values())


def plan_cpus(args: argparse.Namespace) -> Plan:
    """The proxy gets one CPU per worker on distinct physical cores (their hyperthread
    siblings stay idle), away from CPU 0; wrk and the upstream get the rest. Core-starved
    when that leaves fewer than `--load-cpus` for the load."""
    cpus = sorted(os.sched_getaffinity(0))
    most = max(args.workers)
    need = args.load_cpus or max(2, most)
    starved = len(cpus) < most + need
    why = f"{len(cpus)} CPU(s) usable, {most} for the proxy + {need} for wrk and upstream needed"
    if args.no_pin or shutil.which("taskset") is None or len(cpus) < 2:
        reason = "--no-pin" if args.no_pin else "taskset missing or 1 CPU"
        return Plan([], cpus, [], starved, f"not pinned ({reason}): every process on every CPU")
    cores = physical_cores(cpus)
    ordered = cores[1:] + cores[:1]  # CPU 0's core last: it takes most interrupts
    if len(cores) >= most + 1:
        chosen = ordered[:most]
        proxy = [core[0] for core in chosen]
        idle = [cpu for core in chosen for cpu in core[1:]]
        load = [cpu for cpu in cpus if cpu not in proxy and cpu not in idle]
        if len(load) >= need:
            note = f"proxy on CPU(s) {proxy} (one per physical core)"
            note += f", their siblings {idle} idle" if idle else ""
            return Plan(proxy, load, idle, False, f"{note}; wrk and upstream on {load}")
    if not starved:  # enough CPUs, but only by putting proxy and load on sibling threads
        proxy = [cpu for cpu in cpus if cpu != cpus[0]][:most]
        load = [cpu for cpu in cpus if cpu not in proxy]
        note = f"proxy on CPU(s) {proxy}, wrk and upstream on {load} (may share physical cores)"
        return Plan(proxy, load, [], False, note)
    proxy = [cpu for cpu in cpus if cpu != cpus[0]][: min(most, len(cpus) - 1)]
    load = [cpu for cpu in cpus if cpu not in proxy]
    note = f"CORE-STARVED ({why}): proxy on the first min(N, {len(proxy)}) of CPU(s) {proxy}"
    note += f", wrk and upstream on {load}"
    return Plan(proxy, load, [], True, note)


def load_split(args: argparse.Namespace, plan: Plan) -> tuple[int, int]:
    """(wrk threads, upstream nginx workers) for the load CPUs."""
    count = len(plan.load)
    threads = args.threads or max(1, count // 2)
    return threads, args.upstream_workers or max(1, count - threads)


# --- processes -------------------------------------------------------------------------


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of one process, in clock ticks (None once it has gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]) + int(fields[12])


def role(pid: int) -> str:
    """`worker N`, `supervisor`, `worker` / `master` (nginx), or `proxy` (one process)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    words = [a.decode(errors="replace") for a in argv if a]
    text = " ".join(words)
    if "_worker" in words:
        index = words[words.index("--index") + 1] if "--index" in words[:-1] else "?"
        return f"worker {index}"
    if text.startswith("nginx: "):
        return text.split()[1]  # "master" or "worker"
    if "run" in words and ("--workers" in words or harness_children(pid)):
        return "supervisor"
    return "proxy"


def harness_children(pid: int) -> list[int]:
    return [p for p in harness.process_tree(pid) if p != pid]


def proxy_processes(child: Child) -> dict[int, str]:
    """pid -> role for the proxy's process tree; nginx's workers numbered in pid order."""
    roles = {pid: role(pid) for pid in harness.process_tree(child.pid)}
    unnamed = sorted(pid for pid, name in roles.items() if name == "worker")
    roles.update({pid: f"worker {i}" for i, pid in enumerate(unnamed)})
    return roles


def workers_of(processes: dict[int, str]) -> list[int]:
    """The processes that serve traffic: workers, or the single process."""
    serving = [pid for pid, name in processes.items() if name.startswith("worker")]
    return serving or [pid for pid, name in processes.items() if name == "proxy"]


def established_by_pid(where: str) -> dict[int, int]:
    """Established TCP connections matching the `ss` filter `where`, per owning pid."""
    try:
        out = subprocess.run(
            ["ss", "-Htnp", "state", "established", where],
            capture_output=True, text=True, timeout=10, check=False,
        ).stdout  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return {}
    counts: dict[int, int] = {}
    for line in out.splitlines():
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)} or {0}  # 0: no process
        for pid in owners:
            counts[pid] = counts.get(pid, 0) + 1
    return counts


def admin_port(config: Path) -> int | None:
    match = re.search(r"^admin:\s*\n\s+bind:\s*\"?[^\"\n]*:(\d+)", config.read_text(), re.M)
    return int(match.group(1)) if match else None


def admin_get(port: int, path: str, timeout: float = 10.0) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


def requests_counted(port: int | None) -> int | None:
    """Sum of `aiolb_requests_total` over every label (all workers, via the supervisor)."""
    if port is None:
        return None
    try:
        status, text = admin_get(port, "/metrics")
    except (OSError, http.client.HTTPException):
        return None
    if status != 200:
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith("aiolb_requests_total"):
            total += float(line.rsplit(None, 1)[1])
    return int(total)


def wait_ready(child: Child, admin: int | None, workers: int, kind: str) -> None:
    """Until every worker serves: aiolb's /readyz is 200 (the supervisor says so once all
    its workers are up), nginx's master has `workers` children."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if child.proc.poll() is not None:
            raise StartError(f"{child.name} exited with {child.proc.returncode}:\n{child.tail()}")
        if kind == "nginx":
            serving = len(workers_of(proxy_processes(child)))
            if serving >= workers:
                return
        elif admin is None:
            return
        else:
            with contextlib.suppress(OSError, http.client.HTTPException):
                if admin_get(admin, "/readyz", timeout=2)[0] == 200:
                    return
        if time.monotonic() > deadline:
            raise StartError(f"{child.name}: not all {workers} workers ready:\n{child.tail()}")
        time.sleep(0.05)


def log_problems(child: Child) -> list[str]:
    try:
        lines = child.log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line for line in lines if LOG_PROBLEM.search(line) and not LOG_HARMLESS.search(line)]


# --- one run ---------------------------------------------------------------------------


class Scaling:
    def __init__(self, args: argparse.Namespace, session: Session, plan: Plan) -> None:
        self.args, self.session, self.plan = args, session, plan
        self.upstream: harness.Upstream | None = None

    def start(self, name: str, workers: int, pin: Pinning) -> tuple[Child, int, int | None]:
        session, target = self.session, name.split("-")[0]
        assert self.upstream is not None
        if target == "nginx":
            child, port = harness.start_nginx_proxy_workers(
                session, self.upstream, pin.proxy, workers,
                reuseport=not self.args.nginx_no_reuseport, name=name,
            )  # fmt: skip
            wait_ready(child, None, workers, "nginx")
            return child, port, None
        port = session.port()
        generated = harness.aiolb_config(session, port, self.upstream, f"workers: {workers}\n")
        config = session.path(f"{name}.yaml")
        generated.replace(config)
        argv = [arg.replace("{config}", str(config)) for arg in self.args.aiolb_cmd]
        child = harness.start(session, name, argv, port, cpus=pin.proxy, cwd=harness.REPO)
        admin = admin_port(config)
        try:
            wait_ready(child, admin, workers, "aiolb")
        except StartError:
            session.stop(child)
            raise
        return child, port, admin

    def run(self, target: str, workers: int, rnd: int) -> ScaleResult:
        """Start `target` with `workers` workers, measure it, stop it. Its log (stdout and
        stderr) is `<target>-w<workers>[-r<round>].log` in the session dir."""
        pin = self.plan.pin(workers)
        name = f"{target}-w{workers}" + (f"-r{rnd}" if rnd > 1 else "")
        base = {"target": target, "scenario": SCENARIO.name, "workers": workers,
                "cpus": pin.proxy, "round": rnd}  # fmt: skip
        try:
            child, port, admin = self.start(name, workers, pin)
        except (StartError, OSError) as exc:
            return ScaleResult(status="failed to start", detail=str(exc), **base)
        try:
            result = self.measure(child, name, port, admin, workers, pin, base)
        finally:
            with contextlib.suppress(Exception):
                self.session.stop(child)
        result.exit_code = child.proc.returncode
        result.log_problems = log_problems(child)
        if target == "aiolb" and result.exit_code not in (0, None):
            result.notes.append(f"aiolb exited with status {result.exit_code} on SIGTERM")
        return result

    def measure(
        self,
        child: Child,
        name: str,
        port: int,
        admin: int | None,
        workers: int,
        pin: Pinning,
        base: dict[str, Any],
    ) -> ScaleResult:
        assert self.upstream is not None
        try:
            problem = bench.check_once(port, SCENARIO)
        except NoAnswer as exc:
            return ScaleResult(status="not answering", detail=str(exc), **base)
        runner = Bench(self.args, self.session, self.upstream, pin)
        before = proxy_processes(child)
        notes = []
        serving = workers_of(before)
        if len(serving) != workers:
            notes.append(f"{len(serving)} serving processes, expected {workers}: {before}")
        sample: dict[str, dict[int, int]] = {}
        up1, up2 = self.upstream.ports

        def take_sample() -> None:
            sample["clients"] = established_by_pid(f"( sport = :{port} )")
            sample["upstream"] = established_by_pid(f"( dport = :{up1} or dport = :{up2} )")

        try:
            runner.wrk(name, port, SCENARIO, self.args.warmup)
            counted0 = requests_counted(admin)
            ticks0 = {pid: cpu_ticks(pid) for pid in before}
            cpu0, t0 = harness.cpu_times(), time.monotonic()
            sampler = threading.Timer(self.args.duration / 2, take_sample)
            sampler.start()
            data = runner.wrk(name, port, SCENARIO, self.args.duration)
            sampler.join()
            cpu1, wall = harness.cpu_times(), time.monotonic() - t0
            after = proxy_processes(child)
            ticks1 = {pid: cpu_ticks(pid) for pid in after}
            counted1 = requests_counted(admin)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            return ScaleResult(status="wrk failed", check=problem, detail=str(exc), **base)
        if not data["requests"]:
            detail = f"wrk completed no request; errors {data['errors']}"
            return ScaleResult(status="no responses", check=problem, detail=detail, **base)
        if set(after) != set(before):
            notes.append(f"processes changed during the run: {before} -> {after}")
        result = ScaleResult(**{**asdict(bench.to_result(name, SCENARIO, data, problem)), **base})
        result.cpu_busy = harness.cpu_busy(cpu0, cpu1)
        for pid, what in sorted(before.items(), key=lambda item: role_key(item[1])):
            start, end = ticks0.get(pid), ticks1.get(pid)
            seconds = (end - start) / CLK_TCK if start is not None and end is not None else None
            result.processes.append({
                "pid": pid, "role": what, "cpu_s": seconds,
                "core_percent": None if seconds is None else round(100 * seconds / wall, 1),
            })  # fmt: skip
        for kind, counts in sample.items():
            named = {before[pid]: 0 for pid in serving}  # a worker ss lists no socket for
            for pid, n in counts.items():
                owner = before.get(pid, f"pid {pid}" if pid else "no process")
                if kind == "clients" or pid in before:
                    named[owner] = named.get(owner, 0) + n
            if kind == "clients":
                result.connections = named
            else:
                result.upstream_connections = named
        if counted0 is not None and counted1 is not None:
            result.metrics_requests = counted1 - counted0
        result.notes = notes
        return result


# --- report ----------------------------------------------------------------------------


def worker_percents(result: ScaleResult) -> list[float]:
    return [
        p["core_percent"]
        for p in result.processes
        if p["core_percent"] is not None
        and (p["role"].startswith("worker") or p["role"] == "proxy")
    ]


def split_cell(result: ScaleResult) -> str:
    """CPU of each serving process in % of one core; the supervisor/master's after '+'."""
    serving = "/".join(f"{v:.0f}" for v in worker_percents(result)) or "—"
    others = [
        f"{p['role'][:3]} {p['core_percent']:.0f}"
        for p in result.processes
        if p["role"] in ("supervisor", "master") and p["core_percent"] is not None
    ]
    return serving + (f" (+{', '.join(others)})" if others else "")


def role_key(name: str) -> tuple[str, int]:
    word, _, number = name.partition(" ")
    return (word, int(number) if number.isdigit() else -1)


def conns_cell(connections: dict[str, int]) -> str:
    """Connections per serving process, in worker order."""
    roles = sorted(connections, key=role_key)
    serving = [r for r in roles if r.startswith("worker")] or roles
    text = "/".join(str(connections[r]) for r in serving) or "—"
    others = sum(n for r, n in connections.items() if r not in serving)
    return text + (f" (+{others} not in a worker)" if others else "")


def cpu_cell(result: ScaleResult, plan: Plan) -> str:
    busy = result.cpu_busy
    if not busy:
        return "—"
    if not plan.proxy or result.cpus is None:
        return f"{sum(busy.values()) / len(busy):.0f} (all)"
    proxy = [busy.get(int(c), 0.0) for c in result.cpus.split(",")]
    load = [busy.get(c, 0.0) for c in plan.load]
    return f"{sum(proxy) / len(proxy):.0f} / {sum(load) / len(load):.0f}"


def representative(results: Sequence[ScaleResult]) -> ScaleResult:
    """The run with the median req/s (the lower one for an even count), or the first."""
    ok = sorted((r for r in results if r.status == "ok"), key=lambda r: r.rps or 0.0)
    return ok[(len(ok) - 1) // 2] if ok else results[0]


def summarise(results: Sequence[ScaleResult]) -> dict[tuple[str, int], ScaleResult]:
    keys = sorted({(r.target, r.workers) for r in results}, key=lambda k: (k[1], k[0]))
    return {key: representative([r for r in results if (r.target, r.workers) == key])
            for key in keys}  # fmt: skip


def ratio(value: float | None, reference: float | None) -> str:
    return f"{value / reference:.2f}" if value and reference else "—"


def markdown(results: Sequence[ScaleResult], plan: Plan, rounds: int) -> str:
    rows = summarise(results)
    head = (
        "| proxy | workers | requests/s | p50 ms | p99 ms | errors | speed-up vs 1 worker "
        "| vs nginx | CPU % proxy cores / load | CPU % of one core per worker | conns per worker |"
    )
    lines = [head, "| --- |" + " ---: |" * 8 + " --- | --- |"]
    for (target, workers), r in rows.items():
        if r.status != "ok":
            why = (r.detail or "").splitlines()[0] if r.detail else ""
            lines.append(f"| {target} | {workers} | {r.status} | | | {why} | | | | | |")
            continue
        assert r.rps is not None and r.p50_us is not None and r.p99_us is not None
        one = rows.get((target, 1))
        ref = rows.get((REFERENCE, workers))
        rps = f"{r.rps:,.0f}"
        if rounds > 1:
            same = [x.rps for x in results if (x.target, x.workers) == (target, workers) and x.rps]
            rps += f" ({min(same):,.0f}-{max(same):,.0f})"
        errors = str(r.errors) + (f" (check: {r.check})" if r.check else "")
        cells = [
            target, str(workers), rps, f"{r.p50_us / 1000:.2f}", f"{r.p99_us / 1000:.2f}", errors,
            ratio(r.rps, one.rps if one and one.status == "ok" else None),
            ratio(r.rps, ref.rps if ref and ref.status == "ok" else None),
            cpu_cell(r, plan), split_cell(r), conns_cell(r.connections),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def findings(results: Sequence[ScaleResult], plan: Plan, connections: int) -> list[str]:
    """Uneven spread, missing workers, /metrics disagreeing with wrk, errors, log lines."""
    out = []
    for r in results:
        label = f"{r.target} x{r.workers} (round {r.round})"
        out += [f"{label}: {note}" for note in r.notes]
        if r.status != "ok":
            out.append(f"{label}: {r.status}: {(r.detail or '').splitlines()[:1]}")
            continue
        shares = worker_percents(r)
        if r.workers > 1 and shares and min(shares) < UNEVEN_RATIO * max(shares):
            out.append(f"{label}: uneven CPU over the workers: {split_cell(r)} % of a core")
        if r.errors:
            out.append(f"{label}: wrk counted {r.errors} errors {r.wrk.get('errors')}")
        if r.metrics_requests is not None:
            wrk_n = r.wrk["requests"]
            if abs(r.metrics_requests - wrk_n) > max(connections, 0.01 * wrk_n):
                out.append(
                    f"{label}: /metrics counted {r.metrics_requests:,} requests in the timed "
                    f"run, wrk {wrk_n:,}"
                )
        if plan.proxy and r.cpu_busy:
            load = [r.cpu_busy.get(c, 0.0) for c in plan.load]
            if sum(load) / len(load) >= LOAD_BOUND_PERCENT and not plan.core_starved:
                out.append(f"{label}: wrk+upstream CPUs {sum(load) / len(load):.0f}% busy: "
                           "the load side may cap this figure")  # fmt: skip
        if r.log_problems:
            out.append(f"{label}: {len(r.log_problems)} warning/error log line(s), first: "
                       f"{r.log_problems[0]}")  # fmt: skip
    return out


def goal(results: Sequence[ScaleResult], plan: Plan) -> str:
    rows = summarise(results)
    one, four = rows.get(("aiolb", 1)), rows.get(("aiolb", GOAL_WORKERS))
    if not (one and four and one.rps and four.rps):
        return f"goal ({GOAL_WORKERS} workers >= {GOAL_SPEEDUP} x 1 worker): not measured"
    speedup = four.rps / one.rps
    if plan.core_starved:
        verdict = "not judged: core-starved"
    else:
        verdict = "met" if speedup >= GOAL_SPEEDUP else "NOT met"
    return f"goal ({GOAL_WORKERS} workers >= {GOAL_SPEEDUP} x 1 worker): {speedup:.2f} x, {verdict}"


# --- main ------------------------------------------------------------------------------


def starved_banner(plan: Plan) -> str:
    return (
        "WARNING: CORE-STARVED. This machine has too few CPUs for the worker counts asked: "
        "the proxy's workers share cores with each other (and, unpinned, with wrk and the "
        "upstream). The figures below show what extra workers cost or gain on THIS machine; "
        "they are NOT a scaling measurement."
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    bench.check_tools()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    plan = plan_cpus(args)
    args.threads, upstream_workers = load_split(args, plan)
    print(f"pinning: {plan.note}")
    if plan.core_starved:
        print(starved_banner(plan), flush=True)
    loadavg = Path("/proc/loadavg").read_text().split()[:3]
    if float(loadavg[0]) > 0.5:
        print(f"warning: load average {' '.join(loadavg)} before the start: other work shares "
              "this machine, the figures are noisy")  # fmt: skip
    machine = bench.describe_machine(args.aiolb_cmd)
    machine["nofile_limit"] = harness.raise_nofile()
    started = dt.datetime.now().isoformat(timespec="seconds")
    results: list[ScaleResult] = []
    with Session(keep_dir=args.keep_tmp) as session:
        if args.keep_tmp:
            print(f"configs and logs in {session.dir}")
        scaling = Scaling(args, session, plan)
        load_pin = ",".join(str(c) for c in plan.load) if plan.proxy else None
        scaling.upstream = harness.start_upstream(session, load_pin, upstream_workers, "nginx")
        print(f"upstream: {scaling.upstream.note}; wrk -t {args.threads} -c {args.connections}",
              flush=True)  # fmt: skip
        for rnd in range(args.rounds):
            for workers in args.workers:
                for target in args.targets:
                    result = scaling.run(target, workers, rnd + 1)
                    results.append(result)
                    print(f"   round {rnd + 1} {target:<5} x{workers}  {bench.summary(result)}"
                          f"  CPU/worker {split_cell(result)}", flush=True)  # fmt: skip
    print()
    if plan.core_starved:
        print(starved_banner(plan))
        print()
    print(markdown(results, plan, args.rounds))
    print()
    problems = findings(results, plan, args.connections)
    for line in problems:
        print(f"finding: {line}")
    for r in results:
        if r.status == "ok" and r.upstream_connections:
            print(
                f"{r.target} x{r.workers} (round {r.round}): upstream connections per worker "
                f"{conns_cell(r.upstream_connections)}, client connections "
                f"{conns_cell(r.connections)}"
            )
    for r in results:
        if r.target == "aiolb" and r.metrics_requests is not None and r.status == "ok":
            print(
                f"aiolb x{r.workers}: /metrics (supervisor, all workers) counted "
                f"{r.metrics_requests:,} requests in the timed run, wrk {r.wrk['requests']:,}"
            )
    verdict = goal(results, plan)
    print(verdict)
    machine["loadavg_at_start"] = loadavg
    machine["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    report = {
        "started": started,
        "finished": dt.datetime.now().isoformat(timespec="seconds"),
        "core_starved": plan.core_starved,
        "machine": machine,
        "plan": asdict(plan),
        "upstream": asdict(scaling.upstream) if scaling.upstream else None,
        "options": {**vars(args), "upstream_workers": upstream_workers},
        "goal": verdict,
        "findings": problems,
        "summary": [
            {
                "target": t,
                "workers": n,
                "rps": r.rps,
                "p50_us": r.p50_us,
                "p99_us": r.p99_us,
                "worker_cpu_percent": worker_percents(r),
                "connections": r.connections,
            }
            for (t, n), r in summarise(results).items()
        ],
        "results": [asdict(r) for r in results],
    }
    print(f"JSON written to {harness.write_json(args.json_dir, 'scaling', report)}")
    return 0 if all(r.status == "ok" and not r.check for r in results) else 1


if __name__ == "__main__":
    harness.run_main(main)
