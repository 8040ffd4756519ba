"""Pure tests of every balancing algorithm, the hash ring, slow start and the pool's
choice of which upstreams a balancer sees. No sockets, no sleeps: latency-driven
scenarios run on a simulated clock."""

from __future__ import annotations

import heapq
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, get_args

import pytest

from proxy.balancing import REGISTRY
from proxy.balancing.base import effective_weights, integer_weights
from proxy.balancing.consistent_hash import ConsistentHash, key_reader
from proxy.balancing.ip_hash import IpHash
from proxy.balancing.least_connections import LeastConnections
from proxy.balancing.peak_ewma import PeakEwma
from proxy.balancing.power_of_two import PowerOfTwo
from proxy.balancing.random import WeightedRandom
from proxy.balancing.ring import HashRing
from proxy.balancing.slow_start import SlowStart, ramp
from proxy.balancing.weighted_round_robin import WeightedRoundRobin, smooth_schedule
from proxy.config import BALANCER_NAMES, BalancerName, Config, PoolSpec, load_config
from proxy.config.keys import RequestKey, parse_key
from proxy.upstream.pool import Pool

OPTIONS: Mapping[str, Mapping[str, Any]] = {"consistent_hash": {"key": "header:x-user"}}
SEEDED = ("random", "power_of_two", "peak_ewma")  # take an ``rng`` for repeatable tests


class FakeUpstream:
    """What a balancer reads from ``proxy.upstream.pool.Upstream``; hashed by identity."""

    __slots__ = ("_active", "address", "watchers", "weight")

    def __init__(self, address: str, weight: int = 1, active: int = 0) -> None:
        self.address = address
        self.weight = weight
        self.watchers: list[Any] = []
        self._active = active

    @property
    def active(self) -> int:
        return self._active

    @active.setter
    def active(self, value: int) -> None:
        """Like the pool: every change reaches the balancers that index it."""
        self._active = value
        for watch in self.watchers:
            watch(self)

    def __repr__(self) -> str:
        return f"<FakeUpstream {self.address} w{self.weight} a{self.active}>"


class FakeRequest:
    """A ``RequestView``; reading anything not given fails the test (laziness check)."""

    __slots__ = ("_client_ip", "_headers", "_target")

    def __init__(
        self,
        headers: Mapping[bytes, bytes] | None = None,
        target: bytes | None = None,
        client_ip: str | None = None,
    ) -> None:
        self._headers = headers
        self._target = target
        self._client_ip = client_ip

    @property
    def client_ip(self) -> str:
        assert self._client_ip is not None, "client_ip read but not needed"
        return self._client_ip

    @property
    def target(self) -> bytes:
        assert self._target is not None, "target read but not needed"
        return self._target

    def header(self, name: bytes) -> bytes | None:
        assert self._headers is not None, "headers read but not needed"
        assert name == name.lower()
        return self._headers.get(name)


ANY_REQUEST = FakeRequest({b"x-user": b"alice"}, b"/", "10.1.2.3")


def upstreams(*weights: int, prefix: str = "10.0.0.") -> list[FakeUpstream]:
    return [FakeUpstream(f"{prefix}{i + 1}:80", w) for i, w in enumerate(weights)]


def tracked(balancer: Any, targets: Sequence[FakeUpstream]) -> Any:
    """Wire ``on_active_change`` as ``Pool.track`` does for real upstreams."""
    hook = getattr(balancer, "on_active_change", None)
    if hook is not None:
        for u in targets:
            u.watchers.append(hook)
    return balancer


def build(name: str, targets: Sequence[Any], seed: int = 7, **kwargs: Any) -> Any:
    if name in SEEDED:
        kwargs.setdefault("rng", random.Random(seed))
    return tracked(REGISTRY[name](targets, OPTIONS.get(name, {}), **kwargs), targets)


def shares(picks: Iterable[Any], targets: Sequence[Any]) -> list[float]:
    counts = Counter(picks)
    total = sum(counts.values())
    return [counts[t] / total for t in targets]


def expected_shares(weights: Sequence[int]) -> list[float]:
    return [w / sum(weights) for w in weights]


# -- registry and conformance --------------------------------------------------------


def test_registry_names_are_the_config_names() -> None:
    assert set(REGISTRY) == set(BALANCER_NAMES) == set(get_args(BalancerName))
    assert len(BALANCER_NAMES) == 8


@pytest.mark.parametrize("name", sorted(REGISTRY))
class TestConformance:
    def test_no_upstreams_gives_none(self, name: str) -> None:
        assert build(name, []).pick(ANY_REQUEST) is None

    def test_one_upstream_is_always_it(self, name: str) -> None:
        only = upstreams(3)
        balancer = build(name, only)
        requests = [ANY_REQUEST, FakeRequest({}, b"/x", "")]
        assert {balancer.pick(r) for r in requests for _ in range(50)} == {only[0]}

    def test_picks_only_and_all_of_the_given_upstreams(self, name: str) -> None:
        given = upstreams(1, 2, 3, 1, 1)
        balancer = build(name, given)
        picks = [balancer.pick(user_request(i)) for i in range(3000)]
        assert set(picks) == set(given)

    def test_takes_effective_weights_and_shows_state(self, name: str) -> None:
        given = upstreams(1, 1)
        balancer = build(name, given, weights=[0.5, 2.0])
        assert balancer.pick(ANY_REQUEST) in given
        assert repr(balancer).startswith("<")
        if name != "round_robin":  # the one that ignores weights
            with pytest.raises(ValueError):
                build(name, given, weights=[1.0])


def user_request(i: int) -> FakeRequest:
    return FakeRequest({b"x-user": b"user-%d" % i}, b"/p?id=%d" % i, f"10.{i % 7}.{i % 251}.9")


# -- the pool: backups, availability, slow start --------------------------------------


def pool_config(balancer: str, slow_start: str | None = None) -> PoolSpec:
    spec: dict[str, Any] = {"name": balancer, **OPTIONS.get(balancer, {})}
    data: dict[str, Any] = {
        "balancer": spec,
        "upstreams": [
            {"url": "http://10.0.0.1:80"},
            {"url": "http://10.0.0.2:80", "weight": 2},
            {"url": "http://10.0.0.3:80", "backup": True},
            {"url": "http://10.0.0.4:80", "backup": True},
        ],
    }
    if slow_start is not None:
        data["slow_start"] = slow_start
    return PoolSpec.model_validate(data)


def picked_addresses(pool: Pool, count: int = 300) -> set[str | None]:
    """What ``count`` picks chose, each request staying in flight until the end."""
    found: set[str | None] = set()
    for i in range(count):
        upstream = pool.pick(user_request(i))
        found.add(upstream.address if upstream is not None else None)
        if upstream is not None:
            upstream.begin_request()
    for upstream in pool.upstreams:
        while upstream.active:
            upstream.end_request()
    return found


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_pool_uses_backups_only_while_no_primary_is_available(name: str) -> None:
    pool = Pool("p", pool_config(name))
    primary_a, primary_b, backup_a, backup_b = pool.upstreams
    assert picked_addresses(pool) == {"10.0.0.1:80", "10.0.0.2:80"}

    primary_a.healthy = False
    pool.rebuild()
    assert picked_addresses(pool) == {"10.0.0.2:80"}

    primary_b.enabled = False  # an operator's drain counts as unavailable too
    pool.rebuild()
    assert picked_addresses(pool) == {"10.0.0.3:80", "10.0.0.4:80"}

    backup_a.healthy = False
    pool.rebuild()
    assert picked_addresses(pool) == {"10.0.0.4:80"}

    backup_b.healthy = False
    pool.rebuild()
    assert picked_addresses(pool) == {None}  # the 503 path

    primary_a.healthy = True
    pool.rebuild()
    assert picked_addresses(pool) == {"10.0.0.1:80"}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_no_balancer_reads_a_clock(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Picks, observations and rebuilds take the time they are given: a balancer that
    read a clock of its own would pay for it on every request."""
    def no_clock() -> float:
        raise AssertionError(f"{name} read a clock")

    monkeypatch.setattr(time, "perf_counter", no_clock)
    monkeypatch.setattr(time, "monotonic", no_clock)
    monkeypatch.setattr(time, "time", no_clock)
    targets = upstreams(1, 2, 3)
    old = REGISTRY[name](targets, OPTIONS.get(name, {}))
    balancer = REGISTRY[name](targets, OPTIONS.get(name, {}))
    inherit = getattr(balancer, "inherit", None)
    if inherit is not None:
        inherit(old, 1000.0)
    observe = getattr(balancer, "observe", None)
    for step in range(200):
        picked = balancer.pick(ANY_REQUEST)
        assert picked in targets
        if observe is not None:
            observe(picked, 0.001 * (1 + step % 3), 1000.0 + step * 0.01)
    assert repr(balancer)


def test_pool_keeps_peak_ewma_learning_across_rebuilds() -> None:
    pool = Pool("p", pool_config("peak_ewma"))
    fast, slow = pool.upstreams[:2]
    assert pool.observe is not None
    for _ in range(20):
        pool.observe(fast, 0.001, time.perf_counter())
        pool.observe(slow, 0.5, time.perf_counter())
    pool.upstreams[2].healthy = False  # a change elsewhere rebuilds the balancer
    pool.rebuild()
    counts = Counter(pool.pick(ANY_REQUEST) for _ in range(200))
    assert counts[fast] > 180


def test_example_config_loads_and_builds_every_pool() -> None:
    config: Config = load_config("config/balancing.yaml")
    names = {pool.balancer.name for pool in config.pools.values()}
    assert len(names) >= 5
    for name, spec in config.pools.items():
        assert Pool(name, spec).pick(ANY_REQUEST) is not None
    assert config.pools["web"].slow_start == 30.0
    assert config.pools["api"].balancer.options == {"decay": 10.0}


@pytest.mark.parametrize(
    ("balancer", "problem"),
    [
        ({"name": "consistent_hash"}, "option 'key' is required"),
        ({"name": "consistent_hash", "key": "headr:x"}, "is not a key; use one of"),
        ({"name": "consistent_hash", "key": "cookie:"}, "name must be a non-empty"),
        ({"name": "peak_ewma", "decay": "0s"}, "decay: must be > 0"),
        ({"name": "peak_ewma", "window": "1s"}, "unknown option 'window'"),
        ({"name": "random", "seed": 1}, "takes no options"),
    ],
)
def test_config_rejects_bad_balancer_options(balancer: dict[str, Any], problem: str) -> None:
    data = {"balancer": balancer, "upstreams": [{"url": "http://10.0.0.1:80"}]}
    with pytest.raises(ValueError, match=problem):
        PoolSpec.model_validate(data)


def test_config_parses_option_values() -> None:
    spec = {"name": "peak_ewma", "decay": "1m30s"}
    config = PoolSpec.model_validate({"balancer": spec, "upstreams": [{"url": "http://a"}]})
    assert config.balancer.options == {"decay": 90.0}
    assert config.slow_start is None


# -- weighted shares ------------------------------------------------------------------

WEIGHTS = (5, 3, 1, 1)


@pytest.mark.parametrize(
    "name", ["weighted_round_robin", "random", "power_of_two", "least_connections"]
)
def test_weighted_shares_over_100k_picks(name: str) -> None:
    targets = upstreams(*WEIGHTS)  # all idle: power_of_two and least_connections tie
    balancer = build(name, targets)
    got = shares((balancer.pick(ANY_REQUEST) for _ in range(100_000)), targets)
    for share, want in zip(got, expected_shares(WEIGHTS), strict=True):
        assert share == pytest.approx(want, abs=0.01)


@pytest.mark.parametrize("name", ["consistent_hash", "ip_hash"])
def test_hashed_shares_over_100k_keys_follow_weights(name: str) -> None:
    targets = upstreams(*WEIGHTS)
    balancer = build(name, targets)
    got = shares((balancer.pick(user_request(i)) for i in range(100_000)), targets)
    for share, want in zip(got, expected_shares(WEIGHTS), strict=True):
        # 160 points per unit of weight: a ring is within a few percent, not 1%
        assert share == pytest.approx(want, abs=0.03)


def test_smooth_weighted_sequence_is_nginx_s() -> None:
    a, b, c = targets = upstreams(5, 1, 1)
    balancer = WeightedRoundRobin(targets, {})
    assert [balancer.pick(ANY_REQUEST) for _ in range(14)] == [a, a, b, a, c, a, a] * 2


def test_smooth_schedule_spreads_each_share() -> None:
    order = smooth_schedule([3, 2])
    assert order == [0, 1, 0, 1, 0]
    assert smooth_schedule([100_000, 1]) is None  # too long to tabulate


def test_weighted_round_robin_with_a_huge_period_keeps_exact_shares() -> None:
    heavy, light = targets = upstreams(100_000, 3)
    balancer = WeightedRoundRobin(targets, {})
    assert "edf" in repr(balancer)
    counts = Counter(balancer.pick(ANY_REQUEST) for _ in range(100_003))
    assert counts == {heavy: 100_000, light: 3}


def test_integer_weights_keep_proportions() -> None:
    assert integer_weights([5.0, 1.0, 1.0]) == [5, 1, 1]
    assert integer_weights([4.0, 2.0]) == [2, 1]
    assert integer_weights([1.0, 0.55]) == [20, 11]
    assert integer_weights([2.0, 0.2, 0.001]) == [100, 10, 1]
    assert effective_weights(upstreams(2, 3), None) == [2.0, 3.0]
    with pytest.raises(ValueError):
        effective_weights(upstreams(1), [0.0])


# -- hash ring -------------------------------------------------------------------------

KEYS = [b"user-%d" % i for i in range(10_000)]


def owners(ring: HashRing) -> list[str]:
    return [ring.lookup(key).address for key in KEYS]


@pytest.mark.parametrize("n", [3, 10, 30])
def test_ring_adding_one_upstream_moves_few_keys_all_to_it(n: int) -> None:
    before = owners(HashRing(upstreams(*[1] * n), [1.0] * n))
    grown = upstreams(*[1] * (n + 1))
    after = owners(HashRing(grown, [1.0] * (n + 1)))
    moved = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    assert len(moved) / len(KEYS) <= 1 / (n + 1) + 0.05
    assert {new for _, new in moved} == {grown[-1].address}


@pytest.mark.parametrize("n", [3, 10, 30])
def test_ring_removing_one_upstream_moves_only_its_keys(n: int) -> None:
    full = upstreams(*[1] * n)
    before = owners(HashRing(full, [1.0] * n))
    gone = full[n // 2].address
    rest = [u for u in full if u.address != gone]
    after = owners(HashRing(rest, [1.0] * (n - 1)))
    for old, new in zip(before, after, strict=True):
        assert old in (new, gone)
    assert gone not in after


def test_ring_does_not_depend_on_upstream_order() -> None:
    targets = upstreams(1, 2, 3)
    forward = owners(HashRing(targets, [1.0, 2.0, 3.0]))
    backward = owners(HashRing(targets[::-1], [3.0, 2.0, 1.0]))
    assert forward == backward


def test_ring_growing_weight_only_moves_keys_to_the_grower() -> None:
    targets = upstreams(1, 1, 1)
    before = owners(HashRing(targets, [1.0, 1.0, 0.3]))
    after = owners(HashRing(targets, [1.0, 1.0, 0.6]))
    moved = {new for old, new in zip(before, after, strict=True) if old != new}
    assert moved == {targets[2].address}


# -- consistent_hash keys ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "request_", "value"),
    [
        ("header:X-User", FakeRequest({b"x-user": b"bob"}), b"bob"),
        ("cookie:sid", FakeRequest({b"cookie": b"a=1; sid=s42; b=2"}), b"s42"),
        ("cookie:sid", FakeRequest({b"cookie": b'sid="q"'}), b"q"),
        ("query:id", FakeRequest(target=b"/p?x=1&id=77&y"), b"77"),
        ("query:id", FakeRequest(target=b"/p?id="), b""),
        ("path", FakeRequest(target=b"/a/b?id=1"), b"/a/b"),
        ("client_ip", FakeRequest(client_ip="192.0.2.7"), b"192.0.2.7"),
        ("header:x-user", FakeRequest({}), None),
        ("cookie:sid", FakeRequest({b"cookie": b"xsid=1; sidx=2"}), None),
        ("cookie:sid", FakeRequest({}), None),
        ("query:id", FakeRequest(target=b"/p?xid=1"), None),
        ("query:id", FakeRequest(target=b"/p"), None),
    ],
)
def test_key_extraction_reads_only_what_it_needs(
    key: str, request_: FakeRequest, value: bytes | None
) -> None:
    assert key_reader(key)(request_) == value  # FakeRequest fails on any other read


@pytest.mark.parametrize("bad", ["", "header", "header:", "bogus:x", "cookie:a b", "query:a=b"])
def test_bad_keys_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        key_reader(bad)


def test_the_key_syntax_splits_kind_and_name() -> None:
    assert parse_key("header:X-User") == RequestKey("header", "X-User")
    assert parse_key("client_ip") == RequestKey("client_ip", "")
    with pytest.raises(ValueError, match="is not a key; use one of header:NAME"):
        parse_key("bogus:x")


@pytest.mark.parametrize(
    ("key", "make"),
    [
        ("header:X-User", lambda v: FakeRequest({b"x-user": v})),
        ("cookie:sid", lambda v: FakeRequest({b"cookie": b"theme=dark; sid=" + v})),
        ("query:user", lambda v: FakeRequest(target=b"/cart?user=" + v)),
        ("path", lambda v: FakeRequest(target=b"/u/" + v + b"?page=2")),
        ("client_ip", lambda v: FakeRequest(client_ip=v.decode())),
    ],
)
def test_consistent_hash_same_key_same_upstream(
    key: str, make: Callable[[bytes], FakeRequest]
) -> None:
    targets = upstreams(1, 1, 1, 1)
    first = ConsistentHash(targets, {"key": key})
    again = ConsistentHash(targets[::-1], {"key": key})  # a rebuild, in another order
    chosen = set()
    for i in range(200):
        value = b"10.0.%d.1" % i
        picked = first.pick(make(value))
        assert all(first.pick(make(value)) is picked for _ in range(3))
        assert again.pick(make(value)) is picked
        chosen.add(picked)
    assert chosen == set(targets)


def test_consistent_hash_without_a_key_takes_turns() -> None:
    targets = upstreams(1, 1, 1)
    balancer = ConsistentHash(targets, {"key": "header:x-user"})
    no_header = FakeRequest({})
    empty = FakeRequest({b"x-user": b""})
    picks = [balancer.pick(r) for r in [no_header, empty] * 3]
    assert picks == targets * 2


def test_consistent_hash_sends_a_lost_upstream_s_keys_elsewhere_only() -> None:
    targets = upstreams(1, 1, 1, 1)
    full = ConsistentHash(targets, {"key": "header:x-user"})
    without = ConsistentHash(targets[1:], {"key": "header:x-user"})
    for i in range(2000):
        request = user_request(i)
        before, after = full.pick(request), without.pick(request)
        assert before is after or before is targets[0]


def test_ip_hash_is_stable_per_client_and_spreads_clients() -> None:
    targets = upstreams(1, 1, 1)
    balancer = IpHash(targets, {})
    rebuilt = IpHash(list(reversed(targets)), {})
    seen = set()
    for i in range(300):
        request = FakeRequest(client_ip=f"198.51.{i // 256}.{i % 256}")
        picked = balancer.pick(request)
        assert balancer.pick(request) is picked
        assert rebuilt.pick(request) is picked
        seen.add(picked)
    assert seen == set(targets)
    assert balancer.pick(FakeRequest(client_ip="")) in targets  # no address: in turn


# -- load-aware choice ------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_power_of_two_prefers_the_idle_upstream(seed: int) -> None:
    idle, busy = targets = upstreams(1, 1)
    busy.active = 10
    balancer = PowerOfTwo(targets, {}, rng=random.Random(seed))
    counts = Counter(balancer.pick(ANY_REQUEST) for _ in range(10_000))
    assert counts[idle] / 10_000 == pytest.approx(0.75, abs=0.02)  # busy only if drawn twice


def test_least_connections_picks_the_least_loaded() -> None:
    targets = upstreams(1, 1, 1)
    for u, active in zip(targets, (4, 1, 3), strict=True):
        u.active = active
    balancer = tracked(LeastConnections(targets, {}), targets)
    assert all(balancer.pick(ANY_REQUEST) is targets[1] for _ in range(10))


def test_least_connections_divides_by_weight() -> None:
    big, small = targets = upstreams(4, 1)
    big.active, small.active = 3, 1  # 0.75 against 1.0
    assert tracked(LeastConnections(targets, {}), targets).pick(ANY_REQUEST) is big


def test_least_connections_rotates_over_ties() -> None:
    targets = upstreams(1, 1, 1, 1)
    for u in targets:
        u.active = 2
    targets[3].active = 5
    balancer = tracked(LeastConnections(targets, {}), targets)
    picks = [balancer.pick(ANY_REQUEST) for _ in range(9)]
    assert picks == targets[:3] * 3  # never the busy one; never always the first


def test_least_connections_rotates_over_weighted_ties() -> None:
    a, b, c = targets = upstreams(2, 1, 1)
    a.active, b.active, c.active = 2, 1, 7  # a and b tie at 1.0
    balancer = tracked(LeastConnections(targets, {}), targets)
    counts = Counter(balancer.pick(ANY_REQUEST) for _ in range(100))
    assert counts[c] == 0
    assert counts[a] >= 30 and counts[b] >= 30


@pytest.mark.parametrize("n", [3, 5, 12, 40])
@pytest.mark.parametrize("seed", range(4))
def test_least_connections_matches_a_full_scan(n: int, seed: int) -> None:
    rng = random.Random(seed)
    targets = upstreams(*[rng.choice((1, 2, 3)) for _ in range(n)])
    balancer = tracked(LeastConnections(targets, {}), targets)
    for _ in range(200):
        for u in targets:
            u.active = rng.randrange(5)
        low = min(u.active / u.weight for u in targets)
        picked = balancer.pick(ANY_REQUEST)
        assert picked.active / picked.weight == low
    for u in targets:  # busy and level: every tied upstream in turn, none twice
        u.active = 2 * u.weight
    assert {balancer.pick(ANY_REQUEST) for _ in range(n)} == set(targets)


def test_least_connections_follows_picks_as_requests_start() -> None:
    targets = upstreams(1, 1, 1)
    balancer = tracked(LeastConnections(targets, {}), targets)
    for _ in range(30):  # requests that never end: the counts stay level
        balancer.pick(ANY_REQUEST).active += 1
    assert [u.active for u in targets] == [10, 10, 10]


# -- peak_ewma on a simulated clock ----------------------------------------------------


class FakeClock:
    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Simulation:
    """Poisson arrivals at ``rate``; each request takes its upstream's latency (±30%)."""

    def __init__(self, rate: float, seed: int) -> None:
        self.clock = FakeClock()
        self.targets = upstreams(1, 1)
        self.balancer = PeakEwma(self.targets, {"decay": 10.0}, rng=random.Random(seed + 99))
        self.rng = random.Random(seed)
        self.rate = rate
        self.in_flight: list[tuple[float, int, FakeUpstream, float]] = []
        self.sent = 0

    def run(self, seconds: float, latency: Sequence[float]) -> list[float]:
        """Shares of the two upstreams over ``seconds`` with these mean latencies."""
        counts: Counter[FakeUpstream] = Counter()
        end = self.clock.now + seconds
        while self.clock.now < end:
            now = self.clock.now + self.rng.expovariate(self.rate)
            self._finish_until(now)
            self.clock.now = now
            upstream = self.balancer.pick(ANY_REQUEST)
            upstream.active += 1
            took = latency[self.targets.index(upstream)] * self.rng.uniform(0.7, 1.3)
            self.sent += 1
            heapq.heappush(self.in_flight, (now + took, self.sent, upstream, took))
            counts[upstream] += 1
        return shares(counts.elements(), self.targets)

    def _finish_until(self, now: float) -> None:
        while self.in_flight and self.in_flight[0][0] <= now:
            done, _, upstream, took = heapq.heappop(self.in_flight)
            self.clock.now = done
            upstream.active -= 1
            self.balancer.observe(upstream, took, done)


EVEN = (0.005, 0.005)
B_SLOW = (0.005, 0.100)  # 20 times slower


@pytest.mark.parametrize(("rate", "seed"), [(100, 1), (1000, 2), (2000, 3)])
def test_peak_ewma_moves_traffic_off_a_slow_upstream_and_back(rate: int, seed: int) -> None:
    sim = Simulation(rate, seed)
    warm = sim.run(5, EVEN)
    assert 0.4 <= warm[1] <= 0.6
    sim.run(10, B_SLOW)
    assert sim.run(10, B_SLOW)[1] <= 0.2  # at least 80% moved away
    recovering = sim.run(10, EVEN)  # one decay time
    assert recovering[1] > 0  # it got traffic again within one decay time
    assert 0.4 <= sim.run(5, EVEN)[1] <= 0.6  # and its fair share after it


def test_peak_ewma_probes_a_starved_upstream_rarely() -> None:
    clock = FakeClock()
    fast, slow = targets = upstreams(1, 1)
    balancer = PeakEwma(targets, {"decay": 10.0}, rng=random.Random(1))
    balancer.observe(fast, 0.01, clock.now)
    balancer.observe(slow, 1.0, clock.now)
    picks_of_slow = []
    for step in range(1000):  # 10 s, a pick every 10 ms, answers at once
        clock.now += 0.01
        picked = balancer.pick(ANY_REQUEST)
        balancer.observe(picked, 0.01 if picked is fast else 1.0, clock.now)
        if picked is slow:
            picks_of_slow.append(step)
    assert 1 <= len(picks_of_slow) <= 4  # about one per half decay time


def test_peak_ewma_new_upstreams_start_at_the_median() -> None:
    clock = FakeClock()
    old_targets = upstreams(1, 1, 1)
    old = PeakEwma(old_targets, {})
    for upstream, seconds in zip(old_targets, (0.01, 0.02, 0.09), strict=True):
        old.observe(upstream, seconds, clock.now)
    newcomer = FakeUpstream("10.0.0.9:80")
    new = PeakEwma([*old_targets, newcomer], {})
    new.inherit(old, clock.now)
    assert "10.0.0.9:80 20.00ms" in repr(new)
    assert "10.0.0.3:80 90.00ms" in repr(new)


@pytest.mark.parametrize("gap", [1e-5, 0.01, 0.5, 3.0])
def test_peak_ewma_averages_a_faster_answer_by_the_time_since_the_last(gap: float) -> None:
    clock = FakeClock()
    (target,) = upstreams(1)
    balancer = PeakEwma([target], {"decay": 10.0})
    balancer.observe(target, 0.100, clock.now)
    balancer.observe(target, 0.020, clock.now + gap)  # the exchange passes its time
    keep = math.exp(-gap * 5.0 / 10.0)  # time constant decay / 5
    expected = 0.100 * keep + 0.020 * (1.0 - keep)
    cost = balancer._scores[0].cost
    assert cost == pytest.approx(expected, rel=0.005)
    assert balancer._scores[0].stamp == clock.now + gap


@pytest.mark.parametrize("n", [2, 3, 5])
def test_peak_ewma_splits_evenly_between_equal_upstreams(n: int) -> None:
    targets = upstreams(*[1] * n)
    balancer = PeakEwma(targets, {}, rng=random.Random(n))
    got = shares((balancer.pick(ANY_REQUEST) for _ in range(60_000)), targets)
    assert got == pytest.approx([1 / n] * n, abs=0.01)


def test_peak_ewma_ignores_upstreams_it_does_not_balance() -> None:
    balancer = PeakEwma(upstreams(1), {})
    balancer.observe(FakeUpstream("10.9.9.9:80"), 1.0, 1000.0)
    balancer.inherit(WeightedRandom(upstreams(1), {}), 1000.0)
    assert "floor 0.00ms" in repr(balancer)


# -- slow start --------------------------------------------------------------------------


def test_ramp_goes_from_10_to_100_percent_linearly() -> None:
    assert [ramp(t, 30.0) for t in (0, 15, 30, 60)] == pytest.approx([0.1, 0.55, 1.0, 1.0])


def test_slow_start_ramps_only_upstreams_that_come_back() -> None:
    a, _ = targets = upstreams(2, 2)
    slow = SlowStart(10.0)
    slow.update(targets, now=0.0)  # the starting set does not ramp
    assert slow.weights(targets, 0.0) is None
    slow.update([a], now=1.0)
    slow.update(targets, now=2.0)  # b is back
    assert slow.weights(targets, 2.0) == pytest.approx([2.0, 0.2])
    assert slow.weights(targets, 7.0) == pytest.approx([2.0, 1.1])
    assert slow.ramping(11.9) and not slow.ramping(12.0)
    assert slow.weights(targets, 12.0) is None
    assert slow.step == 1.0


def test_pool_slow_start_ramps_weight_through_sweeps() -> None:
    pool = Pool("p", pool_config("weighted_round_robin", slow_start="10s"))
    clock = FakeClock()
    pool.clock = clock
    first, second = pool.upstreams[:2]
    first.healthy = False
    pool.rebuild()
    first.healthy = True
    pool.rebuild()  # first is back at 10% of weight 1, second has weight 2

    def share_of_first() -> float:
        return shares((pool.pick(ANY_REQUEST) for _ in range(2100)), [first, second])[0]

    assert share_of_first() == pytest.approx(0.1 / 2.1, abs=0.01)
    assert "ramping" in repr(pool)
    clock.now += 5.0
    pool.sweep(clock.now)
    assert share_of_first() == pytest.approx(0.55 / 2.55, abs=0.01)
    clock.now += 5.0
    pool.sweep(clock.now)
    assert share_of_first() == pytest.approx(1 / 3, abs=0.01)
    assert "ramping" not in repr(pool)
