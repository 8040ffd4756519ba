"""Instructions per request on the hot path, counted by callgrind (a measurement).

Throughput on a shared VM drifts by tens of percent; instruction counts do not. This
runs ``hotpath_bench``'s no-socket feeder under ``valgrind --tool=callgrind`` twice
(``--small`` and ``--large`` requests after the same warm-up) and divides the
difference by the extra requests, so start-up and warm-up cancel out.

    python loadtests/hotpath_count.py                 # a proxied 20-byte request
    python loadtests/hotpath_count.py --scenario hit  # a memory-cache hit
    python loadtests/hotpath_count.py --scenario traced  # tracing on, not sampled
    python loadtests/hotpath_count.py --scenario traced-child  # ... the client's unsampled
                                                                # traceparent continued
    python loadtests/hotpath_count.py --scenario traced-1pct   # sample_rate 0.01
    python loadtests/hotpath_count.py --scenario traced-all    # every request sampled
    python loadtests/hotpath_count.py --scenario h2   # a 20-byte request from an HTTP/2
                                                      # client (h2c), to HTTP/1.1
    python loadtests/hotpath_count.py --scenario h2-64k  # the same, 64 KiB
    python loadtests/hotpath_count.py --all           # all of them

Needs valgrind. ``PYTHONHASHSEED=0`` keeps dict layouts, and so counts, repeatable.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtests"))

SCENARIOS = (
    "proxied", "hit", "traced", "traced-child", "traced-1pct", "traced-all", "h2", "h2-64k",
)  # fmt: skip
#: the ``tracing`` scenarios' sample rates
RATES = {"traced": 0.0, "traced-child": 0.0, "traced-1pct": 0.01, "traced-all": 1.0}
#: a client's unsampled ``traceparent`` (``traced-child``)
CHILD = b"traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00\r\n"


def feed(scenario: str, n: int) -> None:
    """Proxy ``n`` requests after a warm-up of 1,000 (run under callgrind)."""
    import hotpath_bench as hb

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    extra: dict[str, Any] = {}
    if scenario == "hit":
        extra = {"cache": {"default_ttl": "1h"}}
    elif scenario in RATES:  # tracing on (``traced``: not sampled, the common case)
        tracing = {"endpoint": "http://127.0.0.1:9/v1/traces", "sample_rate": RATES[scenario]}
        extra = {"tracing": tracing}
    if scenario.startswith("h2"):
        run_h2 = hb.h2_feeder(loop, big=scenario == "h2-64k")
        run_h2(1000)
        run_h2(n)
        loop.close()
        return
    client, conns = hb.build(loop, **extra)
    if scenario == "hit":  # the first request fills the cache; every later one is a hit
        client.data_received(hb.REQUEST)
        date = email.utils.formatdate(usegmt=True).encode()  # fresh: stored for an hour
        conns[0].data_received(re.sub(rb"Date: [^\r]*", b"Date: " + date, hb.RESPONSE))
        assert client.exchange is None, "the cache's first request did not complete"
        for _ in range(1000 + n):
            client.data_received(hb.REQUEST)
        assert conns[0].uses == 2, "a hit went upstream"
    else:
        request = hb.REQUEST
        if scenario == "traced-child":
            request = request.replace(b"\r\n\r\n", b"\r\n" + CHILD + b"\r\n")
        run = hb.feeder(client, conns, request)
        run(1000)
        run(n)
    loop.close()


def count(scenario: str, n: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cg.out"
        env = dict(os.environ, PYTHONHASHSEED="0")
        subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
             sys.executable, __file__, "--child", scenario, str(n)],
            check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        text = out.read_text()
    match = re.search(r"^summary:\s+(\d+)", text, re.MULTILINE) or re.search(
        r"^totals:\s+(\d+)", text, re.MULTILINE
    )
    assert match is not None, "no summary in the callgrind output"
    return int(match.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=SCENARIOS, default="proxied")
    parser.add_argument("--all", action="store_true")
    parser.add_argument("--small", type=int, default=2000)
    parser.add_argument("--large", type=int, default=12000)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        feed(args.child[0], int(args.child[1]))
        return 0
    for scenario in SCENARIOS if args.all else (args.scenario,):
        small, large = count(scenario, args.small), count(scenario, args.large)
        per = (large - small) / (args.large - args.small)
        print(f"{scenario}: {per:,.0f} instructions per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
