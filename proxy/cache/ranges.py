"""Byte ranges of a stored response (RFC 9110 14): what a hit sends for ``Range``.

Pure functions over a complete stored body. ``ranged`` decides, for a GET whose
``Range`` names bytes of a stored 200: one satisfiable range is a ``206`` with
``Content-Range``; several are a ``206`` of ``multipart/byteranges``; none satisfiable is
a ``416`` with ``Content-Range: bytes */LENGTH``. An ``If-Range`` that does not match
the stored response (a strong ``ETag`` or the exact ``Last-Modified``) makes it the
whole ``200`` (RFC 9110 13.1.5), and so does a ``Range`` this module ignores: another
unit, a syntax error, more than ``MAX_RANGES`` ranges, or ranges that add up to more
than the body (overlaps: the whole body is cheaper to send, RFC 9110 14.2).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Final

#: More ranges than this in one ``Range`` header: ignored (the whole 200).
MAX_RANGES: Final = 16

Headers = Sequence[tuple[bytes, bytes]]


_HUGE: Final = b"999999999999999999"  # 18 digits: larger than any stored body


def _capped(number: bytes) -> bytes:
    """A digit string of at most 18 digits (a longer one means the same here: huge)."""
    digits = number.strip()
    return _HUGE if len(digits) > 18 and digits.isdigit() else number


def byte_ranges(value: bytes, size: int) -> list[tuple[int, int]] | None:
    """The satisfiable ranges ``(first, last)`` (inclusive) ``Range: value`` asks of a
    body of ``size`` bytes, in the order asked; ``[]`` when none is satisfiable (416);
    None when the header is to be ignored (the whole 200)."""
    unit, eq, spec = value.partition(b"=")
    if not eq or unit.strip().lower() != b"bytes":
        return None
    specs = [s.strip() for s in spec.split(b",")]
    specs = [s for s in specs if s]  # empty list elements are allowed (RFC 9110 5.6.1)
    if not specs or len(specs) > MAX_RANGES:
        return None
    found: list[tuple[int, int]] = []
    for item in specs:
        # int() refuses over 4,300 digits; any number past 18 digits is past any body
        if len(item) > 40:
            item = b"-".join(_capped(part) for part in item.split(b"-", 1))
        first, dash, last = item.partition(b"-")
        if not dash or not (first or last):
            return None
        if first:
            if not first.isdigit() or (last and not last.isdigit()):
                return None
            start = int(first)
            if last and int(last) < start:
                return None  # invalid: ignored (nginx answers 416)
            if start < size:
                found.append((start, min(int(last), size - 1) if last else size - 1))
        else:  # a suffix: the last N bytes
            if not last.isdigit():
                return None
            count = int(last)
            if count and size:
                found.append((max(size - count, 0), size - 1))
    if len(found) > 1 and sum(end - start + 1 for start, end in found) > size:
        return None
    return found


def if_range_matches(value: bytes, stored: Headers) -> bool:
    """Does ``If-Range: value`` name the stored response? An entity tag by strong
    comparison, a date by equality with ``Last-Modified`` (RFC 9110 13.1.5)."""
    value = value.strip()
    if value.startswith(b"W/"):
        return False
    name = b"etag" if value.startswith(b'"') else b"last-modified"
    mine = next((v for n, v in stored if n == name), None)
    return mine is not None and mine == value and not mine.startswith(b"W/")


def ranged(
    head: bytes, stored: Headers, body: bytes, asked: bytes, if_range: bytes | None
) -> tuple[int, bytes, bytes] | None:
    """(status, head without framing, body) answering ``Range: asked`` from a stored
    200 (``head``: its status line and header lines; ``stored``: its headers, lower-case
    names); None: send the whole 200."""
    if if_range is not None and not if_range_matches(if_range, stored):
        return None
    ranges = byte_ranges(asked, len(body))
    if ranges is None:
        return None
    size = len(body)
    if not ranges:
        return (
            416,
            b"HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */%d\r\n" % size,
            b"",
        )
    lines = head.partition(b"\r\n")[2]
    if len(ranges) == 1:
        start, end = ranges[0]
        return 206, b"".join((
            b"HTTP/1.1 206 Partial Content\r\n", lines,
            b"Content-Range: bytes %d-%d/%d\r\n" % (start, end, size),
        )), body[start : end + 1]  # fmt: skip
    return multipart(lines, stored, body, ranges)


def multipart(
    lines: bytes, stored: Headers, body: bytes, ranges: list[tuple[int, int]]
) -> tuple[int, bytes, bytes]:
    """A ``206`` of ``multipart/byteranges`` (RFC 9110 14.6): each part with the stored
    ``Content-Type`` and its ``Content-Range``."""
    boundary = os.urandom(12).hex().encode()
    kind = next((v for n, v in stored if n == b"content-type"), None)
    typed = b"Content-Type: %s\r\n" % kind if kind is not None else b""
    parts: list[bytes] = []
    for start, end in ranges:
        parts += (
            b"--%s\r\n%sContent-Range: bytes %d-%d/%d\r\n\r\n" % (
                boundary, typed, start, end, len(body)),
            body[start : end + 1], b"\r\n",
        )  # fmt: skip
    parts.append(b"--%s--\r\n" % boundary)
    kept = b"".join(
        line + b"\r\n"
        for line in lines.split(b"\r\n")
        if line and line.partition(b":")[0].strip().lower() != b"content-type"
    )
    head = b"HTTP/1.1 206 Partial Content\r\n%sContent-Type: multipart/byteranges; boundary=%s\r\n"
    return 206, head % (kept, boundary), b"".join(parts)
