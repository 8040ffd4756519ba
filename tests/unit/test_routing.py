"""Route matching, traffic splits and their config, without sockets (issue #28, part 3)."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest

from proxy.config import ConfigError, load_config
from proxy.config.routing import QUADRATIC_LIMIT, safe_regex
from proxy.forwarding.matching import Conditions, Facts, parse_query
from proxy.forwarding.router import Router
from proxy.forwarding.traffic import Split


class Req:
    """What the conditions read of a request."""

    def __init__(self, method: bytes = b"GET", headers: list[tuple[bytes, bytes]] | None = None,
                 client_ip: str = "127.0.0.1", target: bytes = b"/") -> None:  # fmt: skip
        self.method = method
        self.headers = headers or []
        self.client_ip = client_ip
        self.target = target

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n.lower() == name:
                return v
        return None


def facts(target: bytes, method: bytes = b"GET", **headers: str) -> Facts:
    raw = [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    return Facts(Req(method, raw), target)


# --- conditions ------------------------------------------------------------------------


def test_methods_and_exact_path() -> None:
    c = Conditions(methods=["GET", "HEAD"], path="/exact")
    assert c.matches(facts(b"/exact"))
    assert c.matches(facts(b"/exact?x=1", b"HEAD"))
    assert not c.matches(facts(b"/exact", b"POST"))
    assert not c.matches(facts(b"/exact/more"))


def test_header_exact_regex_present_and_absent() -> None:
    exact = Conditions(headers={"X-Canary": "1"})
    assert exact.matches(facts(b"/", X_Canary="1"))
    assert exact.matches(Facts(Req(headers=[(b"x-canary", b"1")]), b"/"))  # h2: lower case
    assert not exact.matches(facts(b"/", X_Canary="10"))
    assert not exact.matches(facts(b"/"))
    regex = Conditions(headers={"User-Agent": ("regex", "^curl/8\\.")})
    assert regex.matches(facts(b"/", User_Agent="curl/8.5.0"))
    assert not regex.matches(facts(b"/", User_Agent="Mozilla curl/8."))
    assert not regex.matches(facts(b"/"))
    present = Conditions(headers={"Authorization": ("present", True)})
    absent = Conditions(headers={"Authorization": ("present", False)})
    assert present.matches(facts(b"/", Authorization=""))
    assert not absent.matches(facts(b"/", Authorization="x"))
    assert absent.matches(facts(b"/"))


def test_repeated_header_lines_are_one_value() -> None:
    c = Conditions(headers={"X-A": "1, 2"})
    assert c.matches(Facts(Req(headers=[(b"X-A", b"1"), (b"x-a", b"2")]), b"/"))


def test_query_decoding_repeats_and_invalid_escapes() -> None:
    assert parse_query(b"a=1&b=%41%2b&c=x+y&a=2") == {b"a": b"1", b"b": b"A+", b"c": b"x y"}
    assert parse_query(b"bad=%zz&ok=1&bad2=%4") == {b"ok": b"1"}
    assert parse_query(b"&&flag&=v") == {b"flag": b"", b"": b"v"}
    c = Conditions(query={"debug": "1"})
    assert c.matches(facts(b"/p?x=2&debug=1"))
    assert c.matches(facts(b"/p?debug=%31"))
    assert c.matches(facts(b"/p?debug=1&debug=0"))  # the first occurrence counts
    assert not c.matches(facts(b"/p?debug=0&debug=1"))
    assert not c.matches(facts(b"/p?debug=%3"))  # invalid: absent
    assert not c.matches(facts(b"/p"))


def test_path_regex_is_searched_in_the_path_only() -> None:
    c = Conditions(path_regex="^/api/v[0-9]+/")
    assert c.matches(facts(b"/api/v2/users?q=/api/v1/"))
    assert not c.matches(facts(b"/x?/api/v1/"))


def test_checks_run_cheapest_first() -> None:
    c = Conditions(methods=["GET"], headers={"X": ("regex", "y")}, path_regex="z")
    assert repr(c) == "<Conditions [methods, header X, path_regex]>"
    asked: list[str] = []

    class Counting(Facts):
        def headers(self) -> dict[bytes, bytes]:
            asked.append("headers")
            return super().headers()

    assert not c.matches(Counting(Req(b"POST", [(b"X", b"y")]), b"/z"))
    assert asked == []  # the method failed: no header map was built
    assert not c.matches(Counting(Req(b"GET", [(b"X", b"y")]), b"/a"))
    assert asked == []  # the path regex runs before the header regex
    assert c.matches(Counting(Req(b"GET", [(b"X", b"y")]), b"/z"))
    assert asked == ["headers"]


# --- the router ---------------------------------------------------------------------------


def test_first_match_wins_with_conditions_and_plain_routes() -> None:
    router = Router(
        [(None, "/", "canary"), ("api.example.com", "/", "api"), (None, "/", "web")],
        [Conditions(headers={"X-Canary": "1"}), None, None],
    )
    assert router.route(b"x", b"/", Req(headers=[(b"X-Canary", b"1")])) == "canary"
    assert router.route(b"api.example.com", b"/", Req()) == "api"
    assert router.route(b"x", b"/", Req()) == "web"
    assert router.route(b"x", b"/", None) == "web"  # nothing to check conditions against


def test_a_plain_router_keeps_its_catch_all_shortcut() -> None:
    plain = Router([(None, "/", "web")])
    assert plain._only == "web"
    rich = Router([(None, "/", "get")], [Conditions(methods=["GET"])])
    assert rich._only is None
    assert rich.route(None, b"/", Req(b"POST")) is None


def test_pathological_regexes_are_refused_and_safe_ones_do_not_hang() -> None:
    for bad in ("(a+)+$", "(a*)*b", "(x|xy)*z", "(\\w)\\1", "((ab)*)+"):
        with pytest.raises(ValueError, match="refused"):
            safe_regex(bad)
    with pytest.raises(ValueError, match="invalid regex"):
        safe_regex("(")
    for cubic in ("a.*b.*c", "[a-z]+[0-9a-z]+!", "^a+b+c+"):  # polynomial, degree 3
        with pytest.raises(ValueError, match="polynomial time"):
            safe_regex(cubic)
    assert safe_regex("^a.*b.*c") and safe_regex("a.*b") and safe_regex("^/api/v[0-9]+/")
    # a quadratic pattern is tried on values up to QUADRATIC_LIMIT: a few ms at worst
    quadratic = Conditions(headers={"X": ("regex", "a.*b")})
    for size in (QUADRATIC_LIMIT, 60000):
        started = time.perf_counter()
        assert not quadratic.matches(facts(b"/", X="a" * size))
        assert time.perf_counter() - started < 0.1
    assert quadratic.matches(facts(b"/", X="xaxb"))
    assert not quadratic.matches(facts(b"/", X="a" * QUADRATIC_LIMIT + "b"))  # too long
    c = Conditions(headers={"X": ("regex", "^a.*b$")}, path_regex="^/(?:seg/)+end$")
    hostile = facts(b"/" + b"seg/" * 2000 + b"nope", X="a" * 60000 + "c")
    started = time.perf_counter()
    assert not c.matches(hostile)
    assert time.perf_counter() - started < 0.5


# --- splits ------------------------------------------------------------------------------


class P:
    def __init__(self, name: str) -> None:
        self.name = name


def test_smooth_weighted_split_is_exact_and_spread() -> None:
    a, b = P("stable"), P("canary")
    split = Split([a, b], [95, 5])  # type: ignore[list-item]
    picks = [split.choose(Req()).name for _ in range(10_000)]  # type: ignore[attr-defined]
    assert picks.count("canary") == 500  # the issue asks for ±2% over 10,000: exact
    assert (
        max(len(run) for run in "".join("x" if p == "stable" else "|" for p in picks).split("|"))
        <= 20
    )
    zero = Split([a, b], [1, 0])  # type: ignore[list-item]
    assert {zero.choose(Req()).name for _ in range(10)} == {"stable"}  # type: ignore[attr-defined]


def test_sticky_split_keeps_a_key_on_its_pool_and_keeps_the_shares() -> None:
    from proxy.balancing.consistent_hash import key_reader

    a, b = P("a"), P("b")
    split = Split([a, b], [50, 50], key_reader("header:X-User"))  # type: ignore[list-item]
    users = [Req(headers=[(b"X-User", f"u{i}".encode())]) for i in range(2000)]
    first = [split.choose(u) for u in users]
    assert [split.choose(u) for u in users] == first
    share = sum(1 for p in first if p is a) / len(first)
    assert 0.4 < share < 0.6
    keyless = [split.choose(Req()) for _ in range(10)]
    assert keyless.count(a) == 5  # no key: the round robin


# --- config ------------------------------------------------------------------------------

BASE = """\
listeners:
  - name: l
    bind: "127.0.0.1:0"
    routes:
{routes}
pools:
  stable: {{upstreams: [{{url: "http://127.0.0.1:9001"}}]}}
  canary: {{upstreams: [{{url: "http://127.0.0.1:9002"}}]}}
"""


def problems(tmp_path: Path, routes: str) -> list[str]:
    path = tmp_path / "c.yaml"
    path.write_text(BASE.format(routes=textwrap.indent(textwrap.dedent(routes), "      ")))
    with pytest.raises(ConfigError) as info:
        load_config(str(path), env={})
    return [p.replace(str(path), "F", 1) for p in info.value.problems]


def test_the_contract_example_loads(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    routes = """\
    - match:
        methods: [get, HEAD]
        headers: {X-Canary: "1", X-B: {regex: "^b"}, X-C: {present: false}}
      pool: canary
    - match: {path_regex: "^/api/v[0-9]+/", query: {debug: 1}, path: /api/v1/x}
      pools: [{pool: stable, weight: 95}, {pool: canary, weight: 5}]
      sticky: cookie:canary
      mirror: {pool: canary, fraction: 0.1}
"""
    path.write_text(BASE.format(routes=textwrap.indent(routes, "  ")))
    config = load_config(str(path), env={})
    first, second = config.listeners[0].routes
    assert first.match.methods == ["GET", "HEAD"]
    assert first.match.headers["X-B"].regex == "^b"  # type: ignore[union-attr]
    assert second.pool_names() == ["stable", "canary"]
    assert second.match.query == {"debug": "1"}  # a YAML number is its text
    assert second.mirror is not None and second.mirror.max_in_flight == 100


@pytest.mark.parametrize(
    ("routes", "expected"),
    [
        ('- match: {path_regex: "(a+)+$"}\n  pool: stable\n',
         "F:5: listeners[0].routes[0].match.path_regex: regex '(a+)+$' is refused"),
        ('- match: {headers: {X: {regex: "["}}}\n  pool: stable\n',
         "F:5: listeners[0].routes[0].match.headers.X"),
        ("- pools: [{pool: stable, weight: 1}, {pool: nope, weight: 1}]\n",
         "F:5: listeners[0].routes[0].pools[1].pool: pool 'nope' is not defined"),
        ("- pool: stable\n  mirror: {pool: ghost}\n",
         "F:6: listeners[0].routes[0].mirror.pool: pool 'ghost' is not defined"),
        ("- pools: [{pool: stable, weight: 0}, {pool: canary, weight: 0}]\n",
         "F:5: listeners[0].routes[0]: the weights of pools sum to 0"),
        ("- pool: stable\n  pools: [{pool: canary}]\n",
         "F:5: listeners[0].routes[0]: give either pool or pools, not both"),
        ("- pools: [{pool: stable}, {pool: stable}]\n",
         "F:5: listeners[0].routes[0]: pool 'stable' is listed twice"),
        ("- pool: stable\n  sticky: client_ip\n",
         "F:5: listeners[0].routes[0]: sticky applies to a traffic split"),
        ("- pools: [{pool: stable}]\n  sticky: nose\n",
         "F:5: listeners[0].routes[0]"),
        ("- match: {methods: [\"GE T\"]}\n  pool: stable\n",
         "F:5: listeners[0].routes[0].match.methods[0]: invalid method"),
        ("- match: {path: /a/../b}\n  pool: stable\n",
         "F:5: listeners[0].routes[0].match.path: '/a/../b' can never match"),
        ("- match: {headers: {X: {regx: a}}}\n  pool: stable\n",
         "F:5: listeners[0].routes[0].match.headers.X: must be an exact value (\"1\"), {regex"),
        ("- match: {headers: {X: {present: maybe}}}\n  pool: stable\n",
         "F:5: listeners[0].routes[0].match.headers.X: present must be true or false"),
        ("- match: {}\n  mirror: {pool: canary, fraction: 2}\n  pool: stable\n",
         "F:6: listeners[0].routes[0].mirror.fraction: "),
    ],
)  # fmt: skip
def test_config_problems_name_file_and_line(tmp_path: Path, routes: str, expected: str) -> None:
    found = problems(tmp_path, routes)
    assert any(p.startswith(expected) for p in found), found
