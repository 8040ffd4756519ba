"""A worker's side of the supervisor's link (``proxy.runtime.worker._commands``): what
it cannot read or obey is logged and skipped, and the link's end still stops it."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import pytest

from proxy.runtime.worker import _commands


def server() -> Any:
    stops: list[int] = []
    checks: list[tuple[Any, ...]] = []
    return SimpleNamespace(stops=stops, request_stop=lambda: stops.append(1), checks=checks,
                           check_result=lambda *args: checks.append(args))  # fmt: skip


async def test_a_line_it_cannot_obey_is_skipped_and_the_links_end_still_stops_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"not json\n")
    reader.feed_data(b'{"op": "check"}\n')  # a message missing its fields
    reader.feed_data(b'{"op": "check", "pool": "p", "address": "a:1", "ok": true}\n')
    reader.feed_eof()
    fake = server()
    with caplog.at_level(logging.ERROR, logger="aiolb"):
        await asyncio.wait_for(_commands(fake, reader, lambda i, r: None, 1), 5)
    assert fake.stops == [1]  # the supervisor is gone: drain and exit
    assert fake.checks == [("p", "a:1", True)]  # the line after them was obeyed
    messages = [r.getMessage() for r in caplog.records]
    assert sum("failed: JSONDecodeError" in m for m in messages) == 1
    assert sum("failed: KeyError" in m for m in messages) == 1
    assert any("the supervisor went away" in m for m in messages)
    assert all(r.exc_info is None for r in caplog.records)  # one line each, no traceback


async def test_a_line_past_the_readers_limit_stops_the_worker() -> None:
    reader = asyncio.StreamReader(limit=16)
    reader.feed_data(b"x" * 64 + b"\n")
    fake = server()
    await asyncio.wait_for(_commands(fake, reader, lambda i, r: None, 1), 5)
    assert fake.stops == [1]
