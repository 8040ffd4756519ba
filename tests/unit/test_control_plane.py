"""Pure parts of the control plane: the collector, recent rates, reload planning, adoption."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.admin.recent import RecentStats, Sample, compare
from proxy.config import PoolSpec
from proxy.metrics.collector import build_registry
from proxy.metrics.stats import BUCKETS, Stats
from proxy.runtime.reload import plan_listeners
from proxy.runtime.server import ProxyServer
from proxy.upstream.pool import Pool
from tests.support import make_config


def scraped(server: ProxyServer) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Sample name -> {sorted labels: value}."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    text = generate_latest(build_registry(server)).decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


async def test_collector_sums_every_stats_object_and_folds_methods() -> None:
    server = ProxyServer(make_config(["http://127.0.0.1:9001", "http://127.0.0.1:9002"]))
    pool = server.pools["main"]
    first, second = pool.upstreams
    server.stats.record("test", b"GET", 404, 0.0005)
    pool.stats.record("test", b"GET", 503, 0.003)
    first.stats.record("test", b"PURGE", 200, 0.02)
    first.stats.record("test", b"BREW", 200, 0.02)
    second.stats.record("test", b"POST", 201, 20.0)
    second.stats.connect_errors = 2
    pool.retries = 5
    second.enabled = False
    got = scraped(server)
    requests = {dict(k)["upstream"] + " " + dict(k)["method"] + " " + dict(k)["code"]: v
                for k, v in got["aiolb_requests_total"].items()}  # fmt: skip
    assert requests == {" GET 404": 1, " GET 503": 1, "127.0.0.1:9001 OTHER 200": 2,
                        "127.0.0.1:9002 POST 201": 1}  # fmt: skip
    count = got["aiolb_request_duration_seconds_count"]
    assert count == {(("pool", ""),): 1, (("pool", "main"),): 4}
    buckets = {dict(k)["le"]: v for k, v in got["aiolb_request_duration_seconds_bucket"].items()
               if dict(k)["pool"] == "main"}  # fmt: skip
    assert list(buckets) == [repr(float(b)) for b in BUCKETS] + ["+Inf"]
    assert (buckets["0.001"], buckets["0.005"], buckets["0.025"], buckets["10.0"]) == (0, 1, 3, 3)
    assert buckets["+Inf"] == 4
    assert got["aiolb_retries_total"] == {(("pool", "main"),): 5}
    up = {dict(k)["upstream"]: v for k, v in got["aiolb_upstream_up"].items()}
    assert up == {"127.0.0.1:9001": 1, "127.0.0.1:9002": 0}
    errors = got["aiolb_upstream_connect_errors_total"]
    assert errors[(("pool", "main"), ("upstream", "127.0.0.1:9002"))] == 2


def test_recent_rates_come_from_deltas_over_the_window() -> None:
    now = [0.0]
    recent = RecentStats(interval=1.0, window=10.0, clock=lambda: now[0])
    stats = Stats()
    stats.record("l", b"GET", 200, 0.5)  # before the window: not counted
    pools: Any = {"p": SimpleNamespace(upstreams=[SimpleNamespace(address="u:1", stats=stats)])}
    for second in range(30):
        now[0] = float(second)
        recent.sample(pools)
    for _ in range(18):
        stats.record("l", b"GET", 200, 0.004)
    stats.record("l", b"GET", 502, 0.004)
    stats.record("l", b"GET", 500, 2.0)
    now[0] = 30.0
    r = recent.recent("p", "u:1", stats)
    assert r["rate"] == round(20 / 11, 3)  # the oldest kept sample is from t=19
    assert r["error_rate"] == 0.1
    assert r["p50_ms"] is not None and 2.5 < r["p50_ms"] <= 5.0
    assert r["p99_ms"] is not None and r["p99_ms"] > 1000
    assert recent.recent("p", "other:1", stats)["p50_ms"] is None


def test_recent_restarts_when_counters_go_down() -> None:
    then = Sample(100, 10, (100,) + (0,) * len(BUCKETS))
    now = Sample(3, 0, (3,) + (0,) * len(BUCKETS))
    assert compare(then, now, 1.0)["rate"] == 3.0


def listener(name: str, bind: str) -> Any:
    host, _, port = bind.rpartition(":")
    return SimpleNamespace(name=name, config=SimpleNamespace(host=host, port=int(port)))


def spec(name: str, bind: str) -> Any:
    host, _, port = bind.rpartition(":")
    return SimpleNamespace(name=name, bind=bind, host=host, port=int(port))


def test_plan_keeps_same_address_and_renames_fixed_ports() -> None:
    running = [listener("a", "127.0.0.1:8080"), listener("b", "127.0.0.1:0"),
               listener("c", "127.0.0.1:8081"), listener("d", "127.0.0.1:0")]  # fmt: skip
    new = [spec("a", "127.0.0.1:8080"), spec("b", "127.0.0.1:0"), spec("c2", "127.0.0.1:8081"),
           spec("d2", "127.0.0.1:0"), spec("e", "127.0.0.1:8082")]  # fmt: skip
    plan = plan_listeners(running, new)
    assert [(lst.name, lc.name) for lst, lc in plan.kept] == [("a", "a"), ("b", "b"), ("c", "c2")]
    assert [lc.name for lc in plan.added] == ["d2", "e"]
    assert [lst.name for lst in plan.removed] == ["d"]


def test_plan_treats_a_moved_listener_as_remove_and_add() -> None:
    plan = plan_listeners([listener("a", "127.0.0.1:8080")], [spec("a", "127.0.0.1:9090")])
    assert (plan.kept, [lc.name for lc in plan.added]) == ([], ["a"])
    assert [lst.name for lst in plan.removed] == ["a"]


def pool_config(*ports: int, **extra: Any) -> PoolSpec:
    ups = [{"url": f"http://127.0.0.1:{p}"} for p in ports]
    return PoolSpec.model_validate({"upstreams": ups, **extra})


def test_adopt_keeps_upstream_objects_and_counters() -> None:
    old = Pool("main", pool_config(1, 2))
    old.retries = 4
    one, two = old.upstreams
    two.enabled = False
    old.rebuild()
    new = Pool("main", pool_config(2, 3))
    new.adopt(old)
    old.retire()
    assert new.upstreams[0] is two and two.pool is new and not two.enabled
    assert new.upstreams[1] is not one and one.pool is old
    assert new.stats is old.stats and new.retries == 4
    assert old.max_idle == 0 and new.max_idle is None  # only the removed one stops pooling
    assert one.max_idle == 0 and two.max_idle == 1024  # the kept one pools as before


def test_adopt_does_not_restart_slow_start_for_kept_upstreams() -> None:
    old = Pool("main", pool_config(1, 2, slow_start="60s"))
    same = Pool("main", pool_config(1, 2, slow_start="60s"))
    same.adopt(old)
    assert "ramping" not in repr(same)
    grown = Pool("main", pool_config(1, 2, 3, slow_start="60s"))
    grown.adopt(same)
    assert "ramping" in repr(grown)  # only the new upstream ramps up
