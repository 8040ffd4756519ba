"""Rotating the access log of a running ``aiolb run`` (issue #27): ``mv`` the file, then
SIGUSR1 (what logrotate sends nginx) or SIGHUP (a reload); the lines after it go to a
new file at the configured path, and the process keeps serving."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from tests.support import REPO, Aiolb, Recorder, wait_for

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


async def test_sigusr1_while_workers_start_kills_none_of_them(
    recorders: MakeRecorder, tmp_path: Path
) -> None:
    """A worker that has not installed its handlers yet dies of SIGUSR1 (its default
    action): the supervisor passes it only to workers that said they are ready, and
    tells one that starts meanwhile once it is (it may have opened the old file)."""
    rec = await recorders("ok")
    log, pid_file = tmp_path / "access.log", tmp_path / "aiolb.pid"
    path = tmp_path / "aiolb.yaml"
    path.write_text(config_text(rec.url, 2, log) + f'pid_file: "{pid_file}"\n')
    proc = Aiolb(path)
    env = {k: v for k, v in os.environ.items() if k != "AIOLB_ADMIN_TOKEN"}
    proc.proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "-c", str(path),
        stderr=asyncio.subprocess.PIPE, cwd=REPO, env=env,
    )  # fmt: skip
    proc._reader = asyncio.ensure_future(proc._read())
    try:
        # the pid file is written once the supervisor's handlers are in place; from then
        # on, logrotate may signal it at any time: here, all through the workers' start
        await wait_for(pid_file.exists, 30.0)
        deadline = asyncio.get_running_loop().time() + 30.0
        sent = 0
        while not proc.logged("2 workers serving"):
            assert asyncio.get_running_loop().time() < deadline, "the workers never served"
            proc.proc.send_signal(signal.SIGUSR1)
            sent += 1
            await asyncio.sleep(0.02)  # the stimulus's pace, not a wait for a condition
        assert sent > 1  # the signals did arrive while the workers were starting
        assert not [line for line in proc.lines if "killed by" in line], proc.lines
        assert proc.proc.returncode is None
        await get_each(proc.url, ["after"])
        await wait_for(lambda: count(log, "/after") == 1)
    finally:
        assert await proc.stop() == 0
