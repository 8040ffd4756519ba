"""The http-cache-tests suite (cache-tests.fyi) through aiolb's cache and nginx's.

Installs the npm package ``http-cache-tests`` (pinned) into ``loadtests/.cache/`` the
first time, starts its origin server on a free loopback port, and runs its command-line
client through each target in turn, each target in front of the same origin:

- ``aiolb-memory``: aiolb with a ``store: memory`` cache on its one route;
- ``aiolb-redis``: the same with the Redis store (a ``redis-server`` of its own);
- ``nginx``: nginx with ``proxy_cache`` as the suite's own nginx setup configures it
  (``proxy_cache_revalidate on``).

For each it prints the counts of the suite's result kinds (``lib/display.mjs``:
✅ pass, ⛔️ fail of a required test: a conformance problem, ⚠️ an optional behaviour
missing, Y/N for checks, ⚪️ a test whose dependency failed, 🔹 setup failure) and
writes every result to ``loadtests/results/cache-suite-*.json``.

Not a test: a comparison. Run from the repository root with the project installed:

    python loadtests/cache_suite.py [--targets aiolb-memory,aiolb-redis,nginx]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import harness
from harness import Session

PACKAGE = "http-cache-tests@0.4.5"
CACHE_DIR = harness.HERE / ".cache" / "http-cache-tests"
SUITE = CACHE_DIR / "node_modules" / "http-cache-tests"
TARGETS = ("aiolb-memory", "aiolb-redis", "nginx")

#: Counts the suite's verdicts with its own rules (``determineTestResult``).
SUMMARY_JS = """
import fs from 'fs'
import tests from './tests/index.mjs'
import surrogate from './tests/surrogate-control.mjs'
import * as display from './lib/display.mjs'
tests.push(surrogate)
const results = JSON.parse(fs.readFileSync(process.argv[2]))
const counts = {}
const failed = []
for (const suite of tests) {
  for (const test of suite.tests) {
    const symbol = display.determineTestResult(tests, test.id, results)[2]
    counts[symbol] = (counts[symbol] || 0) + 1
    if (symbol === '⛔️') failed.push(test.id)
  }
}
console.log(JSON.stringify({counts, failed}))
"""


def install() -> Path:
    """The suite's folder, installed with npm the first time."""
    if not (SUITE / "cli.mjs").exists():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["npm", "install", "--silent", "--no-audit", "--no-fund", "--legacy-bundling",
             PACKAGE], cwd=CACHE_DIR, check=True,
        )  # fmt: skip
    (SUITE / "aiolb-summary.mjs").write_text(SUMMARY_JS)
    return SUITE


def npm_env(**config: str) -> dict[str, str]:
    """The environment ``npm run`` would give the suite's scripts."""
    env = {**os.environ}
    for key, value in config.items():
        env[f"npm_config_{key}"] = value
    env.setdefault("npm_package_config_protocol", "http")
    env.setdefault("npm_package_config_pidfile", "/dev/null")
    env.setdefault("npm_package_config_id", "")  # the client runs every test unless set
    return env


def start_origin(session: Session, suite: Path) -> int:
    port = session.port()
    env = npm_env(port=str(port), protocol="http", pidfile=str(session.path("origin.pid")))
    argv = ["node", "server/server.mjs"]
    child = session.spawn("cache-origin", argv, cwd=suite, env=env)
    harness.wait_port(child, port)
    return port


def aiolb_yaml(port: int, origin: int, admin: int, store: str) -> str:
    return f"""listeners:
  - name: cache
    bind: "127.0.0.1:{port}"
    routes:
      - pool: origin
        cache: main
pools:
  origin:
    upstreams:
      - url: "http://127.0.0.1:{origin}"
caches:
  main:
    store: {store}
admin:
  bind: "127.0.0.1:{admin}"
"""


def start_aiolb(session: Session, origin: int, store: str) -> tuple[int, int]:
    """aiolb in front of ``origin`` with a cache of ``store``: (port, admin port)."""
    port, admin = session.port(), session.port()
    path = session.path(f"aiolb-cache-{len(session.children)}.yaml")
    path.write_text(aiolb_yaml(port, origin, admin, store))
    argv = [a.replace("{config}", str(path)) for a in harness.default_aiolb_cmd()]
    harness.start(session, "aiolb", argv, port, cwd=harness.REPO)
    return port, admin


def cache_counts(admin: int) -> dict[str, Any]:
    """What ``/api/caches`` says of the cache after the run (results, errors)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/api/caches", timeout=10) as resp:
        (cache,) = json.load(resp)["caches"]
    return {"requests": cache["requests"], "errors": cache["errors"]}


def start_redis(session: Session) -> str:
    port = session.port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(session.dir)]  # fmt: skip
    harness.start(session, "redis", argv, port)
    return f"redis://127.0.0.1:{port}/0"


def start_nginx(session: Session, origin: int) -> int:
    port = session.port()
    cache = session.path("nginx-cache")
    cache.mkdir()
    conf = harness.nginx_common(session, "nginx-cache", 1) + f"""
    proxy_cache_path {cache} levels=1:2 keys_zone=my-cache:8m max_size=1000m inactive=600m;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{origin};
            proxy_cache my-cache;
            proxy_cache_revalidate on;
        }}
    }}
}}
"""
    path = session.path("nginx-cache.conf")
    path.write_text(conf)
    harness.start(session, "nginx-cache", harness.nginx_argv(session, path), port)
    return port


def run_suite(suite: Path, port: int) -> dict[str, Any]:
    """The suite's results (test id -> verdict) through the proxy on ``port``."""
    env = npm_env(base=f"http://127.0.0.1:{port}", id="")
    done = subprocess.run(
        ["node", "--no-warnings", "cli.mjs"], cwd=suite, env=env, capture_output=True,
        text=True, timeout=900, check=False,
    )  # fmt: skip
    start = done.stdout.find("{")
    if start < 0:
        raise RuntimeError(f"the suite printed no results:\n{done.stdout[-2000:]}{done.stderr}")
    results: dict[str, Any] = json.loads(done.stdout[start:])
    return results


def summarise(suite: Path, results: dict[str, Any], session: Session) -> dict[str, Any]:
    path = session.path("results.json")
    path.write_text(json.dumps(results))
    done = subprocess.run(
        ["node", "--no-warnings", "aiolb-summary.mjs", str(path)], cwd=suite,
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    summary: dict[str, Any] = json.loads(done.stdout)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=lambda t: t.split(","), default=list(TARGETS))
    args = parser.parse_args(argv)
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed")
    suite = install()
    report: dict[str, Any] = {}
    for target in args.targets:
        with Session() as session:
            origin = start_origin(session, suite)
            admin = None
            if target == "nginx":
                port = start_nginx(session, origin)
            elif target == "aiolb-redis":
                url = start_redis(session)
                store = f'{{type: redis, url: "{url}"}}'
                port, admin = start_aiolb(session, origin, store)
            else:
                port, admin = start_aiolb(session, origin, "memory")
            results = run_suite(suite, port)
            report[target] = {"results": results, **summarise(suite, results, session)}
            if admin is not None:
                report[target]["cache"] = cache_counts(admin)
        print(f"{target:<14} {report[target]['counts']} {report[target].get('cache', '')}",
              flush=True)  # fmt: skip
    print()
    kinds = ["✅", "⛔️", "⚠️", "Y", "N", "⚪️", "🔹", "-"]
    print("| target | " + " | ".join(kinds) + " |")
    print("| --- |" + " ---: |" * len(kinds))
    for target, row in report.items():
        print(f"| {target} | " + " | ".join(str(row["counts"].get(k, 0)) for k in kinds) + " |")
    for target, row in report.items():
        if row["failed"]:
            print(f"\n{target}: required tests failed: {', '.join(row['failed'])}")
    path = harness.write_json(harness.HERE / "results", "cache-suite", report)
    print(f"\nJSON written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
