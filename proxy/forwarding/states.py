"""The states of an exchange: its request, its attempt and its response, with every
transition in this module.

Theory of operation
-------------------
An ``Exchange`` (``proxy.forwarding.exchange``) carries three small state machines,
one per thing it tracks, each an ``IntEnum`` stored in one slot (h11's ``_state.py``
keeps a connection's states the same way: one table says what may follow what):

- ``Req``: the client's request as it is read: ``BODY`` while its body (if any) is
  still arriving, ``DONE`` once it is read whole.
- ``Attempt``: the current try on an upstream: nothing picked yet (``IDLE``), the
  body read whole before a connection is taken (``DEFERRED``), waiting for a
  connection (``ACQUIRING``), writing the request (``SENDING``), waiting for the
  response head (``WAITING``), relaying the response (``RECEIVING``), a retry's
  backoff (``BACKOFF``), and ``RELEASED`` once the upstream's request count was given
  back (a retry acquires again from there).
- ``Resp``: what the client gets: nothing yet (``NONE``), the proxy's own answer due
  when the request is read whole (``DUE``), the proxy's answer written (``ANSWERED``:
  the rest of the request body is read and dropped), an upstream's response on its
  way (``HEAD``: its head is committed; also a cache's answer standing in for the
  upstream's head), all of it written (``COMPLETE``).

Besides these, ``Exchange.done`` says the exchange is over (finished: counted, logged,
handed back to its downstream; or abandoned): nothing it is told afterwards acts.

The exchange assigns these slots directly (the hot path pays for no call), and only
the moves in ``MOVES`` may happen. ``checked`` makes a subclass that enforces the
table on every assignment; the test suite runs every exchange through it
(``tests/conftest.py``), so a transition the table does not list fails a test.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, Final, TypeVar


class Req(IntEnum):
    BODY = 0
    DONE = 1


class Attempt(IntEnum):
    IDLE = 0
    DEFERRED = 1
    ACQUIRING = 2
    SENDING = 3
    WAITING = 4
    RECEIVING = 5
    BACKOFF = 6
    RELEASED = 7


class Resp(IntEnum):
    NONE = 0
    DUE = 1
    ANSWERED = 2
    HEAD = 3
    COMPLETE = 4


# Module-level names for the hot path (a global load, not an attribute lookup).
BODY: Final = Req.BODY
DONE: Final = Req.DONE
IDLE: Final = Attempt.IDLE
DEFERRED: Final = Attempt.DEFERRED
ACQUIRING: Final = Attempt.ACQUIRING
SENDING: Final = Attempt.SENDING
WAITING: Final = Attempt.WAITING
RECEIVING: Final = Attempt.RECEIVING
BACKOFF: Final = Attempt.BACKOFF
RELEASED: Final = Attempt.RELEASED
NONE: Final = Resp.NONE
DUE: Final = Resp.DUE
ANSWERED: Final = Resp.ANSWERED
HEAD: Final = Resp.HEAD
COMPLETE: Final = Resp.COMPLETE

#: Every allowed transition: for each slot, the states each state may move to. A
#: state may always be assigned again (no move).
MOVES: Final[dict[str, dict[IntEnum, frozenset[IntEnum]]]] = {
    "req": {
        BODY: frozenset({DONE}),
        DONE: frozenset(),
    },
    "attempt": {
        # picked: read the body first, or take a connection (an idle one sends at once)
        IDLE: frozenset({DEFERRED, ACQUIRING, SENDING, WAITING, RELEASED}),
        DEFERRED: frozenset({ACQUIRING, SENDING, WAITING, RELEASED}),
        # a connection came (an idle one, a freed one, a new one), or none will
        ACQUIRING: frozenset({SENDING, WAITING, RELEASED}),
        # the request is written whole (or the response came first), or it failed
        SENDING: frozenset({WAITING, RECEIVING, ACQUIRING, RELEASED}),
        # the head came; a stale pooled connection is replaced; or it failed
        WAITING: frozenset({RECEIVING, ACQUIRING, RELEASED}),
        RECEIVING: frozenset({RELEASED}),
        BACKOFF: frozenset({ACQUIRING, RELEASED}),
        # a retry: its backoff, then a new upstream
        RELEASED: frozenset({BACKOFF, ACQUIRING}),
    },
    "resp": {
        # the fast path writes the whole response at once (``COMPLETE``)
        NONE: frozenset({DUE, ANSWERED, HEAD, COMPLETE}),
        DUE: frozenset({ANSWERED}),
        ANSWERED: frozenset(),
        # a head held by an async response filter that failed is taken back (500)
        HEAD: frozenset({COMPLETE, NONE}),
        COMPLETE: frozenset(),
    },
}

T = TypeVar("T")


def checked(cls: type[T]) -> type[T]:
    """A subclass of ``cls`` (an exchange class) that refuses any state assignment
    ``MOVES`` does not list (``AssertionError``, naming the slot and both states)."""

    def __setattr__(self: Any, name: str, value: Any) -> None:
        table = MOVES.get(name)
        if table is not None:
            try:
                old = getattr(self, name)
            except AttributeError:  # the first assignment, in __init__
                old = None
            if old is not None and value is not old and value not in table[old]:
                raise AssertionError(f"{cls.__name__}.{name}: {old!r} -> {value!r} is no move")
        object.__setattr__(self, name, value)

    return type(f"Checked{cls.__name__}", (cls,), {"__setattr__": __setattr__})


def describe() -> str:
    """The transition table as text (ARCHITECTURE.md quotes it)."""
    lines = []
    for slot, table in MOVES.items():
        for state, nexts in table.items():
            after = ", ".join(n.name for n in sorted(nexts)) or "(final)"
            lines.append(f"{slot}: {state.name} -> {after}")
    return "\n".join(lines)
