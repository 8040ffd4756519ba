"""Balancing through the real proxy to real upstreams: shares, stickiness, backups, latency.

Every count here is what the upstreams themselves received (``Recorder.seen``), not what
the balancer says it picked. Random and latency-aware tests assert shares with margins
of several standard deviations for their sample, so they hold on a busy machine.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.balancing import REGISTRY
from tests.support import Recorder, make_config, proxy_url, wait_for

#: options an algorithm needs (or that keep a test short); the others take none
OPTIONS: dict[str, dict[str, Any]] = {
    "consistent_hash": {"key": "header:X-User"},
    "peak_ewma": {"decay": "1s"},
}
SLOW_S = 0.15  # latency of the slow upstream's handler


def pool(
    balancer: str | dict[str, Any], ups: list[Recorder], **upstream_fields: Any
) -> dict[str, Any]:
    """A ``pool`` override for ``make_config``: ``balancer`` over ``ups``.

    ``upstream_fields`` maps an upstream name to extra fields (``weight``, ``backup``).
    """
    return {
        "balancer": balancer,
        "upstreams": [{"url": u.url, **upstream_fields.get(u.name, {})} for u in ups],
    }


def received(ups: list[Recorder]) -> dict[str, int]:
    """How many requests each upstream received."""
    return {u.name: len(u.seen) for u in ups}


async def get_all(
    session: aiohttp.ClientSession, url: str, n: int, headers: dict[str, str] | None = None
) -> list[str]:
    """``n`` sequential GETs; the name of the upstream that answered each (all 200)."""
    names = []
    for _ in range(n):
        async with session.get(url, headers=headers) as resp:
            assert resp.status == 200
            names.append(await resp.text())
    return names


async def load(url: str, total: int, concurrency: int) -> Counter[str]:
    """``total`` GETs from ``concurrency`` concurrent clients; answers per upstream."""
    answered: Counter[str] = Counter()
    remaining = total

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            async with session.get(url) as resp:
                assert resp.status == 200
                answered[await resp.text()] += 1

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return answered


# -- weighted shares ---------------------------------------------------------------------


async def test_weighted_round_robin_3_to_1_exact_over_full_periods(recorders, proxy):
    ups = [await recorders(n) for n in ("a", "b")]
    config = make_config([], pool=pool("weighted_round_robin", ups, a={"weight": 3}))
    server = await proxy(config)
    async with aiohttp.ClientSession() as session:
        names = await get_all(session, proxy_url(server), 40)  # 10 periods of 4
    assert received(ups) == {"a": 30, "b": 10}
    for period in range(10):  # every period of 4 holds exactly 3 a and 1 b
        assert sorted(names[period * 4 : period * 4 + 4]) == ["a", "a", "a", "b"]


async def test_weighted_round_robin_5_1_1_smooth_and_exact(recorders, proxy):
    ups = [await recorders(n) for n in ("a", "b", "c")]
    config = make_config([], pool=pool("weighted_round_robin", ups, a={"weight": 5}))
    server = await proxy(config)
    async with aiohttp.ClientSession() as session:
        names = await get_all(session, proxy_url(server), 70)  # 10 periods of 7
    assert received(ups) == {"a": 50, "b": 10, "c": 10}
    # nginx's smooth order: b and c are spread through the period, never a burst of a
    assert names[:7] == ["a", "a", "b", "a", "c", "a", "a"]
    assert names == names[:7] * 10


@pytest.mark.parametrize(
    ("weights", "total"),
    [({"a": 3, "b": 1}, 2000), ({"a": 5, "b": 1, "c": 1}, 2100)],
    ids=["3:1", "5:1:1"],
)
async def test_random_shares_follow_weights(recorders, proxy, weights, total):
    ups = [await recorders(n) for n in weights]
    fields = {name: {"weight": w} for name, w in weights.items()}
    server = await proxy(make_config([], pool=pool("random", ups, **fields)))
    answered = await load(proxy_url(server), total, concurrency=8)
    counts = received(ups)
    assert counts == dict(answered) and sum(counts.values()) == total
    weight_sum = sum(weights.values())
    for name, weight in weights.items():
        # a standard deviation is at most 1.0 point of share here: 4 points is 4 sigma
        share = counts[name] / total
        assert abs(share - weight / weight_sum) < 0.04, (name, counts)


# -- sticky keys -------------------------------------------------------------------------


async def test_consistent_hash_header_key_is_sticky_and_spread(recorders, proxy):
    ups = [await recorders(n) for n in ("a", "b", "c")]
    balancer = {"name": "consistent_hash", "key": "header:X-User"}
    server = await proxy(make_config([], pool=pool(balancer, ups)))
    owner: dict[str, set[str]] = {}
    async with aiohttp.ClientSession() as session:
        for round_ in range(4):
            url = proxy_url(server, f"/round{round_}")
            for user in (f"user-{i}" for i in range(50)):
                names = await get_all(session, url, 1, headers={"X-User": user})
                owner.setdefault(user, set()).update(names)
    assert all(len(names) == 1 for names in owner.values()), owner
    assert {name for names in owner.values() for name in names} == {"a", "b", "c"}
    # what the upstreams saw agrees: each user's 4 requests all reached its one upstream
    for up in ups:
        users = Counter(s.headers["X-User"] for s in up.seen)
        assert all(count == 4 and owner[user] == {up.name} for user, count in users.items())
    assert sum(received(ups).values()) == 200


async def test_consistent_hash_without_the_key_takes_round_robin_turns(recorders, proxy):
    ups = [await recorders(n) for n in ("a", "b", "c")]
    balancer = {"name": "consistent_hash", "key": "header:X-User"}
    server = await proxy(make_config([], pool=pool(balancer, ups)))
    async with aiohttp.ClientSession() as session:
        names = await get_all(session, proxy_url(server), 6)
        empty = await get_all(session, proxy_url(server), 3, headers={"X-User": ""})
    assert Counter(names) == {"a": 2, "b": 2, "c": 2}
    assert sorted(empty) == ["a", "b", "c"]  # an empty value counts as no key


@pytest.mark.parametrize("kind", ["cookie", "query"])
async def test_consistent_hash_cookie_and_query_keys_are_sticky(recorders, proxy, kind):
    ups = [await recorders(n) for n in ("a", "b", "c")]
    balancer = {"name": "consistent_hash", "key": f"{kind}:sid"}
    server = await proxy(make_config([], pool=pool(balancer, ups)))
    owner: dict[str, set[str]] = {}
    async with aiohttp.ClientSession() as session:
        for i in range(30):
            sid = f"s{i}"
            if kind == "cookie":
                url = proxy_url(server, "/cart")
                headers = {"Cookie": f"theme=dark; sid={sid}; lang=en"}
            else:
                url, headers = proxy_url(server, f"/cart?page=2&sid={sid}&x=1"), None
            owner[sid] = set(await get_all(session, url, 3, headers=headers))
        no_key = await get_all(session, proxy_url(server, "/cart?page=2"), 3)
    assert all(len(names) == 1 for names in owner.values()), owner
    assert {name for names in owner.values() for name in names} == {"a", "b", "c"}
    assert sorted(no_key) == ["a", "b", "c"]


async def test_ip_hash_sends_one_client_address_to_one_upstream(recorders, proxy):
    ups = [await recorders(n) for n in ("a", "b", "c")]
    server = await proxy(make_config([], pool=pool("ip_hash", ups)))
    # a new client connection (a new source port) for every request: the address decides
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        names = await get_all(session, proxy_url(server), 30)
    assert len(set(names)) == 1
    assert sorted(received(ups).values()) == [0, 0, 30]
    assert len({s.headers["X-Forwarded-For"] for up in ups for s in up.seen}) == 1


# -- backups -----------------------------------------------------------------------------


async def test_backup_serves_only_while_every_primary_is_drained(recorders, proxy):
    ups = [await recorders(n) for n in ("a", "b", "spare")]
    config = make_config([], pool=pool("round_robin", ups, spare={"backup": True}))
    server = await proxy(config)
    main = server.pools["main"]
    url = proxy_url(server)
    async with aiohttp.ClientSession() as session:
        assert Counter(await get_all(session, url, 10)) == {"a": 5, "b": 5}

        main.upstreams[0].enabled = False  # one primary left: still no backup
        main.rebuild()
        assert set(await get_all(session, url, 5)) == {"b"}

        main.upstreams[1].enabled = False  # no primary left: the backup takes everything
        main.rebuild()
        assert set(await get_all(session, url, 10)) == {"spare"}

        main.upstreams[1].enabled = True  # one primary back: the backup is idle again
        main.rebuild()
        assert set(await get_all(session, url, 5)) == {"b"}

        main.upstreams[0].enabled = True
        main.rebuild()
        assert Counter(await get_all(session, url, 10)) == {"a": 5, "b": 5}
    assert received(ups) == {"a": 10, "b": 20, "spare": 10}


async def test_weighted_backups_share_by_weight_when_primaries_are_down(recorders, proxy):
    ups = [await recorders(n) for n in ("a", "b1", "b2")]
    fields = {"b1": {"backup": True, "weight": 3}, "b2": {"backup": True}}
    server = await proxy(make_config([], pool=pool("weighted_round_robin", ups, **fields)))
    main = server.pools["main"]
    async with aiohttp.ClientSession() as session:
        assert set(await get_all(session, proxy_url(server), 8)) == {"a"}
        main.upstreams[0].enabled = False
        main.rebuild()
        assert Counter(await get_all(session, proxy_url(server), 8)) == {"b1": 6, "b2": 2}


async def test_slow_start_ramps_a_returning_upstream_up_to_its_weight(recorders, proxy):
    ups = [await recorders(n) for n in ("a", "b")]
    config = make_config([], pool={**pool("weighted_round_robin", ups), "slow_start": "10s"})
    server = await proxy(config)
    main = server.pools["main"]
    now = [0.0]
    main.clock = lambda: now[0]  # the ramp's time is ours to move
    url = proxy_url(server)
    async with aiohttp.ClientSession() as session:
        main.upstreams[1].enabled = False
        main.rebuild()
        main.upstreams[1].enabled = True  # b is back at t=0: 10% of its weight
        main.rebuild()
        assert Counter(await get_all(session, url, 22)) == {"a": 20, "b": 2}

        now[0] = 5.0  # halfway: 55%, i.e. 20:11
        main.rebuild()
        assert Counter(await get_all(session, url, 31)) == {"a": 20, "b": 11}

        now[0] = 10.0  # the pool's own sweep ends the ramp: equal shares again
        await wait_for(lambda: "ramping" not in repr(main))
        assert Counter(await get_all(session, url, 10)) == {"a": 5, "b": 5}


# -- latency and load aware --------------------------------------------------------------


@pytest.mark.parametrize(
    "balancer",
    ["least_connections", "power_of_two", {"name": "peak_ewma", "decay": "1s"}],
    ids=["least_connections", "power_of_two", "peak_ewma"],
)
async def test_slow_upstream_gets_the_least_traffic(recorders, proxy, balancer):
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(SLOW_S)  # the real latency under test
        return web.Response(text="slow")

    ups = [await recorders("slow", {"/work": slow})]
    ups += [await recorders(f"fast{i}") for i in range(5)]
    server = await proxy(make_config([], pool=pool(balancer, ups)))
    total = 1200
    answered = await load(proxy_url(server, "/work"), total, concurrency=12)
    counts = received(ups)
    assert counts == dict(answered) and sum(counts.values()) == total
    # The fair share is 1/6 = 200 requests. power_of_two's two draws both land on the
    # slow upstream 1 time in 36 (about 35 expected, sd 6): the bound sits 5 sd above.
    fair = total / len(ups)
    assert counts["slow"] < fair / 3, counts
    assert all(counts[f"fast{i}"] > fair / 2 for i in range(5)), counts


# -- every algorithm ---------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REGISTRY))
async def test_every_algorithm_proxies_requests(recorders, proxy, name):
    ups = [await recorders(n) for n in ("a", "b")]
    balancer: str | dict[str, Any] = {"name": name, **OPTIONS[name]} if name in OPTIONS else name
    server = await proxy(make_config([], pool=pool(balancer, ups)))
    async with aiohttp.ClientSession() as session:
        names = await get_all(session, proxy_url(server, "/smoke?q=1"), 4)
        names += await get_all(session, proxy_url(server), 4, headers={"X-User": "u1"})
    assert set(names) <= {"a", "b"}
    assert sum(received(ups).values()) == 8
    assert all(s.path in ("/smoke?q=1", "/") for up in ups for s in up.seen)
