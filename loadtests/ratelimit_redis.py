"""Two aiolb instances, one Redis, one ``rate: 100/s`` key: do they admit 100/s between them?

Starts bench.py's upstream, a redis-server and two aiolb processes whose one route has
``rate_limit: {rate: 100/s, burst: 100, key: route, store: {type: redis, ...}}``, then
runs wrk against both instances at once for ``--duration`` seconds (10 by default),
far over the limit. The admitted requests are read from both instances' ``/metrics``
(``aiolb_requests_total`` with code 200): over the run they must be the burst plus
100 a second, within 10%. Prints the figure and writes JSON to ``loadtests/results/``.

Not a test: a measurement (the pass/fail tests in ``tests/integration/test_rate_limit.py``
check the same arithmetic over a short window). Run from the repository root:

    python loadtests/ratelimit_redis.py [--duration 10] [--rate 100]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import bench
import harness
from filter_bench import start_redis
from harness import Session

sys.path.insert(0, str(harness.REPO))

from prometheus_client.parser import text_string_to_metric_families


def admitted(admin: int) -> int:
    """Requests an instance answered 200 (its ``/metrics``)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return int(sum(s.value for family in text_string_to_metric_families(text)
                   for s in family.samples
                   if s.name == "aiolb_requests_total" and s.labels["code"] == "200"))  # fmt: skip


def start_instance(session: Session, name: str, redis: str, upstream: harness.Upstream,
                   rate: int, cmd: list[str]) -> tuple[int, int]:  # fmt: skip
    port, admin = session.port(), session.port()
    up1, up2 = upstream.ports
    path = session.path(f"{name}.yaml")
    path.write_text(f"""listeners:
  - name: {name}
    bind: "127.0.0.1:{port}"
    routes:
      - name: shared
        pool: web
        filters:
          - rate_limit:
              rate: {rate}/s
              burst: {rate}
              key: route
              store: {{type: redis, url: "{redis}", timeout: 1s}}
pools:
  web:
    upstreams: [{{url: "http://127.0.0.1:{up1}"}}, {{url: "http://127.0.0.1:{up2}"}}]
admin:
  bind: "127.0.0.1:{admin}"
""")
    argv = [arg.replace("{config}", str(path)) for arg in cmd]
    harness.start(session, name, argv, port, cwd=harness.REPO)
    return port, admin


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--rate", type=int, default=100)
    parser.add_argument("--connections", type=int, default=32, help="per instance")
    parser.add_argument("--json-dir", type=Path, default=harness.HERE / "results")
    args = parser.parse_args(argv)
    bench.check_tools()
    with Session() as session:
        upstream = harness.start_upstream(session, None, 1, "nginx")
        redis = start_redis(session, None)
        if redis is None:
            sys.exit("redis-server is not installed (apt-get install redis-server)")
        cmd = harness.default_aiolb_cmd()
        instances = [start_instance(session, f"aiolb{i}", redis, upstream, args.rate, cmd)
                     for i in (1, 2)]  # fmt: skip
        wrk = [subprocess.Popen(["wrk", "-t", "1", "-c", str(args.connections), "-d",
                                 f"{args.duration}s", "-s", str(bench.WRK_SCRIPT),
                                 f"http://127.0.0.1:{port}/20b"],
                                stdout=subprocess.PIPE, text=True)
               for port, _ in instances]  # fmt: skip
        reports = [bench.parse_wrk(p.communicate(timeout=args.duration + 60)[0]) for p in wrk]
        counts = [admitted(admin) for _, admin in instances]
    total = sum(counts)
    seconds = max(r["duration_us"] for r in reports) / 1e6
    expected = args.rate + args.rate * seconds  # the burst, then the rate
    per_second = (total - args.rate) / seconds
    report: dict[str, Any] = {
        "rate": args.rate, "seconds": seconds, "admitted": counts, "total": total,
        "expected": expected, "admitted_per_second": per_second,
        "error_percent": 100 * (total - expected) / expected,
        "requests": [r["requests"] for r in reports],
    }  # fmt: skip
    print(f"admitted {counts[0]} + {counts[1]} = {total} in {seconds:.2f} s "
          f"(sent {sum(report['requests']):,}); expected {expected:.0f} "
          f"(burst {args.rate} + {args.rate}/s): {per_second:.1f}/s after the burst, "
          f"{report['error_percent']:+.1f}%")  # fmt: skip
    print(f"JSON written to {harness.write_json(args.json_dir, 'ratelimit-redis', report)}")
    return 0 if abs(report["error_percent"]) <= 10 else 1


if __name__ == "__main__":
    harness.run_main(main)
