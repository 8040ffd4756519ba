"""Shared plumbing for the load tests: child processes, ports, pinning, configs, RSS.

Every child runs in its own process group with stdout and stderr going to a log file in
the session's temp dir, so nothing ever blocks on an unread pipe, and `Session.close()`
can end each child together with its workers (nginx) by process group id.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BODY_SIZES = {"20b": 20, "64k": 64 * 1024, "1m": 1024 * 1024}
START_TIMEOUT_S = 15.0
NGINX_TEMPS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
_PR_SET_PDEATHSIG = 1


class StartError(RuntimeError):
    """A child did not come up in time or exited; the message carries its log tail."""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


@dataclass(frozen=True)
class Pinning:
    """taskset CPU lists: `proxy` for the proxy under test, `load` for wrk and upstream."""

    proxy: str | None
    load: str | None
    note: str


@dataclass(frozen=True)
class Upstream:
    kind: str
    ports: tuple[int, int]
    note: str


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL the child if this script dies without cleaning up."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Session:
    """A temp dir plus the children started in it; `close()` ends them all."""

    def __init__(self, keep_dir: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="aiolb-loadtest-"))
        self.dir.chmod(0o755)  # nginx workers may run as `nobody` and read files here
        self.keep_dir = keep_dir
        self.children: list[Child] = []
        self._ports: set[int] = set()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def path(self, name: str) -> Path:
        return self.dir / name

    def certificate(self) -> tuple[Path, Path, Path]:
        """A self-signed ECDSA P-256 certificate for ``localhost`` and 127.0.0.1 (made
        once per session with openssl): cert, key, and both in one file (HAProxy)."""
        cert, key, both = self.path("tls.pem"), self.path("tls.key"), self.path("tls-both.pem")
        if not cert.exists():
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                 "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                 "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                 "-keyout", str(key), "-out", str(cert)],
                check=True, capture_output=True, timeout=30,
            )  # fmt: skip
            both.write_bytes(cert.read_bytes() + key.read_bytes())
            for path in (cert, key, both):
                path.chmod(0o644)  # nginx workers may run as nobody
        return cert, key, both

    def port(self) -> int:
        """A free loopback port not handed out before in this session."""
        while True:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = int(sock.getsockname()[1])
            if port not in self._ports:
                self._ports.add(port)
                return port

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        cpus: str | None = None,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Child:
        log = self.path(f"{name}.log")
        with log.open("wb") as out:
            proc = subprocess.Popen(
                pinned(argv, cpus),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    def stop(self, child: Child) -> None:
        _signal_group(child.pid, signal.SIGTERM)
        try:
            child.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _signal_group(child.pid, signal.SIGKILL)
            child.proc.wait(timeout=5)
        _signal_group(child.pid, signal.SIGKILL)  # stragglers left in the group
        if child in self.children:
            self.children.remove(child)

    def kill(self, child: Child, sig: int = signal.SIGKILL) -> None:
        """Send `sig` (SIGKILL: no cleanup, like a crash) to the child's process group
        and reap it; for failure tests (`stop` is the orderly way)."""
        _signal_group(child.pid, sig)
        child.proc.wait(timeout=5)
        if child in self.children:
            self.children.remove(child)

    def close(self) -> None:
        for child in reversed(list(self.children)):
            with contextlib.suppress(Exception):
                self.stop(child)
        if not self.keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def pinned(argv: Sequence[str], cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus, *argv] if cpus else list(argv)


def plan_pinning() -> Pinning:
    cpus = sorted(os.sched_getaffinity(0))
    if shutil.which("taskset") is None:
        return Pinning(None, None, "not pinned: taskset not found")
    if len(cpus) < 2:
        return Pinning(None, None, f"not pinned: only {len(cpus)} core(s) available")
    proxy = 1 if 1 in cpus else cpus[-1]
    load = ",".join(str(c) for c in cpus if c != proxy)
    return Pinning(str(proxy), load, f"proxy on CPU {proxy}; wrk and upstream on CPU(s) {load}")


#: Every process free to use every core, as a user runs it.
UNPINNED = Pinning(None, None, "not pinned: every process may use every core")


def set_affinity(pid: int, cpus: str | None) -> None:
    """Move ``pid``, its children and all their threads onto ``cpus`` (``"1"``,
    ``"0,1"``; None: every CPU this script may use), while they run."""
    wanted = {int(c) for c in cpus.split(",")} if cpus else os.sched_getaffinity(0)
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{member}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task), wanted)


def raise_nofile(want: int = 65536) -> int:
    """Raise RLIMIT_NOFILE (children inherit it); returns the soft limit now in force."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    for new_hard in (max(hard, want), hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, new_hard), new_hard))
            break
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def wait_port(child: Child | None, port: int, timeout: float = START_TIMEOUT_S) -> None:
    """Poll until something accepts on 127.0.0.1:port; fail early if the child exits."""
    deadline = time.monotonic() + timeout
    while True:
        if child is not None and child.proc.poll() is not None:
            raise StartError(
                f"{child.name} exited with status {child.proc.returncode}:\n{child.tail()}"
            )
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.25):
            return
        if time.monotonic() > deadline:
            where = f":\n{child.tail()}" if child else ""
            raise StartError(f"nothing listening on 127.0.0.1:{port} after {timeout:.0f}s{where}")
        time.sleep(0.05)


def start(
    session: Session,
    name: str,
    argv: Sequence[str],
    port: int,
    cpus: str | None = None,
    cwd: Path | None = None,
) -> Child:
    """Spawn a server and wait until it accepts on `port`; stop it again if it does not."""
    child = session.spawn(name, argv, cpus, cwd)
    try:
        wait_port(child, port)
    except StartError:
        session.stop(child)
        raise
    return child


# --- upstream --------------------------------------------------------------------------


def haproxy_common() -> str:
    """HAProxy's global and defaults sections as every benchmark runs it: one thread,
    as many connections as the file limit allows, keep-alive reuse to the servers."""
    maxconn = min(20000, (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 100) // 2)
    return f"""global
    nbthread 1
    maxconn {maxconn}

defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    http-reuse always
"""


def nginx_common(session: Session, name: str, workers: int) -> str:
    temp_lines = "\n".join(
        f"    {kind}_temp_path {session.path(f'{name}-{kind}-temp')};" for kind in NGINX_TEMPS
    )
    return f"""worker_processes {workers};
worker_rlimit_nofile 50000;
pid {session.path(name + ".pid")};
error_log stderr error;  # the default level: [warn] lines per request would cost time
events {{ worker_connections 20000; }}
http {{
    access_log off;
{temp_lines}
"""


def upstream_nginx_conf(session: Session, ports: tuple[int, int], workers: int) -> Path:
    docroot = session.path("docroot")
    docroot.mkdir(mode=0o755)
    for name, size in BODY_SIZES.items():
        (docroot / name).write_bytes(b"x" * size)
        (docroot / name).chmod(0o644)
    conf = (
        nginx_common(session, "upstream", workers)
        + f"""
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    open_file_cache max=64 inactive=60s;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{ports[0]};
        listen 127.0.0.1:{ports[1]};
        root {docroot};
        location / {{ }}
        location = /upload {{
            client_max_body_size 2m;
            return 200 "ok\\n";
        }}
    }}
}}
"""
    )
    path = session.path("upstream-nginx.conf")
    path.write_text(conf)
    return path


def nginx_argv(session: Session, conf: Path) -> list[str]:
    return ["nginx", "-e", "stderr", "-p", str(session.dir), "-c", str(conf), "-g", "daemon off;"]


def aiohttp_upstream_argv(ports: Sequence[int]) -> list[str]:
    argv = [sys.executable, str(HERE / "upstream.py")]
    for port in ports:
        argv += ["--port", str(port)]
    return argv


def start_upstream(session: Session, cpus: str | None, workers: int, kind: str) -> Upstream:
    """nginx serving static bodies on two ports, or the aiohttp upstream as a fallback."""
    ports = (session.port(), session.port())
    if kind == "nginx" and shutil.which("nginx"):
        conf = upstream_nginx_conf(session, ports, workers)
        start(session, "upstream-nginx", nginx_argv(session, conf), ports[1], cpus=cpus)
        wait_port(None, ports[0])
        note = f"nginx, {workers} worker(s) serving both ports"
        return Upstream("nginx", ports, note)
    start(session, "upstream-aiohttp", aiohttp_upstream_argv(ports), ports[1], cpus=cpus)
    wait_port(None, ports[0])
    why = "nginx not installed: " if kind == "nginx" else ""
    note = f"{why}aiohttp upstream (one Python process, may be the bottleneck)"
    return Upstream("aiohttp", ports, note)


# --- proxies under test ----------------------------------------------------------------


#: aiolb variants, measured in the same run: ``aiolb`` is the shipped defaults; the
#: others add one top-level section each (the cost of observability).
AIOLB_VARIANTS = {
    "aiolb": "",
    "aiolb-nometrics": "metrics: {enabled: false}\n",
    "aiolb-accesslog": "access_log: {path: ACCESS_LOG}\n",
}


def aiolb_config(
    session: Session,
    port: int,
    upstream: Upstream,
    extra: str = "",
    pool: str = "",
    ports: Sequence[int] | None = None,
    tls_port: int | None = None,
    listener: str = "",
) -> Path:
    """The documented minimal config: a listener, a pool of the upstream ports (or of
    ``ports``) and the admin address, everything else at its default. ``extra``:
    top-level YAML to add; ``pool``: lines to add to the pool (indented four spaces);
    ``tls_port``: a second listener there, with TLS (the session's certificate);
    ``listener``: lines to add to the first listener (indented four spaces)."""
    upstreams = "".join(
        f'      - url: "http://127.0.0.1:{p}"\n' for p in (ports or upstream.ports)
    )
    tls = ""
    if tls_port is not None:
        cert, key, _ = session.certificate()
        tls = f"""  - name: bench-tls
    bind: "127.0.0.1:{tls_port}"
    tls:
      certificates: [{{cert: "{cert}", key: "{key}"}}]
    routes:
      - pool: bench
"""
    text = f"""listeners:
  - name: bench
    bind: "127.0.0.1:{port}"
{listener}    routes:
      - pool: bench
{tls}pools:
  bench:
{pool}    upstreams:
{upstreams}admin:
  bind: "127.0.0.1:{session.port()}"
""" + extra.replace("ACCESS_LOG", str(session.path("access.log")))
    path = session.path("aiolb.yaml")
    path.write_text(text)
    return path


def default_aiolb_cmd() -> list[str]:
    return [sys.executable, "-m", "proxy", "run", "-c", "{config}"]


def start_aiolb(
    session: Session,
    upstream: Upstream,
    cpus: str | None,
    cmd: Sequence[str],
    extra: str = "",
    tls_port: int | None = None,
) -> tuple[Child, int]:
    port = session.port()
    config = str(aiolb_config(session, port, upstream, extra, tls_port=tls_port))
    argv = [arg.replace("{config}", config) for arg in cmd]
    return start(session, "aiolb", argv, port, cpus=cpus, cwd=REPO), port


def start_passthrough(session: Session, upstream: Upstream, cpus: str | None) -> tuple[Child, int]:
    """The featureless uvloop + httptools proxy of ``passthrough.py`` (the ceiling)."""
    port = session.port()
    ports = ",".join(map(str, upstream.ports))
    argv = [sys.executable, str(HERE / "passthrough.py"), str(port), ports]
    return start(session, "passthrough", argv, port, cpus=cpus), port


def start_nginx_proxy(
    session: Session, upstream: Upstream, cpus: str | None, tls_port: int | None = None
) -> tuple[Child, int]:
    """nginx as a one-worker proxy in front of both upstream ports (``keepalive 64``);
    ``tls_port``: also HTTPS there, with the session's certificate."""
    return start_nginx_proxy_workers(session, upstream, cpus, 1, reuseport=False,
                                     tls_port=tls_port)  # fmt: skip


def start_haproxy(
    session: Session, upstream: Upstream, cpus: str | None, tls_port: int | None = None
) -> tuple[Child, int]:
    port = session.port()
    tls_bind = ""
    if tls_port is not None:
        both = session.certificate()[2]
        tls_bind = f"    bind 127.0.0.1:{tls_port} ssl crt {both} alpn http/1.1\n"
    up1, up2 = upstream.ports
    conf = haproxy_common() + f"""
frontend bench
    bind 127.0.0.1:{port}
{tls_bind}    default_backend bench

backend bench
    balance roundrobin
    server s1 127.0.0.1:{up1}
    server s2 127.0.0.1:{up2}
"""
    path = session.path("haproxy.cfg")
    path.write_text(conf)
    return start(session, "haproxy", ["haproxy", "-db", "-f", str(path)], port, cpus=cpus), port


# --- memory ----------------------------------------------------------------------------


def _children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def process_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        todo.extend(_children_of(current))
    return pids


def rss_kib(pid: int, tree: Sequence[int] | None = None) -> int:
    """VmRSS in KiB of `pid` plus its descendants (pass `tree` to skip the /proc scan)."""
    total = 0
    for member in tree or process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time of ``pids`` (all their threads) from /proc, in seconds; a
    process that has gone counts nothing."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def cpu_times() -> dict[int, tuple[int, int]]:
    """Per CPU: (busy, total) jiffies from /proc/stat."""
    times = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name != "cpu":
            values = [int(v) for v in fields[:8]]
            idle = values[3] + values[4]  # idle + iowait
            times[int(name[3:])] = (sum(values) - idle, sum(values))
    return times


def cpu_busy(
    before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]
) -> dict[int, float]:
    """Percent busy per CPU between two `cpu_times()` snapshots."""
    busy = {}
    for cpu, (b1, t1) in after.items():
        b0, t0 = before.get(cpu, (0, 0))
        busy[cpu] = round(100.0 * (b1 - b0) / max(1, t1 - t0), 1)
    return busy


def start_nginx_proxy_workers(
    session: Session,
    upstream: Upstream,
    cpus: str | None,
    workers: int,
    reuseport: bool = True,
    name: str = "nginx",
    tls_port: int | None = None,
) -> tuple[Child, int]:
    """nginx as a proxy with `workers` worker processes (`keepalive 64` to both upstream
    ports) and, with `reuseport`, one SO_REUSEPORT listening socket per worker (as
    aiolb's workers have); the config and log are named after `name`. ``tls_port``:
    HTTPS there too (the session's certificate, TLS 1.2 and 1.3 as aiolb offers them:
    nginx 1.22's default leaves 1.3 out; session tickets on, its default)."""
    port = session.port()
    up1, up2 = upstream.ports
    listen = f"127.0.0.1:{port}" + (" reuseport" if reuseport else "")
    if tls_port is not None:
        cert, key, _ = session.certificate()
        listen += (f";\n        listen 127.0.0.1:{tls_port} ssl"
                   + (" reuseport" if reuseport else "")
                   + f";\n        ssl_certificate {cert};\n        ssl_certificate_key {key}"
                   + ";\n        ssl_protocols TLSv1.2 TLSv1.3")
    conf = (
        nginx_common(session, name, workers)
        + f"""
    upstream bench {{
        server 127.0.0.1:{up1};
        server 127.0.0.1:{up2};
        keepalive 64;
    }}
    server {{
        listen {listen};
        client_max_body_size 0;
        location / {{
            proxy_pass http://bench;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""
    )
    path = session.path(f"{name}.conf")
    path.write_text(conf)
    return start(session, name, nginx_argv(session, path), port, cpus=cpus), port


# --- reports and the command line ---------------------------------------------------------


def write_json(json_dir: Path, name: str, report: dict[str, Any]) -> Path:
    """Write ``report`` to ``json_dir/NAME-YYYYmmdd-HHMMSS.json``; the path."""
    json_dir.mkdir(parents=True, exist_ok=True)
    path = json_dir / f"{name}-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path


def run_main(main: Callable[[], int]) -> NoReturn:
    """Exit with ``main()``'s status; Ctrl-C exits 130 (the ``Session`` has stopped every
    process started)."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted; every process started here was stopped", file=sys.stderr)
        sys.exit(130)
