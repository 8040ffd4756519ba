"""What the access log says about failures, tunnels and refusals, and the fields nginx
users look for (issue #27): the upstream tried for a proxy-made 502/504, a WebSocket
logged at its close with what it carried, the 4xx a connection refuses by itself, and
``upstream_status``, ``upstream_connect_time``, ``upstream_header_time``, ``referer``
and ``http_NAME``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import connect

from proxy.config import Config
from proxy.runtime.server import ProxyServer
from tests.integration.test_websocket import Echo, start_echo
from tests.support import HOST, Recorder, make_config, raw_exchange, unused_port, wait_for

MakeProxy = Callable[[Config], Awaitable[ProxyServer]]
MakeRecorder = Callable[..., Awaitable[Recorder]]


def with_log(config: Config, path: Path, fields: list[str] | None = None) -> Config:
    access_log: dict[str, Any] = {"path": str(path)}
    if fields is not None:
        access_log["format"] = fields
    return Config.model_validate({**config.model_dump(), "access_log": access_log})


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def one_line(path: Path, count: int = 1) -> dict[str, Any]:
    await wait_for(lambda: len(lines(path)) >= count)
    return lines(path)[count - 1]


async def test_a_proxy_made_502_and_504_name_the_upstream_tried(
    proxy: MakeProxy, raw_upstreams: Any, tmp_path: Path
) -> None:
    down = f"{HOST}:{unused_port()}"
    hang = await raw_upstreams({b"/hang": None})
    log = tmp_path / "access.log"
    config = make_config(
        [f"http://{down}"], pool={"retries": {"attempts": 1}},
        routes=[{"match": {"path_prefix": "/hang"}, "pool": "hang"},
                {"match": {"path_prefix": "/"}, "pool": "main"}],
        pools={"hang": {"upstreams": [{"url": hang.url}],
                        "timeouts": {"response_header": "200ms"}}},
    )  # fmt: skip
    fields = ["status", "upstream", "upstream_status", "upstream_connect_time"]
    server = await proxy(with_log(config, log, fields))
    port = server.listeners[0].port

    refused = await raw_exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    timed_out = await raw_exchange(
        port, b"GET /hang HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )

    assert refused.startswith(b"HTTP/1.1 502") and timed_out.startswith(b"HTTP/1.1 504")
    first, second = await one_line(log), await one_line(log, 2)
    assert first == {"status": 502, "upstream": down, "upstream_status": None,
                     "upstream_connect_time": None}  # fmt: skip
    assert second["status"] == 504 and second["upstream"] == hang.url.removeprefix("http://")
    assert second["upstream_status"] is None
    assert float(second["upstream_connect_time"]) >= 0


async def test_upstream_fields_referer_and_headers_by_name(
    proxy: MakeProxy, recorders: MakeRecorder, tmp_path: Path
) -> None:
    up = await recorders("ok")
    log = tmp_path / "access.log"
    fields = ["status", "upstream_status", "upstream_connect_time", "upstream_header_time",
              "referer", "http_x_custom", "http_x_absent"]  # fmt: skip
    server = await proxy(with_log(make_config([up.url]), log, fields))
    url = f"http://{HOST}:{server.listeners[0].port}/x"
    async with aiohttp.ClientSession() as session:
        headers = {"Referer": "https://example.test/from", "X-Custom": 'a "b"'}
        for _ in range(2):  # the second reuses the pooled connection
            async with session.get(url, headers=headers) as resp:
                assert resp.status == 200

    first, second = await one_line(log), await one_line(log, 2)
    assert first["upstream_status"] == 200 and first["referer"] == "https://example.test/from"
    assert first["http_x_custom"] == 'a "b"' and first["http_x_absent"] is None
    assert 0 <= float(first["upstream_header_time"]) < 5
    assert 0 <= float(first["upstream_connect_time"]) < 5
    assert second["upstream_connect_time"] == 0  # nginx: 0 for a kept-alive connection


async def test_the_text_format_takes_the_new_fields(
    proxy: MakeProxy, recorders: MakeRecorder, tmp_path: Path
) -> None:
    up = await recorders("ok")
    log = tmp_path / "access.log"
    template = '$status $upstream_status "$referer" "$http_x_custom" $upstream_header_time'
    config = Config.model_validate(
        {**make_config([up.url]).model_dump(), "access_log": {"path": str(log),
                                                               "format": template}}
    )  # fmt: skip
    server = await proxy(config)
    url = f"http://{HOST}:{server.listeners[0].port}/x"
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers={"X-Custom": "v"}) as resp,
    ):
        assert resp.status == 200
    await wait_for(lambda: log.exists() and log.read_text().endswith("\n"))
    status, upstream_status, referer, custom, header_time = log.read_text().split()
    assert (status, upstream_status, referer, custom) == ("200", "200", '"-"', '"v"')
    assert float(header_time) >= 0


async def test_a_websocket_is_logged_at_its_close_with_what_it_carried(
    proxy: MakeProxy, tmp_path: Path
) -> None:
    echo: Echo = await start_echo()
    try:
        log = tmp_path / "access.log"
        fields = ["status", "bytes_in", "bytes_out", "duration_ms", "upstream_status"]
        server = await proxy(with_log(make_config([echo.url]), log, fields))
        url = f"ws://{HOST}:{server.listeners[0].port}/chat"
        async with connect(url, max_size=None, compression=None) as ws:
            for _ in range(3):
                await ws.send(b"x" * 10_000)
                assert await ws.recv() == b"x" * 10_000
            await asyncio.sleep(0.3)  # an open tunnel that has lasted (a duration, not a wait)
            assert lines(log) == [] or not log.read_text()  # nothing yet: it is open
        line = await one_line(log)
    finally:
        await echo.stop()
    assert line["status"] == 101 and line["upstream_status"] == 101
    assert line["bytes_in"] >= 30_000 and line["bytes_out"] >= 30_000
    assert line["duration_ms"] >= 300


REFUSED = {
    431: b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
    400: b"POST /dup HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    414: b"GET /" + b"u" * 20_000 + b" HTTP/1.1\r\nHost: a\r\n\r\n",
    408: b"GET /slow HTTP/1.1\r\nHost: a\r\nX-Slow: ",
}


@pytest.mark.parametrize("status", REFUSED, ids=[str(s) for s in REFUSED])
async def test_what_a_connection_refuses_itself_is_logged(
    proxy: MakeProxy, recorders: MakeRecorder, tmp_path: Path, status: int
) -> None:
    up = await recorders("ok")
    log = tmp_path / "access.log"
    config = make_config(
        [up.url], listener={"timeouts": {"header": "300ms"},
                            "limits": {"max_header_size": 8192, "max_uri_size": 8192}},
    )  # fmt: skip
    server = await proxy(with_log(config, log))
    answer = await raw_exchange(server.listeners[0].port, REFUSED[status])

    assert answer.startswith(b"HTTP/1.1 %d " % status)
    line = await one_line(log)
    assert line["status"] == status and line["client"] == HOST
    assert line["upstream"] == "" and line["listener"] == "test"
    if status == 400:
        assert (line["method"], line["path"]) == ("POST", "/dup")
