"""The command line: ``aiolb run | check | demo | version`` (also ``python -m proxy``).

Expected failures (a bad config, a port in use) print one clear line and exit
non-zero; tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from proxy import __version__
from proxy.config import Config, ConfigError, load_config

log = logging.getLogger("aiolb")

EXIT_CONFIG = 2
EXIT_RUNTIME = 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aiolb", description="asyncio HTTP/1.1 load balancer")
    p.add_argument("--log-level", default=os.environ.get("AIOLB_LOG_LEVEL", "info"))
    sub = p.add_subparsers(dest="command", required=True)
    default_config = os.environ.get("AIOLB_CONFIG")
    run = sub.add_parser("run", help="serve a config until SIGTERM/SIGINT")
    run.add_argument("-c", "--config", default=default_config, required=default_config is None)
    run.add_argument("--workers", type=int, default=None, help="worker processes")
    check = sub.add_parser("check", help="validate a config file")
    check.add_argument("-c", "--config", default=default_config, required=default_config is None)
    demo = sub.add_parser("demo", help="three demo upstreams with the proxy in front")
    demo.add_argument("--port", type=int, default=8080, help="proxy port (default 8080)")
    sub.add_parser("version", help="print the version")
    worker = sub.add_parser("_worker")  # started by the supervisor (proxy.runtime.workers)
    worker.add_argument("--control-fd", type=int, required=True)
    worker.add_argument("--index", type=int, default=0)
    return p


def _run_loop(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every POSIX platform
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())


def _load(path: str, log_warnings: bool = False) -> Config | None:
    """The config at ``path`` with the files it names checked (``proxy.config.files``):
    errors printed (None); warnings printed (or logged) and the config returned."""
    warnings: list[str] = []
    try:
        config = load_config(path, check_files=True, warnings=warnings)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return None
    for line in warnings:
        if log_warnings:
            log.warning("%s", line)
        else:
            print(line, file=sys.stderr)
    return config


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    pools = len(config.pools)
    print(f"{args.config}: OK ({len(config.listeners)} listeners, {pools} pools)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from proxy.runtime.server import ProxyServer

    config = _load(args.config, log_warnings=True)
    if config is None:
        return EXIT_CONFIG
    from proxy.runtime.workers import Supervisor, worker_count

    workers = worker_count(args.workers if args.workers is not None else config.workers)
    if workers > 1:
        code = {"exit": 0}

        async def supervise() -> None:
            code["exit"] = await Supervisor(config, args.config, workers).serve()

        return _serve(supervise) or code["exit"]

    async def main() -> None:
        server = ProxyServer(config)
        server.config_path = args.config  # SIGHUP and POST /api/reload read it again
        await server.serve()

    return _serve(main)


def cmd_worker(args: argparse.Namespace) -> int:
    from proxy.runtime.workers import run_worker

    async def main() -> None:
        await run_worker(args.control_fd, args.index)

    return _serve(main)


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.demo import run_demo

    async def main() -> None:
        await run_demo(args.port)

    return _serve(main)


def _serve(main: Callable[[], Coroutine[Any, Any, None]]) -> int:
    from proxy.admin import AdminError

    try:
        _run_loop(main)
    except AdminError as exc:
        print(f"aiolb: cannot start: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"aiolb: cannot start: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    name = f"%(name)s[worker {args.index}]" if args.command == "_worker" else "%(name)s"
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s %(levelname)s {name}: %(message)s",
        stream=sys.stderr,
    )
    commands = {"run": cmd_run, "check": cmd_check, "demo": cmd_demo, "_worker": cmd_worker}
    if args.command == "version":
        print(f"aiolb {__version__}")
        return 0
    return commands[args.command](args)
