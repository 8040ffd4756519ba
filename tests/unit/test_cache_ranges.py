"""``proxy.cache.ranges``: which bytes a ``Range`` asks of a stored body, and the
answer a hit makes of them (RFC 9110 14, 13.1.5)."""

from __future__ import annotations

import pytest

from proxy.cache.ranges import MAX_RANGES, byte_ranges, if_range_matches, ranged

HEAD = b'HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nETag: "v1"\r\n'
STORED = [(b"content-type", b"text/plain"), (b"etag", b'"v1"'),
          (b"last-modified", b"Sun, 06 Dec 2026 10:00:00 GMT")]  # fmt: skip
BODY = b"0123456789abcdefghij"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"bytes=2-5", [(2, 5)]),
        (b"bytes=15-", [(15, 19)]),
        (b"bytes=-3", [(17, 19)]),
        (b"bytes=-30", [(0, 19)]),
        (b"bytes=0-100", [(0, 19)]),
        (b"BYTES = 0-0", [(0, 0)]),
        (b"bytes=0-1, 5-6,", [(0, 1), (5, 6)]),
        (b"bytes=30-40", []),  # 416
        (b"bytes=-0", []),
        (b"bytes=30-, 40-", []),
        (b"bytes=1-2, 30-", [(1, 2)]),  # the satisfiable ones
        (b"bytes=5-2", None),  # invalid: ignored
        (b"bytes=a-b", None),
        (b"bytes=-", None),
        (b"bytes=", None),
        (b"items=1-2", None),
        (b"bytes 1-2", None),
        (b"bytes=0-19,0-19", None),  # more than the body: the whole 200
        (b"bytes=" + b",".join(b"%d-%d" % (i, i) for i in range(MAX_RANGES + 1)), None),
    ],
)
def test_byte_ranges(value: bytes, expected: list[tuple[int, int]] | None) -> None:
    assert byte_ranges(value, len(BODY)) == expected


def test_an_empty_body_has_no_satisfiable_range() -> None:
    assert byte_ranges(b"bytes=0-", 0) == []
    assert byte_ranges(b"bytes=-5", 0) == []


@pytest.mark.parametrize(
    ("value", "matches"),
    [
        (b'"v1"', True),
        (b'"v2"', False),
        (b'W/"v1"', False),  # weak tags never match (strong comparison)
        (b"Sun, 06 Dec 2026 10:00:00 GMT", True),
        (b"Sun, 06 Dec 2026 10:00:01 GMT", False),
    ],
)
def test_if_range(value: bytes, matches: bool) -> None:
    assert if_range_matches(value, STORED) is matches


def test_a_weak_stored_etag_never_matches() -> None:
    assert not if_range_matches(b'W/"v1"', [(b"etag", b'W/"v1"')])
    assert not if_range_matches(b'"v1"', [])


def test_ranged_answers() -> None:
    code, head, body = ranged(HEAD, STORED, BODY, b"bytes=2-5", None) or (0, b"", b"")
    assert (code, body) == (206, b"2345")
    assert head == (b'HTTP/1.1 206 Partial Content\r\nContent-Type: text/plain\r\nETag: "v1"\r\n'
                    b"Content-Range: bytes 2-5/20\r\n")  # fmt: skip
    unsatisfiable = b"HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */20\r\n"
    assert ranged(HEAD, STORED, BODY, b"bytes=40-", None) == (416, unsatisfiable, b"")
    assert ranged(HEAD, STORED, BODY, b"bytes=2-5", b'"v2"') is None
    assert ranged(HEAD, STORED, BODY, b"bytes=5-2", None) is None


def test_multipart() -> None:
    code, head, body = ranged(HEAD, STORED, BODY, b"bytes=0-1,-2", None) or (0, b"", b"")
    assert code == 206
    lines = head.split(b"\r\n")
    assert lines[:2] == [b"HTTP/1.1 206 Partial Content", b'ETag: "v1"']
    boundary = lines[2].removeprefix(b"Content-Type: multipart/byteranges; boundary=")
    assert boundary != lines[2] and boundary not in BODY
    assert body == (
        b"--%s\r\nContent-Type: text/plain\r\nContent-Range: bytes 0-1/20\r\n\r\n01\r\n"
        b"--%s\r\nContent-Type: text/plain\r\nContent-Range: bytes 18-19/20\r\n\r\nij\r\n"
        b"--%s--\r\n" % (boundary, boundary, boundary)
    )
