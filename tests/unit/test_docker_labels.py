"""The Docker provider's pure parts: inspect data to containers, labels to upstreams,
containers to pool members, label-made pools to config; and the config's checks."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import Config, ConfigError, PoolSpec, load_document
from proxy.config.providers import DockerProviderSpec
from proxy.runtime.preflight import validate
from proxy.runtime.provided import UNSURE, Scaling, merge
from proxy.upstream.docker import (
    Container,
    DockerProvider,
    RouteLabels,
    labelled,
    pool_name,
    upstream_spec,
)
from proxy.upstream.pool import Pool
from tests.support import aiolb_cli

SPEC = DockerProviderSpec()


def inspect_data(**over: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "Id": "0123456789abcdef0123",
        "Name": "/web-1",
        "Config": {"Labels": {"aiolb.enable": "true", "aiolb.pool": "web"},
                   "ExposedPorts": {"8080/tcp": {}}},
        "State": {"Status": "running", "Paused": False},
        "HostConfig": {"NetworkMode": "bridge"},
        "NetworkSettings": {"Networks": {"bridge": {"IPAddress": "172.17.0.2"}}},
    }  # fmt: skip
    data.update(over)
    return data


def test_inspect_data_becomes_a_container() -> None:
    c = Container.inspected(inspect_data())
    assert (c.name, c.state, c.health, c.host_network) == ("web-1", "running", None, False)
    assert c.networks == {"bridge": "172.17.0.2"} and c.ports == [8080]
    assert c.ready and c.short_id == "0123456789ab"
    spec = upstream_spec(c, SPEC)
    assert (spec.url, spec.name, spec.weight, spec.backup) == (
        "http://172.17.0.2:8080", "web-1", 1, False)  # fmt: skip


@pytest.mark.parametrize(
    ("state", "ready"),
    [
        ({"Status": "running", "Health": {"Status": "starting"}}, False),
        ({"Status": "running", "Health": {"Status": "unhealthy"}}, False),
        ({"Status": "running", "Health": {"Status": "healthy"}}, True),
        ({"Status": "running", "Paused": True}, False),
        ({"Status": "exited"}, False),
    ],
)
def test_ready_means_running_and_healthy(state: dict[str, Any], ready: bool) -> None:
    assert Container.inspected(inspect_data(State=state)).ready is ready


def test_a_stopping_container_is_not_ready() -> None:
    c = Container.inspected(inspect_data())
    c.stopping = True
    assert not c.ready


def test_labels_set_port_scheme_weight_backup_and_host_network() -> None:
    labels = {"aiolb.port": "9000", "aiolb.scheme": "https", "aiolb.weight": "3",
              "aiolb.backup": "true"}  # fmt: skip
    c = Container.inspected(inspect_data(
        Config={"Labels": labels, "ExposedPorts": {"80/tcp": {}, "443/tcp": {}}},
        HostConfig={"NetworkMode": "host"}, NetworkSettings={"Networks": {"host": {}}},
    ))  # fmt: skip
    spec = upstream_spec(c, DockerProviderSpec(host_address="10.0.0.5"))
    assert (spec.url, spec.weight, spec.backup) == ("https://10.0.0.5:9000", 3, True)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"Labels": {}, "ExposedPorts": {"80/tcp": {}, "81/tcp": {}}},
         "set aiolb.port (exposed ports: 80, 81)"),
        ({"Labels": {"aiolb.port": "http"}}, "aiolb.port='http' is not a port number"),
        ({"Labels": {"aiolb.port": "80", "aiolb.scheme": "h3"}}, "aiolb.scheme='h3': http, https"),
        ({"Labels": {"aiolb.port": "80", "aiolb.weight": "0"}}, "weight"),
    ],
)  # fmt: skip
def test_bad_labels_say_what_is_wrong(config: dict[str, Any], message: str) -> None:
    c = Container.inspected(inspect_data(Config=config))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        upstream_spec(c, SPEC)


def test_network_choice() -> None:
    nets = {"b": {"IPAddress": "10.0.2.2"}, "a": {"IPAddress": "10.0.1.1"}}
    c = Container.inspected(inspect_data(NetworkSettings={"Networks": nets}))
    assert upstream_spec(c, SPEC).host == "10.0.1.1"  # the first by name
    assert upstream_spec(c, DockerProviderSpec(network="b")).host == "10.0.2.2"
    with pytest.raises(ValueError, match="not attached to network 'c'"):
        upstream_spec(c, DockerProviderSpec(network="c"))


def test_which_containers_and_which_pool() -> None:
    assert labelled({"aiolb.enable": "true"}, SPEC)
    assert not labelled({"aiolb.pool": "web"}, SPEC)
    exposed = DockerProviderSpec(exposed_by_default=True)
    assert labelled({}, exposed) and not labelled({"aiolb.enable": "false"}, exposed)
    c = Container.inspected(inspect_data(Config={"Labels": {}}))
    assert pool_name(c) == "web-1"
    c.labels["com.docker.compose.service"] = "api"
    assert pool_name(c) == "api"
    c.labels["aiolb.pool"] = "web"
    assert pool_name(c) == "web"


def test_provider_fills_pools_and_asks_for_missing_ones() -> None:
    changed: list[int] = []
    wanted: list[dict[str, RouteLabels]] = []
    provider = DockerProvider(SPEC, lambda: changed.append(1), wanted.append)
    pool = Pool("web", PoolSpec(upstreams=[]))
    provider.pools = {"web": pool}
    a = Container.inspected(inspect_data())
    b = Container.inspected(inspect_data(
        Id="b" * 20, Name="/api-1",
        Config={"Labels": {"aiolb.enable": "true", "aiolb.pool": "api", "aiolb.port": "80",
                           "aiolb.route.host": "api.example.com"}},
    ))  # fmt: skip
    provider.containers = {a.id: a, b.id: b}
    provider.apply()
    assert [(u.address, u.name, u.container) for u in pool.upstreams] == [
        ("172.17.0.2:8080", "web-1", (a.id, "web-1"))]  # fmt: skip
    assert changed == [1]
    assert wanted == [{"api": RouteLabels(None, "api.example.com", None)}]
    kept = pool.upstreams[0]
    a.health = "unhealthy"
    provider.apply()
    assert pool.upstreams == [] and kept.max_idle == 0  # drained
    provider.apply()
    assert changed == [1, 1]  # nothing changed the second time


def test_merge_adds_label_made_pools_and_routes_first() -> None:
    config = Config.model_validate({
        "providers": {"docker": {}},
        "listeners": [{"name": "a", "bind": "127.0.0.1:0", "routes": [{"pool": "web"}]},
                      {"name": "b", "bind": "127.0.0.1:0", "routes": [{"pool": "web"}]}],
        "pools": {"web": {"upstreams": []}},
    })  # fmt: skip
    merged = merge(config, {
        "short": RouteLabels(None, None, "/s/"),
        "longer": RouteLabels(None, None, "/longer/"),
        "named": RouteLabels(None, "x.example.com", None),
        "onb": RouteLabels("b", None, "/b/"),
        "none": RouteLabels(None, None, None),
        "nowhere": RouteLabels("zz", None, "/z/"),
    })  # fmt: skip
    assert set(merged.pools) == {"web", "short", "longer", "named", "onb", "none", "nowhere"}
    assert [r.pool for r in merged.listeners[0].routes] == ["named", "longer", "short", "web"]
    assert [r.pool for r in merged.listeners[1].routes] == ["onb", "web"]
    assert merge(config, {}) is config


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "aiolb.yaml"
    path.write_text(text)
    return str(path)


BASE = """listeners:
  - name: public
    bind: "127.0.0.1:0"
    routes:
      - pool: web
"""


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (BASE + "pools:\n  web:\n    upstreams: []\n",
         ":8: pools.web.upstreams: a pool needs at least one upstream (or providers.docker"),
        (BASE + "pools:\n  web:\n    upstreams: [{url: 'http://127.0.0.1:1'}]\n"
         "    scale_from_zero: {wake: {webhook: 'http://x/'}, idle_stop: 1m}\n",
         ":9: pools.web.scale_from_zero: idle_stop stops containers: it needs wake: docker"),
        ("providers:\n  docker:\n    endpoint: /var/run/docker.sock\n" + BASE
         + "pools:\n  web:\n    upstreams: []\n",
         ":3: providers.docker.endpoint: must be unix:///PATH, tcp://HOST:PORT or https://"),
    ],
)  # fmt: skip
def test_config_problems_name_their_line(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_document(write(tmp_path, text))
    assert any(problem in line for line in caught.value.problems), caught.value.problems


def test_check_refuses_a_missing_socket(tmp_path: Path) -> None:
    socket = tmp_path / "nope.sock"
    text = f"providers:\n  docker:\n    endpoint: unix://{socket}\n" + BASE + (
        "pools:\n  web:\n    upstreams: []\n")  # fmt: skip
    with pytest.raises(ConfigError) as caught:
        validate(write(tmp_path, text))
    assert caught.value.problems == [
        f"{tmp_path / 'aiolb.yaml'}:3: providers.docker.endpoint: no Docker socket at "
        f"{socket} (is the engine running, the socket mounted?)"
    ]


def test_the_labelled_compose_example_matches_its_config() -> None:
    """deploy/docker-compose.labels.yml: aiolb reads config/docker.yaml through the
    socket proxy; every labelled service names a pool the config has, or asks for a
    route to its own; POST reaches the engine only because a pool wakes containers."""
    repo = Path(__file__).parents[2]
    compose = yaml.safe_load((repo / "deploy" / "docker-compose.labels.yml").read_text())
    config = load_document(str(repo / "config" / "docker.yaml")).config
    services = compose["services"]
    assert "../config/docker.yaml:/etc/aiolb/docker.yaml:ro" in services["aiolb"]["volumes"]
    docker = config.providers.docker
    assert docker is not None and docker.endpoint == "tcp://docker-socket-proxy:2375"
    for name, service in services.items():
        labels = service.get("labels", {})
        if labels.get("aiolb.enable") == "true":
            pool = labels["aiolb.pool"]
            assert pool in config.pools or "aiolb.route.path_prefix" in labels, name
    wakes = any(p.scale_from_zero and p.scale_from_zero.wake == "docker"
                for p in config.pools.values())  # fmt: skip
    proxy_env = services["docker-socket-proxy"]["environment"]
    assert wakes == (proxy_env.get("POST") == 1)


def test_check_refuses_unreadable_tls_files(tmp_path: Path) -> None:
    text = ("providers:\n  docker:\n    endpoint: https://127.0.0.1:2376\n"
            f"    tls:\n      ca: {tmp_path / 'ca.pem'}\n" + BASE
            + "pools:\n  web:\n    upstreams: []\n")  # fmt: skip
    with pytest.raises(ConfigError) as caught:
        validate(write(tmp_path, text))
    assert caught.value.problems == [
        f"{tmp_path / 'aiolb.yaml'}:5: providers.docker.tls.ca: cannot read {tmp_path / 'ca.pem'}"
    ]


def test_h2c_containers_need_an_http2_pool() -> None:
    h2c = {"aiolb.enable": "true", "aiolb.port": "80", "aiolb.scheme": "h2c"}
    provider = DockerProvider(SPEC, lambda: None)
    plain = Pool("one", PoolSpec(upstreams=[]))
    two = Pool("two", PoolSpec(upstreams=[], http_version="2"))
    provider.pools = {"one": plain, "two": two}
    for i, pool in enumerate(("one", "two", "new")):
        c = Container.inspected(inspect_data(
            Id=f"{i}" * 20, Name=f"/c-{pool}", Config={"Labels": {**h2c, "aiolb.pool": pool}},
            NetworkSettings={"Networks": {"n": {"IPAddress": f"10.0.0.{i + 1}"}}},
        ))  # fmt: skip
        provider.containers[c.id] = c
    provider.apply()
    assert plain.upstreams == []  # left out, logged
    assert [u.address for u in two.upstreams] == ["10.0.0.2:80"] and two.upstreams[0].h2 == []
    assert provider.extra == {"new": RouteLabels(None, None, None, http2=True)}
    config = Config.model_validate({
        "providers": {"docker": {}},
        "listeners": [{"name": "a", "bind": "127.0.0.1:0", "routes": [{"pool": "one"}]}],
        "pools": {"one": {"upstreams": []}},
    })  # fmt: skip
    assert merge(config, provider.extra).pools["new"].http_version == "2"


def test_check_print_shows_the_provider(tmp_path: Path) -> None:
    text = "providers:\n  docker:\n    endpoint: tcp://127.0.0.1:2375\n" + BASE + (
        "pools:\n  web:\n    upstreams: []\n    scale_from_zero: {wake: docker}\n")  # fmt: skip
    done = aiolb_cli("check", "-c", write(tmp_path, text), "--print")
    assert done.returncode == 0, done.stderr
    printed = yaml.safe_load(done.stdout)
    assert printed["providers"]["docker"] == {
        "endpoint": "tcp://127.0.0.1:2375", "exposed_by_default": False, "network": None,
        "host_address": "127.0.0.1", "tls": None,
    }  # fmt: skip
    assert printed["pools"]["web"]["scale_from_zero"] == {
        "hold": "30s", "max_pending": 200, "wake": "docker", "idle_stop": None,
    }  # fmt: skip


def sleepy_pool(idle_stop: str = "1s") -> Pool:
    return Pool("web", PoolSpec.model_validate({"upstreams": [], "scale_from_zero": {
        "wake": "docker", "idle_stop": idle_stop}}))  # fmt: skip


async def test_a_worker_parks_an_idle_pool_and_unparks_what_was_not_stopped() -> None:
    """A worker asked about an idle stop: not idle, how long until it may be; idle and
    asked to park, its containers are drained; unparked, they serve again, except the
    ones the stop took and one the engine is stopping meanwhile."""
    provider = DockerProvider(SPEC, lambda: None)
    pool = sleepy_pool()
    provider.pools = {"web": pool}
    ids = ["a" * 20, "b" * 20, "c" * 20]
    provider.containers = {
        i: Container.inspected(inspect_data(
            Id=i, Name=f"/web-{n}", NetworkSettings={"Networks": {"bridge": {
                "IPAddress": f"172.17.0.{n}"}}}))
        for n, i in enumerate(ids, 2)
    }  # fmt: skip
    provider.apply()
    scaling = Scaling(provider, "worker")
    hold = pool.scale
    assert hold is not None and len(pool.upstreams) == 3
    pool.requests += 1  # a request since the last look: the idle clock starts again
    assert scaling.park(pool, park=True) == pytest.approx(1.0, abs=0.1)
    assert len(pool.upstreams) == 3 and provider.parked == set()
    hold.last_active -= 1.0  # no request for idle_stop
    assert scaling.park(pool, park=False) == 0.0
    assert len(pool.upstreams) == 3  # only asked
    assert scaling.park(pool, park=True) == 0.0
    assert pool.upstreams == [] and provider.parked == set(ids)
    kill = {"Action": "kill", "Actor": {"ID": ids[1], "Attributes": {"signal": "15"}}}
    await provider._event(kill)  # the engine stops web-3 meanwhile
    scaling.unpark(pool, [ids[0]])
    assert [u.name for u in pool.upstreams] == ["web-4"] and provider.parked == set()
    assert scaling.park(None, park=True) == UNSURE


class FakeDocker:
    def __init__(self) -> None:
        self.stops = 0

    def running(self, pool: Pool) -> int:
        return 1

    async def stop(self, pool: Pool) -> list[str]:
        self.stops += 1
        return ["a" * 20]


class FakeConsent:
    """Answers ``idle`` from a script; records what was asked and resumed."""

    def __init__(self, *answers: float) -> None:
        self.answers = list(answers)
        self.asked: list[bool] = []
        self.resumed: list[list[str]] = []

    async def idle(self, pool: str, park: bool) -> float:
        self.asked.append(park)
        return self.answers.pop(0)

    def resume(self, pool: str, stopped: Collection[str]) -> None:
        self.resumed.append(list(stopped))


@pytest.mark.parametrize(
    ("answers", "asked", "stops"),
    [
        ((0.0, 0.0), [False, True], 1),  # every worker idle, and parked: one stop
        ((0.6,), [False], 0),  # a worker served within idle_stop: not even parked
        ((0.0, 0.3), [False, True], 0),  # one got a request between the two questions
    ],
)
async def test_the_supervisor_stops_only_when_every_worker_parked(
    answers: tuple[float, ...], asked: list[bool], stops: int
) -> None:
    docker = FakeDocker()
    consent = FakeConsent(*answers)
    scaling = Scaling(docker, "supervisor")  # type: ignore[arg-type]
    scaling.consent = consent
    pool = sleepy_pool()
    await scaling._decide(docker, pool, consent)  # type: ignore[arg-type]
    assert consent.asked == asked and docker.stops == stops
    assert consent.resumed == ([["a" * 20]] if stops else [])
    assert pool.scale is not None
    assert pool.scale.actions == ({("stop", "success"): 1} if stops else {})
