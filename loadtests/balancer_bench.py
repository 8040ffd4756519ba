"""Throughput of aiolb with each balancing algorithm, next to round_robin, measured with wrk.

Starts the same upstream as bench.py (nginx serving fixed bodies on two ports), then one
aiolb process with a listener and a pool per algorithm in ``proxy.balancing.REGISTRY``,
each pool over both ports (bench.py's settings otherwise). For each algorithm in turn,
round after round, it checks the listener with two requests, warms up for 1 s and runs
wrk on the ``20b`` scenario. One process for all keeps what differs between processes
(memory layout, hash seed) out of the ratios; ``--separate`` starts one process per
algorithm and round instead. Every request carries ``X-User`` (the key of
``consistent_hash``). Prints a Markdown table (req/s, p99, req/s relative to
round_robin: the median of the rounds' ratios) and writes JSON to
``loadtests/results/``. See README.md.

Not a test: a measurement. Run from the repository root:

    python loadtests/balancer_bench.py                      # every algorithm, 5 s each
    python loadtests/balancer_bench.py --rounds 9 --duration 2   # interleaved, medians
    python loadtests/balancer_bench.py --algorithms round_robin,peak_ewma --duration 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import signal
import statistics
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import bench
import harness
from bench import Bench, Result
from harness import Child, Pinning, Session

sys.path.insert(0, str(harness.REPO))

from proxy.balancing import REGISTRY

REFERENCE = "round_robin"
TARGET_RATIO = 0.95  # the goal: every algorithm within 5% of round_robin's req/s
SCENARIO = bench.SCENARIOS["20b"]
USER_HEADER = "X-User: bench-user-42"
#: the ``balancer:`` value for each algorithm that needs options (YAML flow mapping)
BALANCERS = {"consistent_hash": '{name: consistent_hash, key: "header:X-User"}'}


def balancer_yaml(name: str) -> str:
    return BALANCERS.get(name, name)


def algorithms() -> list[str]:
    """Every registered algorithm, the reference first."""
    return [REFERENCE, *(name for name in REGISTRY if name != REFERENCE)]


class BalancerBench(Bench):
    """bench.py's runner with one aiolb per algorithm as the targets, wrk sending X-User."""

    def wrk(self, target: str, port: int, scenario: bench.Scenario, seconds: int) -> dict[str, Any]:
        url = f"http://127.0.0.1:{port}{scenario.path}"
        argv = bench.wrk_argv(self.args, url, seconds)
        argv[-1:-1] = ["-H", USER_HEADER]  # before the URL
        log = self.session.path(f"wrk-{target}-{seconds}s.log")
        with log.open("wb") as out:
            subprocess.run(
                harness.pinned(argv, self.pin.load),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "WRK_BODY_BYTES": "0"},
                timeout=seconds + 30,
                check=False,
            )
        return bench.parse_wrk(log.read_text(errors="replace"))

    def start(self, target: str) -> tuple[Child | None, int]:
        """``--separate``: one aiolb process for ``target`` alone, bench.py's config."""
        session = self.session
        port = session.port()
        config = harness.aiolb_config(session, port, self.upstream, pool=self._pool_lines(target))
        path = session.path(f"aiolb-{target}.yaml")
        config.rename(path)
        argv = [arg.replace("{config}", str(path)) for arg in self.args.aiolb_cmd]
        child = harness.start(
            session, f"aiolb-{target}", argv, port, cpus=self.pin.proxy, cwd=harness.REPO
        )
        return child, port

    def start_shared(self, names: list[str]) -> tuple[Child, dict[str, int]]:
        """One aiolb process with a listener and a pool per algorithm (the default): the
        algorithms then share the process, its memory layout and its hash seed, which
        otherwise move req/s by more than the 5% being measured."""
        session = self.session
        ports = {name: session.port() for name in names}
        up1, up2 = self.upstream.ports
        listeners, pools = [], []
        for name in names:
            listeners.append(
                f"  - name: {name}\n"
                f'    bind: "127.0.0.1:{ports[name]}"\n'
                f"    routes: [{{match: {{path_prefix: /}}, pool: {name}}}]\n"
            )
            pools.append(
                f"  {name}:\n"
                + self._pool_lines(name)
                + f'    upstreams: [{{url: "http://127.0.0.1:{up1}"}}, '
                f'{{url: "http://127.0.0.1:{up2}"}}]\n'
            )
        path = session.path("aiolb-shared.yaml")
        path.write_text(
            "listeners:\n"
            + "".join(listeners)
            + "pools:\n"
            + "".join(pools)
            + f'admin:\n  bind: "127.0.0.1:{session.port()}"\n'
        )
        argv = [arg.replace("{config}", str(path)) for arg in self.args.aiolb_cmd]
        child = harness.start(
            session, "aiolb-shared", argv, ports[names[0]], cpus=self.pin.proxy,
            cwd=harness.REPO,
        )  # fmt: skip
        return child, ports

    def _pool_lines(self, name: str) -> str:
        """The pool's balancer, and ``--max-idle`` when given (else the default)."""
        lines = f"    balancer: {balancer_yaml(name)}\n"
        if self.args.max_idle is not None:
            lines += f"    max_idle_connections: {self.args.max_idle}\n"
        return lines


# --- command line ----------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--algorithms",
        type=bench.csv(tuple(REGISTRY)),
        default=algorithms(),
        help="comma-separated; round_robin is added first if missing (default: all)",
    )
    bench.add_run_options(parser, duration=5, rounds=1)
    parser.add_argument(
        "--max-idle",
        type=int,
        default=None,
        help="pool max_idle_connections for every algorithm (default: the shipped default, "
        "no cap below max_connections)",
    )
    parser.add_argument(
        "--separate",
        action="store_true",
        help="one aiolb process per algorithm and round, instead of one process with a "
        "listener per algorithm",
    )
    args = parser.parse_args(argv)
    if REFERENCE not in args.algorithms:
        args.algorithms.insert(0, REFERENCE)
    args.scenarios = [SCENARIO.name]  # what Bench.target runs
    args.pinning = ["unpinned" if args.no_pin else "pinned"]
    args.rounds = max(1, args.rounds)
    return args


# --- report ----------------------------------------------------------------------------


def combine(name: str, runs: list[Result]) -> dict[str, Any]:
    """One row per algorithm: medians over the rounds that ran."""
    ok = [r for r in runs if r.status == "ok"]
    if not ok:
        return {"algorithm": name, "status": runs[-1].status, "detail": runs[-1].detail}
    return {
        "algorithm": name,
        "status": "ok",
        "rps": statistics.median(r.rps or 0.0 for r in ok),
        "p99_us": statistics.median(r.p99_us or 0 for r in ok),
        "errors": sum(r.errors or 0 for r in ok),
        "checks": [r.check for r in ok if r.check],
        "rounds": len(ok),
        "cpu": [r.cpu_busy for r in ok],
    }


def cpu_column(row: dict[str, Any], pin: Pinning) -> str:
    cells = [bench.cpu_cell(Result("", "", "ok", cpu_busy=busy), pin) for busy in row["cpu"]]
    return ", ".join(cells)


def markdown(rows: list[dict[str, Any]], pin: Pinning) -> str:
    out = [
        "| algorithm | req/s | p99 ms | ratio to round_robin (range) | errors "
        "| CPU % proxy core / wrk+upstream |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        if row["status"] != "ok":
            why = (row.get("detail") or "").splitlines()[:1]
            out.append(f"| {row['algorithm']} | {row['status']} | | | | {' '.join(why)} |")
            continue
        ratio = bench.spread(row["ratios"]) if row.get("ratios") else "—"
        errors = str(row["errors"]) + (f" (check: {row['checks'][0]})" if row["checks"] else "")
        out.append(
            f"| {row['algorithm']} | {row['rps']:,.0f} | {row['p99_us'] / 1000:.2f} | {ratio} "
            f"| {errors} | {cpu_column(row, pin)} |"
        )
    return "\n".join(out)


def verdict(rows: list[dict[str, Any]]) -> list[str]:
    """The algorithms that miss the target, as lines to print (empty: all within)."""
    ref = next((r for r in rows if r["algorithm"] == REFERENCE and r["status"] == "ok"), None)
    if ref is None:
        return [f"{REFERENCE} did not run: no ratios"]
    return [
        f"{row['algorithm']}: {row['ratio']:.3f} of {REFERENCE} (target >= {TARGET_RATIO})"
        for row in rows
        if row.get("ratio") is not None and row["ratio"] < TARGET_RATIO
    ]


def paired_ratios(runs: list[Result], reference: list[Result]) -> list[float]:
    """Each round's req/s relative to round_robin's in the same round.

    Pairing by round cancels the machine's slow drift (on shared VMs, tens of percent
    within minutes), which medians of each column alone would leave in the ratio.
    """
    return [
        r.rps / ref.rps
        for r, ref in zip(runs, reference, strict=False)
        if r.status == "ok" and ref.status == "ok" and r.rps and ref.rps
    ]


# --- main ------------------------------------------------------------------------------


def run(args: argparse.Namespace, session: Session, pin: Pinning) -> dict[str, Any]:
    machine = bench.describe_machine(args.aiolb_cmd)
    machine["nofile_limit"] = harness.raise_nofile()
    print(f"pinning: {pin.note}")
    workers = bench.load_workers(args, pin)
    upstream = harness.start_upstream(session, pin.load, workers, args.upstream)
    print(f"upstream: {upstream.note} on ports {upstream.ports}", flush=True)
    started = dt.datetime.now().isoformat(timespec="seconds")
    runner = BalancerBench(args, session, upstream, pin)
    runs: dict[str, list[Result]] = {name: [] for name in args.algorithms}
    shared: tuple[Child, dict[str, int]] | None = None
    if not args.separate:
        shared = runner.start_shared(args.algorithms)
    for round_ in range(args.rounds):
        if args.rounds > 1:
            print(f"-- round {round_ + 1} of {args.rounds}", flush=True)
        turn = round_ % len(args.algorithms)  # each round starts with the next one: no
        for name in args.algorithms[turn:] + args.algorithms[:turn]:  # place is favoured
            if shared is None:
                runs[name] += runner.target(name)
                continue
            result = runner.measure(name, shared[1][name], SCENARIO)
            print(f"== {name:<22} {bench.summary(result)}", flush=True)
            runs[name].append(result)
    if shared is not None:
        session.stop(shared[0])
    machine["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    return {
        "started": started,
        "finished": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine,
        "pinning": asdict(pin),
        "upstream": asdict(upstream),
        "options": {
            **vars(args),
            "scenario": asdict(SCENARIO),
            "header": USER_HEADER,
            "balancers": {name: balancer_yaml(name) for name in args.algorithms},
            "warmup_s": bench.WARMUP_S,
            "wrk_timeout": bench.WRK_TIMEOUT,
        },
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench.check_tools()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    pin = Pinning(None, None, "not pinned: --no-pin") if args.no_pin else harness.plan_pinning()
    with Session(keep_dir=args.keep_tmp) as session:
        if args.keep_tmp:
            print(f"configs and logs in {session.dir}")
        report = run(args, session, pin)
    runs: dict[str, list[Result]] = report["runs"]
    rows = [combine(name, results) for name, results in runs.items()]
    for row in rows:
        row["ratios"] = paired_ratios(runs[row["algorithm"]], runs[REFERENCE])
        row["ratio"] = statistics.median(row["ratios"]) if row["ratios"] else None
    idle = "default" if args.max_idle is None else args.max_idle
    title = (
        f"{SCENARIO.name}: {SCENARIO.about}, {args.duration} s, {args.rounds} round(s), "
        f"max_idle_connections {idle}"
    )
    print(f"\n### {title}\n")
    print(markdown(rows, pin))
    misses = verdict(rows)
    print()
    print("\n".join(misses) if misses else f"every algorithm within 5% of {REFERENCE}")
    report["summary"] = rows
    report["below_target"] = misses
    report["runs"] = {name: [asdict(r) for r in results] for name, results in runs.items()}
    print(f"JSON written to {harness.write_json(args.json_dir, 'balancer-bench', report)}")
    every_run_ok = all(r.status == "ok" and not r.check for rs in runs.values() for r in rs)
    return 0 if every_run_ok else 1


if __name__ == "__main__":
    harness.run_main(main)
