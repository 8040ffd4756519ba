"""The command line: ``aiolb run | check | reload | stop | demo | example | version``
(also ``python -m proxy``).

Expected failures print clear lines and exit non-zero, never a traceback: a bad flag
is one ``aiolb: ...`` line and exit 2 (``--help`` says more); a config ``run`` would
refuse is ``FILE:LINE: key: message`` per problem and exit 2, from ``check`` as from
``run`` (both go through ``proxy.runtime.preflight.validate``); an address in use is
``FILE:LINE: key: ...`` naming the key to change, and exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import functools
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from proxy import __version__
from proxy.config import ConfigError, Document

if TYPE_CHECKING:
    from proxy.errors import BindError

log = logging.getLogger("aiolb")

EXIT_CONFIG = 2
EXIT_RUNTIME = 1
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
CONFIG_ENV = "AIOLB_CONFIG"
LOG_LEVEL_ENV = "AIOLB_LOG_LEVEL"
COMMANDS = "run,check,reload,stop,demo,example,version"


class Parser(argparse.ArgumentParser):
    """argparse, with every usage mistake as one line and exit 2."""

    def error(self, message: str) -> NoReturn:
        message = message.replace(", '_worker'", "")  # the internal command stays unlisted
        self.exit(EXIT_CONFIG, f"{self.prog}: {message} (see '{self.prog} --help')\n")


def _parser() -> Parser:
    p = Parser(
        prog="aiolb",
        description="asyncio HTTP/1.1 reverse proxy and load balancer",
        epilog=f"environment: {CONFIG_ENV} (default for -c), AIOLB_ADMIN_TOKEN, "
        f"{LOG_LEVEL_ENV} (default for --log-level)",
    )
    p.add_argument("-V", "--version", action="version", version=f"aiolb {__version__}")
    _log_level_option(p, default=None)
    # --log-level also after the command (``aiolb run -c FILE --log-level debug``): every
    # command takes it from this parent; SUPPRESS keeps a command that was not given it
    # from overwriting the one before the command
    common = Parser(add_help=False)
    _log_level_option(common, default=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    add = functools.partial(sub.add_parser, parents=[common])
    run = add("run", help="serve a config until SIGTERM/SIGINT; SIGHUP reloads it")
    _config_option(run)
    run.add_argument("--workers", type=int, metavar="N", help="worker processes (overrides "
                     "the config's workers)")  # fmt: skip
    check = add("check", help="validate a config as run would; exit 0, or 2 with "
                "FILE:LINE: problem lines")  # fmt: skip
    _config_option(check)
    check.add_argument("--print", action="store_true", help="print the effective config: "
                       "every default filled in, ${VAR}s expanded, secrets hidden")  # fmt: skip
    reload = add("reload", help="make the running aiolb re-read its config")
    _config_option(reload)
    stop = add("stop", help="stop the running aiolb gracefully (as SIGTERM)")
    _config_option(stop)
    demo = add("demo", help="three demo upstreams with the proxy in front")
    demo.add_argument("--port", type=int, default=8080, help="proxy port (default 8080; "
                      "0: any free port)")  # fmt: skip
    demo.add_argument("--admin-port", type=int, default=9901, metavar="PORT",
                      help="admin API port (default 9901; a free one if it is busy)")  # fmt: skip
    example = add("example", help="list the example configs, or print one")
    example.add_argument("name", nargs="?", help="the example to print (e.g. aiolb)")
    add("version", help="print the version")
    worker = add("_worker")  # started by the supervisor; not listed in --help
    worker.add_argument("--control-fd", type=int, required=True)
    worker.add_argument("--index", type=int, default=0)
    return p


def _log_level_option(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--log-level", type=str.lower, choices=LOG_LEVELS, metavar="LEVEL", default=default,
        help=f"{', '.join(LOG_LEVELS)} (default: ${LOG_LEVEL_ENV}, else info)",
    )  # fmt: skip


def _config_option(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "-c", "--config", metavar="FILE", default=os.environ.get(CONFIG_ENV),
        help=f"the YAML config (default: ${CONFIG_ENV})",
    )  # fmt: skip


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parsed flags, with the checks argparse cannot make (one line, exit 2)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error(f"a command is required: {COMMANDS}")
    if args.log_level is None:
        level = os.environ.get(LOG_LEVEL_ENV, "info").lower()
        if level not in LOG_LEVELS:
            parser.error(f"{LOG_LEVEL_ENV}={level!r} is not a log level: {', '.join(LOG_LEVELS)}")
        args.log_level = level
    if hasattr(args, "config") and not args.config:
        parser.error(f"{args.command}: -c FILE is required (or set {CONFIG_ENV})")
    return args


def _run_loop(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every POSIX platform
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())


def _validate(path: str, log_warnings: bool = False) -> Document | None:
    """The config at ``path`` as ``run`` would take it, or None after printing why not.
    Its warnings (an expired certificate) are printed, or logged with ``log_warnings``."""
    from proxy.runtime.preflight import validate, warnings

    try:
        document = validate(path)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return None
    for line in warnings(document):
        if log_warnings:
            log.warning("%s", line)
        else:
            print(line, file=sys.stderr)
    return document


def cmd_check(args: argparse.Namespace) -> int:
    document = _validate(args.config)
    if document is None:
        return EXIT_CONFIG
    config = document.config
    if args.print:
        print(_effective_yaml(document), end="")
        return 0
    upstreams = sum(len(pool.upstreams) for pool in config.pools.values())
    counts = (_count(len(config.listeners), "listener"), _count(len(config.pools), "pool"),
              _count(upstreams, "upstream"))  # fmt: skip
    print(f"{args.config}: OK ({', '.join(counts)})")
    return 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"


def _effective_yaml(document: Document) -> str:
    from proxy.admin.security import TOKEN_ENV
    from proxy.config.schema import HIDDEN, effective_yaml

    config = document.config
    header = [
        f"# The effective config of {document.name} (aiolb {__version__}): every default",
        f"# filled in, ${{VAR}}s expanded, secrets shown as {HIDDEN}.",
    ]
    if config.admin.token is None and os.environ.get(TOKEN_ENV):
        header.append(f"# admin.token: null here, but {TOKEN_ENV} is set and is the token.")
    return "\n".join(header) + "\n" + effective_yaml(config)


def cmd_run(args: argparse.Namespace) -> int:
    document = _validate(args.config, log_warnings=True)
    if document is None:
        return EXIT_CONFIG
    config = document.config
    from proxy.remote import PidFile
    from proxy.runtime.server import ProxyServer
    from proxy.runtime.workers import Supervisor, worker_count

    workers = worker_count(args.workers if args.workers is not None else config.workers)
    code = {"exit": 0}

    # written once the listeners and the admin API are bound: a second ``aiolb run`` that
    # cannot bind never touches the running one's file (nginx does the same)
    pid_file = PidFile(config.pid_file) if config.pid_file else None
    on_bound = pid_file.write if pid_file is not None else None

    async def supervise() -> None:
        code["exit"] = await Supervisor(config, args.config, workers).serve(on_bound)

    async def single() -> None:
        # SIGHUP and POST /api/reload read config_path again
        server = ProxyServer(config, config_path=args.config)
        await server.serve(on_bound)

    try:
        return _serve(supervise if workers > 1 else single, document) or code["exit"]
    finally:
        if pid_file is not None:
            pid_file.remove()


def cmd_remote(args: argparse.Namespace) -> int:
    """``reload`` / ``stop``: through the admin API of the proxy serving ``-c FILE``."""
    from proxy import remote

    document = _validate(args.config)
    if document is None:
        if args.command == "reload":
            print("nothing sent: the running aiolb keeps its config", file=sys.stderr)
        else:
            print(remote.stop_by_hand(args.config), file=sys.stderr)
        return EXIT_CONFIG
    action = remote.reload if args.command == "reload" else remote.stop
    try:
        action(document.config)
    except remote.RemoteError as exc:
        print(f"aiolb {args.command}: {exc}" if exc.code != EXIT_CONFIG else str(exc),
              file=sys.stderr)  # fmt: skip
        return exc.code
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from proxy.runtime.worker import run_worker

    async def main() -> None:
        await run_worker(args.control_fd, args.index)

    return _serve(main)


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.demo import DemoPortBusy, run_demo

    async def main() -> None:
        await run_demo(args.port, admin_port=args.admin_port)

    try:
        return _serve(main)
    except DemoPortBusy as exc:
        print(f"aiolb demo: {exc}", file=sys.stderr)
        return EXIT_RUNTIME


def cmd_example(args: argparse.Namespace) -> int:
    from proxy.examples import example_text, examples

    found = examples()
    if args.name is None:
        width = max(map(len, found))
        for name, summary in found.items():
            print(f"{name:<{width}}  {summary}")
        print("\naiolb example NAME prints one; aiolb example aiolb > aiolb.yaml starts a config")
        return 0
    text = example_text(args.name)
    if text is None:
        print(f"aiolb example: no example {args.name!r}; there are: {', '.join(found)}",
              file=sys.stderr)  # fmt: skip
        return EXIT_CONFIG
    print(text, end="")
    return 0


def _serve(main: Callable[[], Coroutine[Any, Any, None]], document: Document | None = None) -> int:
    """Run ``main``; start-up failures are one line each (with the key to change)."""
    from proxy.admin import AdminError
    from proxy.errors import BindError

    try:
        _run_loop(main)
    except AdminError as exc:
        print(f"aiolb: cannot start: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except BindError as exc:
        print(_bind_problem(exc, document), file=sys.stderr)
        return EXIT_RUNTIME
    except OSError as exc:
        print(f"aiolb: cannot start: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        pass
    return 0


def _bind_problem(exc: BindError, document: Document | None) -> str:
    in_use = exc.errno == errno.EADDRINUSE
    hint = "another process holds it: stop it or change this key" if in_use else ""
    message = f"cannot listen on {exc.address}: {exc.reason}" + (f" ({hint})" if hint else "")
    if document is None:
        return f"aiolb: cannot start: {exc}"
    return document.problem(exc.loc, message)


def main(argv: Sequence[str] | None = None) -> int:
    args = _arguments(argv)
    name = f"%(name)s[worker {args.index}]" if args.command == "_worker" else "%(name)s"
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s %(levelname)s {name}: %(message)s",
        stream=sys.stderr,
    )
    commands = {
        "run": cmd_run, "check": cmd_check, "reload": cmd_remote, "stop": cmd_remote,
        "demo": cmd_demo, "example": cmd_example, "_worker": cmd_worker,
    }  # fmt: skip
    if args.command == "version":
        print(f"aiolb {__version__}")
        return 0
    return commands[args.command](args)
