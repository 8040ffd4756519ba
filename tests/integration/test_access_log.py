"""The JSON access log: one line per request, written off the event loop, never fatal."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp

from proxy.config import Config
from tests.support import make_config, proxy_url, wait_for


def _with_access_log(config: Config, path: str) -> Config:
    return Config.model_validate({**config.model_dump(), "access_log": {"path": path}})


async def test_every_request_gets_one_json_line(recorders, proxy, tmp_path: Path):
    up = await recorders("a")
    log_path = tmp_path / "access.log"
    server = await proxy(_with_access_log(make_config([up.url]), str(log_path)))
    async with aiohttp.ClientSession() as session:
        for i in range(5):
            headers = {"X-Request-ID": f"req-{i}"}
            async with session.post(
                proxy_url(server, f'/p"{i}?q=1'), data=b"x" * 10, headers=headers
            ) as resp:
                assert resp.status == 200
        async with session.get(proxy_url(server, "/missing"), headers={"Host": "t"}) as resp:
            await resp.read()

    def lines() -> list[dict[str, object]]:
        text = log_path.read_text() if log_path.exists() else ""
        return [json.loads(line) for line in text.splitlines()]

    await wait_for(lambda: len(lines()) == 6, timeout=5)
    first = lines()[0]
    assert first["method"] == "POST" and first["path"] == '/p%220?q=1'
    assert first["status"] == 200 and first["bytes_in"] == 10 and first["bytes_out"] == 1
    assert first["upstream"] == up.url.removeprefix("http://")
    assert first["attempts"] == 1 and first["request_id"] == "req-0"
    assert first["client"] == "127.0.0.1"
    assert isinstance(first["duration_ms"], float) and str(first["time"]).endswith("Z")


async def test_a_full_disk_costs_log_lines_not_requests(recorders, proxy):
    up = await recorders("a")
    server = await proxy(_with_access_log(make_config([up.url]), "/dev/full"))
    async with aiohttp.ClientSession() as session:
        for _ in range(20):
            async with session.get(proxy_url(server)) as resp:
                assert resp.status == 200 and await resp.text() == "a"
    access_log = server.access_log
    assert access_log is not None
    await wait_for(lambda: access_log.dropped == 20, timeout=5)


async def test_durations_have_sub_millisecond_resolution(recorders, proxy, tmp_path: Path):
    """Request durations (access log, metrics, peak_ewma) come from a fine clock, not
    uvloop's loop time, which ticks in whole milliseconds."""
    up = await recorders("a")
    log_path = tmp_path / "access.log"
    server = await proxy(_with_access_log(make_config([up.url]), str(log_path)))
    async with aiohttp.ClientSession() as session:
        for _ in range(20):
            async with session.get(proxy_url(server)) as resp:
                assert resp.status == 200

    def durations() -> list[float]:
        text = log_path.read_text() if log_path.exists() else ""
        return [json.loads(line)["duration_ms"] for line in text.splitlines()]

    await wait_for(lambda: len(durations()) == 20, timeout=5)
    assert all(d > 0 for d in durations())
    assert any(d != round(d) for d in durations())  # not whole milliseconds
