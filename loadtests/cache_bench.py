"""Cache hits: aiolb's memory cache against nginx's ``proxy_cache``, measured with wrk.

Starts bench.py's upstream (nginx serving fixed bodies on two ports), one aiolb process
with two listeners over one pool (``hit``: a route with ``cache: main``, ``default_ttl:
1h``, so the upstream's static files are stored; ``proxied``: the same route without a
cache) and one nginx process with the same two servers (``proxy_cache`` with
``proxy_cache_valid 200 1h``, and plain ``proxy_pass``). nginx keeps its compiled-in
``sendfile off``: with Debian's ``sendfile on; tcp_nopush on`` its 64 KiB hits ran at a
fifth of that here (10,000 against 26,500 req/s, p99 48 against 5 ms). Round after
round, every target in turn on every scenario (20 B and 64 KiB), the order rotated each
round: a check that the target answers (and that a cached target answers from its
cache), a 1 s warm-up, then a timed wrk run. Each target's CPU time is read from /proc
for its whole process tree over the timed run: CPU µs per request is that over the
requests completed. Ratios are taken within a round (the machine's drift falls on both
sides); the table gives medians and ranges. Writes JSON to ``loadtests/results/``.

Not a test: a measurement. Run from the repository root:

    python loadtests/cache_bench.py                            # 5 rounds of 4 s
    python loadtests/cache_bench.py --rounds 2 --duration 2    # a short look
    python loadtests/cache_bench.py --no-pin                   # every process on every core
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import signal
import statistics
import sys
from dataclasses import asdict, dataclass
from typing import Any

import bench
import harness
from bench import Bench, Result
from harness import Child, Pinning, Session

SCENARIOS = ("20b", "64k")
#: target -> (proxy, listener): what each row measures
TARGETS = {
    "aiolb-hit": ("aiolb", "hit"),
    "nginx-hit": ("nginx", "hit"),
    "aiolb-proxied": ("aiolb", "proxied"),
    "nginx-proxied": ("nginx", "proxied"),
}
#: the header each proxy's cached listener answers a hit with, and what it says
HIT_HEADERS = {"aiolb": ("Cache-Status", "aiolb; hit"), "nginx": ("X-Cache-Status", "HIT")}


@dataclass
class Sample:
    result: Result
    cpu_us: float | None  # CPU time of the proxy's processes per completed request


def check_hit(port: int, path: str, proxy: str) -> str | None:
    """Two GETs; the second must come from the cache. A problem, or None."""
    name, value = HIT_HEADERS[proxy]
    for attempt in range(2):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
        finally:
            conn.close()
        if attempt and value not in (response.getheader(name) or ""):
            return f"not a cache hit: {name}: {response.getheader(name)}"
    return None


class CacheBench(Bench):
    """bench.py's runner with the process's CPU time read around the timed run."""

    def sample(self, target: str, port: int, scenario: bench.Scenario) -> Sample:
        proxy, listener = TARGETS[target]
        problem = check_hit(port, scenario.path, proxy) if listener == "hit" else None
        result = self.measure(target, port, scenario)
        result.check = result.check or problem
        requests = result.wrk.get("requests") if result.status == "ok" else None
        cpu = result.cpu_s * 1e6 / requests if requests and result.cpu_s is not None else None
        return Sample(result, cpu)

    def start_aiolb(self, ports: dict[str, int]) -> Child:
        session, (up1, up2) = self.session, self.upstream.ports
        path = session.path("aiolb-cache.yaml")
        path.write_text(
            "listeners:\n"
            f'  - {{name: hit, bind: "127.0.0.1:{ports["hit"]}", '
            "routes: [{pool: bench, cache: main}]}\n"
            f'  - {{name: proxied, bind: "127.0.0.1:{ports["proxied"]}", '
            "routes: [{pool: bench}]}\n"
            "caches:\n  main: {default_ttl: 1h}\n"
            "pools:\n  bench:\n"
            f'    upstreams: [{{url: "http://127.0.0.1:{up1}"}}, '
            f'{{url: "http://127.0.0.1:{up2}"}}]\n'
            f'admin:\n  bind: "127.0.0.1:{session.port()}"\n'
        )
        argv = [arg.replace("{config}", str(path)) for arg in self.args.aiolb_cmd]
        return harness.start(session, "aiolb-cache", argv, ports["hit"], cpus=self.pin.proxy,
                             cwd=harness.REPO)  # fmt: skip

    def start_nginx(self, ports: dict[str, int]) -> Child:
        session, (up1, up2) = self.session, self.upstream.ports
        store = session.path("nginx-cache")
        proxy = ("proxy_pass http://bench; proxy_http_version 1.1; "
                 'proxy_set_header Connection "";')  # fmt: skip
        conf = (
            harness.nginx_common(session, "nginx-cache", 1)
            + f"""
    proxy_cache_path {store} levels=1:2 keys_zone=main:10m max_size=1g inactive=1h
                     use_temp_path=off;
    upstream bench {{
        server 127.0.0.1:{up1};
        server 127.0.0.1:{up2};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{ports["hit"]};
        location / {{
            {proxy}
            proxy_cache main;
            proxy_cache_valid 200 1h;
            add_header X-Cache-Status $upstream_cache_status;
        }}
    }}
    server {{
        listen 127.0.0.1:{ports["proxied"]};
        location / {{ {proxy} }}
    }}
}}
"""
        )
        path = session.path("nginx-cache.conf")
        path.write_text(conf)
        argv = harness.nginx_argv(session, path)
        return harness.start(session, "nginx-cache", argv, ports["hit"], cpus=self.pin.proxy)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", type=bench.csv(SCENARIOS), default=list(SCENARIOS))
    bench.add_run_options(parser, duration=4, rounds=5)
    args = parser.parse_args(argv)
    args.pinning = ["unpinned" if args.no_pin else "pinned"]
    args.rounds = max(1, args.rounds)
    return args


def run(args: argparse.Namespace, session: Session, pin: Pinning) -> dict[str, Any]:
    machine = bench.describe_machine(args.aiolb_cmd)
    machine["nofile_limit"] = harness.raise_nofile()
    upstream = harness.start_upstream(session, pin.load, bench.load_workers(args, pin),
                                      args.upstream)  # fmt: skip
    print(f"pinning: {pin.note}; upstream: {upstream.note}", flush=True)
    runner = CacheBench(args, session, upstream, pin)
    ports = {proxy: {"hit": session.port(), "proxied": session.port()}
             for proxy in ("aiolb", "nginx")}  # fmt: skip
    processes = {"aiolb": runner.start_aiolb(ports["aiolb"]),
                 "nginx": runner.start_nginx(ports["nginx"])}  # fmt: skip
    for target, (proxy, _) in TARGETS.items():
        runner.charged[target] = harness.process_tree(processes[proxy].pid)
    started = dt.datetime.now().isoformat(timespec="seconds")
    names = list(TARGETS)
    runs: dict[tuple[str, str], list[Sample]] = {(s, t): [] for s in args.scenarios for t in names}
    for round_ in range(args.rounds):
        print(f"-- round {round_ + 1} of {args.rounds}", flush=True)
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        for scenario in args.scenarios:
            for target in order:
                proxy, listener = TARGETS[target]
                sample = runner.sample(target, ports[proxy][listener], bench.SCENARIOS[scenario])
                cpu = f"{sample.cpu_us:.1f} µs CPU" if sample.cpu_us else "—"
                print(f"   {scenario:<4} {target:<14} {bench.summary(sample.result)}  {cpu}",
                      flush=True)  # fmt: skip
                runs[scenario, target].append(sample)
    return {"started": started, "finished": dt.datetime.now().isoformat(timespec="seconds"),
            "machine": machine, "pinning": asdict(pin), "upstream": asdict(upstream),
            "options": vars(args), "runs": runs}  # fmt: skip


def paired(runs: list[Sample], reference: list[Sample], what: str) -> list[float]:
    """Per round: ``what`` ("rps" or "cpu") of ``runs`` over ``reference``'s."""
    out = []
    for mine, ref in zip(runs, reference, strict=True):
        a, b = (mine.result.rps, ref.result.rps) if what == "rps" else (mine.cpu_us, ref.cpu_us)
        if mine.result.status == ref.result.status == "ok" and a and b:
            out.append(a / b)
    return out


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(runs: dict[tuple[str, str], list[Sample]], scenarios: list[str]) -> list[dict]:
    rows = []
    for scenario in scenarios:
        for target, (proxy, listener) in TARGETS.items():
            samples = runs[scenario, target]
            ok = [s for s in samples if s.result.status == "ok"]
            other = "nginx" if proxy == "aiolb" else "aiolb"
            rival = runs[scenario, f"{other}-{listener}"]
            proxied = runs[scenario, f"{proxy}-proxied"]
            rows.append({
                "scenario": scenario, "target": target,
                "status": "ok" if ok else samples[-1].result.status,
                "rps": median([s.result.rps or 0.0 for s in ok]),
                "p99_us": median([float(s.result.p99_us or 0) for s in ok]),
                "errors": sum(s.result.errors or 0 for s in ok),
                "checks": [s.result.check for s in samples if s.result.check],
                "cpu_us": median([s.cpu_us for s in ok if s.cpu_us]),
                "vs_nginx": paired(samples, rival, "rps") if proxy == "aiolb" else [],
                "cpu_vs_proxied": paired(samples, proxied, "cpu") if listener == "hit" else [],
            })  # fmt: skip
    return rows


def markdown(rows: list[dict], scenarios: list[str]) -> str:
    out = []
    for scenario in scenarios:
        out += [f"### {scenario}: {bench.SCENARIOS[scenario].about}", "",
                "| target | req/s | p99 ms | errors | req/s vs nginx's same (range) "
                "| CPU µs/request | CPU vs its proxied |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for row in (r for r in rows if r["scenario"] == scenario):
            if row["status"] != "ok":
                out.append(f"| {row['target']} | {row['status']} | | | | | |")
                continue
            vs = bench.spread(row["vs_nginx"]) if row["vs_nginx"] else "—"
            cpu_ratio = bench.spread(row["cpu_vs_proxied"]) if row["cpu_vs_proxied"] else "—"
            cpu = f"{row['cpu_us']:.1f}" if row["cpu_us"] else "—"
            errors = str(row["errors"]) + (f" (check: {row['checks'][0]})" if row["checks"] else "")
            out.append(f"| {row['target']} | {row['rps']:,.0f} | {row['p99_us'] / 1000:.2f} | "
                       f"{errors} | {vs} | {cpu} | {cpu_ratio} |")  # fmt: skip
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench.check_tools()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    pin = Pinning(None, None, "not pinned: --no-pin") if args.no_pin else harness.plan_pinning()
    with Session(keep_dir=args.keep_tmp) as session:
        report = run(args, session, pin)
    runs: dict[tuple[str, str], list[Sample]] = report["runs"]
    rows = summarize(runs, args.scenarios)
    print(f"\nMedians of {args.rounds} interleaved round(s) of {args.duration} s; ratios: the "
          "median of the rounds' ratios (their range).\n")  # fmt: skip
    print(markdown(rows, args.scenarios))
    report["summary"] = rows
    report["runs"] = {f"{s}/{t}": [{**asdict(x.result), "cpu_us": x.cpu_us} for x in samples]
                      for (s, t), samples in runs.items()}  # fmt: skip
    print(f"JSON written to {harness.write_json(args.json_dir, 'cache-bench', report)}")
    good = all(x.result.status == "ok" and not x.result.check
               for samples in runs.values() for x in samples)  # fmt: skip
    return 0 if good else 1


if __name__ == "__main__":
    harness.run_main(main)
