"""gRPC calls counted by pool and status (``aiolb_grpc_responses_total``): the counter on
``Stats``, its snapshot and the workers' sum, the collector's names for the numbers, and
the access log's ``grpc_status`` field."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics.collector import build_registry
from proxy.metrics.log_format import compile_format
from proxy.metrics.stats import Stats, grpc_label
from proxy.runtime.server import ProxyServer
from proxy.runtime.totals import absorb, snapshot, summed_stats
from tests.support import make_config

Samples = dict[tuple[str, str], float]


def grpc_samples(server: ProxyServer) -> Samples:
    """``aiolb_grpc_responses_total`` as (pool, grpc_status) -> value."""
    text = generate_latest(build_registry(server)).decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "aiolb_grpc_responses_total":
                out[(s.labels["pool"], s.labels["grpc_status"])] = s.value
    return out


def two_pools() -> ProxyServer:
    return ProxyServer(make_config(
        ["http://127.0.0.1:9001"],
        pools={"other": {"upstreams": [{"url": "http://127.0.0.1:9002"}]}},
    ))  # fmt: skip


@pytest.mark.parametrize(
    ("code", "name"),
    [(0, "OK"), (3, "INVALID_ARGUMENT"), (14, "UNAVAILABLE"), (16, "UNAUTHENTICATED"),
     (17, "OTHER"), (999, "OTHER"), (-1, "OTHER")],
)  # fmt: skip
def test_grpc_status_names(code: int, name: str) -> None:
    assert grpc_label(code) == name


def test_stats_count_grpc_calls_by_status_and_snapshot_them() -> None:
    stats = Stats()
    for code in (0, 0, 14, 3):
        stats.record_grpc(code)
    assert stats.grpc == {0: 2, 14: 1, 3: 1}
    assert sorted(stats.snapshot()["grpc"]) == [[0, 2], [3, 1], [14, 1]]
    # a gRPC status counts nothing in the request counters: those stay per request
    assert stats.total == 0 and stats.duration.count == 0


def test_worker_snapshots_sum_by_status() -> None:
    one, two = Stats(), Stats()
    one.record_grpc(0)
    one.record_grpc(14)
    two.record_grpc(0)
    two.record_grpc(99)
    old = Stats().snapshot()
    del old["grpc"]  # a snapshot without the key (no gRPC field): adds nothing
    total = summed_stats([one.snapshot(), json.loads(json.dumps(two.snapshot())), old])
    assert total.grpc == {0: 2, 14: 1, 99: 1}


async def test_the_collector_names_the_statuses_per_pool() -> None:
    server = two_pools()
    main, other = server.pools["main"].stats, server.pools["other"].stats
    for code in (0, 0, 0, 3, 14, 17, 40):
        main.record_grpc(code)
    other.record_grpc(4)
    # a pool's requests without gRPC statuses, and the server's own: no samples
    server.stats.record("test", b"POST", 404, 0.001)
    main.record("test", b"GET", 200, 0.001)
    assert grpc_samples(server) == {
        ("main", "OK"): 3, ("main", "INVALID_ARGUMENT"): 1, ("main", "UNAVAILABLE"): 1,
        ("main", "OTHER"): 2, ("other", "DEADLINE_EXCEEDED"): 1,
    }  # fmt: skip


async def test_no_grpc_calls_no_samples() -> None:
    server = two_pools()
    server.pools["main"].stats.record("test", b"GET", 200, 0.001)
    text = generate_latest(build_registry(server)).decode()
    assert "# TYPE aiolb_grpc_responses_total counter" in text  # the family is always there
    assert grpc_samples(server) == {}


async def test_the_supervisor_scrapes_the_workers_sum() -> None:
    workers = [two_pools(), two_pools()]
    workers[0].pools["main"].stats.record_grpc(0)
    workers[0].pools["other"].stats.record_grpc(14)
    workers[1].pools["main"].stats.record_grpc(0)
    workers[1].pools["main"].stats.record_grpc(3)
    supervisor = two_pools()
    absorb(supervisor, [json.loads(json.dumps(snapshot(w))) for w in workers])
    assert grpc_samples(supervisor) == {
        ("main", "OK"): 2, ("main", "INVALID_ARGUMENT"): 1, ("other", "UNAVAILABLE"): 1,
    }  # fmt: skip


def test_the_access_log_grpc_status_field() -> None:
    args = [0.0, "c", b"POST", b"/t.Echo/Unary", 200, 0, 0, 0.0, 1, b"r", None, [], "l",
            None, None]  # fmt: skip
    line = compile_format(("status", "grpc_status"), str)
    text = compile_format("$status $grpc_status", str)
    for code in (0, 3, 14):
        call = SimpleNamespace(grpc_status=code)
        assert json.loads(line(*args, call)) == {"status": 200, "grpc_status": code}
        assert text(*args, call) == f"200 {code}\n"
    # not a gRPC call (or one cut short before a status), and no exchange at all
    for ex in (SimpleNamespace(grpc_status=-1), None):
        assert json.loads(line(*args, ex)) == {"status": 200, "grpc_status": None}
        assert text(*args, ex) == "200 -\n"
