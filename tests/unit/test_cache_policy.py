"""RFC 9111 decisions for a shared cache (``proxy.cache.policy``), fed heads and times."""

from __future__ import annotations

import pytest

from proxy.cache.policy import (
    Directives,
    current_age,
    lifetime,
    must_revalidate,
    response_directives,
    stale_allowed,
    storable,
    variant,
    vary_names,
)

DATE = b"Tue, 01 Dec 2026 10:00:00 GMT"
T0 = 1796119200.0  # DATE as a Unix time


def cc(value: str) -> Directives:
    return Directives.of([(b"cache-control", value.encode())])


def test_directives_parse_names_values_quotes_and_several_lines() -> None:
    found = Directives.of([
        (b"cache-control", b'Max-Age=60, no-cache="Set-Cookie, X-A", public'),
        (b"cache-control", b"s-maxage=bogus, max-age=5"),
    ])  # fmt: skip
    assert found == {"max-age": "60", "no-cache": "Set-Cookie, X-A", "public": None,
                     "s-maxage": "bogus"}  # fmt: skip
    assert found.seconds("max-age") == 60  # the first one counts
    assert found.seconds("s-maxage") is None  # invalid
    assert Directives.of_request([(b"pragma", b"no-cache")]) == {"no-cache": None}
    assert Directives.of_request([(b"pragma", b"no-cache"), (b"cache-control", b"max-age=3")]) == {
        "max-age": "3"}  # fmt: skip


@pytest.mark.parametrize(
    ("method", "status", "asked", "response", "authorized", "heuristic", "why"),
    [
        (b"GET", 200, "", "max-age=60", False, False, None),
        (b"HEAD", 200, "", "max-age=60", False, False, "method"),
        (b"POST", 200, "", "max-age=60", False, False, "method"),
        (b"GET", 206, "", "max-age=60", False, False, "status"),
        (b"GET", 500, "", "max-age=60", False, False, "status"),
        (b"GET", 200, "no-store", "max-age=60", False, False, "no-store"),
        (b"GET", 200, "", "max-age=60, no-store", False, False, "no-store"),
        (b"GET", 200, "", "private, max-age=60", False, False, "private"),
        (b"GET", 200, "", "max-age=60", True, False, "authorization"),
        (b"GET", 200, "", "public, max-age=60", True, False, None),
        (b"GET", 200, "", "s-maxage=60", True, False, None),
        (b"GET", 200, "", "must-revalidate, max-age=60", True, False, None),
        (b"GET", 200, "", "", False, False, "no freshness"),
        (b"GET", 200, "", "", False, True, None),  # default_ttl set: heuristic
        (b"GET", 302, "", "", False, True, "no freshness"),  # not heuristically cacheable
        (b"GET", 302, "", "max-age=5", False, False, None),
        (b"GET", 200, "", "no-cache", False, False, None),  # stored, revalidated each use
    ],
)
def test_storable(method: bytes, status: int, asked: str, response: str, authorized: bool,
                  heuristic: bool, why: str | None) -> None:  # fmt: skip
    headers = [(b"cache-control", response.encode())] if response else []
    assert storable(method, status, cc(asked), cc(response), headers, authorized,
                    heuristic) == why  # fmt: skip


def test_vary_star_is_never_stored_and_names_are_normalised() -> None:
    assert storable(b"GET", 200, cc(""), cc("max-age=60"),
                    [(b"vary", b"Accept, *")], False, False) == "vary"  # fmt: skip
    assert vary_names([(b"vary", b"Accept-Encoding, accept"), (b"vary", b"X-A")]) == (
        b"accept", b"accept-encoding", b"x-a")  # fmt: skip
    request = [(b"accept", b"text/html,  */*"), (b"x-a", b"1"), (b"x-a", b"2")]
    assert variant(request, (b"accept", b"x-a", b"x-b")) == (b"text/html, */*", b"1, 2", b"")


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ([(b"cache-control", b"max-age=60, s-maxage=10")], 10.0),  # shared: s-maxage first
        ([(b"cache-control", b"max-age=60")], 60.0),
        ([(b"cache-control", b"max-age=abc")], 0.0),  # invalid: stale
        ([(b"date", DATE), (b"expires", b"Tue, 01 Dec 2026 10:05:00 GMT")], 300.0),
        ([(b"date", DATE), (b"expires", b"0")], 0.0),  # invalid Expires: in the past
        ([(b"date", DATE), (b"expires", b"Tue, 01 Dec 2026 09:00:00 GMT")], 0.0),
        ([(b"cache-control", b"max-age=7"), (b"expires", b"0")], 7.0),  # max-age wins
        ([], 0.0),
    ],
)
def test_lifetime(headers: list[tuple[bytes, bytes]], seconds: float) -> None:
    assert lifetime(200, Directives.of(headers), headers, None) == seconds


def test_heuristic_lifetime_only_with_default_ttl_and_a_heuristic_status() -> None:
    assert lifetime(200, cc(""), [], 30.0) == 30.0
    assert lifetime(302, cc(""), [], 30.0) == 0.0
    assert lifetime(200, cc(""), [], None) == 0.0


def test_current_age_follows_rfc_9111_4_2_3() -> None:
    # sent at T0 - 1, received at T0 + 1 (2 s on the wire), Date says T0, Age says 10
    headers = [(b"date", DATE), (b"age", b"10")]
    assert current_age(headers, T0 - 1, T0 + 1, T0 + 1) == 12.0  # 10 + the response delay
    assert current_age(headers, T0 - 1, T0 + 1, T0 + 31) == 42.0  # + 30 s resident
    late = [(b"date", b"Tue, 01 Dec 2026 09:59:00 GMT")]  # generated a minute before
    assert current_age(late, T0, T0, T0) == 60.0  # the apparent age wins
    assert current_age([], T0, T0, T0 + 5) == 5.0


@pytest.mark.parametrize(
    ("ages", "fresh"),
    [([b"5"], True), ([b"5, 7200"], False), ([b"0, 0"], False), ([b"7200"], False),
     ([b"abc"], False),
     ([b"-5"], False), ([b"5.0"], False), ([b"5", b"6"], False), ([b"5;x=1"], False)],
)  # fmt: skip
def test_an_age_that_is_not_one_integer_makes_a_response_stale(
    ages: list[bytes], fresh: bool
) -> None:
    headers = [(b"age", a) for a in ages]
    assert (current_age(headers, T0, T0, T0) < 3600) is fresh


def test_must_revalidate() -> None:
    assert not must_revalidate(cc(""), cc("max-age=60"), 10, 60)
    assert must_revalidate(cc(""), cc("max-age=60"), 60, 60)  # stale
    assert must_revalidate(cc(""), cc("no-cache"), 0, 60)
    assert must_revalidate(cc("no-cache"), cc("max-age=60"), 0, 60)
    assert must_revalidate(cc("max-age=0"), cc("max-age=60"), 1, 60)
    assert not must_revalidate(cc("max-age=30"), cc("max-age=60"), 10, 60)
    assert must_revalidate(cc("min-fresh=55"), cc("max-age=60"), 10, 60)
    assert not must_revalidate(cc("max-stale=20"), cc("max-age=60"), 70, 60)
    assert must_revalidate(cc("max-stale=5"), cc("max-age=60"), 70, 60)
    assert not must_revalidate(cc("max-stale"), cc("max-age=60"), 7000, 60)
    assert must_revalidate(cc("max-stale"), cc("max-age=60, must-revalidate"), 70, 60)
    assert must_revalidate(cc("max-stale"), cc("s-maxage=60"), 70, 60)


def test_stale_windows_follow_rfc_5861_unless_revalidation_is_required() -> None:
    swr = cc("max-age=1, stale-while-revalidate=30, stale-if-error=300")
    assert stale_allowed(swr, "stale-while-revalidate", 29)
    assert not stale_allowed(swr, "stale-while-revalidate", 31)
    assert stale_allowed(swr, "stale-if-error", 299)
    assert not stale_allowed(cc("max-age=1, stale-if-error=300, must-revalidate"),
                             "stale-if-error", 1)  # fmt: skip
    assert not stale_allowed(cc("max-age=1"), "stale-if-error", 1)


def test_surrogate_control_directives_for_aiolb_replace_cache_control() -> None:
    head = [(b"cache-control", b"no-store, private"),
            (b"surrogate-control", b'max-age=60;aiolb, no-store;other-cdn, foo="a,b"')]  # fmt: skip
    assert Directives.surrogate(head) == {"max-age": "60", "foo": "a,b"}
    assert response_directives(head, surrogate=True) == {"max-age": "60", "foo": "a,b"}
    assert response_directives(head, surrogate=False) == {"no-store": None, "private": None}
    others_only = [(b"cache-control", b"max-age=5"),
                   (b"surrogate-control", b"max-age=60;other-cdn")]  # fmt: skip
    assert response_directives(others_only, surrogate=True) == {"max-age": "5"}
