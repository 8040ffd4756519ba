"""The two scripts the container image ships (deploy/docker/), run as the image runs
them: real processes on 127.0.0.1.

``demo_upstream.py`` is the upstream of docker-compose and of the Kubernetes example;
``healthcheck.py`` is the image's HEALTHCHECK. Docker itself is exercised by
``loadtests/docker_smoke.sh``, which CI runs on an engine it starts.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from tests.support import REPO, unused_port

SCRIPTS = REPO / "deploy" / "docker"


def script_env(**extra: str) -> dict[str, str]:
    # In the image `proxy` is installed; here it is imported from the checkout.
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


async def healthcheck(url: str) -> tuple[int, str]:
    """Run the HEALTHCHECK script against ``url``: (exit code, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPTS / "healthcheck.py"),
        stderr=asyncio.subprocess.PIPE, env=script_env(AIOLB_HEALTHCHECK_URL=url),
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def wait_until_answering(url: str, proc: asyncio.subprocess.Process) -> None:
    deadline = asyncio.get_running_loop().time() + 20
    async with aiohttp.ClientSession() as session:
        while True:
            assert proc.returncode is None, f"exited early with {proc.returncode}"
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            assert asyncio.get_running_loop().time() < deadline, f"{url} never answered"
            await asyncio.sleep(0.05)


@pytest.fixture
async def demo_upstream() -> AsyncIterator[tuple[int, asyncio.subprocess.Process]]:
    """``python demo_upstream.py NAME PORT``, as docker-compose runs it."""
    port = unused_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPTS / "demo_upstream.py"), "upstream-7", str(port),
        stderr=asyncio.subprocess.DEVNULL, env=script_env(),
    )  # fmt: skip
    try:
        await wait_until_answering(f"http://127.0.0.1:{port}/healthz", proc)
        yield port, proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_demo_upstream_answers_with_its_name(
    demo_upstream: tuple[int, asyncio.subprocess.Process],
) -> None:
    port, _ = demo_upstream
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{port}/some/path?q=1") as resp:
            assert resp.status == 200
            assert resp.headers["X-Upstream"] == "upstream-7"
            assert await resp.text() == "Hello from upstream-7: POST /some/path?q=1\n"


async def test_demo_upstream_is_healthy_and_stops_cleanly_on_sigterm(
    demo_upstream: tuple[int, asyncio.subprocess.Process],
) -> None:
    """`docker stop` sends SIGTERM: the demo upstream exits 0, not by SIGKILL."""
    port, proc = demo_upstream
    code, err = await healthcheck(f"http://127.0.0.1:{port}/healthz")
    assert code == 0, err
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 10) == 0


async def test_demo_upstream_takes_name_and_port_from_the_environment() -> None:
    """The Kubernetes example passes the pod name and port as DEMO_NAME and DEMO_PORT."""
    port = unused_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPTS / "demo_upstream.py"),
        stderr=asyncio.subprocess.DEVNULL,
        env=script_env(DEMO_NAME="web-5d9c7-abcde", DEMO_PORT=str(port)),
    )  # fmt: skip
    try:
        await wait_until_answering(f"http://127.0.0.1:{port}/healthz", proc)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/") as resp:
                assert resp.headers["X-Upstream"] == "web-5d9c7-abcde"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0


async def test_healthcheck_fails_on_an_error_status_and_a_refused_connection() -> None:
    async def not_ready(request: web.Request) -> web.Response:
        return web.Response(status=503, text="not ready\n")

    app = web.Application()
    app.router.add_get("/healthz", not_ready)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = unused_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        code, err = await healthcheck(f"http://127.0.0.1:{port}/healthz")
        assert code == 1 and "unhealthy" in err and "503" in err, err
    finally:
        await runner.cleanup()
    # the same port, now closed
    code, err = await healthcheck(f"http://127.0.0.1:{port}/healthz")
    assert code == 1 and "unhealthy" in err and "Traceback" not in err, err
