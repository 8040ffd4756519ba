"""What a filter is and what its hooks see: the base class users subclass.

A filter is a class with up to three hooks, each run at one phase boundary of a
request on a route that lists the filter (Envoy's HTTP filter chain, pingora's phase
callbacks)::

    class AddUser(Filter):
        def request_filter(self, request):          # before an upstream is picked
            if request.headers.get("X-Api-Key") is None:
                return LocalResponse(401, {"WWW-Authenticate": "ApiKey"}, "no key\\n")
            request.headers.set("X-User", "alice")
            return None                              # go on

        def upstream_request_filter(self, request, upstream):   # one was picked
            request.headers.set("X-Upstream", upstream.name)

        async def response_filter(self, request, response):     # the response head
            response.headers.add("Server-Timing", "auth;dur=1")

- ``request_filter(request)``: change the request (``headers``, ``path``), or answer
  it here by returning a ``LocalResponse`` (the filters after it and the upstream
  are skipped). None goes on.
- ``upstream_request_filter(request, upstream)``: the upstream is chosen; change the
  request once more (it runs once: a retry resends the same request).
- ``response_filter(request, response)``: change the response's ``status`` and headers
  before the client sees them (not the body, not its framing).

Each hook may be a plain method or ``async def``, or return an ``asyncio.Future`` of
its result (request and upstream hooks: waited on without a task, the cheapest way to
wait on I/O of one's own); a filter implements only the hooks it needs (the chain
notices which, once, and costs nothing in the others; setting a hook to None in
``__init__`` takes that instance out of the phase). A hook that raises, or returns
something else, answers 500 for that request and logs one line; the proxy keeps
serving. ``__init__(options)`` gets the ``options`` mapping of the config (validated by
the class's ``Options`` pydantic model, when it has one, and then that model's
instance); it runs when the config is checked too, so it must not start I/O. Headers
are ``str`` (latin-1, as HTTP's bytes); names are case-insensitive.
"""

from __future__ import annotations

import http
from collections.abc import Awaitable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Final, Protocol

from proxy.http.headers import FRAMING_HEADERS, MANAGED_REQUEST_HEADERS, ResponseHead
from proxy.http.target import normalise_host

if TYPE_CHECKING:
    from pydantic import BaseModel

    from proxy.filters.chain import FilterChain
    from proxy.http.headers import RequestHeaders
    from proxy.upstream.pool import Upstream


class Subject(Protocol):
    """What a filter's ``Request`` reads of the request it stands for (the exchange)."""

    method: bytes
    host: bytes | None
    request_id: bytes
    found: RequestHeaders
    upstream: Upstream | None

    @property
    def client_ip(self) -> str: ...
    @property
    def client(self) -> _Client: ...


class _Site(Protocol):
    @property
    def bind(self) -> str: ...


class _Client(Protocol):
    @property
    def listener(self) -> _Site: ...


_CTL: Final = frozenset(range(0, 32)) - {9} | {127}
_TOKEN: Final = frozenset(
    b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


class LocalResponse:
    """An answer made by a filter: ``status`` (200-599), headers (a mapping or pairs)
    and a body (a ``str`` is sent as UTF-8 ``text/plain`` unless a ``Content-Type`` is
    given). ``Content-Length`` and ``Connection`` are the proxy's to write."""

    __slots__ = ("body", "headers", "status")

    def __init__(
        self,
        status: int,
        headers: Mapping[str, str] | Sequence[tuple[str, str]] = (),
        body: bytes | str = b"",
    ) -> None:
        if not isinstance(status, int) or not 200 <= status <= 599:
            raise ValueError(f"a local response's status is 200-599, not {status!r}")
        pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
        self.status = status
        self.headers = [(_name(n, FRAMING_HEADERS, "response"), _value(v)) for n, v in pairs]
        self.body = body.encode() if isinstance(body, str) else bytes(body)
        typed = any(n.lower() == "content-type" for n, _ in pairs)
        if isinstance(body, str) and body and not typed:
            self.headers.append(("Content-Type", "text/plain; charset=utf-8"))

    def render(self, close: bool, head_only: bool) -> bytes:
        """The whole response as bytes (the head only for HEAD requests)."""
        lines = [b"HTTP/1.1 %d %s\r\n" % (self.status, _reason(self.status))]
        lines += (b"%s: %s\r\n" % (n.encode(), v.encode("latin-1")) for n, v in self.headers)
        lines.append(b"Content-Length: %d\r\n" % len(self.body))
        if close:
            lines.append(b"Connection: close\r\n")
        lines.append(b"\r\n")
        if not head_only:
            lines.append(self.body)
        return b"".join(lines)

    def __repr__(self) -> str:
        size = len(self.body)
        return f"<LocalResponse {self.status} [{len(self.headers)} headers, {size} bytes]>"


class Headers:
    """Headers held as ``[name, b": ", value, b"\\r\\n", ...]`` (the request's forwarded
    headers, or a response head's lines): read and changed in place."""

    __slots__ = ("_forbidden", "_parts", "_side")

    def __init__(self, parts: list[bytes], forbidden: frozenset[str], side: str) -> None:
        self._parts = parts
        self._forbidden = forbidden
        self._side = side

    def get(self, name: str) -> str | None:
        """The first value of ``name``, or None."""
        key = name.lower().encode()
        parts = self._parts
        for i in range(0, len(parts), 4):
            if parts[i].lower() == key:
                return parts[i + 2].decode("latin-1")
        return None

    def get_all(self, name: str) -> list[str]:
        key = name.lower().encode()
        parts = self._parts
        return [parts[i + 2].decode("latin-1") for i in range(0, len(parts), 4)
                if parts[i].lower() == key]  # fmt: skip

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def items(self) -> list[tuple[str, str]]:
        parts = self._parts
        return [(parts[i].decode("latin-1"), parts[i + 2].decode("latin-1"))
                for i in range(0, len(parts), 4)]  # fmt: skip

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self.items())

    def set(self, name: str, value: str) -> None:
        """Replace every ``name`` header by one with ``value`` (where the first was)."""
        raw = _name(name, self._forbidden, self._side).encode()
        data = _value(value).encode("latin-1")
        key = raw.lower()
        parts = self._parts
        for i in range(0, len(parts), 4):
            if parts[i].lower() == key:
                parts[i + 2] = data
                self._drop(key, i + 4)
                return
        parts += (raw, b": ", data, b"\r\n")

    def add(self, name: str, value: str) -> None:
        """One more ``name`` header (after the others)."""
        if name.lower() == "host" and self._side == "request":
            raise ValueError("Host may be set, not added")
        raw = _name(name, self._forbidden, self._side).encode()
        self._parts += (raw, b": ", _value(value).encode("latin-1"), b"\r\n")

    def remove(self, name: str) -> None:
        """Remove every ``name`` header (none: nothing happens)."""
        if name.lower() == "host" and self._side == "request":
            raise ValueError("Host may be set, not removed")
        self._drop(_name(name, self._forbidden, self._side).lower().encode(), 0)

    def _drop(self, key: bytes, start: int) -> None:
        parts = self._parts
        i = start
        while i < len(parts):
            if parts[i].lower() == key:
                del parts[i : i + 4]
            else:
                i += 4

    def __repr__(self) -> str:
        return f"<Headers {self.items()!r}>"


_REQUEST_FORBIDDEN: Final = FRAMING_HEADERS | MANAGED_REQUEST_HEADERS


class UpstreamInfo:
    """The upstream a request goes to: ``address`` (``host:port``), ``name`` (the
    config's, else the address) and ``pool``."""

    __slots__ = ("address", "name", "pool")

    def __init__(self, upstream: Upstream) -> None:
        self.address = upstream.address
        self.name = upstream.name
        self.pool = upstream.pool.name

    def __repr__(self) -> str:
        return f"<UpstreamInfo {self.pool}/{self.name} {self.address}>"


class Request:
    """One request as every hook of its route sees it (the same object in every phase).

    ``method``, ``request_id``, ``host`` (lower case, without port; None without a
    Host header), ``route`` and ``pool`` are read-only; ``path`` (with the query) and
    ``headers`` may be changed; ``client_ip`` is the client's address (an ``access``
    filter with ``trusted_proxies`` may have taken it from ``X-Forwarded-For``);
    ``state`` is a dict for the filters' own use. ``upstream`` is the upstream that
    serves it, once there is one (the one that answered, in ``response_filter``).
    """

    __slots__ = ("_headers", "_state", "chain", "client_ip", "coder", "encoding", "ex", "pinned",
                 "target")  # fmt: skip

    def __init__(self, chain: FilterChain, ex: Subject, target: bytes) -> None:
        self.chain = chain
        self.ex = ex
        self.target = target  # the path sent upstream (rewrites change it)
        self.client_ip = ex.client_ip
        #: the upstream to send to while it is available (``sticky``, ``prefer``)
        self.pinned: Upstream | None = None
        #: the content coding a ``compress`` filter chose for the response (``gzip``,
        #: ``br``, ``zstd`` or ``identity``); None on a route without one
        self.encoding: bytes | None = None
        #: the response body's coder once ``ResponseEncoder.encode`` gave one (the
        #: exchange's to drive)
        self.coder: BodyCoder | None = None
        self._headers: Headers | None = None
        self._state: dict[str, Any] | None = None

    @property
    def method(self) -> str:
        return self.ex.method.decode("latin-1")

    @property
    def path(self) -> str:
        return self.target.decode("latin-1")

    @path.setter
    def path(self, value: str) -> None:
        if (
            not value.startswith("/")
            or not value.isascii()
            or any(c <= " " or c == "\x7f" for c in value)
        ):
            raise ValueError(f"a path starts with '/' and has no spaces or controls: {value!r}")
        self.target = value.encode()

    @property
    def headers(self) -> Headers:
        headers = self._headers
        if headers is None:
            headers = self._headers = Headers(self.ex.found.parts, _REQUEST_FORBIDDEN, "request")
        return headers

    @property
    def request_id(self) -> str:
        return self.ex.request_id.decode("latin-1")

    @property
    def host(self) -> str | None:
        host = self.ex.host
        return normalise_host(host).decode("latin-1") if host else None

    @property
    def route(self) -> str:
        return self.chain.route

    @property
    def pool(self) -> str:
        return self.chain.pool.name

    @property
    def upstream(self) -> UpstreamInfo | None:
        upstream = self.ex.upstream
        return UpstreamInfo(upstream) if upstream is not None else None

    @property
    def state(self) -> dict[str, Any]:
        state = self._state
        if state is None:
            state = self._state = {}
        return state

    def prefer(self, address: str) -> bool:
        """Send this request to the pool's upstream ``address`` (``host:port``) if it is
        available (else the balancer picks); False when it is not one of the pool's."""
        upstream = self.chain.pool.upstream(address)
        self.pinned = upstream
        return upstream is not None

    # -- for the key functions of ``proxy.balancing.consistent_hash`` (RequestView) ------

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower case) as forwarded now."""
        if name == b"x-forwarded-for":
            return self.ex.found.forwarded_for
        if name == b"x-request-id":
            return self.ex.request_id
        parts = self.ex.found.parts
        for i in range(0, len(parts), 4):
            if parts[i].lower() == name:
                return parts[i + 2]
        return None

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.path[:60]!r} on {self.route}>"


class Response:
    """A response head as ``response_filter`` sees it: ``status`` and ``headers`` (not
    the framing ones). Changes make a new head; the upstream's own head is untouched."""

    __slots__ = ("_head", "_parts", "_status", "changed")

    def __init__(self, head: bytes) -> None:
        self._head = head
        self._parts: list[bytes] | None = None
        self._status = int(head[9:12])
        self.changed = False

    def replace(self, head: bytes) -> None:
        """Take ``head`` (a whole head, as ``head()`` makes them) as the response's head:
        for a filter that computed the same change for this head before."""
        self._head = head
        self._parts = None
        self._status = int(head[9:12])
        self.changed = True

    @property
    def status(self) -> int:
        return self._status

    @status.setter
    def status(self, value: int) -> None:
        old = self._status
        if (
            not isinstance(value, int)
            or not 200 <= value <= 599
            or value in (204, 304)
            or (old in (204, 304) and value != old)
        ):
            raise ValueError(f"cannot change status {old} to {value!r} (200-599, neither "
                             "204 nor 304, which frame the body differently)")  # fmt: skip
        self._status = value
        self.changed = True

    @property
    def headers(self) -> Headers:
        parts = self._parts
        if parts is None:
            parts = self._parts = _split(self._head)
        self.changed = True  # the caller may change them: the head is rebuilt
        return Headers(parts, FRAMING_HEADERS, "response")

    def head(self) -> bytes:
        """The head with the changes (status line and header lines, each ending CRLF)."""
        head = self._head
        if not self.changed or (self._parts is None and self._status == int(head[9:12])):
            return head
        status = self._status
        line = b"HTTP/1.1 %d %s\r\n" % (status, _reason(status))
        if self._parts is None:
            return line + head[head.index(b"\r\n") + 2 :]
        return line + b"".join(self._parts)

    def framed(self, found: ResponseHead) -> ResponseHead:
        """The head to relay for the upstream's ``found``: ``found`` itself when nothing
        changed, else a copy with the new head (the framing stays ``found``'s: hooks
        may not change it)."""
        if not self.changed:
            return found
        copy = ResponseHead.__new__(ResponseHead)
        copy.chunked, copy.close, copy.has_length = found.chunked, found.close, found.has_length
        copy.length, copy.status = found.length, found.status
        copy.head = self.head()
        return copy

    def __repr__(self) -> str:
        return f"<Response {self._status}>"


class BodyCoder(Protocol):
    """What compresses one response body (``proxy.filters.compress.Coder``)."""

    def compress(self, data: bytes | memoryview) -> bytes:
        """A piece of the body in; what comes out so far (may be empty)."""

    def flush(self) -> bytes:
        """What the coder holds, as far as it can be decoded (an upstream read ended)."""

    def finish(self) -> bytes:
        """The rest, at the end of the body."""


class ResponseEncoder(Protocol):
    """A filter that changes a response's body encoding (``compress``): the exchange
    asks it before the route's cache sees the head, so the cache stores what the
    client gets."""

    def encode(
        self, request: Request, status: int, found: ResponseHead, head_only: bool
    ) -> tuple[ResponseHead, BodyCoder | None] | None:
        """The head to relay instead of ``found`` and the coder of its body (None: the
        body as it is), or None to leave the response alone."""


class Filter:
    """Base class of every filter (see the module's documentation for the hooks).

    ``Options``: a pydantic model the config's ``options`` are validated with (its
    errors are reported as ``FILE:LINE`` by ``aiolb check``); None hands the mapping
    over as it is.
    """

    Options: ClassVar[type[BaseModel] | None] = None

    def __init__(self, options: Any = None) -> None:
        self.options = options

    def request_filter(
        self, request: Request
    ) -> LocalResponse | Awaitable[LocalResponse | None] | None:
        """Before an upstream is picked: a ``LocalResponse`` answers, None goes on."""
        return None

    def upstream_request_filter(
        self, request: Request, upstream: UpstreamInfo
    ) -> Awaitable[None] | None:
        """An upstream was picked; the request head is built after this."""
        return None

    def response_filter(self, request: Request, response: Response) -> Awaitable[None] | None:
        """The response head, before the client gets it."""
        return None


#: The hooks, by phase.
HOOKS: Final = ("request_filter", "upstream_request_filter", "response_filter")


def implements(instance: Filter, hook: str) -> bool:
    """True if the filter has its own ``hook``: its class overrides the base class's
    (which does nothing), and ``__init__`` did not set it to None (a phase this
    instance has nothing to do in)."""
    method = getattr(instance, hook, None)
    return method is not None and getattr(method, "__func__", method) is not getattr(Filter, hook)


def _name(name: str, forbidden: frozenset[str], side: str) -> str:
    if not isinstance(name, str) or not name or not set(name.encode("latin-1")) <= _TOKEN:
        raise ValueError(f"invalid header name {name!r}")
    if name.lower() in forbidden:
        raise ValueError(f"{side} header {name!r} is aiolb's to write")
    return name


def _value(value: str) -> str:
    if not isinstance(value, str) or any(ord(c) in _CTL for c in value):
        raise ValueError(f"invalid header value {value!r} (a str without CR, LF or controls)")
    return value


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _split(head: bytes) -> list[bytes]:
    """A head's header lines as ``[name, b": ", value, b"\\r\\n", ...]``."""
    parts: list[bytes] = []
    for line in head.split(b"\r\n")[1:]:
        if line:
            name, _, value = line.partition(b":")
            parts += (name, b": ", value.strip(), b"\r\n")
    return parts
