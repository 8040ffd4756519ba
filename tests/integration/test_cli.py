"""The command line as a user runs it: real processes, real sockets."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
import yaml

from proxy import __version__
from proxy.cli import _arguments, main
from proxy.config import load_config
from proxy.config.schema import HIDDEN
from tests.support import HOST, REPO, CertAuthority, aiolb_cli, wait_for

PUBLIC_ADMIN = """\
listeners:
  - {name: web, bind: "127.0.0.1:0", routes: [{pool: main}]}
pools:
  main: {upstreams: [{url: "http://127.0.0.1:9"}]}
admin: {bind: "0.0.0.0:0"}
"""


def test_version() -> None:
    result = aiolb_cli("version")
    assert result.returncode == 0 and result.stdout.strip() == f"aiolb {__version__}"


Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    """``main(args)`` in this process: ``(exit code, stdout, stderr)``, for commands that
    do not serve. ``env`` is set for the call, after clearing the ``AIOLB_*`` variables."""

    def call(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        for name in ("AIOLB_CONFIG", "AIOLB_LOG_LEVEL", "AIOLB_ADMIN_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    return call


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_flags(cli: Cli, flag: str) -> None:
    assert cli(flag) == (0, f"aiolb {__version__}\n", "")


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["--log-level", "bogus", "version"], {}, "invalid choice: 'bogus'"),
        (["version"], {"AIOLB_LOG_LEVEL": "loud"}, "AIOLB_LOG_LEVEL='loud' is not a log level"),
        ([], {}, "a command is required: run,check,"),
        (["bogus"], {}, "invalid choice: 'bogus'"),
        (["run"], {}, "run: -c FILE is required (or set AIOLB_CONFIG)"),
        (["check", "-c", "x.yaml", "--nope"], {}, "unrecognized arguments: --nope"),
        (["demo", "--port", "many"], {}, "argument --port: invalid int value: 'many'"),
        (["run", "-c", "x.yaml", "--log-level", "loud"], {}, "invalid choice: 'loud'"),
    ],
)
def test_a_usage_mistake_is_one_line_and_exit_2(
    cli: Cli, args: list[str], env: dict[str, str], says: str
) -> None:
    code, out, err = cli(*args, env=env)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and err.startswith("aiolb") and says in err, err
    assert "_worker" not in err


@pytest.mark.parametrize(
    ("args", "level"),
    [
        (["run", "-c", "x.yaml", "--log-level", "debug"], "debug"),
        (["--log-level", "error", "run", "-c", "x.yaml"], "error"),
        (["--log-level", "error", "check", "-c", "x.yaml", "--log-level", "DEBUG"], "debug"),
        (["stop", "--log-level", "warning", "-c", "x.yaml"], "warning"),
        (["check", "-c", "x.yaml"], "info"),
    ],
)
def test_log_level_goes_before_or_after_the_command(
    monkeypatch: pytest.MonkeyPatch, args: list[str], level: str
) -> None:
    monkeypatch.delenv("AIOLB_LOG_LEVEL", raising=False)
    assert _arguments(args).log_level == level  # the last one given wins


def test_log_level_after_the_command_from_the_shell() -> None:
    result = aiolb_cli("check", "-c", "config/aiolb.yaml", "--log-level", "debug")
    assert result.returncode == 0 and result.stdout.startswith("config/aiolb.yaml: OK")


def test_a_bad_flag_from_the_shell_has_no_traceback() -> None:
    result = aiolb_cli("--log-level", "bogus", "version")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr


def test_help_lists_the_commands_and_explains_the_options(cli: Cli) -> None:
    code, top, _ = cli("--help")
    assert code == 0
    for command in ("run", "check", "reload", "stop", "demo", "example", "version"):
        assert re.search(rf"^\s+{command}\s+\S", top, re.M), (command, top)
    assert "_worker" not in top
    assert "--log-level LEVEL" in top and "AIOLB_LOG_LEVEL" in top
    for command in ("run", "check", "reload", "stop"):
        text = cli(command, "--help")[1]
        assert "-c FILE, --config FILE" in text and "(default: $AIOLB_CONFIG)" in text, text


def test_config_defaults_to_aiolb_config(cli: Cli) -> None:
    code, out, _ = cli("check", env={"AIOLB_CONFIG": "config/routing.yaml"})
    assert code == 0 and out.startswith("config/routing.yaml: OK")


# --- check and run refuse the same files --------------------------------------------------


def _preflight_cases(tmp_path: Path) -> list[tuple[str, int, str]]:
    """(config text, line, message start) for each refusal ``run`` makes from the file."""
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    base = PUBLIC_ADMIN.replace("0.0.0.0:0", "127.0.0.1:0")
    return [
        (PUBLIC_ADMIN, 5, "admin.bind: 0.0.0.0:0 is not a loopback address and no token is set"),
        (base + f"access_log: {{path: {tmp_path}/missing/access.log}}\n", 6,
         f"access_log.path: cannot create {tmp_path}/missing/access.log: directory "
         f"{tmp_path}/missing does not exist"),
        (base + f"access_log: {{path: {log_dir}}}\n", 6, f"access_log.path: {log_dir} is a "
         "directory"),
        (base + f"pid_file: {tmp_path}/run/aiolb.pid\n", 6, f"pid_file: cannot create "
         f"{tmp_path}/run/aiolb.pid: directory {tmp_path}/run does not exist"),
        (base.replace('bind: "127.0.0.1:0", routes', 'bind: "no-such-host.invalid:0", routes'),
         2, "listeners[0].bind: host 'no-such-host.invalid' does not resolve"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(5))
def test_check_refuses_what_run_refuses(cli: Cli, tmp_path: Path, case: int) -> None:
    text, line, message = _preflight_cases(tmp_path)[case]
    path = tmp_path / "c.yaml"
    path.write_text(text)
    code, out, err = cli("check", "-c", str(path))
    run = aiolb_cli("run", "-c", str(path))
    assert code == run.returncode == 2
    assert err == run.stderr, (err, run.stderr)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{path}:{line}: {message}"), lines
    assert "Traceback" not in run.stderr and out == ""


def test_a_token_makes_a_public_admin_acceptable(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(PUBLIC_ADMIN)
    assert cli("check", "-c", str(path), env={"AIOLB_ADMIN_TOKEN": "t"})[0] == 0
    path.write_text(PUBLIC_ADMIN.replace('"0.0.0.0:0"}', '"0.0.0.0:0", token: s3cret}'))
    assert cli("check", "-c", str(path))[0] == 0


# --- the effective config -------------------------------------------------------------------


def test_check_print_shows_the_effective_config(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "listeners:\n"
        '  - {name: web, bind: "127.0.0.1:${PORT}", routes: [{pool: main}]}\n'
        "pools:\n"
        "  main:\n"
        "    balancer: {name: peak_ewma, decay: 5s}\n"
        '    upstreams: [{url: "http://127.0.0.1:9001", name: app-1}]\n'
        'admin: {bind: "127.0.0.1:9902", token: "${TOKEN}"}\n'
    )
    env = {"PORT": "8081", "TOKEN": "very-secret-token"}
    code, out, err = cli("check", "-c", str(path), "--print", env=env)
    assert code == 0, err
    assert "very-secret-token" not in out
    assert out.startswith(f"# The effective config of {path}")
    data = yaml.safe_load(out)
    listener, pool = data["listeners"][0], data["pools"]["main"]
    assert listener["bind"] == "127.0.0.1:8081"  # ${PORT} expanded
    assert listener["timeouts"] == {"header": "10s", "idle": "1m", "body": "1m", "send": "1m"}
    assert listener["limits"]["max_header_size"] == "64KiB"
    assert pool["balancer"] == {"name": "peak_ewma", "decay": "5s"}
    assert pool["upstreams"] == [{"url": "http://127.0.0.1:9001", "name": "app-1", "weight": 1,
                                  "backup": False, "max_connections": None}]  # fmt: skip
    assert pool["retries"]["attempts"] == 2 and pool["health_check"]["active"] is None
    assert data["admin"] == {"bind": "127.0.0.1:9902", "token": HIDDEN, "allowed_hosts": None}
    assert data["access_log"] is None and data["workers"] == 1
    # what it prints is a config that means the same (the token aside)
    printed = tmp_path / "printed.yaml"
    printed.write_text(out)
    expected = load_config(path, env=env)
    assert load_config(printed, env={}) == expected.model_copy(
        update={"admin": expected.admin.model_copy(update={"token": HIDDEN})})  # fmt: skip


def test_check_print_names_each_route_as_the_proxy_does(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "listeners:\n"
        '  - name: public\n    bind: "127.0.0.1:0"\n'
        "    routes: [{pool: main, match: {path_prefix: /a/}}, {pool: main, name: rest}]\n"
        'pools: {main: {upstreams: [{url: "http://127.0.0.1:9001"}]}}\n'
    )
    code, out, err = cli("check", "-c", str(path), "--print")
    assert code == 0, err
    assert "  - name: null  # public/0\n" in out and "  - name: rest\n" in out
    printed = tmp_path / "printed.yaml"
    printed.write_text(out)
    assert load_config(printed) == load_config(path)


def test_check_print_says_where_the_token_comes_from(cli: Cli) -> None:
    code, out, _ = cli("check", "-c", "config/aiolb.yaml", "--print",
                       env={"AIOLB_ADMIN_TOKEN": "from-env"})  # fmt: skip
    assert code == 0
    assert "AIOLB_ADMIN_TOKEN is set and is the token" in out and "from-env" not in out


# --- start-up: what it serves, and a busy port ---------------------------------------------


def test_a_busy_port_names_the_key_to_change(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind((HOST, 0))
        holder.listen()
        port = holder.getsockname()[1]
        path = tmp_path / "c.yaml"
        path.write_text(PUBLIC_ADMIN.replace("0.0.0.0:0", "127.0.0.1:0").replace(
            "127.0.0.1:0\", routes", f"127.0.0.1:{port}\", routes"))  # fmt: skip
        listener = aiolb_cli("run", "-c", str(path))
        path.write_text(PUBLIC_ADMIN.replace("0.0.0.0:0", f"127.0.0.1:{port}"))
        admin = aiolb_cli("run", "-c", str(path))
        demo = aiolb_cli("demo", "--port", str(port))
    assert listener.returncode == admin.returncode == demo.returncode == 1
    assert listener.stderr.strip().splitlines()[-1] == (
        f"{path}:2: listeners[0].bind: cannot listen on 127.0.0.1:{port}: address already in "
        "use (another process holds it: stop it or change this key)")  # fmt: skip
    assert (
        admin.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"{path}:5: admin.bind: cannot listen on 127.0.0.1:{port}: address already in use"
        )
    )
    assert demo.stderr.strip() == (
        f"aiolb demo: cannot listen on 127.0.0.1:{port}: address already in use; choose "
        "another port with --port N (--port 0: any free port)")  # fmt: skip
    for result in (listener, admin, demo):
        assert "Traceback" not in result.stderr


async def test_run_says_what_it_serves(recorders, aiolb, tmp_path: Path) -> None:
    a, b = await recorders("a"), await recorders("b")
    pair = CertAuthority(tmp_path).issue("example.com")
    text = (
        "listeners:\n"
        "  - name: public\n"
        f'    bind: "{HOST}:0"\n'
        "    routes:\n"
        "      - {match: {host: api.example.com, path_prefix: /v1/}, pool: api}\n"
        "      - {pool: web}\n"
        "  - name: secure\n"
        f'    bind: "{HOST}:0"\n'
        f"    tls: {{certificates: [{{cert: {pair.cert}, key: {pair.key}}}]}}\n"
        "    routes: [{pool: web}]\n"
        "  - name: plain\n"
        f'    bind: "{HOST}:0"\n'
        "    redirect_https: 8443\n"
        "  - name: mixed\n"
        f'    bind: "{HOST}:0"\n'
        "    routes: [{match: {path_prefix: /login}, redirect_https: true}, {pool: api}]\n"
        "pools:\n"
        "  web:\n"
        f'    upstreams: [{{url: "{a.url}", name: app-a, weight: 2}},\n'
        f'                {{url: "{b.url}", backup: true}}]\n'
        "  api:\n"
        "    balancer: least_connections\n"
        f'    upstreams: [{{url: "{a.url}"}}]\n'
        "    health_check: {active: {interval: 2s}}\n"
        f'admin: {{bind: "{HOST}:0"}}\n'
    )
    proc = await aiolb(text)
    said = [line.split(" aiolb: ", 1)[1].rstrip() for line in proc.lines if " aiolb: " in line]
    serving = (re.match(r"listener \S+ serving on \S+:(\d+)", line) for line in said)
    ports = [m.group(1) for m in serving if m]
    a_at, b_at = a.url.removeprefix("http://"), b.url.removeprefix("http://")
    assert said[:8] == [
        f"aiolb {__version__} serving {proc.path} (pid {proc.proc.pid}, 1 worker)",
        f"listener public serving on {HOST}:{proc.port}: api.example.com/v1/ -> api, / -> web",
        f"listener secure serving on {HOST}:{ports[1]} with TLS (1 certificate, TLSv1.2+): "
        "/ -> web",
        f"listener plain serving on {HOST}:{ports[2]}: / -> https:8443 (308)",
        f"listener mixed serving on {HOST}:{ports[3]}: /login -> https (308), / -> api",
        f"pool web: round_robin, 2 upstreams (app-a={a_at} [weight 2], {b_at} [backup]), "
        "no active checks, passive on",
        f"pool api: least_connections, 1 upstream ({a_at}), active checks every 2s, passive on",
        f"admin API on {proc.admin} (dashboard /, metrics /metrics, no token)",
    ], said


async def test_demo_says_prominently_that_the_admin_port_moved() -> None:
    with socket.socket() as holder:
        holder.bind((HOST, 0))
        holder.listen()
        busy = holder.getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "demo", "--port", "0", "--admin-port", str(busy),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        try:
            banner = await _read_banner(proc)
        finally:
            proc.send_signal(signal.SIGINT)
            await asyncio.wait_for(proc.wait(), 30)
    admin_url = re.search(r"Admin: dashboard (http://\S+)/ ", banner).group(1)
    assert not admin_url.endswith(f":{busy}")
    lines = banner.splitlines()
    assert lines[2] == (f"NOTE: port {busy} is busy (another aiolb?), so this demo's admin API "
                        f"and dashboard are on {admin_url},")  # fmt: skip
    assert lines[3].strip().startswith(f"NOT on http://127.0.0.1:{busy}")


def test_check_accepts_the_default_config():
    result = aiolb_cli("check", "-c", "config/aiolb.yaml")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("config/aiolb.yaml: OK")


def test_check_reports_every_problem_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "listeners:\n"
        "  - name: public\n"
        '    bind: "127.0.0.1:8080"\n'
        "    routes:\n"
        '      - match: {path_prefix: "/"}\n'
        "        pool: nowhere\n"
        "pools:\n"
        "  web:\n"
        "    upstreams:\n"
        '      - {url: "http://127.0.0.1:9001"}\n'
        '      - {url: "http://127.0.0.1:9002", weight: 0}\n'
    )
    result = aiolb_cli("check", "-c", str(bad))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert any(re.match(rf"{re.escape(str(bad))}:6: .*pool.*nowhere", ln) for ln in lines), lines
    assert any(
        ln.startswith(f"{bad}:11: pools.web.upstreams[1].weight: must be >= 1") for ln in lines
    ), lines
    assert "Traceback" not in result.stderr


def test_check_missing_file_is_one_clear_line(tmp_path):
    result = aiolb_cli("check", "-c", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "nope.yaml" in result.stderr and "Traceback" not in result.stderr


def test_run_refuses_a_bad_config_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("listeners: [\n")
    result = aiolb_cli("run", "-c", str(bad))
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
        sys.executable,
        "-m",
        "proxy",
        "demo",
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
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


# --- the example configs ------------------------------------------------------------------


def test_example_lists_and_prints_the_example_configs(cli: Cli) -> None:
    code, out, _ = cli("example")
    names = sorted(path.stem for path in (REPO / "config").glob("*.yaml"))
    assert code == 0 and [line.split()[0] for line in out.splitlines()[: len(names)]] == names
    assert "aiolb      the documented default configuration." in out
    assert cli("example", "aiolb") == (0, (REPO / "config" / "aiolb.yaml").read_text(), "")
    assert cli("example", "routing.yaml")[1] == (REPO / "config" / "routing.yaml").read_text()
    code, out, err = cli("example", "nope")
    assert (code, out) == (2, "") and err.startswith("aiolb example: no example 'nope'; there")


def test_every_example_passes_check_as_printed_in_an_empty_folder(
    cli: Cli, tmp_path: Path
) -> None:
    names = sorted(path.stem for path in (REPO / "config").glob("*.yaml"))
    tls = CertAuthority(tmp_path)  # the tls example's files are the user's: made here
    files = {"example": tls.issue("example.com"), "api": tls.issue("api.example.com")}
    for name in names:
        folder = tmp_path / name
        folder.mkdir()
        text = cli("example", name)[1]
        if name in ("tls", "http2"):  # the examples with a listener's certificates
            for stem, pair in files.items():
                text = text.replace(f"/etc/aiolb/tls/{stem}.pem", pair.cert)
                text = text.replace(f"/etc/aiolb/tls/{stem}.key", pair.key)
            text = text.replace("/etc/aiolb/tls/internal-ca.pem", tls.cert_file)
        (folder / f"{name}.yaml").write_text(text)
        checked = aiolb_cli("check", "-c", f"{name}.yaml", cwd=folder)
        assert checked.returncode == 0, (name, checked.stderr)
        assert sorted(path.name for path in folder.iterdir()) == [f"{name}.yaml"]


def test_the_python_filter_of_the_filters_example_prints_and_wins_when_copied(
    tmp_path: Path,
) -> None:
    module = aiolb_cli("example", "example_filter.py", cwd=tmp_path)
    assert module.stdout == (REPO / "config" / "example_filter.py").read_text()
    (tmp_path / "filters.yaml").write_text((REPO / "config" / "filters.yaml").read_text())
    (tmp_path / "example_filter.py").write_text(
        module.stdout.replace("keys: dict[str, str] = Field(min_length=1)", "keys: int"))
    checked = aiolb_cli("check", "-c", "filters.yaml", cwd=tmp_path)  # the copy is imported
    assert checked.returncode == 2 and ".filters[2].options.keys: " in checked.stderr


def test_example_descriptions_are_whole_sentences(cli: Cli) -> None:
    out = cli("example")[1]
    assert ("limits     Tighter client limits and timeouts, e.g. for an API that takes small "
            "JSON bodies and whose upstreams must answer quickly.\n") in out  # fmt: skip


@pytest.mark.parametrize("workers", [1, 2])
async def test_run_tells_systemd_when_it_is_ready_reloading_and_stopping(
    recorders, aiolb, tmp_path: Path, workers: int
) -> None:
    """``Type=notify``: the datagrams on ``$NOTIFY_SOCKET`` (a path, or an abstract name
    written ``@name``), from the process systemd started only."""
    a = await recorders("a")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if workers == 1:
        address = str(tmp_path / "notify")
        notify.bind(address)
    else:
        address = f"@aiolb-test-{os.getpid()}-{id(notify)}"
        notify.bind("\0" + address[1:])
    notify.setblocking(False)
    messages: list[str] = []

    def received() -> list[str]:
        while True:
            try:
                messages.append(notify.recv(4096).decode())
            except BlockingIOError:
                return messages

    text = (
        f'listeners: [{{name: web, bind: "{HOST}:0", routes: [{{pool: main}}]}}]\n'
        f'pools: {{main: {{upstreams: [{{url: "{a.url}"}}]}}}}\n'
        f'admin: {{bind: "{HOST}:0"}}\n'
        f"workers: {workers}\n"
    )
    try:
        proc = await aiolb(text, workers, env={"NOTIFY_SOCKET": address})
        await wait_for(lambda: bool(received()))
        assert messages == ["READY=1\n"]  # once, from the main process
        async with aiohttp.ClientSession() as s, s.get(proc.url) as resp:
            assert resp.status == 200

        proc.proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: len(received()) == 3)
        reloading, ready = messages[1:3]
        assert re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=\d+\n", reloading), reloading
        assert ready == "READY=1\n"

        assert await proc.stop() == 0
        assert received()[3:] == ["STOPPING=1\n"]
    finally:
        notify.close()
