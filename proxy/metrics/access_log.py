"""The access log: one line per request, never blocking the event loop.

The hot path appends one formatted line to a list (the format, JSON fields or a
template, is compiled once: ``proxy.metrics.log_format``). On each clock tick the list is
handed, whole, to a writer thread (one queue operation per tick, not per request),
which writes it with ``os.write``. A full disk, a closed stdout or a writer that falls
behind costs lines, never the proxy: they are dropped, counted in ``dropped``, and a
warning is logged at most once a minute.

``reopen`` (SIGUSR1, and every reload) opens the path again, for log rotation
(``mv access.log access.log.1`` then SIGUSR1, as logrotate does for nginx): the new file
is opened in the loop, then handed to the writer thread behind the lines queued so far,
so each line lands whole in the old file or the new one.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from typing import TYPE_CHECKING, Final

from proxy.config.log_fields import DEFAULT_FIELDS
from proxy.metrics.log_format import compile_format

if TYPE_CHECKING:
    from proxy.metrics.source import PoolRef, UpstreamRef

log = logging.getLogger("aiolb")

#: Lines held in the loop between two ticks before new ones are dropped.
MAX_PENDING_LINES: Final = 50_000
#: Batches waiting for the writer thread before new batches are dropped.
MAX_QUEUED_BATCHES: Final = 64
_WARN_EVERY: Final = 60.0


class AccessLog:
    __slots__ = (
        "_fd", "_format", "_last_warning", "_lines", "_owns_fd", "_prefix", "_queue",
        "_second", "_thread", "dropped", "path", "times",
    )

    def __init__(self, path: str, format: str | tuple[str, ...] = DEFAULT_FIELDS) -> None:
        """``path``: ``stdout``/``-`` or a file (opened for append; OSError if it cannot
        be). ``format``: ``access_log.format``, a field list (JSON) or a template."""
        self.path = path
        self._format = compile_format(format, self.timestamp)
        #: the format logs ``upstream_header_time``: exchanges note when heads arrive
        self.times = "upstream_header_time" in format
        if path in ("stdout", "-"):
            self._fd, self._owns_fd = sys.stdout.fileno(), False
        else:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self._owns_fd = True
        self._lines: list[str] = []
        #: batches of lines; an int: the file to write to from now on; None: stop
        self._queue: queue.SimpleQueue[list[str] | int | None] = queue.SimpleQueue()
        self.dropped = 0
        self._last_warning = 0.0
        self._second = -1
        self._prefix = ""
        self._thread = threading.Thread(target=self._run, name="aiolb-access-log", daemon=True)
        self._thread.start()

    def record(
        self, now: float, client: str, method: bytes, target: bytes, status: int,
        bytes_in: int, bytes_out: int, seconds: float, attempts: int, request_id: bytes,
        host: bytes | None, headers: list[tuple[bytes, bytes]], listener: str,
        pool: PoolRef | None, upstream: UpstreamRef | None, ex: object,
    ) -> None:
        """Format and queue one request's line (the hot path; ``now`` is ``time.time()``;
        ``upstream``: the one tried last, None: none was; ``pool`` None: before routing;
        ``ex`` None: the connection answered before a request was made of it)."""
        self.write(self._format(
            now, client, method, target, status, bytes_in, bytes_out, seconds, attempts,
            request_id, host, headers, listener, pool, upstream, ex,
        ))  # fmt: skip

    def timestamp(self, now: float) -> str:
        """``2026-11-23T02:55:00.123Z``; the part up to the second is cached."""
        sec = int(now)
        if sec != self._second:
            self._second = sec
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return f"{self._prefix}.{int((now - sec) * 1000):03d}Z"

    def write(self, line: str) -> None:
        """Queue one line (with its newline)."""
        lines = self._lines
        if len(lines) < MAX_PENDING_LINES:
            lines.append(line)
        else:
            self.dropped += 1

    def flush(self, now: float = 0.0) -> None:
        """Hand the lines gathered so far to the writer thread (a clock sweeper)."""
        lines = self._lines
        if not lines:
            return
        self._lines = []
        if self._queue.qsize() >= MAX_QUEUED_BATCHES:
            self.dropped += len(lines)
            self._warn("access log writer is behind")
            return
        self._queue.put(lines)

    def reopen(self) -> bool:
        """Open ``path`` again (after a rotation moved it); the lines gathered so far go
        to the old file. False, logged, when it cannot be opened: the old file stays."""
        if not self._owns_fd:
            return True
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            log.error("cannot reopen the access log %s: %s", self.path, exc.strerror or exc)
            return False
        self.flush()
        self._queue.put(fd)
        return True

    def close(self, timeout: float = 2.0) -> None:
        self.flush()
        self._queue.put(None)
        self._thread.join(timeout)
        if self._owns_fd:
            _close(self._fd)

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            if isinstance(batch, int):
                self._fd, old = batch, self._fd
                _close(old)
                continue
            data = "".join(batch).encode("utf-8", "replace")
            try:
                while data:
                    written = os.write(self._fd, data)
                    data = data[written:]
            except OSError as exc:
                self.dropped += len(batch)
                self._warn(f"cannot write the access log {self.path}: {exc.strerror or exc}")

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY:
            self._last_warning = now
            log.warning("%s (%d lines dropped so far)", message, self.dropped)

    def __repr__(self) -> str:
        return f"<AccessLog {self.path} [{len(self._lines)} pending, {self.dropped} dropped]>"


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
