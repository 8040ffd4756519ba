"""Throughput of aiolb with each route filter, next to the same route without filters.

Starts bench.py's upstream (nginx serving fixed bodies), a redis-server when one is
installed (for the ``rate_limit_redis`` variant), and one aiolb process with a
listener per variant in ``VARIANTS``, each with one route over the same pool: ``none``
(no filters: the reference) and one filter each. Round after round, every variant in
turn: two requests to check it, a 1 s warm-up, then wrk on the ``20b`` scenario. One
process for all keeps what differs between processes (memory layout, hash seed) out of
the ratios; the ratio is taken within each round (the machine's drift falls on both
sides), and the table gives the median of the rounds and their range. Nothing is
refused: the rate limits are far above what wrk sends, the address is allowed, the
redirect is what that variant answers. Writes JSON to ``loadtests/results/``.

Not a test: a measurement. Run from the repository root:

    python loadtests/filter_bench.py                           # every variant, 5 rounds of 4 s
    python loadtests/filter_bench.py --rounds 2 --duration 2   # a short look
    python loadtests/filter_bench.py --variants none,headers,sticky

``python loadtests/hotpath_bench.py --filters`` gives the same variants' Python cost per
request in µs, without sockets.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import signal
import statistics
import sys
from dataclasses import asdict
from typing import Any

import bench
import harness
from balancer_bench import BalancerBench, combine, paired_ratios
from bench import Result
from harness import Child, Pinning, Session

REFERENCE = "none"
SCENARIO = bench.SCENARIOS["20b"]
#: Each variant's route filters (YAML flow style); ``REDIS`` is the session's redis-server.
VARIANTS = {
    "none": "[]",
    "rate_limit": "[{rate_limit: {rate: 100000000/s, key: client_ip}}]",
    "rate_limit_redis": '[{rate_limit: {rate: 100000000/s, key: route, store: {type: redis, '
                        'url: "REDIS", timeout: 1s}}}]',
    "headers": '[{headers: {request: {set: {X-Client: "${client_ip}"}}, '
               "response: {set: {X-Served-By: aiolb}}}}]",
    "headers_request": '[{headers: {request: {set: {X-Client: "${client_ip}"}}}}]',
    "rewrite": "[{rewrite: {strip_prefix: /none}}]",
    "redirect": "[{redirect: {scheme: https}}]",
    "sticky": "[sticky]",
    "access": "[{access: {allow: [127.0.0.0/8]}}]",
    "python": '[{python: "loadtests.bench_filter:PassThrough"}]',
}  # fmt: skip


class FilterBench(BalancerBench):
    """balancer_bench's runner (wrk on 20b), with one listener per filter variant."""

    redis: str | None = None

    def measure(self, target: str, port: int, scenario: bench.Scenario) -> Result:
        if target != "redirect":
            return super().measure(target, port, scenario)
        # a redirect answers 302 itself: wrk counts those as status errors, not failures
        data = self.wrk(target, port, scenario, bench.WARMUP_S)
        data = self.wrk(target, port, scenario, self.args.duration)
        result = bench.to_result(target, scenario, data, None)
        result.errors = sum(v for k, v in data["errors"].items() if k != "status")
        return result

    def start_variants(self, names: list[str]) -> tuple[Child, dict[str, int]]:
        session = self.session
        ports = {name: session.port() for name in names}
        up1, up2 = self.upstream.ports
        listeners = [
            f"  - name: {name}\n"
            f'    bind: "127.0.0.1:{ports[name]}"\n'
            f"    routes: [{{pool: bench, filters: {self._filters(name)}}}]\n"
            for name in names
        ]
        path = session.path("aiolb-filters.yaml")
        path.write_text(
            "listeners:\n" + "".join(listeners) + "pools:\n  bench:\n"
            f'    upstreams: [{{url: "http://127.0.0.1:{up1}"}}, '
            f'{{url: "http://127.0.0.1:{up2}"}}]\n'
            f'admin:\n  bind: "127.0.0.1:{session.port()}"\n'
        )
        argv = [arg.replace("{config}", str(path)) for arg in self.args.aiolb_cmd]
        child = harness.start(session, "aiolb-filters", argv, ports[names[0]],
                              cpus=self.pin.proxy, cwd=harness.REPO)  # fmt: skip
        return child, ports

    def _filters(self, name: str) -> str:
        return VARIANTS[name].replace("REDIS", self.redis or "")


def start_redis(session: Session, cpus: str | None) -> str | None:
    """A redis-server on a free port for the Redis variant, or None if not installed."""
    if shutil.which("redis-server") is None:
        return None
    port = session.port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(session.dir)]  # fmt: skip
    harness.start(session, "redis", argv, port, cpus=cpus)
    return f"redis://127.0.0.1:{port}/0"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", type=bench.csv(tuple(VARIANTS)), default=list(VARIANTS))
    bench.add_run_options(parser, duration=4, rounds=5)
    args = parser.parse_args(argv)
    if REFERENCE not in args.variants:
        args.variants.insert(0, REFERENCE)
    args.scenarios = [SCENARIO.name]
    args.pinning = ["unpinned" if args.no_pin else "pinned"]
    args.max_idle = None
    args.rounds = max(1, args.rounds)
    return args


def markdown(rows: list[dict[str, Any]]) -> str:
    out = ["| filters | req/s | p99 ms | ratio to none (range) | aiolb CPU µs/req | errors |",
           "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for row in rows:
        if row["status"] != "ok":
            out.append(f"| {row['algorithm']} | {row['status']} | | | | |")
            continue
        ratio = bench.spread(row["ratios"]) if row.get("ratios") else "—"
        cpu = f"{row['cpu_us']:.1f}" if row.get("cpu_us") is not None else "—"
        out.append(f"| {row['algorithm']} | {row['rps']:,.0f} | {row['p99_us'] / 1000:.2f} | "
                   f"{ratio} | {cpu} | {row['errors']} |")  # fmt: skip
    return "\n".join(out)


def cpu_per_request(results: list[Result]) -> float | None:
    """The median over rounds of aiolb's CPU time (user + system) per request, in µs:
    what the proxy spends, which a busy machine's other work does not change the way
    it changes req/s (when the load generator, not the proxy, runs out of CPU)."""
    per = [r.cpu_s * 1e6 / r.wrk["requests"] for r in results
           if r.cpu_s is not None and r.wrk and r.wrk.get("requests")]  # fmt: skip
    return statistics.median(per) if per else None


def run(args: argparse.Namespace, session: Session, pin: Pinning) -> dict[str, Any]:
    machine = bench.describe_machine(args.aiolb_cmd)
    machine["nofile_limit"] = harness.raise_nofile()
    upstream = harness.start_upstream(session, pin.load, bench.load_workers(args, pin),
                                      args.upstream)  # fmt: skip
    runner = FilterBench(args, session, upstream, pin)
    runner.redis = start_redis(session, pin.load)
    names = [n for n in args.variants if runner.redis or n != "rate_limit_redis"]
    print(f"pinning: {pin.note}; upstream: {upstream.note}; redis: {runner.redis}", flush=True)
    started = dt.datetime.now().isoformat(timespec="seconds")
    child, ports = runner.start_variants(names)
    # every variant's timed runs are charged the one aiolb process's CPU time
    runner.charged = {name: harness.process_tree(child.pid) for name in names}
    runs: dict[str, list[Result]] = {name: [] for name in names}
    try:
        for round_ in range(args.rounds):
            print(f"-- round {round_ + 1} of {args.rounds}", flush=True)
            for name in names:
                result = runner.measure(name, ports[name], SCENARIO)
                print(f"== {name:<18} {bench.summary(result)}", flush=True)
                runs[name].append(result)
    finally:
        session.stop(child)
    return {"started": started, "finished": dt.datetime.now().isoformat(timespec="seconds"),
            "machine": machine, "pinning": asdict(pin), "upstream": asdict(upstream),
            "options": {**vars(args), "variants": {n: VARIANTS[n] for n in names}},
            "runs": runs}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench.check_tools()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    pin = Pinning(None, None, "not pinned: --no-pin") if args.no_pin else harness.plan_pinning()
    with Session(keep_dir=args.keep_tmp) as session:
        report = run(args, session, pin)
    runs: dict[str, list[Result]] = report["runs"]
    rows = [combine(name, results) for name, results in runs.items()]
    for row in rows:
        row["ratios"] = paired_ratios(runs[row["algorithm"]], runs[REFERENCE])
        row["ratio"] = statistics.median(row["ratios"]) if row["ratios"] else None
        row["cpu_us"] = cpu_per_request(runs[row["algorithm"]])
    print(f"\n### {SCENARIO.name}: {SCENARIO.about}, {args.duration} s, {args.rounds} round(s)\n")
    print(markdown(rows))
    report["summary"] = rows
    report["runs"] = {name: [asdict(r) for r in results] for name, results in runs.items()}
    print(f"JSON written to {harness.write_json(args.json_dir, 'filter-bench', report)}")
    return 0 if all(r.status == "ok" for rs in runs.values() for r in rs) else 1


if __name__ == "__main__":
    harness.run_main(main)
