"""``aiolb reload`` and ``aiolb stop`` against a running ``aiolb run``: through the admin
API with the configured token, or, with ``pid_file``, by signal.

The admin API needs a fixed port here (the commands read it from the file): a port the
system handed out for port 0 and released (``unused_port``).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tests.support import HOST, Aiolb, Recorder, aiolb_cli, unused_port, wait_for

MakeRecorder = Callable[..., Awaitable[Recorder]]
MakeAiolb = Callable[..., Awaitable[Aiolb]]


def config_text(urls: list[str], admin: str, top: str = "", listener_port: int = 0) -> str:
    upstreams = ", ".join(f'{{url: "{url}"}}' for url in urls)
    return (
        "listeners:\n"
        f'  - {{name: test, bind: "{HOST}:{listener_port}", routes: [{{pool: main}}]}}\n'
        "pools:\n"
        f"  main: {{upstreams: [{upstreams}]}}\n"
        f"admin: {admin}\n"
        "shutdown_timeout: 5s\n"
        f"{top}"
    )


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``aiolb ARGS`` in a thread (the proxy it talks to runs in another process)."""
    result = await asyncio.to_thread(aiolb_cli, *args, env=env)
    return result.returncode, result.stdout, result.stderr


async def test_reload_says_what_changed_or_why_not(
    recorders: MakeRecorder, aiolb: MakeAiolb
) -> None:
    a, b = await recorders("a"), await recorders("b")
    admin = f'{{bind: "{HOST}:{unused_port()}", token: "${{TOKEN}}"}}'
    env = {"TOKEN": "right"}
    proc = await aiolb(config_text([a.url], admin), env=env)
    path = str(proc.path)

    proc.path.write_text(config_text([a.url, b.url], admin))
    code, out, err = await cli("reload", "-c", path, env=env)
    assert (code, err) == (0, "")
    assert out == f"reloaded: pool main: upstream {HOST}:{b.port} added\n"
    await wait_for(lambda: proc.logged(
        f"reloaded {path}: pool main: upstream {HOST}:{b.port} added"))  # fmt: skip

    # the same file again: nothing to change
    assert (await cli("reload", "-c", path, env=env))[:2] == (0, "reloaded: no changes\n")

    # a token the proxy does not know
    code, _, err = await cli("reload", "-c", path, env={"TOKEN": "wrong"})
    assert code == 1 and "refused the token" in err and err.count("\n") == 1, err

    # a file that does not validate is not sent at all
    proc.path.write_text(config_text([a.url, b.url], admin).replace("{url", "{weight: 0, url", 1))
    code, _, err = await cli("reload", "-c", path, env=env)
    assert code == 2 and err.startswith(f"{path}:4: pools.main.upstreams[0].weight: must be >= 1")
    assert err.rstrip().endswith("nothing sent: the running aiolb keeps its config")

    # a file the proxy refuses (its new listener port is taken): the proxy's reasons
    with socket.socket() as holder:
        holder.bind((HOST, 0))
        holder.listen()
        taken = holder.getsockname()[1]
        proc.path.write_text(config_text([a.url], admin, listener_port=taken))
        code, _, err = await cli("reload", "-c", path, env=env)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert f"cannot bind {HOST}:{taken}" in lines[0] and lines[0].startswith(path)
    assert lines[-1] == "reload refused: the running config stays"
    assert proc.proc is not None and proc.proc.returncode is None


@pytest.mark.parametrize("workers", [1, 2])
async def test_stop_drains_and_returns_once_aiolb_is_gone(
    recorders: MakeRecorder, aiolb: MakeAiolb, workers: int
) -> None:
    a = await recorders("a")
    admin = f'{{bind: "{HOST}:{unused_port()}"}}'
    proc = await aiolb(config_text([a.url], admin, top=f"workers: {workers}\n"), workers)
    code, out, err = await cli("stop", "-c", str(proc.path))
    assert (code, err) == (0, ""), err
    assert out.splitlines()[-1] == "stopped"
    assert proc.proc is not None
    assert await asyncio.wait_for(proc.proc.wait(), 5) == 0  # gone: exited by itself, 0
    assert proc.logged("stop requested through the admin API")


async def test_without_an_admin_port_the_pid_file_is_signalled(
    recorders: MakeRecorder, aiolb: MakeAiolb, tmp_path: Path
) -> None:
    a, b = await recorders("a"), await recorders("b")
    pid_file = tmp_path / "aiolb.pid"
    admin = f'{{bind: "{HOST}:0"}}'  # the port is chosen at start: not in the file
    proc = await aiolb(config_text([a.url], admin, top=f"pid_file: {pid_file}\n"))
    assert proc.proc is not None
    assert pid_file.read_text() == f"{proc.proc.pid}\n"

    proc.path.write_text(config_text([a.url, b.url], admin, top=f"pid_file: {pid_file}\n"))
    code, out, _ = await cli("reload", "-c", str(proc.path))
    assert code == 0 and out.startswith(f"sent SIGHUP to aiolb (pid {proc.proc.pid})"), out
    await wait_for(lambda: proc.logged(f"pool main: upstream {HOST}:{b.port} added"))

    code, out, err = await cli("stop", "-c", str(proc.path))
    assert code == 0 and out.splitlines()[-1] == "stopped", (out, err)
    assert await asyncio.wait_for(proc.proc.wait(), 5) == 0
    assert not pid_file.exists()  # removed on exit


async def test_nothing_running_is_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(config_text(["http://127.0.0.1:9"], f'{{bind: "{HOST}:{unused_port()}"}}'))
    for command in ("reload", "stop"):
        code, out, err = await cli(command, "-c", str(path))
        assert (code, out) == (1, "")
        assert err.count("\n") == 1 and err.startswith(f"aiolb {command}: cannot reach the "
                                                       "admin API at http://"), err  # fmt: skip
    stale = tmp_path / "stale.pid"
    stale.write_text(f"{2**22 + 12345}\n")  # above the kernel's default pid_max
    path.write_text(config_text(["http://127.0.0.1:9"], f'{{bind: "{HOST}:0"}}',
                                top=f"pid_file: {stale}\n"))  # fmt: skip
    code, _, err = await cli("stop", "-c", str(path))
    assert code == 1 and "which is not running" in err, err
    assert os.path.exists(stale)


@pytest.mark.parametrize("clash", ["listener", "admin"])
async def test_a_second_run_that_cannot_bind_leaves_the_pid_file_alone(
    recorders: MakeRecorder, aiolb: MakeAiolb, tmp_path: Path, clash: str
) -> None:
    a = await recorders("a")
    pid_file = tmp_path / "aiolb.pid"
    admin = f'{{bind: "{HOST}:{unused_port()}"}}'
    proc = await aiolb(config_text([a.url], admin, top=f"pid_file: {pid_file}\n"))
    assert proc.proc is not None
    assert pid_file.read_text() == f"{proc.proc.pid}\n"

    # the same pid_file, and the running one's listener port or admin address
    second = tmp_path / "second.yaml"
    if clash == "listener":
        text = config_text([a.url], f'{{bind: "{HOST}:{unused_port()}"}}',
                           top=f"pid_file: {pid_file}\n", listener_port=proc.port)  # fmt: skip
    else:
        text = config_text([a.url], admin, top=f"pid_file: {pid_file}\n")
    second.write_text(text)
    code, _, err = await cli("run", "-c", str(second))
    assert code == 1 and "cannot listen on" in err, err
    assert pid_file.read_text() == f"{proc.proc.pid}\n"  # still the running one's

    # so stop finds it by the file (and by the admin API)
    code, out, err = await cli("stop", "-c", str(proc.path))
    assert (code, err) == (0, "") and out.splitlines()[-1] == "stopped", (out, err)
    assert not pid_file.exists()


async def test_a_pid_file_naming_another_process_is_not_removed_at_exit(
    recorders: MakeRecorder, aiolb: MakeAiolb, tmp_path: Path
) -> None:
    a = await recorders("a")
    pid_file = tmp_path / "aiolb.pid"
    proc = await aiolb(config_text([a.url], f'{{bind: "{HOST}:0"}}',
                                   top=f"pid_file: {pid_file}\n"))  # fmt: skip
    pid_file.write_text(f"{os.getpid()}\n")  # another instance took it over since
    assert await proc.stop() == 0
    assert pid_file.read_text() == f"{os.getpid()}\n"


async def test_stop_with_a_broken_config_says_how_to_stop_it_by_hand(
    recorders: MakeRecorder, aiolb: MakeAiolb, tmp_path: Path
) -> None:
    a = await recorders("a")
    pid_file = tmp_path / "aiolb.pid"
    admin = f'{{bind: "{HOST}:{unused_port()}"}}'
    proc = await aiolb(config_text([a.url], admin, top=f"pid_file: {pid_file}\n"))
    assert proc.proc is not None
    path = str(proc.path)
    proc.path.write_text(config_text([a.url], admin, top=f"pid_file: {pid_file}\nbogus: 1\n"))
    code, out, err = await cli("stop", "-c", path)
    assert (code, out) == (2, "")
    lines = err.splitlines()
    assert lines[0].startswith(f"{path}:8: bogus:"), err
    assert lines[-1] == (f"nothing sent: to stop the running aiolb anyway, kill -TERM "
                         f"{proc.proc.pid} (from {pid_file}; SIGTERM drains as aiolb stop "
                         "does)")  # fmt: skip
    assert proc.proc.returncode is None  # still serving

    # no pid_file (or no YAML at all): the pid is in its start-up line
    proc.path.write_text("listeners: [\n")
    code, _, err = await cli("stop", "-c", path)
    assert code == 2 and err.splitlines()[-1].startswith(
        "nothing sent: to stop the running aiolb anyway, kill -TERM <pid> (SIGTERM drains"
    ), err


async def test_a_second_run_that_binds_takes_the_pid_file_over_with_a_warning(
    recorders: MakeRecorder, aiolb: MakeAiolb, tmp_path: Path
) -> None:
    a = await recorders("a")
    pid_file = tmp_path / "aiolb.pid"
    admin = f'{{bind: "{HOST}:0"}}'
    first = await aiolb(config_text([a.url], admin, top=f"pid_file: {pid_file}\n"))
    second = await aiolb(config_text([a.url], admin, top=f"pid_file: {pid_file}\n"))
    assert first.proc is not None and second.proc is not None
    # the pid file is written just after the "serving" line: wait for it, not for luck
    await wait_for(lambda: pid_file.read_text() == f"{second.proc.pid}\n")  # type: ignore[union-attr]
    await wait_for(lambda: second.logged(
        f"pid_file {pid_file} named pid {first.proc.pid}, still running; "  # type: ignore[union-attr]
        f"it now names this process ({second.proc.pid})"  # type: ignore[union-attr]
    ))  # fmt: skip
