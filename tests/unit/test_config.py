"""proxy.config: values, models, defaults, YAML loading with FILE:LINE errors, ${VAR}."""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import pytest
from pydantic import ValidationError

import proxy
import proxy.balancing
from proxy.config import (
    BALANCER_NAMES,
    AdminSpec,
    BalancerName,
    Config,
    ConfigError,
    LimitsSpec,
    ListenerSpec,
    ListenerTimeoutsSpec,
    MatchSpec,
    PoolSpec,
    PoolTimeoutsSpec,
    UpstreamSpec,
    load_config,
    log_fields,
    parse_config,
    parse_duration,
    parse_size,
)
from proxy.config.balancer import BALANCER_OPTIONS
from proxy.config.base import ConfigModel
from proxy.config.diff import describe_changes
from proxy.config.filters import FILTER_OPTIONS, FilterOptions
from proxy.config.source import expand
from proxy.config.values import format_duration, format_size
from proxy.metrics import log_format

EXAMPLES = sorted((Path(__file__).parents[2] / "config").glob("*.yaml"))

# Line numbers matter: tests below name them.
VALID = """\
listeners:
  - name: public
    bind: "127.0.0.1:8080"
    routes:
      - pool: web
pools:
  web:
    upstreams:
      - url: "http://127.0.0.1:9001"
      - url: "http://127.0.0.1:9002"
"""


def minimal(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "listeners": [{"name": "a", "bind": "127.0.0.1:8080", "routes": [{"pool": "web"}]}],
        "pools": {"web": {"upstreams": [{"url": "http://127.0.0.1:9001"}]}},
    }
    return {**data, **overrides}


def problems(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[str]:
    """The problems loading ``text`` reports, with the file's path shown as ``F``."""
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(ConfigError) as info:
        load_config(str(path), env={} if env is None else env)
    assert str(info.value) == "\n".join(info.value.problems)
    return [problem.replace(str(path), "F", 1) for problem in info.value.problems]


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Config:
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(text))
    return load_config(path, env={} if env is None else env)


# --- durations and sizes ------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(5, 5.0), (1.5, 1.5), ("250ms", 0.25), ("5s", 5.0), ("1.5s", 1.5), ("1m", 60.0),
     ("1h", 3600.0), ("1m30s", 90.0), ("5", 5.0), (" 2S ", 2.0), (".5s", 0.5)],
)  # fmt: skip
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value", ["5x", "", "ms", "s5", "-1s", "1 m", True, None, [], float("inf")]
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("value", "size"),
    [("64KiB", 65536), ("8k", 8192), ("8K", 8192), ("1MiB", 1 << 20), ("1m", 1 << 20),
     ("10MB", 10_000_000), ("1g", 1 << 30), ("1GiB", 1 << 30), ("1GB", 10**9), ("2kb", 2000),
     ("1.5k", 1536), ("100", 100), ("100B", 100), ("2 KiB", 2048), (123, 123)],
)  # fmt: skip
def test_parse_size(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["1x", "k", "KiB", "-1k", "1 kibi", True])
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(value)


def test_sizes_and_durations_in_models() -> None:
    limits = LimitsSpec(max_header_size="16KiB", max_uri_size="2k", max_body_size="1MB")
    assert (limits.max_header_size, limits.max_uri_size, limits.max_body_size) == (
        16384, 2048, 1_000_000)  # fmt: skip
    timeouts = PoolTimeoutsSpec(connect="250ms", read="1m")
    assert (timeouts.connect, timeouts.read) == (0.25, 60.0)


@pytest.mark.parametrize("value", [0, -1, "0s"])
def test_timeouts_must_be_positive(value: object) -> None:
    with pytest.raises(ValidationError, match="greater than 0"):
        ListenerTimeoutsSpec(header=value)


# --- models and defaults --------------------------------------------------------------


def test_every_default() -> None:
    config = Config.model_validate(minimal())
    listener, pool = config.listeners[0], config.pools["web"]
    assert (config.workers, config.admin.bind, config.admin.token) == (1, "127.0.0.1:9901", None)
    assert listener.timeouts == ListenerTimeoutsSpec(header=10.0, idle=60.0, body=60.0)
    limits = LimitsSpec(max_header_size=65536, max_uri_size=8192, max_body_size=None)
    assert listener.limits == limits
    assert listener.routes[0].match == MatchSpec(host=None, path_prefix="/")
    assert (pool.balancer.name, pool.balancer.options, pool.max_idle_connections) == (
        "round_robin", {}, None)  # fmt: skip
    timeouts = PoolTimeoutsSpec(connect=3.0, response_header=30.0, idle=60.0, read=60.0)
    assert pool.timeouts == timeouts
    assert (pool.upstreams[0].weight, pool.upstreams[0].backup) == (1, False)


def _models(base: type[ConfigModel]) -> Iterator[type[ConfigModel]]:
    for model in base.__subclasses__():
        yield model
        yield from _models(model)


def test_config_models_follow_one_naming_rule() -> None:
    """Config models are ``*Spec``, except the root ``Config`` and the filters' and
    balancers' options (``*Options``), so no config model is named like a runtime class
    and none is imported under an alias."""
    options = {FilterOptions, *FILTER_OPTIONS.values(), *BALANCER_OPTIONS.values()}
    models = [m for m in _models(ConfigModel) if m.__module__.startswith("proxy.config.")]
    assert len(models) > 30
    for model in models:
        suffix = "Options" if model in options else "Spec"
        assert model is Config or model.__name__.endswith(suffix), model
    runtime = {
        node.name
        for path in (Path(proxy.__file__).parent).rglob("*.py")
        if "config" not in path.relative_to(Path(proxy.__file__).parent).parts[:1]
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef)
    }
    assert not runtime & {model.__name__ for model in models}


def test_models_are_frozen_and_forbid_unknown_keys() -> None:
    config = Config.model_validate(minimal())
    with pytest.raises(ValidationError, match="frozen"):
        config.workers = 2  # type: ignore[misc]
    with pytest.raises(ValidationError, match="Extra inputs"):
        AdminSpec(bind="127.0.0.1:1", tokn="x")  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("bind", "host", "port"),
    [("127.0.0.1:8080", "127.0.0.1", 8080), ("0.0.0.0:0", "0.0.0.0", 0),
     ("[::1]:8080", "::1", 8080), ("localhost:65535", "localhost", 65535)],
)  # fmt: skip
def test_listener_bind(bind: str, host: str, port: int) -> None:
    listener = ListenerSpec(name="a", bind=bind, routes=[{"pool": "p"}])
    assert (listener.host, listener.port) == (host, port)


@pytest.mark.parametrize("bind", ["8080", "host:", ":8080", "h:65536", "h:-1", "::1:80", "[zz]:80",
                                  "a b:80", "h:8o"])  # fmt: skip
def test_listener_bind_rejects(bind: str) -> None:
    with pytest.raises(ValidationError, match="bind"):
        ListenerSpec(name="a", bind=bind, routes=[{"pool": "p"}])


@pytest.mark.parametrize(
    ("url", "host", "port", "address"),
    [("http://127.0.0.1:9001", "127.0.0.1", 9001, "127.0.0.1:9001"),
     ("http://Example.COM", "example.com", 80, "example.com:80"),
     ("http://h:81/", "h", 81, "h:81"),
     ("http://[::1]:9001", "::1", 9001, "[::1]:9001"),
     ("https://Api.Example", "api.example", 443, "api.example:443"),
     ("https://10.0.0.1:8443", "10.0.0.1", 8443, "10.0.0.1:8443")],
)  # fmt: skip
def test_upstream_url(url: str, host: str, port: int, address: str) -> None:
    spec = UpstreamSpec(url=url)
    assert (spec.host, spec.port, spec.address) == (host, port, address)


@pytest.mark.parametrize(
    ("url", "message"),
    [("https://h:443/x", "https://host:port without a path"), ("http://h:1/api", "without a path"),
     ("ftp://h", "expected http://host:port"), ("h:9001", "expected http://host:port"),
     ("http://h:0", "1..65535"), ("http://h:99999", "invalid upstream url"),
     ("http://u:p@h:1", "just http://host:port"), ("http://h:1?x=1", "just http://host:port")],
)  # fmt: skip
def test_upstream_url_rejects(url: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        UpstreamSpec(url=url)


def test_match_host_and_prefix() -> None:
    assert MatchSpec(host="API.Example.com").host == "api.example.com"
    assert MatchSpec(host="*.example.com").host == "*.example.com"
    for host, message in [("a.com:80", "port"), ("a*.com", "invalid host"), ("", "invalid host")]:
        with pytest.raises(ValidationError, match=message):
            MatchSpec(host=host)
    with pytest.raises(ValidationError, match="must start with '/'"):
        MatchSpec(path_prefix="api/")


@pytest.mark.parametrize(("value", "workers"), [(1, 1), (8, 8), ("4", 4), ("auto", "auto")])
def test_workers(value: object, workers: object) -> None:
    assert Config.model_validate(minimal(workers=value)).workers == workers


@pytest.mark.parametrize("value", [0, -1, "many", True, 1.5])
def test_workers_rejects(value: object) -> None:
    with pytest.raises(ValidationError, match="or 'auto'"):
        Config.model_validate(minimal(workers=value))


def test_admin_empty_token_is_none() -> None:
    assert AdminSpec(token="").token is None
    assert AdminSpec(token="s3cret").token == "s3cret"


# --- balancer ---------------------------------------------------------------------------


def test_balancer_names_match_registry() -> None:
    assert set(BALANCER_NAMES) == set(proxy.balancing.REGISTRY)
    assert set(get_args(BalancerName)) == set(BALANCER_NAMES)


def test_balancer_string_and_dict_forms() -> None:
    upstreams = [{"url": "http://127.0.0.1:9001"}]
    named = PoolSpec.model_validate({"balancer": "round_robin", "upstreams": upstreams})
    assert named.balancer.name == "round_robin"
    spec = PoolSpec.model_validate(
        {"balancer": {"name": "consistent_hash", "key": "header:X-User"}, "upstreams": upstreams}
    ).balancer
    assert (spec.name, spec.options) == ("consistent_hash", {"key": "header:X-User"})
    again = {"balancer": spec.model_dump(), "upstreams": upstreams}
    dumped = PoolSpec.model_validate(again).balancer
    assert dumped == spec


def test_balancer_errors(tmp_path: Path) -> None:
    text = VALID.replace("  web:\n", "  web:\n    balancer: roundrobin\n")
    assert problems(tmp_path, text) == [
        "F:8: pools.web.balancer.name: unknown value 'roundrobin'; expected "
        + " or ".join(", ".join(repr(n) for n in get_args(BalancerName)).rsplit(", ", 1))
    ]
    text = VALID.replace("  web:\n", "  web:\n    balancer: {name: round_robin, foo: 1}\n")
    assert problems(tmp_path, text) == [
        "F:8: pools.web.balancer: balancer 'round_robin' takes no options, got 'foo'"
    ]


def test_retry_budget_old_reserve_key_is_refused_with_the_new_name(tmp_path: Path) -> None:
    text = VALID + "    retries:\n      budget: {percent: 20, min_retries: 3}\n"
    assert problems(tmp_path, text) == [
        "F:12: pools.web.retries.budget: 'min_retries' (a fixed reserve of retries) was "
        "replaced by 'min_retries_per_second' (a reserve that refills every second; "
        "default 10): rename the key"
    ]
    rate = VALID + "    retries:\n      budget: {min_retries_per_second: 2.5}\n"
    assert load(tmp_path, rate).pools["web"].retries.budget.min_retries_per_second == 2.5


@pytest.mark.parametrize(
    ("value", "version"),
    [("2", "2"), ("2.0", "2"), ('"2"', "2"), ("1.1", "1.1"), ("'1.1'", "1.1")],
)
def test_http_version_takes_yaml_numbers_and_strings(
    tmp_path: Path, value: str, version: str
) -> None:
    config = load(tmp_path, VALID + f"    http_version: {value}\n")
    assert config.pools["web"].http_version == version
    assert load(tmp_path, VALID).pools["web"].http_version == "1.1"  # the default


@pytest.mark.parametrize(
    ("value", "shown"), [("3", "'3'"), ('"2.0"', "'2.0'"), ("1.0", "'1.0'"), ("h2", "'h2'"),
                         ("true", "True")],
)  # fmt: skip
def test_http_version_refuses_anything_else_at_its_line(
    tmp_path: Path, value: str, shown: str
) -> None:
    assert problems(tmp_path, VALID + f"    http_version: {value}\n") == [
        f"F:11: pools.web.http_version: unknown value {shown}; expected '1.1' or '2'"
    ]


# --- loading: FILE:LINE errors ------------------------------------------------------------


def test_valid_file_loads(tmp_path: Path) -> None:
    config = load(tmp_path, VALID)
    assert [u.address for u in config.pools["web"].upstreams] == [
        "127.0.0.1:9001",
        "127.0.0.1:9002",
    ]
    assert parse_config(VALID) == config


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}: no such file"]


def test_file_is_named_as_passed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "x.yaml").write_text(VALID.replace("weight", "w").replace(":9002", ":9002/a"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config("x.yaml")
    assert info.value.problems[0].startswith("x.yaml:10: pools.web.upstreams[1].url: ")


def test_yaml_syntax_error(tmp_path: Path) -> None:
    found = problems(tmp_path, "listeners:\n  - name: a\n   bind: x\n")
    assert len(found) == 1
    assert found[0].startswith("F:3: YAML syntax error: ")
    assert problems(tmp_path, "a:\n\tb: 1\n")[0].startswith(
        "F:2: YAML syntax error: found character"
    )


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n", "~\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    assert problems(tmp_path, text) == ["F:1: the file is empty; expected 'listeners' and 'pools'"]


@pytest.mark.parametrize(
    ("text", "kind"), [("- a\n- b\n", "a list"), ("hello\n", "a single value")]
)
def test_top_level_not_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    assert problems(tmp_path, text) == [f"F:1: top level must be a mapping of sections, not {kind}"]


def test_upstream_weight_points_at_its_line(tmp_path: Path) -> None:
    text = VALID.replace('"http://127.0.0.1:9002"', '"http://127.0.0.1:9002"\n        weight: 0')
    assert problems(tmp_path, text) == ["F:11: pools.web.upstreams[1].weight: must be >= 1"]


def test_unknown_key_points_at_the_key(tmp_path: Path) -> None:
    text = VALID + "    helth_check: {}\n"
    assert problems(tmp_path, text) == ["F:11: pools.web.helth_check: unknown key 'helth_check'"]


def test_missing_key_points_at_the_parent_mapping(tmp_path: Path) -> None:
    text = VALID.replace("      - pool: web", "      - match: {path_prefix: /}")
    assert problems(tmp_path, text) == ["F:5: listeners[0].routes[0]: missing required key 'pool'"]
    assert problems(tmp_path, "\n# pools below\nlisteners: []\n") == [
        "F:3: listeners: must have at least 1 entry",
        "F:3: missing required key 'pools'",
    ]


def test_route_to_undefined_pool(tmp_path: Path) -> None:
    assert problems(tmp_path, VALID.replace("pool: web", "pool: api")) == [
        "F:5: listeners[0].routes[0].pool: pool 'api' is not defined (defined pools: web)"
    ]


LISTENER_2 = """\
  - name: {name}
    bind: "{bind}"
    routes: [{{pool: web}}]
"""


def two_listeners(name: str, bind: str, admin: str = "127.0.0.1:9901") -> str:
    first, pools = VALID.split("pools:\n")
    extra = LISTENER_2.format(name=name, bind=bind)
    return f'{first}{extra}pools:\n{pools}admin: {{bind: "{admin}"}}\n'


@pytest.mark.parametrize(
    ("bind", "used_by"),
    [("127.0.0.1:8080", "listeners[0]"), ("0.0.0.0:8080", "listeners[0]"),
     ("127.0.0.1:9901", "admin.bind")],
)  # fmt: skip
def test_duplicate_bind(tmp_path: Path, bind: str, used_by: str) -> None:
    assert problems(tmp_path, two_listeners("other", bind)) == [
        f"F:7: listeners[1].bind: bind address '{bind}' is already used by {used_by}"
    ]


@pytest.mark.parametrize("bind", ["127.0.0.1:8081", "127.0.0.2:8080", "[::1]:8080"])
def test_distinct_binds_are_fine(tmp_path: Path, bind: str) -> None:
    assert len(load(tmp_path, two_listeners("other", bind)).listeners) == 2


def test_port_zero_never_clashes() -> None:
    config = minimal(admin={"bind": "127.0.0.1:0"})
    config["listeners"] = [{**config["listeners"][0], "bind": "127.0.0.1:0"}] * 1
    config["listeners"].append({**config["listeners"][0], "name": "b"})
    assert len(Config.model_validate(config).listeners) == 2


def test_duplicate_listener_name(tmp_path: Path) -> None:
    assert problems(tmp_path, two_listeners("public", "127.0.0.1:8081")) == [
        "F:6: listeners[1].name: duplicate listener name 'public' (also listeners[0])"
    ]


def test_duplicate_upstream(tmp_path: Path) -> None:
    text = VALID.replace(":9002", ":9001/")
    assert problems(tmp_path, text) == [
        "F:10: pools.web.upstreams[1].url: duplicate upstream 'http://127.0.0.1:9001/' "
        "(also upstreams[0])"
    ]


def named_upstreams(first: str, second: str) -> str:
    """``VALID`` with ``name:`` on its two upstreams (lines 10 and 12)."""
    text = VALID.replace('9001"', f'9001"\n        name: {first}')
    return text.replace('9002"', f'9002"\n        name: {second}')


def test_duplicate_upstream_name(tmp_path: Path) -> None:
    assert problems(tmp_path, named_upstreams("app", "app")) == [
        "F:12: pools.web.upstreams[1].name: duplicate upstream name 'app' (also upstreams[0])"
    ]
    named = load(tmp_path, named_upstreams("app-1", "app-2"))
    assert [u.label for u in named.pools["web"].upstreams] == ["app-1", "app-2"]
    assert load(tmp_path, VALID).pools["web"].upstreams[0].label == "127.0.0.1:9001"


@pytest.mark.parametrize(
    ("fmt", "message"),
    [
        ("[status, nope]", "unknown access log field 'nope'; fields: time, client,"),
        ("[status, status]", "each access log field may be listed once"),
        ("'$client $nope'", "unknown access log field $nope; fields: time, client,"),
        ("'costs $5'", "'$' at 6 starts no field; write $$ for '$'"),
        ("[]", "must be a list of field names or a template string"),
    ],
)
def test_access_log_format_errors(tmp_path: Path, fmt: str, message: str) -> None:
    text = VALID + f"access_log:\n  path: stdout\n  format: {fmt}\n"
    found = problems(tmp_path, text)
    assert len(found) == 1 and found[0].startswith(f"F:13: access_log.format: {message}"), found


def test_access_log_format_forms(tmp_path: Path) -> None:
    text = VALID + "access_log:\n  format: [status, path]\n"
    assert load(tmp_path, text).access_log.format == ("status", "path")  # type: ignore[union-attr]
    template = VALID + "access_log:\n  format: '$$ $status'\n"
    assert load(tmp_path, template).access_log.format == "$$ $status"  # type: ignore[union-attr]


def test_every_access_log_field_has_a_value() -> None:
    """The config's field names and the formatter's table are one list, in one order."""
    assert tuple(log_format._FIELDS) == log_fields.FIELDS


def test_duplicate_yaml_key(tmp_path: Path) -> None:
    text = VALID.replace("routes:", "name: again\n    routes:")
    assert problems(tmp_path, text) == ["F:4: listeners[0].name: duplicate key 'name'"]


def test_all_problems_at_once(tmp_path: Path) -> None:
    text = (
        VALID.replace("pool: web", "pool: api")
        .replace('"127.0.0.1:8080"', "${BIND}")
        .replace('"http://127.0.0.1:9002"', '"http://127.0.0.1:9002"\n        weight: 0')
    ) + "    helth_check: {}\nworkers: none\n"
    assert problems(tmp_path, text) == [
        "F:3: listeners[0].bind: environment variable BIND is not set",
        "F:5: listeners[0].routes[0].pool: pool 'api' is not defined (defined pools: web)",
        "F:11: pools.web.upstreams[1].weight: must be >= 1",
        "F:12: pools.web.helth_check: unknown key 'helth_check'",
        "F:13: workers: must be an integer >= 1 or 'auto', got 'none'",
    ]


def test_invalid_values_read_well(tmp_path: Path) -> None:
    text = VALID + "    timeouts: {connect: 5x, read: 0}\n    max_idle_connections: lots\n"
    assert problems(tmp_path, text) == [
        "F:11: pools.web.timeouts.connect: invalid duration '5x'; use seconds or a string "
        "such as 250ms, 5s, 1.5s, 1m, 1h, 1m30s",
        "F:11: pools.web.timeouts.read: must be > 0",
        "F:12: pools.web.max_idle_connections: must be an integer",
    ]


def test_yaml_merge_keys_and_anchors(tmp_path: Path) -> None:
    text = VALID.replace("pools:\n", "x-fast: &fast {connect: 1s}\npools:\n")
    text += "    timeouts:\n      <<: *fast\n      read: 2s\n"
    assert problems(tmp_path, text) == ["F:6: x-fast: unknown key 'x-fast'"]
    config = load(tmp_path, text.replace("x-fast: &fast {connect: 1s}\n", "").replace(
        "<<: *fast", "<<: {connect: 1s}"))  # fmt: skip
    assert (config.pools["web"].timeouts.connect, config.pools["web"].timeouts.read) == (1.0, 2.0)


# --- ${VAR} expansion -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "env", "result", "missing"),
    [("${A}", {"A": "x"}, "x", []), ("${A}", {}, "", ["A"]), ("${A}", {"A": ""}, "", []),
     ("${A:-d}", {}, "d", []), ("${A:-d}", {"A": ""}, "d", []), ("${A:-d}", {"A": "x"}, "x", []),
     ("${A:-}", {}, "", []), ("http://${H}:${P:-80}/", {"H": "h"}, "http://h:80/", []),
     ("$${A} $5 $A", {"A": "x"}, "${A} $5 $A", []), ("${A}${B}", {}, "", ["A", "B"])],
)  # fmt: skip
def test_expand(text: str, env: dict[str, str], result: str, missing: list[str]) -> None:
    assert expand(text, env) == (result, missing)


def test_env_values_are_resolved_as_yaml(tmp_path: Path) -> None:
    text = VALID.replace(
        '"http://127.0.0.1:9002"', '"http://${HOST:-127.0.0.1}:9002"\n        weight: ${W:-2}'
    ).replace("  web:\n", "  web:\n    max_idle_connections: ${IDLE}\n")
    text += '        backup: ${B:-true}\nadmin: {token: "${T:-123}"}\nworkers: ${N:-auto}\n'
    config = load(tmp_path, text, env={"IDLE": "7"})
    pool = config.pools["web"]
    assert (pool.upstreams[1].weight, pool.upstreams[1].backup, pool.max_idle_connections) == (
        2, True, 7)  # fmt: skip
    assert (config.admin.token, config.workers) == ("123", "auto")
    assert load(tmp_path, text, env={"W": "5", "IDLE": "1"}).pools["web"].upstreams[1].weight == 5


def test_env_defaults_to_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIOLB_TEST_BIND", "127.0.0.1:8181")
    path = tmp_path / "c.yaml"
    path.write_text(VALID.replace('"127.0.0.1:8080"', "${AIOLB_TEST_BIND}"))
    assert load_config(path).listeners[0].bind == "127.0.0.1:8181"


def test_keys_are_not_expanded(tmp_path: Path) -> None:
    assert problems(tmp_path, VALID + "${K}: 1\n", env={"K": "admin"}) == [
        "F:11: ['${K}']: unknown key '${K}'"
    ]


# --- the example files ----------------------------------------------------------------------


def test_examples_exist() -> None:
    names = {path.name for path in EXAMPLES}
    assert {"aiolb.yaml", "routing.yaml", "backup.yaml", "limits.yaml", "env.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_example_loads_and_round_trips(path: Path) -> None:
    config = load_config(path, env={})
    assert Config.model_validate(config.model_dump()) == config


def test_default_example_shows_the_defaults() -> None:
    config = load_config(Path(__file__).parents[2] / "config" / "aiolb.yaml", env={})
    assert config == Config.model_validate(
        minimal(
            listeners=[{"name": "public", "bind": "127.0.0.1:8080", "routes": [{"pool": "web"}]}],
            pools={
                "web": {"upstreams": [{"url": f"http://127.0.0.1:{p}"} for p in (9001, 9002, 9003)]}
            },
        )
    )


def test_env_example_uses_the_environment() -> None:
    env = {"AIOLB_BIND": "0.0.0.0:9000", "AIOLB_ADMIN_TOKEN": "s3cret", "AIOLB_WORKERS": "3"}
    config = load_config(Path(__file__).parents[2] / "config" / "env.yaml", env=env)
    assert (config.listeners[0].bind, config.admin.token, config.workers) == (
        "0.0.0.0:9000", "s3cret", 3)  # fmt: skip


# --- TLS, redirects and Upgrade settings -------------------------------------------------------

TLS_LISTENER = VALID.replace(
    "    routes:\n", "    tls:\n      certificates: [{cert: a.pem, key: a.key}]\n    routes:\n"
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (VALID.replace("- pool: web", "- pool: web\n        upgrades: [websocket, h2c]"),
         "F:6: listeners[0].routes[0].upgrades: h2c upgrades are never forwarded (aiolb speaks "
         "HTTP/1.1 to upstreams); remove 'h2c'"),
        (VALID.replace("      - pool: web", "      - pool: web\n        upgrades: ['web socket']"),
         "F:6: listeners[0].routes[0].upgrades: invalid upgrade protocol 'web socket'; use a "
         "token such as websocket"),
        (VALID + "    tls: {ca: ca.pem}\n",
         "F:7: pools.web: tls applies to https:// upstreams; this pool has none"),
        (VALID.replace('http://127.0.0.1:9001"', 'https://127.0.0.1:9001"')
         + "    tls: {cert: c.pem}\n",
         "F:11: pools.web.tls: cert and key go together: set both or neither"),
        (TLS_LISTENER.replace("    routes:\n", "    redirect_https: true\n    routes:\n"),
         "F:6: listeners[0].redirect_https: redirect_https applies to plain-HTTP listeners; "
         "this one has tls"),
        (VALID.replace("    routes:\n      - pool: web\n", ""),
         "F:2: listeners[0]: missing required key 'routes'"),
        (VALID.replace("      - pool: web", "      - match: {path_prefix: /}\n"
                                            "        redirect_https: false"),
         "F:5: listeners[0].routes[0]: missing required key 'pool'"),
        (TLS_LISTENER.replace("TLSv1.2", "").replace("[{cert", "[{cert").replace(
            "certificates:", "min_version: TLSv1.1\n      certificates:"),
         "F:5: listeners[0].tls.min_version: unknown value 'TLSv1.1'; expected 'TLSv1.2' or "
         "'TLSv1.3'"),
    ],
)  # fmt: skip
def test_tls_redirect_and_upgrade_settings_are_checked(
    tmp_path: Path, text: str, expected: str
) -> None:
    assert problems(tmp_path, text) == [expected]


def test_redirect_routes_need_no_pool_and_upgrades_default_to_websocket(tmp_path: Path) -> None:
    config = load(tmp_path, VALID.replace("    routes:\n      - pool: web\n",
                                          "    redirect_https: 8443\n"))  # fmt: skip
    assert config.listeners[0].routes == [] and config.listeners[0].redirect_https == 8443
    route = load(tmp_path, VALID).listeners[0].routes[0]
    assert route.upgrades == ("websocket",) and route.redirect_https is None
    upstream = load(tmp_path, VALID.replace("http://127.0.0.1:9001", "https://a.test"))
    spec = upstream.pools["web"].upstreams[0]
    assert (spec.https, spec.address) == (True, "a.test:443")


# --- printing values back: durations and sizes ------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.25, "250ms"), (0.025, "25ms"), (30.0, "30s"), (300.0, "5m"), (3600.0, "1h"),
     (1.5, "1.5s"), (0.0, "0s"), (90.0, "90s"), (0.0125, "0.0125s"), (1e-05, "0.00001s")],
)  # fmt: skip
def test_format_duration_reads_back(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text and parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("size", "text"), [(65536, "64KiB"), (8192, "8KiB"), (1 << 20, "1MiB"), (3 << 30, "3GiB"),
                       (1000, 1000), (0, 0)],
)  # fmt: skip
def test_format_size_reads_back(size: int, text: str | int) -> None:
    assert format_size(size) == text and parse_size(text) == size


# --- what a reload changes ---------------------------------------------------------------


def test_describe_changes() -> None:
    old = Config.model_validate(minimal(
        pools={"web": {"upstreams": [{"url": "http://127.0.0.1:9001"},
                                     {"url": "http://127.0.0.1:9002"}]},
               "old": {"upstreams": [{"url": "http://127.0.0.1:9009"}]}},
        listeners=[{"name": "a", "bind": "127.0.0.1:8080", "routes": [{"pool": "web"}]},
                   {"name": "gone", "bind": "127.0.0.1:8081", "routes": [{"pool": "old"}]}],
    ))  # fmt: skip
    assert describe_changes(old, old) == []
    new = Config.model_validate(minimal(
        pools={"web": {"upstreams": [{"url": "http://127.0.0.1:9001", "weight": 3},
                                     {"url": "http://127.0.0.1:9003"}],
                       "retries": {"attempts": 3}},
               "api": {"upstreams": [{"url": "http://127.0.0.1:9100"}]}},
        listeners=[{"name": "a", "bind": "127.0.0.1:8090", "routes": [{"pool": "api"}]},
                   {"name": "b", "bind": "127.0.0.1:8091", "routes": [{"pool": "web"}]}],
        workers=2,
    ))  # fmt: skip
    assert describe_changes(old, new) == [
        "listener a: bind 127.0.0.1:8080 -> 127.0.0.1:8090, routes changed",
        "listener b added (127.0.0.1:8091)",
        "listener gone removed",
        "pool web: upstream 127.0.0.1:9003 added, upstream 127.0.0.1:9002 removed, "
        "upstream 127.0.0.1:9001 changed, retries changed",
        "pool api added (1 upstream)",
        "pool old removed",
        "workers changed",
    ]
