"""A demo upstream for the container examples: ``proxy.demo.demo_app`` on all interfaces.

It answers every path with ``Hello from NAME: METHOD PATH`` (and an ``X-Upstream: NAME``
header) and has ``/healthz``, like the upstreams of ``aiolb demo``. The image ships it
as ``/opt/aiolb/demo_upstream.py`` so that docker-compose and the Kubernetes example
can run upstreams from the aiolb image itself:

    python /opt/aiolb/demo_upstream.py NAME [PORT]

NAME defaults to ``$DEMO_NAME`` (the Kubernetes example sets it to the pod name), then
the host name; PORT to ``$DEMO_PORT``, then 8000. SIGTERM stops it (aiohttp's
``run_app`` handles it), so ``docker stop`` exits 0.
"""

from __future__ import annotations

import os
import socket
import sys

from aiohttp import web

from proxy.demo import demo_app


def main(argv: list[str]) -> int:
    name = argv[1] if len(argv) > 1 else os.environ.get("DEMO_NAME") or socket.gethostname()
    port = int(argv[2] if len(argv) > 2 else os.environ.get("DEMO_PORT") or 8000)
    print(f"demo upstream {name} on 0.0.0.0:{port}", file=sys.stderr, flush=True)
    web.run_app(demo_app(name), host="0.0.0.0", port=port, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
