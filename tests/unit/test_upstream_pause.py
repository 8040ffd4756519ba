"""An upstream connection's reading is paused for reasons (a slow client, a cache store
behind, a filter holding the response) and reads again only when none is left."""

from __future__ import annotations

from typing import Any

from proxy.upstream.connection import UpstreamConnection
from proxy.upstream.session import CLIENT_SLOW, FILTER_HOLD, STORE_BEHIND


class Transport:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def pause_reading(self) -> None:
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.calls.append("resume")


def test_reading_resumes_only_when_no_reason_is_left() -> None:
    conn = UpstreamConnection(upstream=Any)  # type: ignore[arg-type]
    conn.transport = transport = Transport()  # type: ignore[assignment]
    conn.pause_reading(CLIENT_SLOW)
    conn.pause_reading(STORE_BEHIND)
    conn.resume_reading(CLIENT_SLOW)  # the client caught up; the store has not
    assert transport.calls == ["pause"] and conn.reading_paused == STORE_BEHIND
    conn.pause_reading(FILTER_HOLD)
    conn.resume_reading(STORE_BEHIND)
    conn.resume_reading(STORE_BEHIND)  # twice: nothing more
    assert transport.calls == ["pause"]
    conn.resume_reading(FILTER_HOLD)
    assert transport.calls == ["pause", "resume"] and conn.reading_paused == 0
