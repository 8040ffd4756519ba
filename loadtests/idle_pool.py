"""How aiolb's idle upstream pool holds up under a steady load, by cap and concurrency.

For each ``max_idle_connections`` value (``default`` is the shipped one: no cap below
``max_connections``) one aiolb process runs with the documented minimal config in
front of ONE upstream port (nginx, as in bench.py), and wrk keeps 64, 256 and 1000
keep-alive connections busy. From the end of a 2 s warm-up, for ``--duration`` seconds
of the same wrk run, it counts the upstream connections aiolb opened
(``aiolb_upstream_connections_opened_total``) and the requests it served
(``aiolb_requests_total``). Rounds interleave (round, concurrency, cap); the table
gives medians and, per cap, req/s relative to the default's in the same round.

Not a test: a measurement. Run from the repository root:

    python loadtests/idle_pool.py [--caps default,32,64,256] [--concurrency 64,256,1000]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from typing import Any

import bench
import harness
import yaml
from harness import Child, Session

DEFAULT = "default"
OPENED = "aiolb_upstream_connections_opened_total"
REQUESTS = "aiolb_requests_total"
WARMUP_S = 2  # wrk needs about a second to open 1000 connections


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--caps",
        default="default,32,64,256",
        help="comma-separated max_idle_connections values; 'default' leaves it unset",
    )
    parser.add_argument("--concurrency", default="64,256,1000", help="wrk -c values")
    parser.add_argument("--duration", type=int, default=3, help="seconds per timed run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json-dir", default=str(harness.HERE / "results"))
    args = parser.parse_args(argv)
    args.caps = [c.strip() for c in args.caps.split(",") if c.strip()]
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    return args


def totals(admin_port: int) -> tuple[float, float]:
    """(upstream connections opened, requests served) so far, from ``/metrics``."""
    url = f"http://127.0.0.1:{admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        lines = resp.read().decode().splitlines()
    return tuple(  # type: ignore[return-value]
        sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + "{"))
        for name in (OPENED, REQUESTS)
    )


def start(
    session: Session, upstream: harness.Upstream, cap: str, cpus: str | None
) -> tuple[Child, int, int]:
    """aiolb with ``max_idle_connections: cap`` (nothing for the default): child, listener
    port, admin port."""
    port = session.port()
    pool = "" if cap == DEFAULT else f"    max_idle_connections: {int(cap)}\n"
    config = harness.aiolb_config(session, port, upstream, pool=pool, ports=upstream.ports[:1])
    admin = int(yaml.safe_load(config.read_text())["admin"]["bind"].rsplit(":", 1)[1])
    path = session.path(f"aiolb-idle-{cap}.yaml")
    config.rename(path)
    argv = [a.replace("{config}", str(path)) for a in harness.default_aiolb_cmd()]
    child = harness.start(session, f"aiolb-{cap}", argv, port, cpus=cpus, cwd=harness.REPO)
    return child, port, admin


def measure(runner: bench.Bench, cap: str, port: int, admin: int, clients: int) -> dict[str, Any]:
    """One wrk run of warm-up + duration + 1 s; the counters are read at the end of the
    warm-up and ``duration`` later, while every connection is busy (wrk's own start and
    end, which cut requests in flight and so close their upstream connections, fall
    outside the window)."""
    seconds = runner.args.duration
    url = f"http://127.0.0.1:{port}/20b"
    argv = bench.wrk_argv(runner.args, url, WARMUP_S + seconds + 1)
    argv[argv.index("-c") + 1] = str(clients)
    log = runner.session.path(f"wrk-idle-{cap}-{clients}.log")
    with log.open("wb") as out:
        wrk = subprocess.Popen(harness.pinned(argv, runner.pin.load), stdout=out,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
        time.sleep(WARMUP_S)
        opened_before, requests_before = totals(admin)
        started = time.monotonic()
        time.sleep(seconds)
        opened_after, requests_after = totals(admin)
        window = time.monotonic() - started
        wrk.wait(timeout=seconds + 30)
    data = bench.parse_wrk(log.read_text(errors="replace"))
    return {
        "cap": cap,
        "clients": clients,
        "rps": (requests_after - requests_before) / window,
        "opened_per_s": (opened_after - opened_before) / window,
        "errors": sum(data["errors"].values()),  # wrk's, over the whole run
    }


def table(runs: list[dict[str, Any]], args: argparse.Namespace) -> str:
    out = [
        "| clients | max_idle_connections | req/s | vs default (range) "
        "| new upstream connections/s | errors |",
        "| ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for clients in args.concurrency:
        here = [r for r in runs if r["clients"] == clients]
        ref = {r["round"]: r["rps"] for r in here if r["cap"] == DEFAULT}
        for cap in args.caps:
            mine = [r for r in here if r["cap"] == cap]
            ratios = [r["rps"] / ref[r["round"]] for r in mine if ref.get(r["round"])]
            cells = [
                str(clients),
                cap,
                f"{statistics.median(r['rps'] for r in mine):,.0f}",
                bench.spread(ratios) if ratios else "—",
                f"{statistics.median(r['opened_per_s'] for r in mine):,.0f}",
                str(sum(r["errors"] for r in mine)),
            ]
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    bench.check_tools()
    pin = harness.plan_pinning()
    harness.raise_nofile()
    runs: list[dict[str, Any]] = []
    with Session() as session:
        upstream = harness.start_upstream(session, pin.load, 1, "nginx")
        wrk_args = argparse.Namespace(threads=args.threads, connections=1, duration=args.duration)
        runner = bench.Bench(wrk_args, session, upstream, pin)
        started = {cap: start(session, upstream, cap, pin.proxy) for cap in args.caps}
        for n in range(1, args.rounds + 1):
            for clients in args.concurrency:
                for cap, (_, port, admin) in started.items():
                    run = measure(runner, cap, port, admin, clients)
                    run["round"] = n
                    runs.append(run)
                    print(
                        f"round {n}: {clients:>5} clients, cap {cap:>7}: {run['rps']:>9,.0f} "
                        f"req/s, {run['opened_per_s']:>7,.0f} new connections/s",
                        flush=True,
                    )
    print(
        f"\nMedians of {args.rounds} interleaved rounds ({pin.note}; "
        f"upstream: {upstream.note}, one port):\n"
    )
    print(table(runs, args))
    report = {"options": vars(args), "pinning": pin.note, "runs": runs}
    path = harness.write_json(harness.Path(args.json_dir), "idle-pool", report)
    print(f"JSON written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
