"""Filters without sockets: the registry and the config's names, every bad option as
``FILE:LINE: key: message``, the token bucket arithmetic of both tables, the views'
rules, and what ``check --print`` writes back."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml

import proxy.filters
from proxy.config import ConfigError, parse_config
from proxy.config.filter_values import Rate, parse_rate
from proxy.config.filters import FILTER_NAMES, FILTER_OPTIONS, FilterSpec
from proxy.config.schema import effective
from proxy.filters.base import Filter, Headers, LocalResponse, Response, implements
from proxy.filters.buckets import LocalBuckets, SharedBuckets, take
from proxy.http.headers import FRAMING_HEADERS, MANAGED_REQUEST_HEADERS
from tests.support import aiolb_cli

BASE = """listeners:
  - name: public
    bind: "127.0.0.1:0"
    routes:
      - pool: web
        filters:
{filters}
pools:
  web:
    upstreams: [{{url: "http://127.0.0.1:9001"}}]
"""


def problems(filters: str, env: dict[str, str] | None = None) -> list[str]:
    try:
        parse_config(BASE.format(filters=filters), "aiolb.yaml", env or {})
    except ConfigError as exc:
        return exc.problems
    return []


def test_the_registry_and_the_configs_filter_names_are_one_set() -> None:
    tags = {get_args(member)[1].tag for member in get_args(get_args(FilterSpec)[0])}
    assert set(proxy.filters.REGISTRY) == set(FILTER_NAMES) == set(FILTER_OPTIONS) == tags
    assert len(FILTER_NAMES) == 8


AT = "aiolb.yaml:{line}: listeners[0].routes[0].filters[0]"


@pytest.mark.parametrize(
    ("filters", "line", "key", "message"),
    [
        ("          - ratelimit: {rate: 1/s}", 7, "", "unknown filter 'ratelimit'; filters: "
         "'rate_limit', 'headers', 'rewrite', 'redirect', 'sticky', 'access', 'compress', "
         "'python'"),
        ("          - 42", 7, "", "a filter is a name or a mapping such as"),
        ("          - {sticky: {}, access: {allow: [1.2.3.4]}}", 7, ".sticky",
         "one filter per list item, found sticky, access: list each apart"),
        ("          - rate_limit: {burst: 5}", 7, ".rate_limit", "missing required key 'rate'"),
        ("          - rate_limit:\n              rate: 10/fortnight", 8, ".rate_limit.rate",
         "invalid rate '10/fortnight'; use requests per period such as 100/s"),
        ("          - rate_limit: {rate: 0/s}", 7, ".rate_limit.rate",
         "count and period must be > 0"),
        ("          - rate_limit:\n              rate: 1/s\n              burst: 0", 9,
         ".rate_limit.burst", "must be >= 1"),
        ("          - rate_limit: {rate: 1/s, key: ip}", 7, ".rate_limit.key",
         "'ip' is not a key; use one of header:NAME, cookie:NAME, query:NAME, path, "
         "client_ip, route"),
        ("          - rate_limit: {rate: 1/s, key: 'header:'}", 7, ".rate_limit.key",
         "is not a key"),
        ("          - rate_limit: {rate: 1/s, name: 'a b'}", 7, ".rate_limit.name",
         "invalid name 'a b'"),
        ("          - rate_limit: {rate: 1/s, store: redis}", 7, ".rate_limit.store",
         "the redis store needs a url"),
        ("          - rate_limit: {rate: 1/s, store: {type: redis, url: 'http://x'}}", 7,
         ".rate_limit.store", "url must start with redis://, rediss:// or unix://"),
        ("          - rate_limit: {rate: 1/s, store: {type: memory, url: 'redis://x'}}", 7,
         ".rate_limit.store", "the memory store takes no url"),
        ("          - rate_limit: {rate: 1/s, store: {type: mem}}", 7,
         ".rate_limit.store.type", "unknown value 'mem'"),
        ("          - rate_limit:\n              rate: 1/s\n              store:\n"
         "                type: redis\n                url: redis://x\n"
         "                timeout: 0s", 12, ".rate_limit.store.timeout", "must be > 0"),
        ("          - rate_limit: {rate: 1/s, surge: 3}", 7, ".rate_limit.surge",
         "unknown key 'surge'"),
        ("          - headers: {request: {set: {'X A': v}}}", 7, ".headers.request.set",
         "invalid header name 'X A'"),
        ("          - headers: {request: {set: {X-A: '${nope}'}}}", 7,
         ".headers.request.set.X-A", "environment variable nope is not set"),
        ("          - headers: {response: {add: {X-A: \"a\\nb\"}}}", 7,
         ".headers.response.add", "holds a control character"),
        ("          - headers: {request: {remove: [X-Forwarded-For]}}", 7, ".headers",
         "request header 'X-Forwarded-For' is aiolb's to write"),
        ("          - headers: {response: {set: {Content-Length: '1'}}}", 7, ".headers",
         "response header 'Content-Length' is aiolb's to write"),
        ("          - headers: {request: {remove: [Host]}}", 7, ".headers",
         "the Host header may be set, not added or removed"),
        ("          - headers: {request: {delete: [a]}}", 7, ".headers.request.delete",
         "unknown key 'delete'"),
        ("          - rewrite: {}", 7, ".rewrite", "use exactly one of strip_prefix, "
         "replace_prefix, path"),
        ("          - rewrite: {strip_prefix: api}", 7, ".rewrite.strip_prefix",
         "must be a path starting with '/'"),
        ("          - rewrite: {strip_prefix: /a, path: {from: a, to: b}}", 7, ".rewrite",
         "use exactly one of"),
        ("          - rewrite: {replace_prefix: {from: /a}}", 7, ".rewrite.replace_prefix",
         "missing required key 'to'"),
        ("          - rewrite: {path: {from: '(', to: b}}", 7, ".rewrite.path",
         "invalid regular expression '('"),
        ("          - rewrite: {path: {from: '/(a)', to: '/\\\\2'}}", 7, ".rewrite.path",
         "refers to group 2"),
        ("          - rewrite: {path: {from: '/(a)', to: '/\\\\g<x>'}}", 7, ".rewrite.path",
         "refers to group 'x'"),
        ("          - redirect: {}", 7, ".redirect",
         "give either to or some of scheme, host, port, path"),
        ("          - redirect: {to: /a, scheme: https}", 7, ".redirect", "give either to"),
        ("          - redirect: {to: 'ftp://x'}", 7, ".redirect",
         "to must be an http(s) URL or a path"),
        ("          - redirect: {status: 303, to: /a}", 7, ".redirect.status",
         "unknown value 303; expected 301, 302, 307 or 308"),
        ("          - redirect: {scheme: gopher}", 7, ".redirect.scheme", "unknown value"),
        ("          - redirect: {port: 70000}", 7, ".redirect.port", "must be <= 65535"),
        ("          - redirect: {path: nowhere}", 7, ".redirect", "must be a path starting"),
        ("          - sticky: {same_site: none}", 7, ".sticky",
         "same_site: none needs secure: true"),
        ("          - sticky: {max_age: 0s}", 7, ".sticky.max_age", "must be > 0"),
        ("          - sticky: {cookie: 'a;b'}", 7, ".sticky.cookie", "invalid header name"),
        ("          - sticky: {http_only: maybe}", 7, ".sticky.http_only",
         "must be true or false"),
        ("          - access: {}", 7, ".access", "give allow, deny or both"),
        ("          - access: {allow: [10.0.0.0/33]}", 7, ".access.allow[0]",
         "invalid address range '10.0.0.0/33'"),
        ("          - access: {deny: [everyone]}", 7, ".access.deny[0]",
         "invalid address range 'everyone'"),
        ("          - access: {allow: ['::1'], trusted_proxies: [proxy]}", 7,
         ".access.trusted_proxies[0]", "invalid address range 'proxy'"),
        ("          - python: no-colon", 7, ".python", "'no-colon' is not module:Class"),
        ("          - python: a:B\n            options: [1]", 8, ".options", "must be a mapping"),
        ("          - python: a:B\n            optoins: {}", 8, ".optoins",
         "unknown key 'optoins'"),
    ],
)  # fmt: skip
def test_every_bad_option_is_a_file_line_key_message(
    filters: str, line: int, key: str, message: str
) -> None:
    found = problems(filters)
    prefix = AT.format(line=line) + key + ": "
    assert len(found) == 1 and found[0].startswith(prefix) and message in found[0], found


def test_two_rate_limits_on_a_route_need_two_names_and_routes_one_name_each() -> None:
    found = problems("          - rate_limit: {rate: 1/s}\n          - rate_limit: {rate: 5/s}")
    assert found == ["aiolb.yaml:5: listeners[0].routes[0]: two rate_limit filters named "
                     "'rate_limit': give each its own name (the filter label)"]  # fmt: skip
    text = BASE.format(filters="          - sticky").replace(
        "      - pool: web\n", "      - name: api\n        pool: web\n", 1
    ) + "  other: {upstreams: [{url: 'http://127.0.0.1:9002'}]}\n"
    text = text.replace("pools:", "      - name: api\n        pool: web\npools:")
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "aiolb.yaml", {})
    assert caught.value.problems == ["aiolb.yaml:9: listeners[0].routes[1].name: duplicate "
                                     "route name 'api' (also listeners[0].routes[0])"]  # fmt: skip


def test_the_redis_store_without_redis_py_says_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "redis" else real(name, *a))  # fmt: skip
    found = problems("          - rate_limit: {rate: 1/s, store: {type: redis, url: 'redis://x'}}")
    assert found == [AT.format(line=7) + ".rate_limit.store: the redis store needs the redis "
                     "package: pip install 'aiolb[redis]'"]  # fmt: skip


def test_request_variables_are_left_for_the_filters_and_others_come_from_the_environment() -> None:
    filters = ("          - headers: {request: {set: {X-A: '${client_ip}/${API_KEY}/$${host}',"
               " X-B: '${request_id}${host}'}}}")  # fmt: skip
    config = parse_config(BASE.format(filters=filters), "aiolb.yaml", {"API_KEY": "k1"})
    changes = config.listeners[0].routes[0].filters[0].request  # type: ignore[union-attr]
    assert changes.set == {"X-A": "${client_ip}/k1/$${host}", "X-B": "${request_id}${host}"}
    # outside filters, ${client_ip} is an environment variable as before
    with pytest.raises(ConfigError, match="environment variable client_ip is not set"):
        parse_config(BASE.format(filters="          - sticky").replace(
            "name: public", "name: '${client_ip}'"), "aiolb.yaml", {})  # fmt: skip


def test_check_print_writes_the_filters_back_as_the_yaml_has_them(tmp_path: Path) -> None:
    filters = """          - rate_limit: {rate: 600/m, key: "header:X-User", store: {type: redis, url: "redis://h:1/0"}}
          - sticky: {max_age: 1h}
          - rewrite: {replace_prefix: {from: /v1, to: /api}}
          - sticky
          - python: tests.filter_support:Stamp
            options: {async: true}"""  # noqa: E501
    config = parse_config(BASE.format(filters=filters), "aiolb.yaml", {})
    shown = effective(config)["listeners"][0]["routes"][0]["filters"]
    assert shown[0] == {"rate_limit": {
        "rate": "600/m", "burst": None, "key": "header:X-User", "name": "rate_limit",
        "store": {"type": "redis", "url": "redis://h:1/0", "fail_open": True,
                  "timeout": "100ms", "prefix": "aiolb:"}}}  # fmt: skip
    assert shown[1]["sticky"]["max_age"] == "1h" and shown[3]["sticky"]["cookie"] == "aiolb_sticky"
    assert shown[2] == {"rewrite": {"strip_prefix": None, "path": None,
                                    "replace_prefix": {"from": "/v1", "to": "/api"}}}  # fmt: skip
    assert shown[4] == {"python": "tests.filter_support:Stamp", "options": {"async": True}}
    path = tmp_path / "aiolb.yaml"
    path.write_text(BASE.format(filters=filters))
    printed = aiolb_cli("check", "-c", str(path), "--print")
    assert printed.returncode == 0, printed.stderr
    assert parse_config(printed.stdout, "printed.yaml", {}) == config
    assert yaml.safe_load(printed.stdout)["listeners"][0]["routes"][0]["name"] is None


def test_check_and_run_refuse_bad_filters_with_the_same_lines(tmp_path: Path) -> None:
    path = tmp_path / "aiolb.yaml"
    path.write_text(BASE.format(filters="          - rate_limit: {rate: 1/s, burst: -1}\n"
                                "          - python: tests.filter_support:NotAFilter"))
    expected = [
        f"{path}:7: listeners[0].routes[0].filters[0].rate_limit.burst: must be >= 1",
    ]
    check, run = aiolb_cli("check", "-c", str(path)), aiolb_cli("run", "-c", str(path))
    for done in (check, run):
        assert done.returncode == 2 and done.stderr.splitlines() == expected, done.stderr
    path.write_text(BASE.format(filters="          - python: tests.filter_support:NotAFilter"))
    expected = [f"{path}:7: listeners[0].routes[0].filters[0].python: tests.filter_support:"
                "NotAFilter is not a subclass of proxy.filters.Filter"]  # fmt: skip
    for command in ("check", "run"):
        done = aiolb_cli(command, "-c", str(path))
        assert done.returncode == 2 and done.stderr.splitlines() == expected, done.stderr


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tests.nothere:X", "cannot import tests.nothere: ModuleNotFoundError: No module named "
         "'tests.nothere'"),
        ("tests.filter_support:Nope", "module tests.filter_support has no Nope"),
        ("tests.filter_support:Greeting\n            options: {greeting: explode}",
         "tests.filter_support:Greeting(options) failed: ValueError: cannot greet like that"),
    ],
)  # fmt: skip
def test_python_filters_are_imported_and_built_by_the_preflight(
    tmp_path: Path, spec: str, message: str
) -> None:
    path = tmp_path / "aiolb.yaml"
    path.write_text(BASE.format(filters=f"          - python: {spec}"))
    done = aiolb_cli("check", "-c", str(path))
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"{path}:7: listeners[0].routes[0].filters[0].python: "
                                        f"{message}"]  # fmt: skip


def test_python_filter_options_are_validated_by_its_options_model(tmp_path: Path) -> None:
    path = tmp_path / "aiolb.yaml"
    path.write_text(BASE.format(filters="          - python: tests.filter_support:Greeting\n"
                                "            options:\n              times: many"))
    done = aiolb_cli("check", "-c", str(path))
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"{path}:8: listeners[0].routes[0].filters[0].options: missing required key 'greeting'",
        f"{path}:9: listeners[0].routes[0].filters[0].options.times: must be an integer",
    ]


def test_a_filter_module_next_to_the_config_is_found(tmp_path: Path) -> None:
    (tmp_path / "beside.py").write_text(
        "from proxy.filters import Filter\n\nclass Mine(Filter):\n    pass\n"
    )
    path = tmp_path / "aiolb.yaml"
    path.write_text(BASE.format(filters="          - python: beside:Mine"))
    done = aiolb_cli("check", "-c", str(path))
    assert done.returncode == 0, done.stderr


# --- the bucket arithmetic ---------------------------------------------------------------


def test_take_refills_at_the_rate_up_to_the_size_and_never_goes_back_in_time() -> None:
    assert take(0.0, 10.0, 10.5, 4.0, 5.0) == (1.0, 1.0, 10.5)  # 2 tokens earned, 1 taken
    assert take(0.0, 10.0, 100.0, 4.0, 5.0) == (4.0, 4.0, 100.0)  # capped at the size
    assert take(0.5, 10.0, 10.0, 4.0, 5.0) == (-0.5, 0.5, 10.0)  # refused: 1/8 s to go
    # a clock read before the bucket's stamp (another worker) earns nothing, keeps the stamp
    assert take(2.0, 10.0, 9.0, 4.0, 5.0) == (1.0, 1.0, 10.0)


@pytest.mark.parametrize("table", [LocalBuckets, SharedBuckets])
def test_both_tables_decide_alike(table: type[Any]) -> None:
    buckets = table()
    decisions = [buckets.take(b"k", 2.0, 3.0, t) >= 0 for t in (0, 0, 0, 0, 0.25, 0.5, 1.0)]
    assert decisions == [True, True, True, False, False, True, True]
    assert buckets.take(b"other", 2.0, 3.0, 1.0) == 2.0  # its own bucket, full


def test_the_local_table_forgets_full_buckets_first() -> None:
    buckets = LocalBuckets(limit=4)
    for key in (b"a", b"b", b"c"):
        buckets.take(key, 1.0, 2.0, 0.0)
    buckets.take(b"busy", 1.0, 2.0, 10.0)
    buckets.take(b"busy", 1.0, 2.0, 10.0)  # empty now
    buckets.take(b"new", 1.0, 2.0, 10.0)  # full table: a, b, c are full again by now
    assert len(buckets) == 2 and buckets.take(b"busy", 1.0, 2.0, 10.0) < 0


def test_the_shared_table_is_shared_through_its_file_descriptor() -> None:
    first = SharedBuckets(slots=64)
    second = SharedBuckets(first.fd)  # as a worker attaches it
    assert [first.take(b"k", 1.0, 2.0, 0.0), second.take(b"k", 1.0, 2.0, 0.0)] == [1.0, 0.0]
    assert first.take(b"k", 1.0, 2.0, 0.0) < 0
    for i in range(200):  # more keys than slots: the table gives way, never fails
        first.take(b"key-%d" % i, 1.0, 1.0, 1.0)
    assert first.forced > 0
    second.close()
    first.close()


# --- rates, views ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rate", "shown"),
    [("100/s", Rate(100, 1), "100/s"), ("600/m", Rate(600, 60), "600/m"),
     ("5/10s", Rate(5, 10), "5/10s"), ("10r/s", Rate(10, 1), "10/s"),
     ("1000/h", Rate(1000, 3600), "1000/h"), ("0.5/s", Rate(0.5, 1), "0.5/s")],
)  # fmt: skip
def test_rates_read_and_print(text: str, rate: Rate, shown: str) -> None:
    assert parse_rate(text) == rate and str(rate) == shown and parse_rate(str(rate)) == rate


def test_request_headers_refuse_what_the_proxy_writes() -> None:
    parts = [b"Host", b": ", b"a", b"\r\n", b"X-A", b": ", b"1", b"\r\n", b"x-a", b": ", b"2",
             b"\r\n"]  # fmt: skip
    headers = Headers(parts, FRAMING_HEADERS | MANAGED_REQUEST_HEADERS, "request")
    assert headers.get("x-A") == "1" and headers.get_all("X-A") == ["1", "2"]
    headers.set("X-A", "3")
    assert headers.items() == [("Host", "a"), ("X-A", "3")]
    headers.set("Host", "b")
    headers.add("X-B", "4")
    headers.remove("x-b")
    assert headers.items() == [("Host", "b"), ("X-A", "3")] and "host" in headers
    for name in ("Content-Length", "Connection", "X-Request-ID", "X-Forwarded-For", "Via"):
        with pytest.raises(ValueError, match="aiolb's to write"):
            headers.set(name, "x")
    with pytest.raises(ValueError, match="Host may be set"):
        headers.remove("Host")
    with pytest.raises(ValueError, match="invalid header value"):
        headers.set("X-A", "a\r\nInjected: 1")
    with pytest.raises(ValueError, match="invalid header name"):
        headers.set("X A", "1")


def test_a_response_view_makes_a_new_head_and_keeps_the_framing() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: 1\r\n"
    response = Response(head)
    assert response.head() is head  # untouched: the very same bytes
    response.headers.set("X-A", "2")
    response.status = 201
    assert response.head() == b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nX-A: 2\r\n"
    with pytest.raises(ValueError, match="aiolb's to write"):
        response.headers.remove("Content-Length")
    for status in (204, 304, 100, 600):
        with pytest.raises(ValueError, match="cannot change status"):
            response.status = status
    with pytest.raises(ValueError, match="cannot change status 304"):
        Response(b"HTTP/1.1 304 Not Modified\r\n").status = 200


def test_local_responses_and_which_hooks_a_filter_has() -> None:
    answer = LocalResponse(403, {"X-Why": "rules"}, "no\n")
    data = answer.render(close=True, head_only=False)
    assert data == (
        b"HTTP/1.1 403 Forbidden\r\nX-Why: rules\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 3\r\nConnection: close\r\n\r\nno\n"
    )
    assert answer.render(close=False, head_only=True).endswith(b"Content-Length: 3\r\n\r\n")
    for bad in (99, 600, "200"):
        with pytest.raises(ValueError, match="status is 200-599"):
            LocalResponse(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="aiolb's to write"):
        LocalResponse(200, {"Content-Length": "5"})

    class Half(Filter):
        def request_filter(self, request: Any) -> None:
            return None

    assert implements(Half(), "request_filter") and not implements(Half(), "response_filter")
    off = Half()
    off.request_filter = None  # type: ignore[assignment]
    assert not implements(off, "request_filter")
