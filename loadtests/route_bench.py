"""Microseconds per route lookup with 100 routes (a measurement, no sockets).

    python loadtests/route_bench.py

Builds routers from configs as ``build_router`` does (``Conditions`` from each route's
``match``) and times ``Router.route`` for a request that takes the last route (every
route before it tried), the middle one and the first, in these tables:

- ``plain``: 100 routes of host and path prefix only (the common config);
- ``mixed``: 100 routes of path prefix with methods, a header, a query parameter;
- ``regex``: 100 routes with a ``path_regex`` and a header regex each.
"""

from __future__ import annotations

import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy.config.listeners import MatchSpec
from proxy.forwarding.router import Router
from proxy.server.listener import _conditions

N = 100


class Request:
    """What the router reads of a request: its method and its header lines."""

    def __init__(self, method: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.method = method
        self.headers = headers


HEADERS = [
    (b"Host", b"app.example.com"),
    (b"User-Agent", b"Mozilla/5.0 (X11; Linux x86_64) Firefox/130.0"),
    (b"Accept", b"text/html,application/xhtml+xml"),
    (b"Accept-Encoding", b"gzip, br"),
    (b"Cookie", b"session=abc123; theme=dark"),
]


def plain() -> tuple[Router[int], list[tuple[bytes, bytes, Request]]]:
    routes = [(None, f"/svc{i}/", i) for i in range(N)]
    router: Router[int] = Router(routes)
    return router, [(b"app.example.com", f"/svc{i}/x".encode(), Request(b"GET", HEADERS))
                    for i in (N - 1, N // 2, 0)]  # fmt: skip


def mixed() -> tuple[Router[int], list[tuple[bytes, bytes, Request]]]:
    specs = [
        MatchSpec(path_prefix=f"/svc{i % 10}/", methods=["GET", "HEAD"],
                  headers={"X-Tenant": f"t{i}"}, query={"v": str(i % 3)})
        for i in range(N)
    ]  # fmt: skip
    router: Router[int] = Router(
        [(None, s.path_prefix, i) for i, s in enumerate(specs)], [_conditions(s) for s in specs]
    )
    cases = []
    for i in (N - 1, N // 2, 0):
        headers = [*HEADERS, (b"X-Tenant", f"t{i}".encode())]
        cases.append((b"app", f"/svc{i % 10}/x?v={i % 3}".encode(), Request(b"GET", headers)))
    return router, cases


def regex() -> tuple[Router[int], list[tuple[bytes, bytes, Request]]]:
    specs = [
        MatchSpec(path_regex=f"^/api/v[0-9]+/svc{i}/", headers={"X-Tenant": {"regex": f"^t{i}$"}})
        for i in range(N)
    ]
    router: Router[int] = Router(
        [(None, s.path_prefix, i) for i, s in enumerate(specs)], [_conditions(s) for s in specs]
    )
    cases = []
    for i in (N - 1, N // 2, 0):
        headers = [*HEADERS, (b"X-Tenant", f"t{i}".encode())]
        cases.append((b"app", f"/api/v2/svc{i}/x".encode(), Request(b"GET", headers)))
    return router, cases


def _best(router: Router[int], host: bytes, path: bytes, req: Request, runs: int) -> float:
    """The fastest of five timings of ``runs`` lookups, in seconds."""
    return min(timeit.repeat(lambda: router.route(host, path, req), number=runs, repeat=5))


def main() -> None:
    print(f"µs per Router.route with {N} routes (match at the last / middle / first route)")
    for name, build in (("plain", plain), ("mixed", mixed), ("regex", regex)):
        router, cases = build()
        times = []
        for expected, (host, path, req) in zip((N - 1, N // 2, 0), cases, strict=True):
            assert router.route(host, path, req) == expected, (name, expected)
            runs = 20_000 if name == "plain" else 2_000
            times.append(_best(router, host, path, req, runs) / runs * 1e6)
        print(f"{name:6} " + " / ".join(f"{t:6.2f}" for t in times))


if __name__ == "__main__":
    main()
