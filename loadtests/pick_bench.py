"""The cost of one balancer pick, for every algorithm, with 3 and with 100 upstreams.

Not a test: a measurement. Run from the repository root:

    python loadtests/pick_bench.py            # the table
    python loadtests/pick_bench.py --number 50000 --repeat 7

Each row builds the balancer once (as the pool does on a change) and times ``pick``
with ``timeit`` (best of ``--repeat`` runs). Upstreams carry in-flight counts drawn
from 0-3, so load-aware balancers see a realistic mix; ``least_connections`` is also
shown with every upstream idle (its O(1) path) and every upstream busy (its scan).
Requests carry an ``X-User`` header, a path with a query and a client address.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.balancing import REGISTRY

SIZES = (3, 100)
OPTIONS: dict[str, dict[str, Any]] = {
    "consistent_hash": {"key": "header:X-User"},
    "peak_ewma": {"decay": 10.0},
}


class BenchUpstream:
    __slots__ = ("active", "address", "weight")

    def __init__(self, i: int, active: int) -> None:
        self.address = f"10.0.{i // 250}.{i % 250 + 1}:8080"
        self.weight = 1 + i % 3
        self.active = active


class BenchRequest:
    __slots__ = ("client_ip", "headers", "target")

    def __init__(self) -> None:
        self.client_ip = "203.0.113.57"
        self.target = b"/api/v1/items?page=3&user=u-12345"
        self.headers = {b"x-user": b"u-12345", b"cookie": b"theme=dark; sid=abc123"}

    def header(self, name: bytes) -> bytes | None:
        return self.headers.get(name)


def make(name: str, n: int, active: Callable[[int], int]) -> Any:
    targets = [BenchUpstream(i, active(i)) for i in range(n)]
    balancer = REGISTRY[name](targets, OPTIONS.get(name, {}))
    observe = getattr(balancer, "observe", None)
    if observe is not None:  # give a latency-aware balancer something to compare
        for i, upstream in enumerate(targets):
            observe(upstream, 0.002 + 0.001 * (i % 5), 1000.0)
    return balancer


def per_pick(balancer: Any, number: int, repeat: int) -> float:
    """Microseconds per pick, best of ``repeat`` runs."""
    request = BenchRequest()
    pick = balancer.pick
    runs = timeit.repeat(lambda: pick(request), number=number, repeat=repeat)
    return min(runs) / number * 1e6


def per_observe(n: int, number: int, repeat: int) -> float:
    balancer = make("peak_ewma", n, lambda i: 0)
    upstream = balancer.pick(BenchRequest())
    observe = balancer.observe
    now = time.perf_counter()
    runs = timeit.repeat(lambda: observe(upstream, 0.003, now), number=number, repeat=repeat)
    return min(runs) / number * 1e6


def rows(number: int, repeat: int) -> list[tuple[str, list[float]]]:
    rng = random.Random(1)
    mixed = [rng.randrange(4) for _ in range(max(SIZES))]
    cases: list[tuple[str, str, Callable[[int], int]]] = [
        (name, name, mixed.__getitem__) for name in REGISTRY
    ]
    cases += [
        ("least_connections, all idle", "least_connections", lambda i: 0),
        ("least_connections, all busy", "least_connections", lambda i: 1 + i % 3),
    ]
    table = [(label, [per_pick(make(name, n, act), number, repeat) for n in SIZES])
             for label, name, act in cases]  # fmt: skip
    table.append(("peak_ewma observe()", [per_observe(n, number, repeat) for n in SIZES]))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=20_000, help="picks per run")
    parser.add_argument("--repeat", type=int, default=5, help="runs; the best counts")
    args = parser.parse_args()
    print(f"Python {sys.version.split()[0]}, µs per pick (best of {args.repeat})\n")
    header = "| algorithm | " + " | ".join(f"{n} upstreams" for n in SIZES) + " |"
    print(header)
    print("| --- | " + " | ".join("---:" for _ in SIZES) + " |")
    for label, costs in rows(args.number, args.repeat):
        print(f"| {label} | " + " | ".join(f"{c:.2f}" for c in costs) + " |")


if __name__ == "__main__":
    main()
