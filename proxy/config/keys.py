"""The request key syntax: what ``consistent_hash``'s and ``rate_limit``'s ``key`` name.

==================  ===========================================================
``header:NAME``     the first value of request header NAME (case-insensitive)
``cookie:NAME``     the value of cookie NAME in the first ``Cookie`` header
``query:NAME``      the raw (not percent-decoded) value of query parameter NAME
``path``            the raw path of the request target, without the query
``client_ip``       the client address as ``ip_hash`` sees it
==================  ===========================================================

``parse_key`` checks a key's spelling and splits it; the config validates keys with it
and ``proxy.balancing.consistent_hash.key_reader`` builds from it the function that
reads the key from a request.
"""

from __future__ import annotations

from typing import Final, Literal, NamedTuple, cast

#: The keys, as the config reference and the error messages write them.
KEY_FORMS: Final = ("header:NAME", "cookie:NAME", "query:NAME", "path", "client_ip")

KeyKind = Literal["header", "cookie", "query", "path", "client_ip"]

_NAMED: Final = frozenset({"header", "cookie", "query"})
_BAD_NAME_CHARS: Final = frozenset(" \t\r\n;,=&?#\"")


class RequestKey(NamedTuple):
    """A parsed key: ``header:X-User`` is ``RequestKey("header", "X-User")``; ``path``
    and ``client_ip`` have no name (``""``)."""

    kind: KeyKind
    name: str


def parse_key(spec: str) -> RequestKey:
    """``spec`` split into its kind and name; ValueError with the accepted forms if bad."""
    if spec in ("path", "client_ip"):
        return RequestKey(cast(KeyKind, spec), "")
    kind, colon, name = spec.partition(":")
    if not colon or kind not in _NAMED:
        raise ValueError(f"{spec!r} is not a key; use one of {', '.join(KEY_FORMS)}")
    if not name or not name.isascii() or _BAD_NAME_CHARS.intersection(name):
        raise ValueError(f"{spec!r}: the {kind} name must be a non-empty ASCII token")
    return RequestKey(cast(KeyKind, kind), name)
