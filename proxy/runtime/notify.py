"""systemd's readiness protocol (``sd_notify``), without libsystemd.

Under a ``Type=notify`` unit systemd sets ``NOTIFY_SOCKET`` to a Unix datagram socket
(a path, or an abstract name written with a leading ``@``) and waits for ``READY=1``
before it counts the service as started. aiolb sends:

- ``READY=1`` once every listener and the admin API are bound (with workers: once every
  worker serves);
- ``RELOADING=1`` (with ``MONOTONIC_USEC``, which ``Type=notify-reload`` requires) when a
  reload starts, and ``READY=1`` again when it has ended, applied or refused;
- ``STOPPING=1`` when a graceful shutdown starts.

Each message is one datagram; a missing or unreachable socket costs nothing and is
never an error (the proxy serves the same without systemd). Worker processes never
send: only the process systemd started speaks for the service.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Final

ENV: Final = "NOTIFY_SOCKET"


def notify(*fields: str) -> bool:
    """Send ``fields`` (``"READY=1"``, ...) to ``$NOTIFY_SOCKET`` as one datagram.
    True when it was sent; False without the variable or when the socket refuses."""
    address = os.environ.get(ENV)
    if not address or address[0] not in "/@":  # unset, or a vsock address: not ours
        return False
    if address[0] == "@":
        address = "\0" + address[1:]  # Linux's abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(fields).encode() + b"\n", address)
    except OSError:
        return False
    return True


def ready() -> bool:
    """The service is up (or done reloading)."""
    return notify("READY=1")


def reloading() -> bool:
    """A reload starts; ``ready()`` ends it."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}")


def stopping() -> bool:
    """A graceful shutdown starts."""
    return notify("STOPPING=1")
