"""The container image's HEALTHCHECK: GET the admin ``/healthz`` and exit 0 or 1.

The slim base image has no curl, so this uses the standard library. The URL is
``$AIOLB_HEALTHCHECK_URL``, default ``http://127.0.0.1:9901/healthz``: the admin
listener's default address, which answers from inside the container whether the admin
is bound to loopback or to every interface. Set the variable when the config moves the
admin port, or for the demo upstreams that run from the same image (port 8000).
``/healthz`` needs no token even when the admin has one.
"""

from __future__ import annotations

import os
import sys
import urllib.request

DEFAULT_URL = "http://127.0.0.1:9901/healthz"


def main() -> int:
    url = os.environ.get("AIOLB_HEALTHCHECK_URL") or DEFAULT_URL
    try:
        # urlopen raises for refused connections, timeouts and statuses >= 400
        with urllib.request.urlopen(url, timeout=2) as response:
            status = response.status
    except Exception as exc:  # every failure is "unhealthy", with the reason in the log
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    return 0 if 200 <= status < 300 else 1


if __name__ == "__main__":
    sys.exit(main())
