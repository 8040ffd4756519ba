"""A lean pipelined RESP connection for the Redis ``rate_limit`` store.

Theory of operation: ``Pipe.call`` appends one command's bytes to an out-list and its
waiter (a callback) to a FIFO of waiters; the first command of an
event-loop iteration schedules one ``_flush`` with ``call_soon``, so every decision
asked during that iteration leaves in one ``write``: one round trip. Redis answers a
connection's commands in order, so ``data_received`` parses whole replies and hands
each to the waiter at the head of the FIFO: a callback is called there and then (the
store settles its decisions in the loop iteration that read the reply).
Each command is its own atomic ``EVALSHA``: batching changes when commands travel, not
what Redis decides.

Every waiter has a deadline (its enqueue time + ``timeout``); one timer watches the
oldest. A deadline passed, a connection refused or lost, or a reply that is not RESP
ends the connection: every waiter gets ``None`` at once (the store's outage answer) and
the owner is told (``on_lost``). ``MAX_IN_FLIGHT`` bounds the waiters: beyond it
``call`` returns False without queueing. A reply ``-NOSCRIPT`` re-sends
that command's ``redo`` (``EVAL`` with the script's text) for the same waiter.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs, unquote, urlsplit

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger("aiolb")

#: Decisions waiting on one connection at most; more are answered ``None`` at once.
MAX_IN_FLIGHT: Final = 8192
_CRLF: Final = b"\r\n"


class ReplyError(Exception):
    """A Redis error reply (``-ERR ...``), as the waiter's result."""


def bulk(*parts: bytes) -> bytes:
    """``parts`` as RESP bulk strings, one after the other."""
    return b"".join([b"$%d\r\n%s\r\n" % (len(part), part) for part in parts])


def command(*parts: bytes) -> bytes:
    """``parts`` as one RESP array of bulk strings."""
    return b"*%d\r\n" % len(parts) + bulk(*parts)


def handshake(url: str) -> tuple[dict[str, Any], list[bytes]]:
    """``url``'s connection arguments (for ``create_connection`` or
    ``create_unix_connection``) and the commands to send first (``AUTH``, ``SELECT``)."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    if parts.scheme == "unix":
        where: dict[str, Any] = {"path": parts.path}
        db = query.get("db", ["0"])[0]
    else:
        where = {"host": parts.hostname or "127.0.0.1", "port": parts.port or 6379}
        if parts.scheme == "rediss":
            where["ssl"] = ssl.create_default_context()
        db = parts.path.strip("/") or query.get("db", ["0"])[0]
    first = []
    if parts.password is not None:
        secret = [unquote(parts.password).encode()]
        if parts.username:
            secret.insert(0, unquote(parts.username).encode())
        first.append(command(b"AUTH", *secret))
    if db not in ("", "0"):
        first.append(command(b"SELECT", db.encode()))
    return where, first


class Pipe(asyncio.Protocol):
    """One connection to Redis carrying pipelined commands (see the module).
    ``writes`` counts the round trips, ``asked`` the commands."""

    __slots__ = ("_buffer", "_connecting", "_loop", "_on_lost", "_out", "_timer", "_transport",
                 "asked", "closed", "timeout", "waiting", "writes")  # fmt: skip

    def __init__(
        self, timeout: float, on_lost: Callable[[Pipe, BaseException | None], None]
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self.timeout = timeout
        self._on_lost = on_lost
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._out: list[bytes] = []
        #: (waiter or None for a handshake command, redo head, tail, deadline), oldest first
        self.waiting: deque[tuple[Callable[[Any], None] | None, bytes | None, bytes, float]] = (
            deque()
        )
        self._timer: asyncio.TimerHandle | None = None
        self._connecting: asyncio.Task[None] | None = None
        self.closed = False
        self.writes = 0
        self.asked = 0

    def connect(self, url: str, *first: bytes) -> None:
        """Open the connection in the background (commands queue meanwhile); send
        ``first`` (commands whose error reply ends the connection) before any other."""
        where, auth = handshake(url)
        for cmd in (*auth, *first):
            self._send(cmd, b"", None, None)
        self._connecting = self._loop.create_task(self._connect(where))

    async def _connect(self, where: dict[str, Any]) -> None:
        loop = self._loop
        try:
            async with asyncio.timeout(self.timeout):
                if "path" in where:
                    await loop.create_unix_connection(lambda: self, **where)
                else:
                    await loop.create_connection(lambda: self, **where)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            self._connecting = None
            self.lost(exc)
        else:
            self._connecting = None

    def call(
        self, head: bytes, tail: bytes, redo: bytes | None, answer: Callable[[Any], None]
    ) -> bool:
        """Send the command ``head + tail``; ``answer(reply)`` (bytes, an int, or a
        ``ReplyError``; ``None`` when the connection fails first) is called from the
        callback that reads the reply, so it must not raise. False (not sent, never
        answered) when too many are waiting. A ``NOSCRIPT`` reply sends ``redo + tail``
        instead."""
        if len(self.waiting) >= MAX_IN_FLIGHT:
            return False
        self._send(head, tail, answer, redo)
        return True

    def _send(self, head: bytes, tail: bytes, waiter: Callable[[Any], None] | None,
              redo: bytes | None, deadline: float = 0.0) -> None:  # fmt: skip
        out = self._out
        if not out:
            self._loop.call_soon(self._flush)
        out.append(head)
        out.append(tail)
        self.asked += 1
        self.waiting.append((waiter, redo, tail, deadline or self._loop.time() + self.timeout))
        if self._timer is None:
            self._timer = self._loop.call_at(self.waiting[0][3], self._check)

    def flush(self) -> None:
        """Write what is queued now, rather than at the end of the loop iteration."""
        self._flush()

    def _flush(self) -> None:
        transport = self._transport
        if transport is None or self.closed or not self._out:
            return  # not connected yet: ``connection_made`` flushes
        transport.write(b"".join(self._out))
        self._out.clear()
        self.writes += 1

    def _check(self) -> None:
        """The oldest waiter's deadline: passed, the connection ends."""
        self._timer = None
        if not self.waiting or self.closed:
            return
        deadline = self.waiting[0][3]
        if self._loop.time() >= deadline:
            self.lost(TimeoutError(f"no reply within {self.timeout * 1000:g} ms"))
        else:
            self._timer = self._loop.call_at(deadline, self._check)

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.closed:
            transport.close()
            return
        self._transport = transport  # type: ignore[assignment]
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.lost(exc or ConnectionError("Redis closed the connection"))

    def data_received(self, data: bytes) -> None:
        buf = self._buffer
        buf += data
        pos, size = 0, len(buf)
        try:
            while pos < size:
                end = buf.find(_CRLF, pos)
                if end < 0:
                    break
                kind = buf[pos]
                if kind == 36:  # $: a bulk string
                    n = int(buf[pos + 1 : end])
                    if n < 0:
                        value: Any = None
                        after = end + 2
                    else:
                        after = end + 4 + n
                        if after > size:
                            break
                        value = bytes(buf[end + 2 : end + 2 + n])
                elif kind == 58:  # :: an integer
                    value, after = int(buf[pos + 1 : end]), end + 2
                elif kind == 43:  # +: a status
                    value, after = bytes(buf[pos + 1 : end]), end + 2
                elif kind == 45:  # -: an error
                    value, after = (
                        ReplyError(buf[pos + 1 : end].decode(errors="replace")),
                        end + 2,
                    )
                else:
                    raise ValueError(f"unexpected RESP reply type {chr(kind)!r}")
                pos = after
                self._reply(value)
                if self.closed:
                    return
        except (ValueError, IndexError) as exc:
            self.lost(exc)
            return
        except Exception as exc:  # a bug: it never escapes a protocol callback
            log.error("bug reading a Redis reply", exc_info=exc)
            self.lost(exc)
            return
        del buf[:pos]

    def _reply(self, value: Any) -> None:
        if not self.waiting:
            raise ValueError("a reply nobody asked for")
        waiter, redo, tail, deadline = self.waiting.popleft()
        if waiter is None:  # AUTH, SELECT
            if isinstance(value, ReplyError):
                self.lost(value)
            return
        if redo is not None and isinstance(value, ReplyError) and str(value).startswith("NOSCRIPT"):
            self._send(redo, tail, waiter, None, deadline)  # the script's text, once
            return
        waiter(value)

    def lost(self, exc: BaseException | None) -> None:
        """End the connection: every waiter gets None; the owner hears ``exc`` (None:
        closed on purpose)."""
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._connecting is not None:
            self._connecting.cancel()
        if self._transport is not None:
            self._transport.abort()
        waiting, self.waiting = self.waiting, deque()
        self._out.clear()
        for waiter, *_ in waiting:
            if waiter is not None:
                waiter(None)
        self._on_lost(self, exc)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open" if self._transport else "connecting"
        return f"<Pipe [{state}, {len(self.waiting)} waiting, {self.writes} writes]>"
