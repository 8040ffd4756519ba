"""Header rules for both directions, in one pass over the parsed header list.

Requests: hop-by-hop headers are removed (``Connection`` and every name it lists,
``Keep-Alive``, ``Proxy-Connection``, ``TE``, ``Trailer``, ``Upgrade``) and so is
``Expect`` (the proxy answers ``100 Continue`` itself, as nginx does). A ``TE`` that
says ``trailers`` (the client keeps trailer fields, RFC 9110 10.1.4) is noted in
``trailers`` and sent on as the proxy's own ``TE: trailers`` with ``Connection: TE``,
so that an upstream that sends trailers only when asked still does; its other codings
are not (the proxy decodes none). Honoured with or without ``TE`` in the client's
``Connection`` (RFC 9110 10.1.4 has it listed; not every client does). An Upgrade
request (``Connection: upgrade`` and an ``Upgrade`` header, no body) is noted in
``upgrade`` (its protocols, ``h2c`` left out: never forwarded); the exchange puts the
upgrade headers back for the protocols its route allows.
``X-Forwarded-For`` gets the client address appended, ``X-Forwarded-Proto`` and
``X-Forwarded-Host`` are set, ``Via`` is added, ``X-Request-ID`` is kept or generated.
``Forwarded`` (RFC 7239) is dropped unless the listener keeps it (``forwarded:
append``); a listener that sends aiolb's own element has it in its connections' head
template (``forwarded_template``: the client address is fixed per connection).
``Host``, ``Content-Length`` and ``Transfer-Encoding`` pass unchanged: the parser has
already rejected ambiguous framing, and a chunked body is re-chunked on the way out.
A ``Connection`` header that names one of them is an attack, not a hop-by-hop option
(removing ``Content-Length`` while the body is forwarded smuggles that body upstream as
a request): such a request is refused (``ValueError``, a 400). So is a ``Host`` that is
not an RFC 3986 authority (``a b``, ``a/b@c``): RFC 9112 3.2.

Responses: the same hop-by-hop names and ``Transfer-Encoding`` are removed; the
forwarding layer writes its own framing and ``Connection`` header. A ``Connection``
header naming ``Content-Length`` does not remove it (the body was framed by it: removed,
the client would get a keep-alive response with no length), as nginx does. Trailer
fields pass ``relayed_trailers``: valid fields only, none that frames, routes,
authenticates or controls the message (RFC 9110 6.5.1).
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable, Collection, Iterator
from typing import Final, TypeAlias

# Actions, as small ints: one dict lookup per header decides.
_PASS: Final = 0  # any other header: forwarded as it came
_UNDERSCORE: Final = 9  # a name with ``_``: dropped unless the listener allows them
_DROP: Final = 10
_CONNECTION: Final = 1
_HOST: Final = 2
_XFF: Final = 3
_REQUEST_ID: Final = 4
_CONTENT_LENGTH: Final = 5
_TRANSFER_ENCODING: Final = 6
_EXPECT: Final = 7
_UPGRADE: Final = 8
_FORWARDED: Final = 11  # RFC 7239: dropped unless the listener appends to it
_TRACEPARENT: Final = 13  # W3C Trace Context: forwarded as it came, and noted
_TRACESTATE: Final = 14
_TE: Final = 12  # hop-by-hop; its ``trailers`` member is noted and sent on (``TE_LINE``)

_REQUEST_ACTIONS: Final[dict[bytes, int]] = {
    b"connection": _CONNECTION,
    b"keep-alive": _DROP,
    b"proxy-connection": _DROP,
    b"te": _TE,
    b"trailer": _DROP,
    b"upgrade": _UPGRADE,
    b"x-forwarded-proto": _DROP,
    b"x-forwarded-host": _DROP,
    b"host": _HOST,
    b"x-forwarded-for": _XFF,
    b"x-request-id": _REQUEST_ID,
    b"content-length": _CONTENT_LENGTH,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"expect": _EXPECT,
    b"forwarded": _FORWARDED,
    b"traceparent": _TRACEPARENT,
    b"tracestate": _TRACESTATE,
}

#: Request header names as they came (any case) -> action: one lookup, no ``lower()``,
#: per header. Bounded: emptied when full (client-chosen names cannot grow it).
_REQUEST_NAMES: Final[dict[bytes, int]] = {}
_REQUEST_NAMES_MAX: Final = 4096


def _request_action(name: bytes) -> int:
    """What to do with a request header ``name`` (kept in ``_REQUEST_NAMES``)."""
    action = _REQUEST_ACTIONS.get(name.lower())
    if action is None:
        action = _UNDERSCORE if name.find(b"_") != -1 else _PASS
    if len(_REQUEST_NAMES) >= _REQUEST_NAMES_MAX:
        _REQUEST_NAMES.clear()
    _REQUEST_NAMES[name] = action
    return action


_RESPONSE_ACTIONS: Final[dict[bytes, int]] = {
    b"connection": _CONNECTION,
    b"keep-alive": _DROP,
    b"proxy-connection": _DROP,
    b"te": _DROP,
    b"trailer": _DROP,
    b"upgrade": _DROP,
    b"content-length": _CONTENT_LENGTH,
    b"transfer-encoding": _TRANSFER_ENCODING,
}

_PLAIN_CONNECTION_TOKENS: Final = frozenset((b"close", b"keep-alive"))
#: Names a ``Connection`` header may never remove: the message's framing and its Host.
_PROTECTED: Final = frozenset((b"content-length", b"transfer-encoding", b"host"))

#: A valid ``Host`` value (RFC 9112 3.2, RFC 3986 3.2.2): a reg-name (unreserved,
#: percent-escapes, sub-delims) or an IP literal, and an optional port. No userinfo,
#: no slash, no space or control.
_HOST_VALUE: Final = re.compile(
    rb"(?:[A-Za-z0-9._~!$&'()*+,;=-]|%[0-9A-Fa-f]{2})*(?::[0-9]*)?"
    rb"|\[[0-9A-Fa-f:.]+\](?::[0-9]*)?|\[v[0-9A-Fa-f]+\.[A-Za-z0-9._~!$&'()*+,;=:-]+\]"
    rb"(?::[0-9]*)?"
)
#: Host values already found valid: clients repeat a handful, so most requests pay a
#: dict lookup rather than the pattern. Bounded: emptied when full.
_GOOD_HOSTS: Final[dict[bytes, bool]] = {}
_GOOD_HOSTS_MAX: Final = 1024


def valid_host(value: bytes) -> bool:
    """Is ``value`` a ``Host`` header value RFC 9112 allows? A valid one is remembered
    in ``_GOOD_HOSTS``, which the request path looks in first (no call per request)."""
    if not value or _HOST_VALUE.fullmatch(value) is None:  # empty: 400, as nginx
        return False
    if len(_GOOD_HOSTS) >= _GOOD_HOSTS_MAX:
        _GOOD_HOSTS.clear()
    _GOOD_HOSTS[value] = True
    return True


#: Headers that frame a message or concern one hop only: the proxy writes its own, and
#: no filter may set, add or remove them (lower case, as ``str``).
FRAMING_HEADERS: Final = frozenset((
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade",
    "transfer-encoding", "content-length", "expect",
))  # fmt: skip
#: Fields never relayed in trailers (RFC 9110 6.5.1; RFC 7230 4.1.2 lists them): what
#: frames the message or concerns one hop, routes it, modifies a request, authenticates,
#: controls a response or says how to read its content; pseudo-headers fail the token
#: check. Such a field after the body would be a smuggled header to a lenient client.
NOT_TRAILERS: Final = frozenset((
    b"content-length", b"transfer-encoding", b"trailer", b"connection", b"keep-alive",
    b"proxy-connection", b"te", b"upgrade", b"host", b"expect", b"max-forwards",
    b"cache-control", b"pragma", b"range", b"if-match", b"if-none-match",
    b"if-modified-since", b"if-unmodified-since", b"if-range", b"authorization",
    b"proxy-authorization", b"www-authenticate", b"proxy-authenticate", b"cookie",
    b"set-cookie", b"age", b"expires", b"date", b"location", b"retry-after", b"vary",
    b"warning", b"content-encoding", b"content-type", b"content-range",
))  # fmt: skip
_TOKEN: Final = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: A field value (RFC 9110 5.5): visible characters, obs-text, spaces and tabs; no CR,
#: LF, NUL or other controls.
_FIELD_VALUE: Final = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")


def relayed_trailers(fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The trailer ``fields`` a client may be sent: names lower-cased, values trimmed,
    and none that is invalid (not a token, a control in its value) or ``NOT_TRAILERS``.
    An upstream's fields may come from a lenient parser: nothing is written unchecked."""
    out: list[tuple[bytes, bytes]] = []
    for name, value in fields:
        name = name.lower()
        value = value.strip(b" \t")
        if (
            name not in NOT_TRAILERS and _TOKEN.fullmatch(name) is not None
            and _FIELD_VALUE.fullmatch(value) is not None
        ):  # fmt: skip
            out.append((name, value))
    return out


#: Request headers the proxy sets on every forwarded request (``request_head``).
MANAGED_REQUEST_HEADERS: Final = frozenset((
    "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id", "via",
    "forwarded",
))  # fmt: skip
VIA: Final = b"Via: 1.1 aiolb\r\n"


#: Request ids: ``next(ids)`` is the next one (``request_ids``).
RequestIds: TypeAlias = Iterator[bytes]


def request_ids() -> RequestIds:
    """Request ids unique per process: a random 64-bit prefix and a counter.

    Cheaper than ``uuid4()`` on every request and as unique in practice: a C iterator,
    so ``next(ids)`` runs no Python frame (and costs less than calling its
    ``__next__``, a method-wrapper)."""
    prefix = os.urandom(8).hex().encode()
    return map((prefix + b"-%x").__mod__, itertools.count(1))


#: ``RequestHeaders.traceparent`` when a ``tracestate`` came without a ``traceparent``
#: (an invalid value: a new trace, the ``tracestate`` dropped)
NO_PARENT: Final = b"(none)"


class RequestHeaders:
    """What one pass over a request's headers found, and the headers to forward."""

    __slots__ = (
        "chunked",
        "close",
        "connection",
        "content_length",
        "expect_continue",
        "forwarded_for",
        "host",
        "parts",
        "request_id",
        "traceparent",
        "tracestate",
        "trailers",
        "upgrade",
    )

    def __init__(
        self, headers: list[tuple[bytes, bytes]], underscores: bool = False,
        forwarded: bool = False,
    ) -> None:  # fmt: skip
        """``underscores``: forward header names with ``_`` (dropped otherwise: nginx's
        ``underscores_in_headers off``, since CGI and WSGI read ``X_A`` as ``X-A``);
        ``forwarded``: keep the client's ``Forwarded`` (dropped otherwise)."""
        parts: list[bytes] = []
        self.host: bytes | None = None
        self.forwarded_for: bytes | None = None
        self.request_id: bytes | None = None
        self.content_length: bytes | None = None
        self.chunked = False
        self.close = False
        self.expect_continue = False
        #: the client keeps trailer fields (``TE: trailers``): a chunked response's are
        #: relayed to it, and asked of the upstream
        self.trailers = False
        #: W3C Trace Context headers as they came (``traceparent``: b"" for a repeated
        #: one, ``NO_PARENT`` for a ``tracestate`` without one: both invalid, and None
        #: only when neither header came); forwarded unchanged unless ``tracing`` is on
        #: (``proxy.tracing``)
        self.traceparent: bytes | None = None
        self.tracestate: bytes | None = None
        listed: list[bytes] | None = None
        upgrade: bytes | None = None
        names = _REQUEST_NAMES
        for name, value in headers:
            action = names.get(name)
            if action is None:
                action = _request_action(name)
            if not action or action == _CONTENT_LENGTH:
                parts += (name, b": ", value, b"\r\n")
                if action:
                    self.content_length = value
            elif action == _HOST:
                if self.host is not None:
                    raise ValueError("duplicate Host header")
                if value not in _GOOD_HOSTS and not valid_host(value):
                    raise ValueError("invalid Host header")
                self.host = value
                parts += (name, b": ", value, b"\r\n")
            elif action == _XFF:
                self.forwarded_for = (
                    value if self.forwarded_for is None else (self.forwarded_for + b", " + value)
                )
            elif action == _REQUEST_ID:
                self.request_id = value
            elif action == _TRANSFER_ENCODING:
                if value.strip().lower() != b"chunked":  # the only coding a request may use
                    raise ValueError("unsupported Transfer-Encoding")
                self.chunked = True
                parts += (name, b": ", value, b"\r\n")
            elif action == _EXPECT:
                self.expect_continue = value.strip().lower() == b"100-continue"
            elif action == _CONNECTION:
                listed = _connection_tokens(value, listed)
            elif action == _UPGRADE:
                upgrade = value if upgrade is None else upgrade + b", " + value
            elif action == _TRACEPARENT:  # a repeated one is invalid: b""
                parts += (name, b": ", value, b"\r\n")
                parent: bytes | None = self.traceparent
                self.traceparent = value if parent is None or parent is NO_PARENT else b""
            elif action == _TRACESTATE:  # several lines are one list (W3C 3.3.1.1)
                parts += (name, b": ", value, b"\r\n")
                state: bytes | None = self.tracestate
                self.tracestate = value if state is None else state + b"," + value
                if self.traceparent is None:  # so far: trace headers came all the same
                    self.traceparent = NO_PARENT
            elif (action == _UNDERSCORE and underscores) or (action == _FORWARDED and forwarded):
                parts += (name, b": ", value, b"\r\n")
            elif action == _TE and not self.trailers and _says_trailers(value):
                self.trailers = True
                parts += TE_PARTS
        if listed:
            self.close = b"close" in listed
            parts = _remove_listed(parts, listed)  # raises for a framing header
        self.parts = parts
        #: the tokens of the ``Connection`` headers, None when there is none
        self.connection = listed
        #: an Upgrade request's protocols (lower case, ``h2c`` left out), else None
        self.upgrade: list[bytes] | None = None
        if upgrade is not None and listed and b"upgrade" in listed:
            self.upgrade = self._upgrades(upgrade)

    def _upgrades(self, value: bytes) -> list[bytes] | None:
        """The protocols of an ``Upgrade`` header worth forwarding: not ``h2c`` (never
        forwarded), and none when the request has a body (only bodiless requests are
        tunnelled; the parser already ended such a request's message)."""
        if self.chunked or self.content_length not in (None, b"0"):
            return None
        tokens = [t for t in _connection_tokens(value, None) if t.partition(b"/")[0] != b"h2c"]
        return tokens or None

    def set_host(self, host: bytes) -> None:
        """Replace ``Host`` by an absolute-form target's authority (RFC 9112 3.2.2)."""
        parts = self.parts
        for i in range(0, len(parts), 4):
            if parts[i].lower() == b"host":
                parts[i + 2] = host
                break
        else:
            parts += (b"Host", b": ", host, b"\r\n")
        self.host = host


#: What a request whose client said ``TE: trailers`` sends on (``RequestHeaders.parts``
#: pieces): RFC 9110 10.1.4 has ``TE`` listed in ``Connection`` by its sender.
TE_PARTS: Final = (b"TE", b": ", b"trailers", b"\r\n", b"Connection", b": ", b"TE", b"\r\n")
#: Names a client's ``Connection`` may list without removing what the proxy wrote itself.
_REBUILT: Final = frozenset((b"te", b"connection"))


def _says_trailers(value: bytes) -> bool:
    """Does a ``TE`` value (``trailers, deflate;q=0.5``) have the ``trailers`` member?"""
    return any(t.partition(b";")[0].strip().lower() == b"trailers" for t in value.split(b","))


def _connection_tokens(value: bytes, listed: list[bytes] | None) -> list[bytes]:
    tokens = [t.strip().lower() for t in value.split(b",") if t.strip()]
    return tokens if listed is None else listed + tokens


def _remove_listed(parts: list[bytes], listed: list[bytes], refuse: bool = True) -> list[bytes]:
    """Drop the headers a ``Connection`` header names (rare: only non-plain tokens).
    ``Content-Length``, ``Transfer-Encoding`` and ``Host`` are never dropped: a request
    naming one is refused (ValueError), a response (``refuse`` False) keeps them. A
    request's ``TE`` and ``Connection`` in ``parts`` are the proxy's own (``TE_PARTS``):
    kept."""
    names = {t for t in listed if t not in _PLAIN_CONNECTION_TOKENS}
    if refuse:
        names -= _REBUILT
    if not names:
        return parts
    if not refuse:
        names -= _PROTECTED
    elif not names.isdisjoint(_PROTECTED):
        raise ValueError("Connection header names " + ", ".join(
            sorted(n.decode("latin-1") for n in names & _PROTECTED)
        ))  # fmt: skip
    return without(parts, names)


def without(parts: list[bytes], names: Collection[bytes]) -> list[bytes]:
    """Header pieces (``RequestHeaders.parts``: name, ``": "``, value, CRLF) without the
    headers called ``names`` (lower case)."""
    kept: list[bytes] = []
    for i in range(0, len(parts), 4):
        if parts[i].lower() not in names:
            kept += parts[i : i + 4]
    return kept


def request_head(
    method: bytes,
    target: bytes,
    found: RequestHeaders,
    client_ip: bytes,
    forwarded_host: bytes | None,
    request_id: bytes,
    template: bytes,
    trace_id: bytes,
) -> bytes:
    """The request head sent upstream (always HTTP/1.1, keep-alive). ``template``: the
    client connection's (``head_template``: ``X-Forwarded-Proto``, ``Forwarded``, a
    ``traceparent`` line under ``tracing``), chosen once per connection, never per
    request; ``trace_id``: its trace's (b"" without ``tracing``: the slot is empty)."""
    xff = client_ip if found.forwarded_for is None else found.forwarded_for + b", " + client_ip
    if forwarded_host is None:  # no Host (HTTP/1.0): no X-Forwarded-Host either
        template = template.replace(_FORWARDED_HOST, b"%s", 1)
        forwarded_host = b""
    return template % (
        method, target, b"".join(found.parts), xff, request_id, forwarded_host, trace_id
    )  # fmt: skip


_FORWARDED_HOST: Final = b"X-Forwarded-Host: %s\r\n"
#: One C-level format per request head (half the time of joining a list of pieces). The
#: last ``%s`` is ``tracing``'s: empty here, a trace id where a listener traces.
REQUEST_HEAD: Final = (
    b"%s %s HTTP/1.1\r\n%sX-Forwarded-For: %s\r\nX-Forwarded-Proto: http\r\n"
    b"X-Request-ID: %s\r\n" + VIA + _FORWARDED_HOST + b"%s\r\n"
)
REQUEST_HEAD_TLS: Final = REQUEST_HEAD.replace(b"Proto: http", b"Proto: https")
#: ``TRACED % (trace id, parent id)``: the ``traceparent`` line of a traced listener's
#: heads (a sampled request's is rewritten: ``proxy.tracing.span``)
TRACED: Final = b"traceparent: 00-%s-%s-00\r\n"
#: ``TRACED_END % (parent id, flags)`` (ints): what a head built with ``TRACED`` ends with
#: from the dash before its parent id, blank line included (a rewrite replaces the last
#: ``TRACED_END_SIZE`` bytes: ``proxy.tracing.span``)
TRACED_END: Final = b"-%016x-%02x\r\n\r\n"
TRACED_END_SIZE: Final = len(TRACED_END % (0, 0))


def head_template(tls: bool, parent: bytes | None) -> bytes:
    """The upstream request head's format for a listener's connections: ``X-Forwarded-
    Proto: https`` behind TLS; under ``tracing``, a ``traceparent`` line naming the
    request's trace and ``parent`` (the tracer's parent id for unsampled new traces)."""
    template = REQUEST_HEAD_TLS if tls else REQUEST_HEAD
    if parent is None:
        return template
    return template[:-4] + TRACED % (b"%s", parent) + b"\r\n"


def forwarded_template(template: bytes, client_ip: str) -> bytes:
    """``template`` (``REQUEST_HEAD`` or ``REQUEST_HEAD_TLS``) with aiolb's RFC 7239
    element for a client at ``client_ip`` after ``Via``: built once per connection, so
    a request pays nothing for it. An IPv6 address is bracketed and quoted."""
    ip = client_ip.encode()
    node = b'"[%s]"' % ip if b":" in ip else ip or b"unknown"  # Unix sockets: no address
    proto = b"https" if template.find(b"Proto: https") != -1 else b"http"
    line = b"Forwarded: for=%s;proto=%s\r\n" % (node.replace(b"%", b"%%"), proto)
    return template.replace(VIA, VIA + line)


# What in a response head needs more than passing through: a hop-by-hop or framing
# header (group 1 names it), or an obs-fold continuation line.
_RESPONSE_SPECIAL = re.compile(
    rb"\r\n(?:(connection|keep-alive|proxy-connection|te|trailer|upgrade|transfer-encoding)"
    rb"[ \t]*:|[ \t])"
)
_PLAIN_CONNECTION = {b"keep-alive": False, b"close": True}


class ResponseHead:
    """A response head as the client will get it, from the upstream's raw head bytes.

    ``head`` is the status line and the headers to forward, each line ending in CRLF,
    without the blank line that ends the head: the caller appends its own framing and
    ``Connection`` headers and the final CRLF. The raw bytes were already validated by
    the parser (strict CRLF, valid tokens), so the common head (no hop-by-hop header but
    a plain ``Connection: keep-alive`` or ``close``) is forwarded as it came, with that
    one line cut out; anything else is split into lines and filtered.

    ``length`` is the body length of a common head (HTTP/1.1, a final status with a body,
    a Content-Length), else -1; with ``status`` and ``close`` it frames a response whose
    head the parser has seen before (``known_response_head``).
    """

    __slots__ = ("chunked", "close", "has_length", "head", "length", "status")

    def __init__(self, raw: bytes) -> None:
        lower = raw.lower()
        length_at = lower.find(b"\r\ncontent-length:")
        self.has_length = length_at >= 0
        self.chunked = self.close = False
        self.length = -1
        self.status = 0
        m = _RESPONSE_SPECIAL.search(lower)
        if m is None:
            head = raw[:-2]
        elif m.group(1) == b"connection":  # the usual one: cut a plain Connection line
            eol = lower.index(b"\r\n", m.end())
            close = _PLAIN_CONNECTION.get(lower[m.end() : eol].strip())
            if close is None or _RESPONSE_SPECIAL.search(lower, eol) is not None:
                self._filter(raw)
                return
            self.close = close
            head = raw[: m.start()] + raw[eol:-2]
        else:
            self._filter(raw)
            return
        if not raw.startswith(b"HTTP/1.1 "):
            self.head = b"HTTP/1.1 " + head[9:]
            return
        self.head = head
        status = int(raw[9:12])
        if self.has_length and status >= 200 and status != 204 and status != 304:
            self.status = status
            start = length_at + 17
            self.length = int(lower[start : lower.index(b"\r\n", start)])

    def with_lines(self, lines: bytes) -> ResponseHead:
        """A copy with header ``lines`` (each ending in CRLF) added: what a cache or a
        filter sends; ``self`` may be the head cache's and is never changed."""
        copy = ResponseHead.__new__(ResponseHead)
        copy.chunked, copy.close, copy.has_length = self.chunked, self.close, self.has_length
        copy.length, copy.status = self.length, self.status
        copy.head = self.head + lines
        return copy

    def _filter(self, raw: bytes) -> None:
        """The general path: one pass over the header lines (obs-fold unfolded)."""
        lines = raw[:-4].replace(b"\r\n ", b" ").replace(b"\r\n\t", b" ").split(b"\r\n")
        parts: list[bytes] = [b"HTTP/1.1 " + lines[0][9:] + b"\r\n"]
        listed: list[bytes] | None = None
        actions = _RESPONSE_ACTIONS
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            value = value.strip()
            action = actions.get(name.lower())
            if action is None or action == _CONTENT_LENGTH:
                parts += (name, b": ", value, b"\r\n")
            elif action == _TRANSFER_ENCODING:
                # chunked last: the parser de-chunks; any other coding last: the body
                # ends when the upstream closes (RFC 9112 6.3)
                self.chunked = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
            elif action == _CONNECTION:
                listed = _connection_tokens(value, listed)
        if listed:
            self.close = b"close" in listed
            parts = [parts[0], *_remove_listed(parts[1:], listed, refuse=False)]
        self.head = b"".join(parts)


#: Rewritten response heads by their raw bytes. An upstream answers a run of requests
#: with the same head until its ``Date`` ticks, so most heads are found here and not
#: parsed again. Bounded: emptied when full; long heads are not kept.
_HEADS: Final[dict[bytes, ResponseHead]] = {}
_HEADS_MAX: Final = 512
_HEAD_CACHED_MAX: Final = 1024  # bytes


#: ``known_response_head(raw)``: the cached ``ResponseHead`` of ``raw``, or None. Only
#: heads the parser has accepted are found: the upstream connection fills the cache
#: (``response_head``) from parsed responses. A C call, no Python frame.
known_response_head: Final[Callable[[bytes], ResponseHead | None]] = _HEADS.get


def response_head(raw: bytes) -> ResponseHead:
    """``ResponseHead(raw)``, from the cache when the same head was seen recently."""
    found = _HEADS.get(raw)
    if found is None:
        found = ResponseHead(raw)
        if len(raw) <= _HEAD_CACHED_MAX:
            if len(_HEADS) >= _HEADS_MAX:
                _HEADS.clear()
            _HEADS[raw] = found
    return found
