"""Counters the hot path records into: plain Python ints, lists and dicts.

Theory of operation
-------------------
Recording a finished request costs one dict update and one histogram bucket
increment (``bisect`` in C), about the cost of a plain dict increment,
instead of prometheus-client's ``labels(...).inc()`` at over a microsecond per call.
The collector (``proxy.metrics.collector``) turns these into metric families only when
``/metrics`` is scraped. Nothing here takes a lock: one event loop owns them. With
several worker processes each worker keeps its own and the supervisor sums snapshots
(``snapshot()`` is a plain dict, cheap to send over a pipe).

Where they live: every ``Upstream`` has ``stats`` (requests it answered or failed),
every ``Pool`` has ``stats`` (all its requests: feeds the pool histogram and the
responses the proxy made itself for that pool, with upstream ``""``), and the server
has one for responses made before any pool was chosen (404, 400, ...). gRPC calls are
counted by status on their pool's ``stats`` alone (``record_grpc``), however they ended:
the exchange skips that with one int compare for every other request.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Final

from proxy.h2.headers import GRPC_CODES

#: Histogram bucket upper bounds in seconds, 1 ms to 10 s (Traefik/Caddy-like).
BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: Methods that keep their own label; any other becomes ``OTHER`` (bounded cardinality).
METHODS: Final = frozenset(
    (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"CONNECT", b"TRACE")
)


def method_label(method: bytes) -> str:
    return method.decode() if method in METHODS else "OTHER"


def grpc_label(code: int) -> str:
    """A ``grpc-status`` number's name (``OK``, ``UNAVAILABLE``); outside 0-16: ``OTHER``."""
    return GRPC_CODES[code] if 0 <= code < len(GRPC_CODES) else "OTHER"


class Histogram:
    """Fixed buckets (non-cumulative counts, the last one is +Inf), sum and count;
    ``Stats.record`` fills them (inline: it runs per request)."""

    __slots__ = ("buckets", "count", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0

    def quantile(self, q: float) -> float | None:
        """Estimated ``q`` quantile (linear within a bucket), None when empty."""
        if not self.count:
            return None
        rank = q * self.count
        seen = 0
        for i, n in enumerate(self.buckets):
            if n and seen + n >= rank:
                low = BUCKETS[i - 1] if i else 0.0
                high = BUCKETS[i] if i < len(BUCKETS) else BUCKETS[-1]
                return low + (high - low) * (rank - seen) / n
            seen += n
        return BUCKETS[-1]


class Stats:
    """Requests by ``(listener, method, status)``, a latency histogram, error counters,
    gRPC calls by status."""

    __slots__ = ("connect_errors", "connections_opened", "duration", "grpc", "requests")

    def __init__(self) -> None:
        #: ``(listener name, method bytes, status)`` -> count; method as sent, mapped to a
        #: label at scrape time (unknown methods are folded into OTHER there).
        self.requests: dict[tuple[str, bytes, int], int] = {}
        self.duration = Histogram()
        self.connect_errors = 0
        self.connections_opened = 0  # upstream connections established
        #: finished gRPC calls by ``grpc-status`` number (a pool's ``Stats`` only; the
        #: parser keeps numbers under 1,000, named or folded into OTHER at scrape time)
        self.grpc: dict[int, int] = {}

    def record(self, listener: str, method: bytes, status: int, seconds: float) -> None:
        key = (listener, method if method in METHODS else b"OTHER", status)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        duration = self.duration
        duration.buckets[bisect_left(BUCKETS, seconds)] += 1
        duration.sum += seconds
        duration.count += 1

    def record_grpc(self, code: int) -> None:
        """One finished gRPC call that ended with ``grpc-status`` ``code``."""
        grpc = self.grpc
        grpc[code] = grpc.get(code, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    @property
    def errors(self) -> int:
        """Responses with a 5xx status."""
        return sum(n for (_, _, status), n in self.requests.items() if status >= 500)

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": [[lst, m.decode(), s, n] for (lst, m, s), n in self.requests.items()],
            "buckets": list(self.duration.buckets),
            "sum": self.duration.sum,
            "connect_errors": self.connect_errors,
            "connections_opened": self.connections_opened,
            "grpc": [[code, n] for code, n in self.grpc.items()],
        }

    def __repr__(self) -> str:
        return f"<Stats [{self.total} requests, {self.errors} 5xx]>"
