"""The command line as a user runs it: real processes, real sockets."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp

from proxy import __version__

REPO = Path(__file__).resolve().parents[2]


def _aiolb(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True, text=True, timeout=60, cwd=REPO, **kw,
    )


def test_version():
    result = _aiolb("version")
    assert result.returncode == 0 and result.stdout.strip() == f"aiolb {__version__}"


def test_check_accepts_the_default_config():
    result = _aiolb("check", "-c", "config/aiolb.yaml")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("config/aiolb.yaml: OK")


def test_check_reports_every_problem_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "listeners:\n"
        "  - name: public\n"
        "    bind: \"127.0.0.1:8080\"\n"
        "    routes:\n"
        "      - match: {path_prefix: \"/\"}\n"
        "        pool: nowhere\n"
        "pools:\n"
        "  web:\n"
        "    upstreams:\n"
        "      - {url: \"http://127.0.0.1:9001\"}\n"
        "      - {url: \"http://127.0.0.1:9002\", weight: 0}\n"
    )
    result = _aiolb("check", "-c", str(bad))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert any(re.match(rf"{re.escape(str(bad))}:6: .*pool.*nowhere", ln) for ln in lines), lines
    assert any(
        ln.startswith(f"{bad}:11: pools.web.upstreams[1].weight: must be >= 1") for ln in lines
    ), lines
    assert "Traceback" not in result.stderr


def test_check_missing_file_is_one_clear_line(tmp_path):
    result = _aiolb("check", "-c", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "nope.yaml" in result.stderr and "Traceback" not in result.stderr


def test_run_refuses_a_bad_config_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("listeners: [\n")
    result = _aiolb("run", "-c", str(bad))
    assert result.returncode == 2
    assert f"{bad}:" in result.stderr and "Traceback" not in result.stderr


async def _read_banner(proc: asyncio.subprocess.Process) -> str:
    assert proc.stdout is not None
    text = ""
    while "Ctrl-C" not in text:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line, f"demo exited early: {text}"
        text += line.decode()
    return text


async def test_demo_answers_through_the_proxy_and_stops_on_ctrl_c():
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "demo", "--port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        banner = await _read_banner(proc)
        url = re.search(r"proxy on (http://127\.0\.0\.1:\d+)", banner).group(1)
        assert "curl" in banner
        seen = []
        async with aiohttp.ClientSession() as session:
            for _ in range(6):
                async with session.get(f"{url}/hello") as resp:
                    assert resp.status == 200
                    seen.append(resp.headers["X-Upstream"])
        assert sorted(set(seen)) == ["demo-1", "demo-2", "demo-3"]
        assert seen[:3] != [seen[0]] * 3  # round robin, not one upstream
    finally:
        proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(proc.wait(), 30)
    assert code == 0
