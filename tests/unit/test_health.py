"""Health and retry state machines, fed by hand: rise/fall, outlier ejection, the retry
budget and backoff, and the config that drives them."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from proxy.config import ActiveHealthCheckSpec, Config, ConfigError, load_config, parse_config
from proxy.config.schema import effective_yaml
from proxy.health.state import RiseFall
from proxy.upstream.pool import Pool
from proxy.upstream.retry import RetryBudget, RetryPolicy


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_pool(n: int, **pool: Any) -> tuple[Pool, FakeClock]:
    config = Config.model_validate({
        "listeners": [{"name": "l", "bind": "127.0.0.1:0", "routes": [{"pool": "p"}]}],
        "pools": {"p": {"upstreams": [{"url": f"http://127.0.0.1:{9000 + i}"}
                                      for i in range(n)], **pool}},
    })  # fmt: skip
    p = Pool("p", config.pools["p"])
    clock = FakeClock()
    p.clock = clock
    return p, clock


class Everyone:
    """A RequestView for picks that need no key."""

    client_ip = "127.0.0.1"
    target = b"/"

    def header(self, name: bytes) -> bytes | None:
        return None


def picks(pool: Pool, n: int = 30) -> set[str]:
    return {u.address for u in (pool.pick(Everyone()) for _ in range(n)) if u is not None}


# -- rise / fall ---------------------------------------------------------------------


def test_rise_fall_flips_only_after_consecutive_results() -> None:
    state = RiseFall(rise=2, fall=3)
    assert [state.record(False) for _ in range(3)] == [False, False, True]
    assert not state.healthy
    assert [state.record(True) for _ in range(2)] == [False, True]
    assert state.healthy


def test_rise_fall_an_agreeing_result_resets_the_streak() -> None:
    state = RiseFall(rise=2, fall=3)
    for ok in (False, False, True, False, False, True, False, False):
        assert not state.record(ok)
    assert state.healthy


def test_flapping_never_flips_more_than_the_thresholds_allow() -> None:
    """Alternating success and failure: with thresholds of 2 the state never changes;
    with any thresholds, flips are at most results / min(rise, fall)."""
    state = RiseFall(rise=2, fall=2)
    assert sum(state.record(i % 2 == 0) for i in range(1000)) == 0
    state = RiseFall(rise=2, fall=3)
    pattern = [True, False, False, True, True, False, False, False]  # bursts of 1..3
    flips = sum(state.record(ok) for _ in range(100) for ok in pattern)
    assert flips <= len(pattern) * 100 // 2


def test_rise_fall_initially_unhealthy() -> None:
    state = RiseFall(rise=2, fall=3, healthy=False)
    assert not state.record(True) and state.record(True) and state.healthy


# -- outlier detection ----------------------------------------------------------------


def test_consecutive_failures_eject_then_time_returns_it() -> None:
    pool, clock = make_pool(3, health_check={"passive": {
        "consecutive_failures": 3, "ejection_time": "10s"}})  # fmt: skip
    bad = pool.upstreams[0]
    pool.failure(bad, "connect failed")
    pool.failure(bad, "connect failed")
    assert bad.available
    pool.failure(bad, "connect failed")
    assert bad.ejected and not bad.available and bad.ejections == 1
    assert bad.address not in picks(pool)
    clock.now += 9.9
    pool.sweep(clock.now)
    assert bad.ejected
    clock.now += 0.2
    pool.sweep(clock.now)
    assert not bad.ejected and bad.address in picks(pool)


def test_a_success_resets_the_failure_count() -> None:
    pool, _ = make_pool(3, health_check={"passive": {"consecutive_failures": 3}})
    bad = pool.upstreams[0]
    for _ in range(10):
        pool.failure(bad, "reset")
        pool.failure(bad, "reset")
        bad.failures = 0  # what the exchange does on a good response
    assert not bad.ejected


def test_ejection_time_grows_with_each_ejection_up_to_the_cap_and_decays() -> None:
    pool, clock = make_pool(3, health_check={"passive": {
        "consecutive_failures": 1, "ejection_time": "10s", "max_ejection_time": "25s"}})
    bad = pool.upstreams[0]
    seconds = []
    for _ in range(3):
        pool.failure(bad, "timeout")
        seconds.append(bad.ejected_until - clock.now)
        clock.now = bad.ejected_until
        pool.sweep(clock.now)
    assert seconds == [10.0, 20.0, 25.0]
    clock.now += 25  # in rotation for 2.5 ejection times: the multiplier drops by 2
    pool.failure(bad, "timeout")
    assert bad.ejected_until - clock.now == 20.0


def test_max_ejection_percent_and_never_the_last_available() -> None:
    pool, _ = make_pool(4, health_check={"passive": {
        "consecutive_failures": 1, "max_ejection_percent": 50}})
    for u in pool.upstreams:
        pool.failure(u, "connect failed")
    assert [u.ejected for u in pool.upstreams] == [True, True, False, False]
    pool, _ = make_pool(2, health_check={"passive": {
        "consecutive_failures": 1, "max_ejection_percent": 100}})
    for u in pool.upstreams:
        pool.failure(u, "connect failed")
    assert sum(u.ejected for u in pool.upstreams) == 1  # the last one stays
    pool, _ = make_pool(1, health_check={"passive": {"consecutive_failures": 1}})
    pool.failure(pool.upstreams[0], "connect failed")
    assert pool.upstreams[0].available


def test_passive_off() -> None:
    pool, _ = make_pool(3, health_check={"passive": None})
    for _ in range(100):
        pool.failure(pool.upstreams[0], "connect failed")
    assert pool.upstreams[0].available


def test_active_verdicts_and_their_combination_with_ejection() -> None:
    pool, _ = make_pool(3, health_check={
        "active": {"path": "/healthz"}, "passive": {"consecutive_failures": 1}})
    a, b, _ = pool.upstreams
    pool.set_healthy(a, False)
    assert a.address not in picks(pool)
    pool.failure(b, "reset")
    assert b.ejected
    pool.set_healthy(a, True)
    assert a.address in picks(pool)
    pool.checks_pass(b)  # the checker: healthy_threshold passes since the ejection
    assert not b.ejected and b.address in picks(pool)


def test_initial_state_unhealthy() -> None:
    pool, _ = make_pool(2, health_check={"active": {"initial_state": "unhealthy"}})
    assert not any(u.available for u in pool.upstreams)
    assert pool.pick(Everyone()) is None


# -- retries ------------------------------------------------------------------------------


def test_budget_bounds_a_retry_storm() -> None:
    """Every request wants a retry (an outage): retries stay within percent of the
    requests plus the reserve's rate times the time, however the requests are spread."""
    for gap in (0.0001, 0.001, 0.01, 0.1):  # 10,000 to 10 requests a second
        budget = RetryBudget(percent=20, per_second=10)
        now, requests, retries = 1.0, 0, 0
        for _ in range(5000):
            requests += 1
            now += gap
            retries += budget.allow(requests, now)
        seconds = now - 1.0
        assert retries <= 0.2 * requests + 10 * seconds + 10, gap  # +10: it starts full
        assert retries >= min(requests, 0.2 * requests + 10 * seconds) * 0.9, gap  # usable


def test_budget_absorbs_a_burst_after_healthy_traffic() -> None:
    """A second of traffic with no retries banks tokens: a sudden burst of retries (an
    upstream dying with requests in flight) goes through."""
    budget = RetryBudget(percent=20, per_second=0)
    assert budget.allow(1000, 1.0)  # the pool saw 1000 requests by t=1s
    assert all(budget.allow(1000, 1.0) for _ in range(150))


def test_budget_reserve_is_a_rate_that_lets_a_quiet_pool_retry() -> None:
    """A freshly started pool has earned nothing: the reserve allows one second's worth
    of retries at once, then refills at its rate (Finagle's minRetriesPerSec)."""
    budget = RetryBudget(percent=20, per_second=3)
    assert [budget.allow(1, 1.0) for _ in range(4)] == [True, True, True, False]
    assert budget.denied == 1
    assert not budget.allow(1, 1.2)  # 0.6 of a token back: not yet
    assert budget.allow(1, 1.4)  # 1.2 back
    assert [budget.allow(1, 11.0) for _ in range(4)] == [True, True, True, False]  # full again
    off = RetryBudget(percent=20, per_second=0)
    assert not off.allow(1, 1.0)  # no reserve and nothing earned: no retry
    slow = RetryBudget(percent=0, per_second=0.5)
    assert [slow.allow(1, 1.0), slow.allow(1, 1.0), slow.allow(1, 2.0), slow.allow(1, 3.0)] == [
        True, False, False, True]  # fmt: skip


def test_budget_retune_keeps_what_was_spent() -> None:
    budget = RetryBudget(percent=20, per_second=2)
    assert budget.allow(0, 1.0) and budget.allow(0, 1.0) and not budget.allow(0, 1.0)
    budget.retune(50, 4)  # a reload: a faster reserve, but the spent tokens stay spent
    assert not budget.allow(0, 1.0)
    assert budget.allow(0, 1.25)  # refilling at 4 a second now


def test_backoff_is_exponential_with_full_jitter() -> None:
    config = Config.model_validate({
        "listeners": [{"name": "l", "bind": "127.0.0.1:0", "routes": [{"pool": "p"}]}],
        "pools": {"p": {"upstreams": [{"url": "http://127.0.0.1:1"}]}},
    })  # fmt: skip
    policy = RetryPolicy(config.pools["p"].retries)
    for retry, ceiling in ((1, 0.025), (2, 0.05), (3, 0.1), (4, 0.2), (5, 0.25), (9, 0.25)):
        waits = [policy.backoff(retry) for _ in range(300)]
        assert all(0 <= w <= ceiling for w in waits)
        assert max(waits) > ceiling * 0.8  # jitter spans the whole range


def test_retry_defaults_follow_design() -> None:
    config = Config.model_validate({
        "listeners": [{"name": "l", "bind": "127.0.0.1:0", "routes": [{"pool": "p"}]}],
        "pools": {"p": {"upstreams": [{"url": "http://127.0.0.1:1"}]}},
    })  # fmt: skip
    p = config.pools["p"]
    assert p.retries.attempts == 2  # one retry
    assert set(p.retries.retry_on) == {"connect_failure", "reset_before_response"}
    assert (p.retries.budget.percent, p.retries.budget.min_retries_per_second) == (20, 10)
    assert (p.retries.backoff.base, p.retries.backoff.max) == (0.025, 0.25)
    assert p.health_check.active is None  # opt-in: aiolb cannot guess the path
    passive = p.health_check.passive
    assert passive is not None
    assert (passive.consecutive_failures, passive.ejection_time, passive.max_ejection_time,
            passive.max_ejection_percent) == (5, 30.0, 300.0, 50)  # fmt: skip
    p = Config.model_validate({
        "listeners": [{"name": "l", "bind": "127.0.0.1:0", "routes": [{"pool": "p"}]}],
        "pools": {"p": {"upstreams": [{"url": "http://127.0.0.1:1"}],
                        "health_check": {"active": {}}}},
    }).pools["p"]  # fmt: skip
    active = p.health_check.active
    assert active is not None
    assert (active.interval, active.timeout, active.healthy_threshold,
            active.unhealthy_threshold, active.expected_status) == (
        5.0, 1.0, 2, 3, ((200, 399),))  # fmt: skip


# -- config errors with lines ------------------------------------------------------------

BASE = """\
listeners:
  - name: public
    bind: "127.0.0.1:8080"
    routes:
      - pool: web
pools:
  web:
    upstreams:
      - url: "http://127.0.0.1:9001"
"""


def problems(tmp_path: Path, extra: str) -> list[str]:
    path = tmp_path / "c.yaml"
    path.write_text(BASE + textwrap.indent(textwrap.dedent(extra), "    "))
    with pytest.raises(ConfigError) as info:
        load_config(str(path), env={})
    return [p.replace(str(path), "F", 1) for p in info.value.problems]


def test_health_and_retry_errors_name_file_and_line(tmp_path: Path) -> None:
    found = problems(tmp_path, """\
        health_check:
          active: {expected_status: "399-200", healthy_threshold: 0, type: udp}
          passive: {max_ejection_percent: 150}
        retries:
          attempts: 0
          retry_on: [connect_failure, teapot, 503]
        circuit_breaker: {max_connections: 0}
    """)
    text = "\n".join(found)
    assert "F:11: pools.web.health_check.active.expected_status: " in text
    assert "invalid status range '399-200'" in text
    assert "F:11: pools.web.health_check.active.healthy_threshold: " in text
    assert "F:11: pools.web.health_check.active.type: " in text
    assert "F:12: pools.web.health_check.passive.max_ejection_percent: " in text
    assert "F:14: pools.web.retries.attempts: " in text
    assert "F:15: pools.web.retries.retry_on: unknown retry condition 'teapot'" in text
    assert "F:16: pools.web.circuit_breaker.max_connections: " in text
    assert len(found) == 7


def test_valid_health_config_loads(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(BASE + textwrap.indent(textwrap.dedent("""\
        health_check:
          active: {path: /healthz, expected_status: [200, "300-302"], type: http,
                   interval: 2s, timeout: 500ms, host: app.internal}
          passive: {consecutive_failures: 3, consecutive_5xx: true}
        retries: {attempts: 3, retry_on: [timeout, 503], per_try_timeout: 1s}
        circuit_breaker: {max_connections: 64, max_pending: 10, queue_timeout: 2s}
    """), "    "))
    pool = load_config(str(path), env={}).pools["web"]
    assert pool.health_check.active is not None
    assert pool.health_check.active.expected_status == ((200, 200), (300, 302))
    assert pool.retries.retry_on == ("timeout", 503)
    assert pool.circuit_breaker.max_pending == 10



# -- gRPC checks: type grpc, its service, and the keys of the other types -----------------

GRPC_CHECK = """\
health_check:
  active: {type: grpc, service: my.pkg.Greeter, interval: 2s, host: api.internal}
"""
GRPC_WITH_HTTP_KEYS = """\
health_check:
  active:
    type: grpc
    path: /healthz
    method: HEAD
    expected_status: 200
"""
SERVICE_WITHOUT_GRPC = """\
health_check:
  active:
    type: {kind}
    service: svc
"""


def load_extra(tmp_path: Path, extra: str) -> Config:
    path = tmp_path / "c.yaml"
    path.write_text(BASE + textwrap.indent(extra, "    "))
    return load_config(str(path), env={})


def test_a_grpc_check_loads_with_its_service(tmp_path: Path) -> None:
    active = load_extra(tmp_path, GRPC_CHECK).pools["web"].health_check.active
    assert active is not None
    assert (active.type, active.service, active.interval, active.host) == (
        "grpc", "my.pkg.Greeter", 2.0, "api.internal")  # fmt: skip
    assert ActiveHealthCheckSpec().service == "" and ActiveHealthCheckSpec().type == "http"


def test_grpc_refuses_the_http_keys_at_their_lines(tmp_path: Path) -> None:
    why = "a grpc check calls grpc.health.v1.Health/Check and passes on SERVING: remove it"
    assert problems(tmp_path, GRPC_WITH_HTTP_KEYS) == [
        f"F:13: pools.web.health_check.active.path: path applies to type: http; {why}",
        f"F:14: pools.web.health_check.active.method: method applies to type: http; {why}",
        f"F:15: pools.web.health_check.active.expected_status: expected_status applies to "
        f"type: http; {why}",
    ]


@pytest.mark.parametrize("kind", ["http", "tcp"])
def test_service_is_refused_without_grpc(tmp_path: Path, kind: str) -> None:
    assert problems(tmp_path, SERVICE_WITHOUT_GRPC.format(kind=kind)) == [
        f"F:13: pools.web.health_check.active.service: service applies to type: grpc, "
        f"not {kind}: remove it"
    ]


def test_a_grpc_check_printed_with_every_default_loads_back(tmp_path: Path) -> None:
    """``check --print`` writes every key, the HTTP ones with their defaults: they load."""
    config = load_extra(tmp_path, "health_check: {active: {type: grpc, service: svc}}\n")
    printed = effective_yaml(config)
    assert "path: /" in printed and "expected_status:" in printed
    assert parse_config(printed) == config
