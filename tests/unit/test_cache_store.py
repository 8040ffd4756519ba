"""Stored responses (``proxy.cache.entry``) and the LRU memory store (``proxy.cache.memory``)."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.cache.entry import Entry
from proxy.cache.memory import MemoryStore

T0 = 1796119200.0  # Tue, 01 Dec 2026 10:00:00 GMT
HEAD = (
    b"HTTP/1.1 200 OK\r\nDate: Tue, 01 Dec 2026 10:00:00 GMT\r\nCache-Control: max-age=60\r\n"
    b"Content-Type: text/plain\r\nAge: 5\r\nContent-Length: 5\r\nETag: \"v1\"\r\n"
)


def entry(key: bytes = b"shop.test /a", body: bytes = b"hello", head: bytes = HEAD,
          variant: tuple[bytes, ...] = (), vary: tuple[bytes, ...] = ()) -> Entry:  # fmt: skip
    return Entry(key, vary, variant, head, body, (T0, T0), None)


def test_an_entry_keeps_what_a_hit_sends_and_ages() -> None:
    e = entry()
    assert e.status == 200
    assert e.head == (b"HTTP/1.1 200 OK\r\nDate: Tue, 01 Dec 2026 10:00:00 GMT\r\n"
                      b"Cache-Control: max-age=60\r\nContent-Type: text/plain\r\n"
                      b"ETag: \"v1\"\r\n")  # fmt: skip  # no Age, no Content-Length
    assert e.lifetime == 60.0
    assert e.age(T0) == 5.0  # the upstream's Age counts
    assert e.ttl(T0 + 10) == 45.0
    assert e.size > len(e.head) + len(e.body)


def test_a_304_refreshes_headers_and_restarts_the_clock() -> None:
    e = entry()
    e.refresh(b"HTTP/1.1 304 Not Modified\r\nCache-Control: max-age=120\r\nX-New: 1\r\n"
              b"Content-Length: 99\r\n", (T0 + 100, T0 + 100), None)  # fmt: skip
    assert e.status == 200 and e.body == b"hello"
    assert e.lifetime == 120.0 and e.age(T0 + 100) == 100.0  # Date still says T0
    assert b"Cache-Control: max-age=120\r\n" in e.head and b"max-age=60" not in e.head
    assert b"X-New: 1\r\n" in e.head and b"Content-Length" not in e.head


def test_a_304_with_another_strong_validator_changes_nothing() -> None:
    e = entry()
    before = (e.head, e.age0, e.lifetime)
    assert not e.refresh(b"HTTP/1.1 304 Not Modified\r\nETag: \"v2\"\r\nX-New: 1\r\n",
                         (T0 + 100, T0 + 100), None)  # fmt: skip
    assert (e.head, e.age0, e.lifetime) == before
    assert e.refresh(b"HTTP/1.1 304 Not Modified\r\nETag: W/\"v1\"\r\nContent-MD5: x\r\n",
                     (T0 + 100, T0 + 100), None)  # a weak one: about this response  # fmt: skip
    assert b"Content-MD5" not in e.head  # it describes the stored body: not taken


def test_the_store_serves_the_right_variant() -> None:
    store = MemoryStore(10_000)
    vary = (b"accept-language",)
    store.put(entry(body=b"hallo", variant=(b"de",), vary=vary))
    store.put(entry(body=b"hello", variant=(b"en",), vary=vary))
    german = store.get(b"shop.test /a", [(b"accept-language", b"de")])
    english = store.get(b"shop.test /a", [(b"accept-language", b"en")])
    assert german is not None and english is not None
    assert (german.body, english.body) == (b"hallo", b"hello")
    assert store.get(b"shop.test /a", [(b"accept-language", b"fr")]) is None
    assert store.get(b"shop.test /b", []) is None
    store.put(entry(body=b"any"))  # the resource stopped varying: old variants go
    assert len(store) == 1 and store.get(b"shop.test /a", [(b"accept-language", b"de")]) is not None


def test_a_new_response_replaces_the_stored_one_of_its_variant() -> None:
    store = MemoryStore(10_000)
    store.put(entry(body=b"one"))
    store.put(entry(body=b"two"))
    found = store.get(b"shop.test /a", [])
    assert found is not None and found.body == b"two"
    assert len(store) == 1 and store.size == found.size


def test_remove_and_purge() -> None:
    store = MemoryStore(100_000)
    for path in (b"/static/a", b"/static/b", b"/api/c"):
        store.put(entry(key=b"shop.test " + path))
    assert store.purge(b"shop.test /static/") == 2
    assert store.remove(b"shop.test /api/c") == 1
    assert len(store) == 0 and store.size == 0 and not store.keys


@given(sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=200),
       touches=st.lists(st.integers(0, 199), max_size=100))  # fmt: skip
@settings(max_examples=100, deadline=None, derandomize=True, database=None)
def test_the_store_never_holds_more_than_its_size_and_evicts_the_least_recently_used(
    sizes: list[int], touches: list[int]
) -> None:
    store = MemoryStore(20_000)
    order: list[bytes] = []  # keys from least to most recently used, as the test sees it
    rng = random.Random(len(sizes))
    for i, size in enumerate(sizes):
        key = b"k%d" % i
        store.put(entry(key=key, body=bytes(size)))
        order.append(key)
        if touches and rng.random() < 0.5:
            hit = b"k%d" % touches[i % len(touches)]
            if store.get(hit, []) is not None:
                order.remove(hit)
                order.append(hit)
        assert store.size <= store.max_size
        assert store.size == sum(e.size for e in store.entries.values())
        held = [key for key, _ in store.entries]
        # exactly the most recently used ones are held, in their order of use
        assert held == order[len(order) - len(held):]
        assert held  # one entry always fits
