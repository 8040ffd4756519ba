"""The request target that routes, filters, the cache and the upstream all see.

Theory of operation
-------------------
Routes and filters match a path prefix; if they matched the raw target, ``/%61dmin``,
``//admin``, ``/./admin`` and ``/x/../admin`` would all miss a rule on ``/admin`` and
reach a catch-all route, whose upstream then serves ``/admin``. ``normal_target``
normalises the path of an origin-form target once, before routing (RFC 3986 section 6,
syntax-based), and the exchange forwards the result, so the upstream is asked for
exactly the path the rules judged:

- percent-escapes of unreserved characters (``A-Z a-z 0-9 - . _ ~``) are decoded;
  every other escape is kept, its hex in upper case (``%2f`` -> ``%2F``: an encoded
  slash stays one character of its segment, as in Envoy's default);
- repeated slashes are merged, and ``.`` and ``..`` segments removed (section 5.2.4;
  ``%2e`` counts as a dot, being decoded first); a trailing slash stays;
- the query (from the first ``?``) is left as it came.

What cannot be made safe is refused (``None``; the exchange answers 400 and closes): a
``..`` that climbs above the root (nginx answers 400 too), a malformed escape (``%zz``,
``%4``), an encoded NUL (``%00``), a raw backslash in the path (not a URI character;
some servers take it for ``/``), and a ``.`` or ``..`` hidden behind an encoded slash
or backslash (``..%2F``: a server that decodes ``%2F`` would climb there).

The common target has none of ``%``, ``/.``, ``//`` and ``\\``: four scans in C and the
same object back, nothing allocated. Clients repeat their targets, so the exchange asks
``known_target`` first: the result ``normal_target`` gave for the same bytes before (a
dict lookup, no Python frame), kept in a bounded dict that is emptied when full.
"""

from __future__ import annotations

from typing import Final

_UNRESERVED: Final = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
)
_HEX: Final = frozenset(b"0123456789ABCDEFabcdef")
_DOTS: Final = (b".", b"..")

#: Targets normalised before -> their normal form (refused ones are not kept).
_KNOWN: Final[dict[bytes, bytes]] = {}
_KNOWN_MAX: Final = 4096
#: ``known_target(target)``: what ``normal_target`` gave for these bytes, or None.
known_target: Final = _KNOWN.get


def _keep(target: bytes, normal: bytes) -> bytes:
    if len(_KNOWN) >= _KNOWN_MAX:
        _KNOWN.clear()
    _KNOWN[target] = normal
    return normal


def normal_target(target: bytes) -> bytes | None:
    """``target`` normalised (the same object when it already is), or None to refuse it.

    Only origin-form targets (``/...``) change; ``*`` passes as it is.
    """
    # ``b"%" in target`` first tries b"%" as an integer and formats a TypeError that it
    # then drops; an int is a plain memchr (37 is "%", 92 a backslash). For two bytes,
    # ``replace`` (argument clinic) is cheaper than ``find`` (PyArg_ParseTuple), and it
    # returns the object itself when there is nothing to replace.
    if (
        37 not in target
        and 92 not in target
        and target.replace(b"//", b"") is target
        and target.replace(b"/.", b"") is target
    ):
        return _keep(target, target)
    if target[:1] != b"/":
        return target
    path, mark, query = target.partition(b"?")
    if 92 in path:
        return None
    if 37 in path:
        decoded = _decode(path)
        if decoded is None:
            return None
        path = decoded
    elif path.find(b"/.") < 0 and path.find(b"//") < 0:
        return _keep(target, target)  # what the scan saw was in the query
    normal = _remove_dot_segments(path)
    if normal is None:
        return None
    return _keep(target, normal + mark + query)


def _decode(path: bytes) -> bytes | None:
    """Unreserved escapes decoded, the others in upper case; None for a malformed
    escape or ``%00``. Decoding never makes a ``%`` or a ``/``, so once is enough."""
    pieces = path.split(b"%")
    out = [pieces[0]]
    for piece in pieces[1:]:
        if len(piece) < 2 or piece[0] not in _HEX or piece[1] not in _HEX:
            return None
        byte = int(piece[:2], 16)
        if byte == 0:
            return None
        if byte in _UNRESERVED:
            out.append(bytes((byte,)) + piece[2:])
        else:
            out.append(b"%" + piece[:2].upper() + piece[2:])
    return b"".join(out)


def _remove_dot_segments(path: bytes) -> bytes | None:
    """RFC 3986 5.2.4 with empty segments merged; None if ``..`` climbs above the root
    or a segment hides a dot segment behind an encoded slash."""
    segments = path.split(b"/")  # path starts with "/": segments[0] is b""
    kept: list[bytes] = []
    for segment in segments[1:]:
        if segment == b"..":
            if not kept:
                return None
            kept.pop()
        elif segment and segment != b".":
            if b"%2F" in segment or b"%5C" in segment:
                parts = segment.replace(b"%5C", b"%2F").split(b"%2F")
                if any(part in _DOTS for part in parts):
                    return None
            kept.append(segment)
    tail = b"/" if kept and segments[-1] in (b"", b".", b"..") else b""
    return b"/" + b"/".join(kept) + tail


def normalise_host(host: bytes) -> bytes:
    """``Example.COM:8080`` -> ``example.com``; ``[::1]:80`` -> ``[::1]``."""
    host = host.strip().lower()
    if host.startswith(b"["):
        end = host.find(b"]")
        return host[: end + 1] if end > 0 else host
    return host.partition(b":")[0]
