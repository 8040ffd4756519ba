"""Preflight: what ``aiolb run`` would refuse about a valid config, checked before it
binds anything, and shared by ``aiolb check`` and reloads.

A config can be valid key by key and still be refused when the proxy starts: the
admin listener on a public address without a token, an access log in a directory
that does not exist, a listener on a host name that does not resolve. ``validate``
loads the file (``FILE:LINE`` errors for the keys) and then runs every check in
``PREFLIGHT``, so ``check``, ``run`` and a reload refuse the same files with the same
lines: ``FILE:LINE: key: message``, exit 2.

A check is a function of the validated config and the environment (for
``AIOLB_ADMIN_TOKEN``) that yields ``(loc, message)`` per problem, ``loc`` being the
key's path (``("admin", "bind")``). It reads the file system and the resolver but
changes nothing and binds nothing: a check must be safe to run next to a running
proxy. New kinds of start-up refusal (TLS certificates and keys) add a function here
and an entry in ``PREFLIGHT``. ``python_filters`` needs the file's folder too (a
filter module may sit next to its config), so ``preflight`` runs it apart.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Final

from pydantic import ValidationError

from proxy.admin.security import admin_token, exposure_problem
from proxy.config import Config, ConfigError, Document, load_document
from proxy.config.filters import PythonOptions
from proxy.config.loader import explain
from proxy.filters import python
from proxy.runtime.files import check_files

Loc = tuple[str | int, ...]
Finding = tuple[Loc, str]
Check = Callable[[Config, Mapping[str, str]], Iterable[Finding]]

#: Where the access log goes when it is not a file.
STDOUT_NAMES: Final = frozenset({"stdout", "-"})


def admin_exposure(config: Config, env: Mapping[str, str]) -> Iterator[Finding]:
    """The admin API on a non-loopback address needs a token (``admin.token`` or
    ``AIOLB_ADMIN_TOKEN``)."""
    problem = exposure_problem(config.admin, admin_token(config.admin, env))
    if problem is not None:
        yield ("admin", "bind"), problem


def access_log_file(config: Config, env: Mapping[str, str]) -> Iterator[Finding]:
    """A file access log must be a file the proxy can append to, or create."""
    access_log = config.access_log
    if access_log is not None and access_log.path not in STDOUT_NAMES:
        problem = writable_file_problem(access_log.path)
        if problem is not None:
            yield ("access_log", "path"), problem


def pid_file(config: Config, env: Mapping[str, str]) -> Iterator[Finding]:
    """``pid_file`` must be a file the proxy can write."""
    if config.pid_file is not None:
        problem = writable_file_problem(config.pid_file)
        if problem is not None:
            yield ("pid_file",), problem


def bind_hosts(config: Config, env: Mapping[str, str]) -> Iterator[Finding]:
    """Every host name a listener or the admin binds must resolve (nginx ``-t``'s "host
    not found in listen"); IP literals need no lookup."""
    binds: list[tuple[Loc, str]] = [
        *((("listeners", i, "bind"), lc.host) for i, lc in enumerate(config.listeners)),
        (("admin", "bind"), config.admin.host),
    ]
    answers: dict[str, str | None] = {}
    for loc, host in binds:
        if host not in answers:
            answers[host] = resolve_problem(host)
        problem = answers[host]
        if problem is not None:
            yield loc, problem


def tls_files(config: Config, env: Mapping[str, str]) -> Iterator[Finding]:
    """Every certificate, key and CA file of a TLS listener or an ``https://`` pool must
    load (``proxy.runtime.files``): a missing file, a key that is not the certificate's."""
    for problem in check_files(config):
        if not problem.warning:
            yield problem.loc, problem.message


def tls_warnings(config: Config, env: Mapping[str, str]) -> Iterator[Finding]:
    """An expired certificate, ``verify: false``, a certificate SNI cannot choose."""
    for problem in check_files(config):
        if problem.warning:
            yield problem.loc, problem.message


def docker_endpoint(config: Config, env: Mapping[str, str]) -> Iterator[Finding]:
    """A ``unix://`` Docker endpoint must be a socket the proxy may connect to, and the
    files of ``tls`` must be readable (a TCP endpoint is tried at run time: unreachable,
    it is logged and retried)."""
    docker = config.providers.docker
    if docker is not None and docker.tls is not None:
        for key in ("ca", "cert", "key"):
            name = getattr(docker.tls, key)
            if name is not None and not os.access(name, os.R_OK):
                yield ("providers", "docker", "tls", key), f"cannot read {name}"
    path = docker.socket_path if docker is not None else None
    if path is None:
        return
    loc = ("providers", "docker", "endpoint")
    target = Path(path)
    if not target.exists():
        yield loc, f"no Docker socket at {path} (is the engine running, the socket mounted?)"
    elif not target.is_socket():
        yield loc, f"{path} is not a socket"
    elif not os.access(target, os.R_OK | os.W_OK):
        yield loc, f"{path}: permission denied (the docker group, or a read-only socket proxy)"


def python_filters(config: Config, folder: str | None) -> Iterator[Finding]:
    """Every ``python:`` filter must import, be a ``proxy.filters.Filter``, accept its
    ``options`` (its ``Options`` model) and build (its ``__init__``)."""
    for i, lc in enumerate(config.listeners):
        for j, route in enumerate(lc.routes):
            for k, spec in enumerate(route.filters):
                if isinstance(spec, PythonOptions):
                    yield from _python_filter(("listeners", i, "routes", j, "filters", k),
                                              spec, folder)  # fmt: skip


def _python_filter(at: Loc, spec: PythonOptions, folder: str | None) -> Iterator[Finding]:
    try:
        cls = python.load(spec.python, folder)
    except python.LoadError as exc:
        yield (*at, "python"), str(exc)
        return
    try:
        options = python.options(cls, spec.options)
    except ValidationError as exc:
        for error in exc.errors():
            yield explain(error, (*at, "options", *error["loc"]))
        return
    try:
        cls(options)
    except Exception as exc:
        yield (*at, "python"), f"{spec.python}(options) failed: {type(exc).__name__}: {exc}"


#: Every preflight check, in the order their problems are listed.
PREFLIGHT: Final[tuple[Check, ...]] = (
    admin_exposure, access_log_file, pid_file, bind_hosts, tls_files, docker_endpoint,
)  # fmt: skip
#: Checks whose findings are warnings, not refusals.
WARNINGS: Final[tuple[Check, ...]] = (tls_warnings,)


def preflight(document: Document, env: Mapping[str, str] | None = None) -> list[str]:
    """Every check's problems for a loaded ``document``, as ``FILE:LINE: key: message``."""
    env = os.environ if env is None else env
    folder = os.path.dirname(os.path.abspath(document.name))
    found = [finding for check in PREFLIGHT for finding in check(document.config, env)]
    found += python_filters(document.config, folder)
    return [document.problem(loc, message) for loc, message in found]


def warnings(document: Document, env: Mapping[str, str] | None = None) -> list[str]:
    """Every ``WARNINGS`` finding, as ``FILE:LINE: key: warning: message``."""
    env = os.environ if env is None else env
    return [
        document.problem(loc, f"warning: {message}")
        for check in WARNINGS
        for loc, message in check(document.config, env)
    ]


def validate(path: str, env: Mapping[str, str] | None = None) -> Document:
    """Load ``path`` and run the preflight: the one validation of ``check``, ``run`` and
    reloads. Raises ``ConfigError`` with every problem."""
    document = load_document(path, env)
    problems = preflight(document, env)
    if problems:
        raise ConfigError(problems)
    return document


def writable_file_problem(path: str) -> str | None:
    """Why the proxy could not append to (or create) the file ``path``, or None."""
    target = Path(path)
    if target.is_dir():
        return f"{path} is a directory"
    if target.exists():
        return None if os.access(target, os.W_OK) else f"{path} is not writable"
    parent = target.parent
    if not parent.is_dir():
        return f"cannot create {path}: directory {parent} does not exist"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create {path}: directory {parent} is not writable"
    return None


def resolve_problem(host: str) -> str | None:
    """Why ``host`` cannot be bound by name (it does not resolve), or None."""
    if not host:
        return None
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"host {host!r} does not resolve: {exc.strerror or exc}"
    except UnicodeError:
        return f"host {host!r} is not a valid host name"
    return None
