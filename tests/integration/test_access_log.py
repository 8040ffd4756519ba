"""The JSON access log: one line per request, written off the event loop, never fatal."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp

from proxy.config import Config
from proxy.config.models import MetricsSpec
from tests.support import make_config, proxy_url, wait_for


def _with_access_log(config: Config, path: str, **options: object) -> Config:
    access_log = {"path": path, **options}
    return Config.model_validate({**config.model_dump(), "access_log": access_log})


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def test_every_request_gets_one_json_line(recorders, proxy, tmp_path: Path):
    up = await recorders("a")
    log_path = tmp_path / "access.log"
    routes = [{"match": {"path_prefix": "/p"}, "pool": "main"}]
    server = await proxy(_with_access_log(make_config([up.url], routes=routes), str(log_path)))
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
        return [json.loads(line) for line in _lines(log_path)]

    await wait_for(lambda: len(lines()) == 6, timeout=5)
    first, missing = lines()[0], lines()[5]
    assert list(first) == [
        "time", "client", "method", "path", "status", "bytes_in", "bytes_out", "duration_ms",
        "host", "user_agent", "listener", "pool", "upstream", "attempts", "request_id",
    ]  # fmt: skip
    assert first["method"] == "POST" and first["path"] == '/p%220?q=1'
    assert first["status"] == 200 and first["bytes_in"] == 10 and first["bytes_out"] == 1
    assert first["upstream"] == up.url.removeprefix("http://")
    assert first["attempts"] == 1 and first["request_id"] == "req-0"
    assert first["client"] == "127.0.0.1"
    assert first["host"] == f"127.0.0.1:{server.listeners[0].port}"
    assert str(first["user_agent"]).startswith("Python/") and "aiohttp" in str(
        first["user_agent"]
    )
    assert first["listener"] == "test" and first["pool"] == "main"
    assert isinstance(first["duration_ms"], float) and str(first["time"]).endswith("Z")
    # routed nowhere (404 from the proxy): no pool, no upstream
    assert (missing["status"], missing["host"], missing["pool"], missing["upstream"]) == (
        404, "t", "", ""
    )


async def test_a_field_list_picks_the_json_keys(recorders, proxy, tmp_path: Path):
    up = await recorders("a")
    log_path = tmp_path / "access.log"
    fields = ["status", "upstream_name", "pool", "user_agent", "path"]
    config = make_config([up.url])
    config = Config.model_validate({
        **config.model_dump(),
        "pools": {"main": {"upstreams": [{"url": up.url, "name": "app-1"}]}},
        "access_log": {"path": str(log_path), "format": fields},
    })  # fmt: skip
    server = await proxy(config)
    async with aiohttp.ClientSession(skip_auto_headers=["User-Agent"]) as session:
        async with session.get(proxy_url(server, "/x"), headers={"User-Agent": 'c"url'}) as resp:
            assert resp.status == 200
        async with session.get(proxy_url(server, "/y")) as resp:
            assert resp.status == 200
    await wait_for(lambda: len(_lines(log_path)) == 2, timeout=5)
    first, second = (json.loads(line) for line in _lines(log_path))
    assert list(first) == fields
    assert first == {"status": 200, "upstream_name": "app-1", "pool": "main",
                     "user_agent": 'c"url', "path": "/x"}  # fmt: skip
    assert second["user_agent"] is None  # no User-Agent header: null


async def test_a_template_writes_text_lines_like_nginx(recorders, proxy, tmp_path: Path):
    up = await recorders("a")
    log_path = tmp_path / "access.log"
    template = '$client "$method $path" $status $bytes_out "$user_agent" ${listener}/$pool $$'
    server = await proxy(_with_access_log(make_config([up.url]), str(log_path), format=template))
    async with aiohttp.ClientSession() as session:
        headers = {"User-Agent": "probe\\1"}
        async with session.get(proxy_url(server, '/a"b'), headers=headers) as resp:
            assert resp.status == 200
        async with session.get(proxy_url(server, "/z"), headers={"Host": "nowhere"}) as resp:
            assert resp.status == 200
    await wait_for(lambda: len(_lines(log_path)) == 2, timeout=5)
    first, _ = _lines(log_path)
    # a quote and a backslash the client sent are escaped as nginx does (\xHH)
    assert first == '127.0.0.1 "GET /a%22b" 200 1 "probe\\x5C1" test/main $'


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


async def test_metrics_off_still_writes_the_access_log(recorders, proxy, tmp_path: Path):
    up = await recorders("a")
    log_path = tmp_path / "access.log"
    config = _with_access_log(make_config([up.url]), str(log_path))
    config = config.model_copy(update={"metrics": MetricsSpec(enabled=False)})
    server = await proxy(config)
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.get(proxy_url(server)) as resp:
                assert resp.status == 200
    await wait_for(lambda: len(_lines(log_path)) == 3, timeout=5)
    assert all(0 < json.loads(line)["duration_ms"] < 5000 for line in _lines(log_path))
