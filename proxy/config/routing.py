"""What a route matches beyond host and path prefix, and where it sends traffic.

``HeaderRegexSpec`` and ``HeaderPresentSpec`` are the non-exact forms of a ``match.headers``
value; ``WeightedPoolSpec`` is one entry of a route's ``pools`` (a traffic split),
``MirrorSpec`` its ``mirror``. ``safe_regex`` is how every pattern of a route is
checked: compiled once here, and refused when Python's backtracking ``re`` could take
exponential time on it (a repeat inside a repeat, a repeated alternation, a
backreference), since a client chooses what it is matched against.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from typing import Annotated, Any, Final

from pydantic import AfterValidator, BeforeValidator, Field, PlainValidator

from proxy.config.base import ConfigModel, Kind, Name

#: Request methods a route may name (RFC 9110 tokens, upper case).
_METHOD: Final = re.compile(r"[A-Z][A-Z0-9!#$%&'*+.^_`|~-]*")
#: Header names (RFC 9110 tokens).
_TOKEN: Final = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")

#: The stdlib's regex parser (no stubs): what ``safe_regex`` walks.
sre_p: Any = importlib.import_module("re._parser")
sre_c: Any = importlib.import_module("re._constants")
_REPEATS: Final = (sre_c.MAX_REPEAT, sre_c.MIN_REPEAT, getattr(sre_c, "POSSESSIVE_REPEAT", None))


def _walk(parsed: Any, inside_repeat: bool) -> str | None:
    """Why ``parsed`` (a ``re._parser`` tree) may backtrack exponentially, or None."""
    for op, av in parsed:
        if op in _REPEATS:
            _low, high, body = av
            repeats = high is sre_c.MAXREPEAT or high > 1
            if inside_repeat and repeats:
                return "a repeat inside a repeat (such as (a+)+)"
            why = _walk(body, inside_repeat or repeats)
            if why:
                return why
        elif op is sre_c.BRANCH:
            if inside_repeat:
                return "an alternation inside a repeat (such as (a|ab)*)"
            for branch in av[1]:
                if why := _walk(branch, inside_repeat):
                    return why
        elif op is sre_c.SUBPATTERN:
            if why := _walk(av[-1], inside_repeat):
                return why
        elif op in (sre_c.ASSERT, sre_c.ASSERT_NOT):
            if why := _walk(av[1], inside_repeat):
                return why
        elif op in (sre_c.GROUPREF, sre_c.GROUPREF_EXISTS):
            return "a backreference"
    return None


#: A bounded repeat with more than this many steps counts as unbounded for ``degree``.
_LONG_REPEAT: Final = 64
#: The longest value a regex of degree 2 is tried on; a longer one never matches it.
QUADRATIC_LIMIT: Final = 2048


def _repeats(parsed: Any) -> int:
    """How many long repeats (``*``, ``+``, ``{n,}``, ``{0,1000}``) ``parsed`` has."""
    count = 0
    for op, av in parsed:
        if op in _REPEATS:
            high = av[1]
            count += high is sre_c.MAXREPEAT or high > _LONG_REPEAT
            count += _repeats(av[2])
        elif op is sre_c.BRANCH:
            count += max((_repeats(branch) for branch in av[1]), default=0)
        elif op is sre_c.SUBPATTERN:
            count += _repeats(av[-1])
        elif op in (sre_c.ASSERT, sre_c.ASSERT_NOT):
            count += _repeats(av[1])
    return count


def degree(pattern: str) -> int:
    """The polynomial degree of the worst-case time of ``re.search(pattern, value)`` in
    the value's length, as far as its shape tells: each long repeat may backtrack over
    the value, and a search not anchored at the start (``^``, ``\\A``) tries every
    start position. 1 is linear."""
    parsed = sre_p.parse(pattern)
    items = list(parsed)
    anchored = bool(items) and items[0][0] is sre_c.AT and items[0][1] in (
        sre_c.AT_BEGINNING, sre_c.AT_BEGINNING_STRING)  # fmt: skip
    return max(1, _repeats(parsed) + (0 if anchored else 1))


def safe_regex(pattern: str) -> str:
    """``pattern`` if it compiles and its worst case is at most quadratic; ValueError if
    not (exponential backtracking, or a degree above 2)."""
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"invalid regex {pattern!r}: {exc}") from None
    why = _walk(sre_p.parse(pattern), False)
    if why:
        raise ValueError(f"regex {pattern!r} is refused: {why} can make matching take "
                         "exponential time on a hostile request; write it without")  # fmt: skip
    if degree(pattern) > 2:
        raise ValueError(f"regex {pattern!r} is refused: its repeats (*, +, {{n,}}) could "
                         "take polynomial time on a long hostile value; anchor it with ^ "
                         "and use at most one unbounded repeat, or two when anchored")  # fmt: skip
    return pattern


#: A regular expression (Python ``re`` syntax), searched; refused if it can backtrack.
Regex = Annotated[str, AfterValidator(safe_regex), Kind("regex")]


def check_method(value: str) -> str:
    method = value.strip().upper()
    if not _METHOD.fullmatch(method):
        raise ValueError(f"invalid method {value!r}")
    return method


def check_header_name(value: str) -> str:
    if not _TOKEN.fullmatch(value):
        raise ValueError(f"invalid header name {value!r}")
    return value


class HeaderRegexSpec(ConfigModel):
    """``{regex: PATTERN}``: the header is present and its value matches (searched)."""

    regex: Regex
    """Searched in the value (``re.search``): anchor with ``^`` and ``$`` for the whole."""


class HeaderPresentSpec(ConfigModel):
    """``{present: true}``: the header is sent (any value); ``false``: it is not."""

    present: bool
    """true: the header must be present; false: it must be absent."""


def _scalar(value: object) -> object:
    """A number written where a string value is meant (``debug: 1``) is that string."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


#: A string value; a YAML number is taken as its text (``1`` is ``"1"``).
Text = Annotated[str, BeforeValidator(_scalar), Kind("string")]

_HEADER_FORMS: Final = 'an exact value ("1"), {regex: PATTERN} or {present: true|false}'


def _header_match(value: object) -> str | HeaderRegexSpec | HeaderPresentSpec:
    """One ``match.headers`` value, with one error naming the three forms if wrong."""
    value = _scalar(value)
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and set(value) == {"regex"}:
        pattern = value["regex"]
        if not isinstance(pattern, str):
            raise ValueError("regex must be a string")
        return HeaderRegexSpec.model_construct(regex=safe_regex(pattern))
    if isinstance(value, Mapping) and set(value) == {"present"}:
        if not isinstance(value["present"], bool):
            raise ValueError("present must be true or false")
        return HeaderPresentSpec.model_construct(present=value["present"])
    raise ValueError(f"must be {_HEADER_FORMS}, got {value!r}")


#: A ``match.headers`` value: an exact value, ``{regex: ...}`` or ``{present: bool}``.
HeaderMatch = Annotated[
    str | HeaderRegexSpec | HeaderPresentSpec,
    PlainValidator(_header_match),
    Kind("value, {regex} or {present}"),
]


class WeightedPoolSpec(ConfigModel):
    """One pool of a traffic split (``pools``) and its share."""

    pool: Name
    """The pool's name (``pools``)."""
    weight: Annotated[int, Field(ge=0, le=1_000_000)] = 1
    """Its share: requests go to the pools in proportion to their weights (0: none)."""


class MirrorSpec(ConfigModel):
    """Copy a fraction of a route's requests to another pool, answers discarded."""

    pool: Name
    """The pool the copies go to."""
    fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0
    """Share of the route's requests copied (0..1), chosen at random per request."""
    max_in_flight: Annotated[int, Field(ge=1)] = 100
    """Copies in flight at once for this route; more are dropped (counted with
    ``outcome="dropped"``), so a slow mirror pool never holds more than this."""
