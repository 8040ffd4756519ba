"""A real upstream in its own process, for tests that kill it: ``python -m
tests.upstream_process --port P --name NAME``. Answers every path with its name
(``/healthz`` with ``ok``) and prints ``ready`` once it listens."""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web


async def main(port: int, name: str) -> None:
    async def hello(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text=name)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/{tail:.*}", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True)
    args = parser.parse_args()
    asyncio.run(main(args.port, args.name))
