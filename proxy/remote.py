"""``aiolb reload`` and ``aiolb stop``: control a running aiolb without hunting for its pid.

Both read the same config file the proxy serves, for its admin address and token, and
ask the admin API (``POST /api/reload``, ``POST /api/stop``) with the token the file or
``AIOLB_ADMIN_TOKEN`` gives. A reload answers what changed, or the running proxy's
``FILE:LINE`` refusals; a stop waits until the proxy has drained and its admin API is
gone. When the admin API cannot be reached (or its port is 0, chosen at start) and the
config names a ``pid_file``, the signals do the same (SIGHUP, SIGTERM), as ``nginx -s``
does; a signalled reload's outcome is in the proxy's log.

``pid_file`` (``PidFile``) is written by ``aiolb run`` once its listeners and admin API
are bound (a start that fails leaves a running instance's file alone) and removed when it
exits if it still names it.

Every failure is a ``RemoteError``: one line for stderr and the exit code (1: the
proxy could not be reached or did not do it; 2: the new config was refused).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, Final

import yaml

from proxy.admin.security import ADMIN_HEADER, admin_token
from proxy.config import Config
from proxy.config.values import format_address

#: Seconds one admin API call may take (a reload validates and binds: allow for it).
CALL_TIMEOUT: Final = 30.0
#: Beyond ``shutdown_timeout``, how long ``stop`` waits for the proxy to be gone.
STOP_GRACE: Final = 10.0
_WILDCARDS: Final = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}

log = logging.getLogger("aiolb")


class RemoteError(Exception):
    """The running proxy could not be reached, or refused; ``code`` is the exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def admin_url(config: Config) -> str:
    """Where this machine reaches the admin API of ``config`` (a wildcard bind is
    reached on loopback)."""
    admin = config.admin
    return f"http://{format_address(_WILDCARDS.get(admin.host, admin.host), admin.port)}"


def call(config: Config, method: str, path: str, timeout: float = CALL_TIMEOUT) -> tuple[int, Any]:
    """One admin API call: ``(status, JSON body)``. Raises ``ConnectionError`` when
    nothing answers (or the port is 0: unknown), ``RemoteError`` for a refused token."""
    if config.admin.port == 0:
        raise ConnectionError("admin.bind has port 0, chosen when aiolb starts")
    # X-Aiolb-Admin: the admin refuses a POST a web page could send (proxy.admin.security)
    headers = {"Accept": "application/json", ADMIN_HEADER: "1"}
    token = admin_token(config.admin)
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(admin_url(config) + path, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, _body(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise RemoteError(
                f"the admin API at {admin_url(config)} refused the token: set admin.token or "
                "AIOLB_ADMIN_TOKEN to the running proxy's token"
            ) from None
        return exc.code, _body(exc.read())
    except urllib.error.URLError as exc:
        reason = exc.reason
        raise ConnectionError(getattr(reason, "strerror", None) or str(reason)) from None


def reload(config: Config, out: Callable[[str], None] = print) -> None:
    """Ask the proxy serving ``config`` to reload its file; report what changed."""
    try:
        status, body = call(config, "POST", "/api/reload")
    except ConnectionError as exc:
        pid = _signal_fallback(config, signal.SIGHUP, exc)
        out(f"sent SIGHUP to aiolb (pid {pid}); its log says whether the new config applied")
        return
    if status == 200:
        changes = body.get("changes") or []
        out("reloaded: " + ("; ".join(changes) if changes else "no changes"))
        return
    errors = body.get("errors") if isinstance(body, dict) else None
    if status == 400 and errors:
        raise RemoteError("\n".join([*errors, "reload refused: the running config stays"]), 2)
    raise RemoteError(f"reload failed: {_describe(status, body)}")


def stop(config: Config, out: Callable[[str], None] = print) -> None:
    """Ask the proxy serving ``config`` to stop as SIGTERM does; wait until it is gone."""
    deadline = time.monotonic() + config.shutdown_timeout + STOP_GRACE
    try:
        status, body = call(config, "POST", "/api/stop")
    except ConnectionError as exc:
        pid = _signal_fallback(config, signal.SIGTERM, exc)
        out(f"sent SIGTERM to aiolb (pid {pid}); waiting for it to finish its requests")
        _wait(lambda: not _alive(pid), deadline, f"aiolb (pid {pid})")
        out("stopped")
        return
    if status != 202:
        raise RemoteError(f"stop failed: {_describe(status, body)}")
    out(f"stopping aiolb at {admin_url(config)} (in-flight requests get up to "
        f"{config.shutdown_timeout:g}s)")  # fmt: skip
    _wait(lambda: not _answers(config), deadline, f"aiolb at {admin_url(config)}")
    out("stopped")


def stop_by_hand(path: str) -> str:
    """What to do when ``aiolb stop -c path`` cannot read its config: how to send the
    SIGTERM it would have sent (with the pid, when the file's ``pid_file`` names a running
    process; the file is read as plain YAML, whatever else is wrong with it)."""
    anyway = "nothing sent: to stop the running aiolb anyway, kill -TERM"
    how = "SIGTERM drains as aiolb stop does"
    pid_path = _raw_pid_file(path)
    if pid_path is None:
        return f"{anyway} <pid> ({how}; its start-up line says 'serving FILE (pid N, ...)')"
    try:
        pid = PidFile(pid_path).read()
    except RemoteError as exc:
        return f"{anyway} <pid> ({how}; {exc})"
    if not _alive(pid):
        return f"nothing sent: {pid_path} names pid {pid}, which is not running"
    return f"{anyway} {pid} (from {pid_path}; {how})"


def _raw_pid_file(path: str) -> str | None:
    """The ``pid_file`` a config file names, read without validating it (None when
    the file cannot be read as YAML or names none, or names it through ``${VAR}``)."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    value = data.get("pid_file") if isinstance(data, dict) else None
    return value if isinstance(value, str) and value and "${" not in value else None


def _body(raw: bytes) -> Any:
    """The JSON of an answer; its text if it is not JSON (``/healthz``)."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")


def _describe(status: int, body: Any) -> str:
    if isinstance(body, dict):
        message = body.get("error") or "; ".join(body.get("errors") or [])
        if message:
            return f"{status}: {message}"
    return f"the admin API answered {status}"


def _answers(config: Config) -> bool:
    try:
        call(config, "GET", "/healthz", timeout=2.0)
    except (ConnectionError, RemoteError):
        return False
    return True


def _wait(done: Callable[[], bool], deadline: float, what: str) -> None:
    while not done():
        if time.monotonic() > deadline:
            raise RemoteError(f"{what} is still running after the shutdown timeout")
        time.sleep(0.1)


def _signal_fallback(config: Config, sig: signal.Signals, cause: ConnectionError) -> int:
    """Send ``sig`` to the pid in ``pid_file``; without one, the unreachable admin API
    is the error."""
    if config.pid_file is None:
        raise RemoteError(
            f"cannot reach the admin API at {admin_url(config)} ({cause}): is aiolb running "
            "with this config? (a pid_file lets aiolb reload and stop signal it instead)"
        )
    pid = PidFile(config.pid_file).read()
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        raise RemoteError(f"{config.pid_file} names pid {pid}, which is not running") from None
    return pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class PidFile:
    """``pid_file``: this process's id while it serves."""

    def __init__(self, path: str) -> None:
        self.path = path

    def write(self) -> None:
        """Write this process's id (atomically: a reader never sees half a number).

        ``aiolb run`` calls it once it is bound, so a second instance that cannot bind
        never gets here; one that can (other ports, the same ``pid_file``) takes the
        file over with a warning naming the process it named."""
        try:
            before = self.read()
        except RemoteError:
            before = None
        if before is not None and before != os.getpid() and _alive(before):
            log.warning("pid_file %s named pid %d, still running; it now names this "
                        "process (%d)", self.path, before, os.getpid())  # fmt: skip
        temporary = f"{self.path}.{os.getpid()}.tmp"
        with open(temporary, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(temporary, self.path)

    def remove(self) -> None:
        """Remove the file if it still names this process."""
        try:
            if self.read() == os.getpid():
                os.unlink(self.path)
        except (RemoteError, OSError):
            pass

    def read(self) -> int:
        try:
            with open(self.path) as f:
                text = f.read().strip()
        except FileNotFoundError:
            raise RemoteError(f"{self.path} does not exist: is aiolb running?") from None
        except OSError as exc:
            raise RemoteError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        if not text.isdigit():
            raise RemoteError(f"{self.path} does not hold a process id: {text[:40]!r}")
        return int(text)

    def __repr__(self) -> str:
        return f"<PidFile {self.path}>"
