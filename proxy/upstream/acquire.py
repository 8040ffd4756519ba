"""Getting an upstream session: reuse an idle one, open one, wait, or be refused.

Theory of operation
-------------------
A request asks for a session of the upstream it picked (``acquire``) and holds a
``Ticket``, its claim, which it can cancel. Every decision about an upstream's
connections is made by one synchronous function, ``assign`` (STYLE 2; httpcore's
``_assign_requests_to_connections``), called after each change: a request asks, a
connection is freed (``Upstream.put_idle``) or closed (``Upstream.connection_closed``),
a requester goes away (``Ticket.cancel``) or waited too long (``Ticket.expire``).
``assign`` only moves counts, queues and ticket states, and returns what it decided;
``carry_out`` then acts on it: it answers the ``Waiter``, starts or cancels connect
tasks. So a waiter that asks again from its callback finds the books balanced.

The rules, in ``assign``:

- the most recently released idle connection is reused first (``Upstream.take_idle``);
- else one is opened while fewer than ``max_connections`` are open. ``Upstream.conns``
  counts connections being opened too: the slot is taken when the open is decided, so
  requests in the same loop iteration see it gone, and given back when the connection
  closes or its connect fails (``Upstream.connection_closed``), or by ``assign`` when
  the requester goes away before the connect task first ran;
- else the request waits in ``Upstream.waiting``, first come first served: at most
  ``max_pending`` per pool (beyond: 503 at once) and at most ``queue_timeout`` (then
  503); both count in ``Pool.overflows``;
- a freed connection goes to the first waiter, and a closed one lets it open one.

Only the connect (``_connect``) awaits. The queue deadline costs no timer: the
requester's own deadline check (the exchange's, on the clock tick) calls
``Ticket.expire`` at the time ``Waiter.queued`` gave it.

A ticket's states and their transitions (all of them set here)::

    NEW -> GRANTED | OPENING | QUEUED | REFUSED          assign: a request asks
    QUEUED -> GRANTED | OPENING                          assign: served in turn
    QUEUED -> REFUSED | CANCELLED                        assign: expired, cancelled
    OPENING -> CONNECTING                                _connect starts
    OPENING | CONNECTING -> CANCELLED                    assign: cancelled
    CONNECTING -> GRANTED | FAILED                       _connect ends
"""

from __future__ import annotations

import asyncio
import enum
import ssl
from collections import deque
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING, Protocol, TypeVar

from proxy.clock import NEVER
from proxy.errors import CircuitOpenError, ProxyError, UpstreamConnectError
from proxy.tcp import connect_sending
from proxy.tls import tls_failure
from proxy.upstream.connection import UpstreamConnection
from proxy.upstream.h2 import H2Upstream

if TYPE_CHECKING:
    from proxy.proxy_protocol import Addresses
    from proxy.upstream.pool import Pool, Upstream
    from proxy.upstream.session import UpstreamSession


class Waiter(Protocol):
    """Who asked for a session (``acquire``; the exchange). It is answered once, by
    ``granted``, ``refused`` or ``failed``, maybe before ``acquire`` returns; ``queued``
    may come first."""

    def granted(self, session: UpstreamSession, connect_seconds: float | None) -> bool:
        """``session`` is the waiter's: an idle one (``connect_seconds`` None) or one
        opened for it. False: it no longer wants one (it finished meanwhile), and the
        pool takes the session back."""

    def queued(self, deadline: float) -> None:
        """``max_connections`` are open: the request waits. Once the waiter's clock
        passes ``deadline`` it calls ``Ticket.expire`` (which answers ``refused``)."""

    def refused(self, error: CircuitOpenError) -> None:
        """The circuit breaker's 503: ``max_pending`` requests wait already, or the wait
        outlasted ``queue_timeout``. The upstream is not to blame; nothing was sent."""

    def failed(self, error: ProxyError) -> None:
        """Opening the connection failed (an ``UpstreamConnectError``: refused, timed
        out, a TLS handshake): an attempt failure, nothing sent."""

    def proxy_addresses(self) -> Addresses | None:
        """Who connected to whom on the client side: what a pool's
        ``send_proxy_protocol`` header says (asked only when it sends one)."""


class Wait(Protocol):
    """What a request holds while it waits: a ``Ticket`` (a connection), or a
    ``proxy.upstream.hold.Claim`` (an upstream, with ``scale_from_zero``)."""

    def cancel(self) -> None:
        """The requester went away (idempotent)."""

    def expire(self) -> bool:
        """The requester's deadline passed: True when it was this wait's."""


class State(enum.Enum):
    """Where a ticket is (see the module's transitions)."""

    NEW = "new"
    QUEUED = "queued"  # waiting in ``Upstream.waiting``, counted in ``Pool.pending``
    OPENING = "opening"  # a slot taken; the connect task has not run yet
    CONNECTING = "connecting"  # the connect task runs: it gives the slot back if it fails
    GRANTED = "granted"
    REFUSED = "refused"
    FAILED = "failed"
    CANCELLED = "cancelled"


NEW, QUEUED, OPENING, CONNECTING = State.NEW, State.QUEUED, State.OPENING, State.CONNECTING
GRANTED, REFUSED, FAILED, CANCELLED = State.GRANTED, State.REFUSED, State.FAILED, State.CANCELLED


class Ticket:
    """One request's claim on a session of ``upstream``, from ``acquire`` until it is
    granted, refused, failed or cancelled: the requester's one handle (``cancel``,
    ``expire``)."""

    __slots__ = (
        "asked",
        "conn",
        "deadline",
        "error",
        "fresh",
        "loop",
        "pool",
        "state",
        "task",
        "upstream",
        "waiter",
    )

    def __init__(
        self,
        upstream: Upstream,
        waiter: Waiter,
        loop: asyncio.AbstractEventLoop,
        now: float,
        fresh: bool = False,
    ) -> None:
        self.upstream = upstream
        #: the pool that counts it in ``pending`` while it waits (a reload may give the
        #: upstream to another pool meanwhile)
        self.pool: Pool = upstream.pool
        self.waiter = waiter
        self.loop = loop
        self.asked = now  # the requester's clock when it asked: the queue wait's start
        #: a new connection at once, whatever is idle or open (``acquire``)
        self.fresh = fresh
        self.state = NEW
        self.deadline = NEVER  # while QUEUED: when ``expire`` refuses it
        self.conn: UpstreamConnection | None = None  # GRANTED: until the waiter has it
        self.error: CircuitOpenError | None = None  # REFUSED: until the waiter has it
        self.task: asyncio.Task[None] | None = None  # OPENING, CONNECTING

    def cancel(self) -> None:
        """The requester went away: leave the queue, or stop the connect (a connect task
        that never ran gives its slot back now, a running one as it ends). Idempotent;
        nothing once the ticket was answered."""
        state = self.state
        if state is QUEUED or state is OPENING or state is CONNECTING:
            carry_out(assign(self.upstream, self, cancel=True))

    def expire(self) -> bool:
        """The requester's clock passed the deadline ``Waiter.queued`` gave: a ticket
        still waiting is refused (503). True when the deadline was this ticket's (it
        waited, or it left the queue for a connect, which keeps its own timeout)."""
        state = self.state
        if state is QUEUED:
            carry_out(assign(self.upstream, self))
            return True
        return state is OPENING or state is CONNECTING

    def __repr__(self) -> str:
        return f"<Ticket {self.upstream.address} [{self.state.value}]>"


def acquire(
    upstream: Upstream,
    waiter: Waiter,
    loop: asyncio.AbstractEventLoop,
    now: float,
    fresh: bool = False,
) -> Ticket | None:
    """Ask for a session of ``upstream`` on behalf of ``waiter`` (``now``: the waiter's
    clock, where a queue deadline starts). Returns the ticket while the request waits
    or its connection opens, None when it was answered already (an idle connection, a
    503). The waiter drops the ticket once answered: it refers to the waiter.
    ``fresh``: open a new connection now, idle ones and the limit aside: the
    replacement of a pooled connection that proved stale, whose slot it takes. HTTP/2
    has no such slot: a stream sent again (refused unprocessed) asks as any request."""
    if upstream.h2 is not None:
        fresh = False
    if not fresh and not upstream.waiting:
        # the common case, decided as ``assign`` decides for a lone request but without
        # a ticket, which a request answered at once does not need: the idle connection
        conn = upstream.take_idle()
        if conn is None and upstream.private:  # one that sent this client's header
            conn = upstream.take_own(_header(upstream, waiter))
        if conn is not None:
            if not waiter.granted(conn, None):
                upstream.put_idle(conn, loop.time())
            return None
    ticket = Ticket(upstream, waiter, loop, now, fresh)
    carry_out(assign(upstream, ticket))
    state = ticket.state  # not yet CONNECTING: the connect task has not run
    return ticket if state is QUEUED or state is OPENING else None


def assign(
    upstream: Upstream, ticket: Ticket | None = None, cancel: bool = False
) -> list[tuple[Ticket, State]]:
    """The bookkeeping of ``upstream``'s connections: every decision, no effect.

    ``ticket`` is the one whose requester acted: a ``NEW`` one asks; with ``cancel``
    its requester went away; a ``QUEUED`` one otherwise waited past its deadline.
    Without one, a connection was freed (it is in ``upstream.idle``) or closed (its
    slot is free). Then the waiters are served in order while an idle connection or a
    slot is free. Returns the tickets decided with their outcome (their new ``state``):
    ``GRANTED`` (``conn`` is theirs), ``OPENING`` (a slot taken; ``carry_out`` starts
    the connect), ``QUEUED`` (``deadline`` set), ``REFUSED`` (``error``, a 503) or
    ``CANCELLED``.
    """
    decided: list[tuple[Ticket, State]] = []
    waiting = upstream.waiting
    if ticket is not None:
        state = ticket.state
        if cancel or state is QUEUED:
            if state is QUEUED:
                _leave(waiting, ticket)
                if not cancel:  # its wait ran out
                    ticket.pool.overflows += 1
                    ticket.error = CircuitOpenError("no connection free within the queue timeout")
            elif state is OPENING:  # the task never ran: nothing else gives the slot back
                upstream.conns -= 1
                if upstream.h2 is not None:
                    upstream.h2_opening -= 1
            ticket.state = outcome = CANCELLED if cancel else REFUSED
            decided.append((ticket, outcome))
        elif ticket.fresh:
            upstream.conns += 1
            ticket.state = OPENING
            return [(ticket, OPENING)]
        else:
            waiting.append(ticket)  # served in turn below, or it waits
    while waiting:
        first = waiting[0]
        conn = upstream.take_idle()
        if conn is not None:
            first.conn = conn
            outcome = GRANTED
        elif (upstream.h2_opening or upstream.h2_settling()) and not upstream.private:
            break  # HTTP/2: a connection opening, or waiting for its SETTINGS, may have room
        elif upstream.conns < upstream.max_connections:
            upstream.conns += 1
            if upstream.h2 is not None:
                upstream.h2_opening += 1
            outcome = OPENING
        else:
            if upstream.owned:  # a slot held idle for another client: free it
                upstream.evict_own()
            break
        waiting.popleft()
        if first.state is QUEUED:
            first.pool.pending -= 1
        first.state = outcome
        decided.append((first, outcome))
    if ticket is not None and ticket.state is NEW:  # nothing free: it waits, or 503
        pool = ticket.pool
        if pool.pending >= pool.max_pending:
            waiting.pop()
            pool.overflows += 1
            ticket.error = CircuitOpenError(
                f"{upstream.conns} connections open, {pool.pending} requests waiting"
            )
            ticket.state = REFUSED
        else:
            pool.pending += 1
            ticket.deadline = ticket.asked + pool.queue_timeout
            ticket.state = QUEUED
        decided.append((ticket, ticket.state))
    return decided


def _leave(waiting: deque[Ticket], ticket: Ticket) -> None:
    try:
        waiting.remove(ticket)
    except ValueError:
        pass
    ticket.pool.pending -= 1


def carry_out(decided: list[tuple[Ticket, State]]) -> None:
    """Act on what ``assign`` decided: answer the waiters, start and cancel connect
    tasks. A decision that a later one overtook (a waiter's callback asked or left
    again) is skipped: the later one's ``carry_out`` acts."""
    for ticket, outcome in decided:
        if ticket.state is not outcome:
            continue
        if outcome is GRANTED:
            conn = ticket.conn
            ticket.conn = None
            if conn is not None and not ticket.waiter.granted(conn, None):
                ticket.upstream.put_idle(conn, ticket.loop.time())
        elif outcome is OPENING:
            ticket.task = ticket.loop.create_task(_connect(ticket))
        elif outcome is QUEUED:
            ticket.waiter.queued(ticket.deadline)
        elif outcome is REFUSED:
            error = ticket.error
            ticket.error = None
            if error is not None:
                ticket.waiter.refused(error)
        else:  # CANCELLED
            task = ticket.task
            if task is not None:
                ticket.task = None
                task.cancel()


async def _connect(ticket: Ticket) -> None:
    """The one task a request may create: open the connection ``ticket`` holds a slot
    for, and hand it over."""
    ticket.state = CONNECTING  # from here on, ``_open`` gives the slot back if it fails
    upstream = ticket.upstream
    opened = perf_counter()
    h2 = upstream.h2 is not None
    header = _header(upstream, ticket.waiter) if upstream.private else None
    try:
        if h2:
            try:
                session: UpstreamSession = await _open_h2(upstream, ticket.loop, header)
            finally:
                upstream.h2_opening -= 1
        else:
            session = await _open(upstream, ticket.loop, header)
    except ProxyError as exc:
        ticket.task = None
        ticket.state = FAILED
        if isinstance(exc, UpstreamConnectError):
            upstream.stats.connect_errors += 1
        ticket.waiter.failed(exc)
        if h2 and upstream.waiting:  # the next waiter may try
            carry_out(assign(upstream))
        return
    ticket.task = None
    ticket.state = GRANTED
    if not ticket.waiter.granted(session, perf_counter() - opened):
        upstream.put_idle(session, ticket.loop.time())  # type: ignore[arg-type]
    if h2 and upstream.waiting:  # the new connection's room, for those who waited for it
        carry_out(assign(upstream))


def _header(upstream: Upstream, waiter: Waiter) -> bytes:
    """The PROXY header a new connection of ``upstream`` would send for ``waiter``."""
    send = upstream.pool.send_proxy
    return send(waiter.proxy_addresses()) if send is not None else b""


async def _open_h2(
    upstream: Upstream, loop: asyncio.AbstractEventLoop, header: bytes | None
) -> UpstreamSession:
    """Open an HTTP/2 connection (counted in ``upstream.conns``) and a stream on it: prior
    knowledge on plain TCP, ALPN ``h2`` over TLS (an upstream that does not choose it is
    a connect error). With a PROXY ``header`` it carries that one stream, then closes."""
    transport, conn = await _dial(upstream, loop, lambda: H2Upstream(upstream), header)
    if upstream.ssl is not None:
        tls = transport.get_extra_info("ssl_object")
        chosen = tls.selected_alpn_protocol() if tls is not None else None
        if chosen != "h2":
            conn.close()  # its connection_lost gives the slot back
            raise UpstreamConnectError(
                f"the upstream does not speak HTTP/2 over TLS (ALPN chose {chosen or 'nothing'})"
            )
    upstream.stats.connections_opened += 1
    h2 = upstream.h2
    if h2 is None:  # the pool went back to HTTP/1.1 meanwhile
        conn.retire()
        h2 = []
    h2.append(conn)
    session = conn.open_stream()
    if upstream.private:  # one client's address: no other stream here
        conn.retire()
    return session


async def _open(
    upstream: Upstream, loop: asyncio.AbstractEventLoop, header: bytes | None
) -> UpstreamConnection:
    """Open an HTTP/1.1 connection, already counted in ``upstream.conns``."""
    _, conn = await _dial(upstream, loop, lambda: UpstreamConnection(upstream), header)
    if header is not None:
        conn.proxy_key = header
    upstream.stats.connections_opened += 1
    return conn


P = TypeVar("P", bound=asyncio.BaseProtocol)


async def _dial(
    upstream: Upstream,
    loop: asyncio.AbstractEventLoop,
    protocol: Callable[[], P],
    header: bytes | None = None,
) -> tuple[asyncio.BaseTransport, P]:
    """Connect to ``upstream`` (TLS when it is ``https://``, the handshake counted
    against the same connect timeout), ``header`` (a PROXY header) its first bytes,
    before TLS; failures give the slot back and become ``UpstreamConnectError``."""
    timeout = upstream.pool.connect_timeout
    try:
        async with asyncio.timeout(timeout):
            if header is not None:
                sock = await connect_sending(loop, upstream.host, upstream.port, header)
                return await loop.create_connection(
                    protocol, sock=sock, ssl=upstream.ssl, server_hostname=upstream.server_name,
                    ssl_handshake_timeout=timeout if upstream.ssl is not None else None,
                )  # fmt: skip
            if upstream.ssl is None:
                return await loop.create_connection(protocol, upstream.host, upstream.port)
            return await loop.create_connection(
                protocol, upstream.host, upstream.port,
                ssl=upstream.ssl, server_hostname=upstream.server_name,
                ssl_handshake_timeout=timeout,
            )  # fmt: skip
    except TimeoutError:
        upstream.connection_closed()
        raise UpstreamConnectError(f"connect timeout after {timeout:g}s") from None
    except ssl.SSLError as exc:
        upstream.connection_closed()
        raise UpstreamConnectError(f"TLS handshake failed: {tls_failure(exc)}") from None
    except OSError as exc:
        upstream.connection_closed()
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise UpstreamConnectError(f"connect failed: {reason.lower()}") from None
    except BaseException:  # cancelled: the requester went away
        upstream.connection_closed()
        raise
