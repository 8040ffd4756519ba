"""``rate_limit`` buckets in Redis, shared by every aiolb instance that names it.

A decision is one ``EVALSHA`` of a Lua script that runs the token bucket rule of
``proxy.filters.buckets.take`` atomically on a hash of the bucket's tokens and stamp,
with Redis's own clock (``TIME``), so the instances' clocks do not matter. The key
expires when its bucket would be full again: Redis holds only the buckets that matter.
A fixed ``INCR``+``EXPIRE`` window would be cheaper, but it admits up to twice the
limit across a window's edge, and would differ from the memory store's rule.

``take`` is a plain function that returns a future: no coroutine, no task per
decision. The decisions asked during one event-loop iteration are gathered (``take``
queues a waiter; the iteration's first schedules ``_send``) and leave together through
one pipelined connection per store and process (``proxy.filters.redis_pipe.Pipe``):
one write, one read. The decisions on one bucket become one ``EVALSHA`` that takes
``n`` tokens at once and answers the tokens there were before; the callback of that
reply (``_answer``) settles each waiter in turn: the i-th with ``before - min(i,
floor(before) + 1)``, what ``n`` decisions in a row would have answered (Redis's clock
moving a few microseconds between them aside), or with what the caller's ``decide``
makes of it (the filter's outcome, so its future is the hook's answer). A route-wide
or per-API-key limit costs Redis one script run per iteration, not one per request. A
waiter cancelled meanwhile (its request gone) is skipped; its token stays taken. Each
command is atomic: instances sharing a bucket stay exact. Each connection loads the
script first (``SCRIPT LOAD``); a Redis that has forgotten it since (``SCRIPT FLUSH``,
a failover) answers ``NOSCRIPT``, and that command is sent again as ``EVAL`` with the
script's text.

Outages: any error (refused, no reply within ``timeout``, a bad answer) ends the
connection, answers every waiting decision ``None`` at once and opens a circuit for a
second, in which decisions are made without asking (``None``: the filter admits with
``fail_open``, else answers 503); the first error of an outage logs one line, the first
success after it another. More than ``MAX_IN_FLIGHT`` decisions waiting are answered
``None`` too, without opening the circuit.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import math
import time
from typing import TYPE_CHECKING, Any, Final

from proxy.filters.redis_pipe import Pipe, ReplyError, bulk, command
from proxy.redis_client import RedisCircuit

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger("aiolb")

TOKEN_BUCKET: Final = """
if redis.replicate_commands then redis.replicate_commands() end
local rate = tonumber(ARGV[1])
local size = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 't', 's')
local tokens = tonumber(state[1])
if tokens == nil then
  tokens = size
elseif now > tonumber(state[2]) then
  tokens = math.min(size, tokens + (now - tonumber(state[2])) * rate)
else
  now = tonumber(state[2])  -- the bucket's time never goes back
end
local before = tokens
tokens = tokens - math.max(0, math.min(n, math.floor(tokens)))
redis.call('HSET', KEYS[1], 't', string.format('%.17g', tokens), 's', string.format('%.6f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil((size - tokens) / rate * 1000) + 1000)
return string.format('%.17g', before)
"""


#: the commands' heads: ``EVALSHA`` of the script, and ``EVAL`` of its text (NOSCRIPT)
_EVALSHA: Final = b"*7\r\n" + bulk(
    b"EVALSHA", hashlib.sha1(TOKEN_BUCKET.encode()).hexdigest().encode()
)
_LOAD: Final = command(b"SCRIPT", b"LOAD", TOKEN_BUCKET.encode())
_EVAL: Final = b"*7\r\n" + bulk(b"EVAL", TOKEN_BUCKET.encode())


#: a decision's waiter, and what its result is made of (None: the tokens left as they are)
Waiter = tuple["asyncio.Future[Any]", "Callable[[float | None], Any] | None"]


def _settle(group: list[Waiter], value: float | None) -> None:
    """Answer each of ``group`` ``value`` (None: Redis cannot say)."""
    for waiter, decide in group:
        _set(waiter, decide, value)


def _set(waiter: asyncio.Future[Any], decide: Callable[[float | None], Any] | None,
         value: float | None) -> None:  # fmt: skip
    if waiter.done():  # a waiter whose request went away is cancelled
        return
    if decide is None:
        waiter.set_result(value)
        return
    try:
        waiter.set_result(decide(value))
    except Exception as exc:  # a bug in ``decide``: its request's failure, not the batch's
        waiter.set_exception(exc)


class RedisBuckets(RedisCircuit):
    """A Redis server's buckets, as ``take`` decisions; one per url and settings.
    ``errors`` counts the failed connections and answers (``RedisCircuit``)."""

    __slots__ = ("_args", "_batch", "_loop", "_pipe", "_started", "timeout", "url")

    def __init__(self, url: str, timeout: float) -> None:
        super().__init__()
        self.url = url
        self.timeout = timeout
        self._loop: asyncio.AbstractEventLoop | None = None  # the first decision's
        self._pipe: Pipe | None = None
        #: (rate, size) -> the commands' rate and size arguments, preformatted
        self._args: dict[tuple[float, float], bytes] = {}
        #: this loop iteration's decisions: (key, rate, size) -> their waiters, in order
        self._batch: dict[tuple[bytes, float, float], list[Waiter]] = {}
        self._started = 0.0  # monotonic: when this iteration's first decision was asked

    @property
    def pipe(self) -> Pipe | None:
        """The connection now (None before the first decision and after a failure)."""
        return self._pipe

    def take(
        self, key: bytes, rate: float, size: float,
        decide: Callable[[float | None], Any] | None = None,
    ) -> asyncio.Future[Any]:  # fmt: skip
        """A future of the tokens left after taking one from ``key``'s bucket (< 0:
        refused), or of None when Redis cannot say (down, slow, the circuit open, too
        many waiting); of ``decide(that)`` when ``decide`` is given (it runs in the
        callback that settles the bucket's decisions: no coroutine, no task per
        decision). Cancelling the future drops the decision's answer, not its token."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        if self.outage and time.monotonic() < self.down_until:  # the circuit is open
            _set(waiter, decide, None)
            return waiter
        batch = self._batch
        if not batch:
            self._started = time.monotonic()
            loop.call_soon(self._send)
        group = batch.get((key, rate, size))
        if group is None:
            batch[(key, rate, size)] = [(waiter, decide)]
        else:
            group.append((waiter, decide))
        return waiter

    def _send(self) -> None:
        """This iteration's decisions: one command per bucket, all in one write."""
        batch, self._batch = self._batch, {}
        if not batch:  # closed meanwhile
            return
        pipe = self._pipe
        if pipe is None:
            pipe = self._pipe = Pipe(self.timeout, self._lost)
            pipe.connect(self.url, _LOAD)  # the script, before any EVALSHA
        started = self._started
        for (key, rate, size), group in batch.items():
            args = self._args.get((rate, size))
            if args is None:
                args = self._args[(rate, size)] = bulk(repr(rate).encode(), repr(size).encode())
            # 1 key, the key, rate, size, how many tokens to take
            tail = b"$1\r\n1\r\n$%d\r\n%s\r\n%s%s" % (
                len(key),
                key,
                args,
                bulk(b"%d" % len(group)),
            )
            answer = functools.partial(self._answer, group, started)
            if not pipe.call(_EVALSHA, tail, _EVAL, answer):  # too many waiting: not asked
                _settle(group, None)
        pipe.flush()

    def _answer(self, group: list[Waiter], started: float, value: Any) -> None:
        """One bucket's reply (the tokens there were before its ``n`` were taken): each
        waiter's answer, in the order they asked. The i-th of n decisions in a row
        answers ``before - min(i, floor(before) + 1)``: once the whole tokens are taken,
        each later one is refused with the same fraction left (-1 + frac). Called by the
        pipe as it reads the reply (or ends: None), so the waiters' callbacks run in this
        loop iteration."""
        if value is None:  # not asked, or the connection failed (then the circuit is open)
            _settle(group, None)
            return
        try:
            if isinstance(value, ReplyError):
                raise value
            before = float(value)
        except (ReplyError, ValueError, TypeError) as exc:
            self.failed("a decision", exc)
            _settle(group, None)
            return
        if self.outage:
            self.worked(started)
        whole = math.floor(before) + 1
        for nth, (waiter, decide) in enumerate(group, 1):  # ``_set``, inline: per decision
            if waiter.done():  # cancelled: its request went away
                continue
            left = before - (nth if nth < whole else whole)
            if decide is None:
                waiter.set_result(left)
                continue
            try:
                waiter.set_result(decide(left))
            except Exception as exc:  # a bug in ``decide``: its request's failure
                waiter.set_exception(exc)

    def _lost(self, pipe: Pipe, exc: BaseException | None) -> None:
        if self._pipe is pipe:
            self._pipe = None
        if exc is not None:
            self.failed("a decision", exc)

    def outage_began(self, what: str, exc: BaseException) -> None:
        log.error(
            "rate limit store %s unreachable (%s: %s); deciding without it until it "
            "answers", self.url, type(exc).__name__, exc or "no detail",
        )  # fmt: skip

    def outage_ended(self) -> None:
        log.warning("rate limit store %s answers again", self.url)

    async def close(self) -> None:
        batch, self._batch = self._batch, {}
        for group in batch.values():
            _settle(group, None)
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            pipe.lost(None)

    def __repr__(self) -> str:
        state = "down" if self.outage else "up"
        return f"<RedisBuckets {self.url} [{state}, {self.errors} errors]>"
