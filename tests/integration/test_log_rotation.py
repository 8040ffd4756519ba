"""Rotating the access log of a running ``aiolb run`` (issue #27): ``mv`` the file, then
SIGUSR1 (what logrotate sends nginx) or SIGHUP (a reload); the lines after it go to a
new file at the configured path, and the process keeps serving."""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from tests.support import Aiolb, Recorder, wait_for

MakeRecorder = Callable[..., Awaitable[Recorder]]
MakeAiolb = Callable[..., Awaitable[Aiolb]]


def config_text(url: str, workers: int, log: Path) -> str:
    return f"""\
listeners:
  - name: test
    bind: "127.0.0.1:0"
    routes: [{{pool: main}}]
pools:
  main:
    upstreams: [{{url: "{url}"}}]
admin: {{bind: "127.0.0.1:0"}}
workers: {workers}
access_log: {{path: "{log}"}}
"""


async def get_each(url: str, paths: list[str]) -> None:
    """One request per path, each on a new connection (so that they spread over workers)."""
    for path in paths:
        async with aiohttp.ClientSession() as s, s.get(url + path) as resp:
            assert resp.status == 200


def count(path: Path, text: str) -> int:
    return path.read_text().count(text) if path.exists() else 0


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize(
    ("sig", "done"),
    [(signal.SIGUSR1, "reopening the access log"), (signal.SIGHUP, "reloaded ")],
    ids=["SIGUSR1", "SIGHUP"],
)
async def test_moved_access_log_is_reopened(
    aiolb: MakeAiolb, recorders: MakeRecorder, tmp_path: Path, workers: int,
    sig: signal.Signals, done: str,
) -> None:  # fmt: skip
    rec = await recorders("ok")
    log = tmp_path / "access.log"
    proc = await aiolb(config_text(rec.url, workers, log), workers=workers)
    assert proc.proc is not None
    before = [f"before-{i}" for i in range(6)]
    await get_each(proc.url, before)
    await wait_for(lambda: count(log, "/before-") == len(before))

    rotated = log.rename(tmp_path / "access.log.1")
    # SIGUSR1: the supervisor and each worker say so; SIGHUP: the reload is logged once
    expected = proc.logged(done) + (workers + 1 if sig == signal.SIGUSR1 and workers > 1 else 1)
    proc.proc.send_signal(sig)
    await wait_for(lambda: proc.logged(done) >= expected, 15.0)

    after = [f"after-{i}" for i in range(6)]
    await get_each(proc.url, after)
    await wait_for(lambda: count(log, "/after-") == len(after))
    assert count(log, "/before-") == 0
    assert count(rotated, "/after-") == 0 and count(rotated, "/before-") == len(before)
    assert proc.proc.returncode is None
    assert await proc.stop() == 0
