"""The route filters' options: one model per filter, keyed by the name used in YAML.

A route's ``filters`` is a list; each item names one filter and holds its options::

    filters:
      - access: {allow: [10.0.0.0/8]}
      - rate_limit: {rate: 100/s, burst: 200, key: client_ip}
      - sticky                                   # a filter without options
      - python: "mypackage.module:MyFilter"     # a user's filter class
        options: {greeting: hello}

Each item is validated by its filter's model (frozen, unknown keys refused), so a bad
option is reported at its own line: ``listeners[0].routes[0].filters[1].rate_limit.burst:
must be >= 1``. The models dump back to the same one-key form (``{rate_limit: {...}}``),
which is what the workers receive and ``aiolb check --print`` shows. The filters
themselves live in ``proxy.filters`` (``REGISTRY``, keyed by the same names). The
values the options hold (rates, header templates with their ``${client_ip}``-style
variables, address ranges) are ``proxy.config.filter_values``.
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    SerializerFunctionWrapHandler,
    Tag,
    field_validator,
    model_serializer,
    model_validator,
)

from proxy.config.base import ConfigModel, Duration, Kind, Name, Size, Timeout
from proxy.config.filter_values import (
    CONTROL_CHARACTER,
    Cidr,
    RateValue,
    check_header_name,
    check_path,
    header_template,
)
from proxy.config.keys import KEY_FORMS, parse_key
from proxy.http.headers import FRAMING_HEADERS, MANAGED_REQUEST_HEADERS

_CLASS_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_.]*")


class FilterOptions(ConfigModel):
    """Base of every filter's options: read from and dumped to ``{NAME: {options}}``."""

    NAME: ClassVar[str] = ""

    @model_validator(mode="before")
    @classmethod
    def _unwrap(cls, data: Any) -> Any:
        if data == cls.NAME:  # ``- sticky``: every option at its default
            return {}
        if isinstance(data, Mapping) and cls.NAME in data:
            if len(data) != 1:
                names = ", ".join(map(str, data))
                raise ValueError(f"one filter per list item, found {names}: list each apart")
            inner = data[cls.NAME]
            return {} if inner is None else inner
        return data

    @model_serializer(mode="wrap")
    def _wrap(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {self.NAME: handler(self)}


class RateLimitStoreSpec(ConfigModel):
    """Where ``rate_limit`` keeps its buckets: ``memory`` (this instance, every worker
    included) or ``{type: redis, url: ...}`` (every instance that uses the same Redis)."""

    type: Literal["memory", "redis"] = "memory"
    """``memory``: this instance's own buckets (shared by its workers); ``redis``: one
    Redis shared by every aiolb instance that names it."""
    url: str | None = None
    """``redis://host:6379/0``, ``rediss://...`` (TLS) or ``unix:///path/redis.sock``."""
    fail_open: bool = True
    """Redis unreachable: admit the request (one log line per outage); false answers 503."""
    timeout: Timeout = 0.1
    """Longest wait for Redis to connect or answer one decision."""
    prefix: str = "aiolb:"
    """Prefix of the Redis keys (then the route name, the filter name and the key)."""

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        return {"type": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _check(self) -> RateLimitStoreSpec:
        if self.type == "memory":
            extra = [k for k in ("url",) if getattr(self, k) is not None]
            if extra:
                raise ValueError("the memory store takes no url (did you mean type: redis?)")
            return self
        if self.url is None:
            raise ValueError("the redis store needs a url, such as redis://127.0.0.1:6379/0")
        if not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"url must start with redis://, rediss:// or unix://, got {self.url!r}"
            )
        if importlib.util.find_spec("redis") is None:
            raise ValueError(
                "the redis store needs the redis package: pip install 'aiolb[redis]'"
            )
        return self

    @model_serializer(mode="wrap")
    def _short(self, handler: SerializerFunctionWrapHandler) -> Any:
        return "memory" if self.type == "memory" else handler(self)


def _check_key(value: str) -> str:
    if value != "route":
        try:
            parse_key(value)
        except ValueError:
            raise ValueError(
                f"{value!r} is not a key; use one of {', '.join((*KEY_FORMS, 'route'))}"
            ) from None
    return value


class RateLimitOptions(FilterOptions):
    """``rate_limit``: a token bucket per key (nginx ``limit_req``, Envoy's local and
    global rate limits). Over the limit: 429 with ``Retry-After`` and the IETF draft's
    ``RateLimit-Policy`` and ``RateLimit`` headers."""

    NAME: ClassVar[str] = "rate_limit"
    rate: RateValue
    """Requests per period: ``100/s``, ``600/m``, ``5/10s`` (the bucket's refill rate)."""
    burst: Annotated[int, Field(ge=1)] | None = None
    """Requests admitted at once (the bucket's size); null: the rate's count (``100/s``:
    100)."""
    key: Annotated[str, BeforeValidator(str.strip)] = "client_ip"
    """One bucket per ``client_ip``, ``header:NAME``, ``cookie:NAME``, ``query:NAME``,
    ``path``, or ``route`` (one bucket for the whole route). Requests without the key
    share one bucket."""
    store: RateLimitStoreSpec = RateLimitStoreSpec()
    """``memory`` or ``{type: redis, url: ..., fail_open: true}``."""
    name: Name = "rate_limit"
    """The ``filter`` label of ``aiolb_rate_limited_total`` and part of the bucket's key;
    two rate limits on one route need different names."""

    @field_validator("key")
    @classmethod
    def _key(cls, value: str) -> str:
        return _check_key(value)

    @property
    def size(self) -> int:
        """The bucket's size: ``burst``, else the rate's count (at least 1)."""
        return self.burst if self.burst is not None else max(1, math.ceil(self.rate.requests))


class HeaderChangesSpec(ConfigModel):
    """Headers to ``set`` (replacing any of that name), ``add`` (one more line) and
    ``remove``; applied in that order: remove, set, add."""

    set: dict[str, str] = {}
    """Name -> value, replacing every header of that name."""
    add: dict[str, str] = {}
    """Name -> value, added after any header of that name."""
    remove: list[str] = []
    """Names to remove (case-insensitive)."""

    @field_validator("set", "add")
    @classmethod
    def _check_values(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            check_header_name(name)
            header_template(text)
        return value

    @field_validator("remove")
    @classmethod
    def _check_names(cls, value: list[str]) -> list[str]:
        for name in value:
            check_header_name(name)
        return value

    def names(self) -> list[str]:
        return [*self.set, *self.add, *self.remove]


class HeadersOptions(FilterOptions):
    """``headers``: change request headers before an upstream is picked (nginx
    ``proxy_set_header``) and response headers (``add_header``)."""

    NAME: ClassVar[str] = "headers"
    request: HeaderChangesSpec = HeaderChangesSpec()
    """Changes to the request sent upstream."""
    response: HeaderChangesSpec = HeaderChangesSpec()
    """Changes to the response sent to the client."""

    @model_validator(mode="after")
    def _check_names(self) -> HeadersOptions:
        for name in self.request.names():
            lower = name.lower()
            if lower in MANAGED_REQUEST_HEADERS or lower in FRAMING_HEADERS:
                raise ValueError(f"request header {name!r} is aiolb's to write")
        if "host" in (n.lower() for n in (*self.request.add, *self.request.remove)):
            raise ValueError("the Host header may be set, not added or removed")
        for name in self.response.names():
            if name.lower() in FRAMING_HEADERS:
                raise ValueError(f"response header {name!r} is aiolb's to write")
        return self


_FROM = ConfigDict(
    frozen=True, extra="forbid", use_attribute_docstrings=True,
    populate_by_name=True, serialize_by_alias=True,
)  # fmt: skip


class PrefixChangeSpec(ConfigModel):
    """Replace the path prefix ``from`` by ``to``."""

    model_config = _FROM
    from_: Annotated[str, Field(alias="from")]
    """The prefix to replace."""
    to: str
    """What replaces it."""

    @field_validator("from_", "to")
    @classmethod
    def _paths(cls, value: str) -> str:
        return check_path(value)


class PathRegexSpec(ConfigModel):
    """Replace what the regular expression ``from`` matches in the path by ``to``."""

    model_config = _FROM
    from_: Annotated[str, Field(alias="from")]
    """A Python regular expression, searched in the path (not the query)."""
    to: str
    """The replacement; ``\\1`` or ``\\g<name>`` insert a group."""

    @model_validator(mode="after")
    def _check(self) -> PathRegexSpec:
        try:
            pattern = re.compile(self.from_)
        except re.error as exc:
            raise ValueError(f"invalid regular expression {self.from_!r}: {exc}") from None
        for number, name in re.findall(r"\\(\d+)|\\g<(\w+)>", self.to):
            group = number or name
            if group.isdigit() and int(group) > pattern.groups:
                raise ValueError(f"{self.to!r} refers to group {group}; {self.from_!r} has "
                                 f"{pattern.groups}")  # fmt: skip
            if not group.isdigit() and group not in pattern.groupindex:
                raise ValueError(f"{self.to!r} refers to group {group!r}, which {self.from_!r} "
                                 "does not name")  # fmt: skip
        return self


class RewriteOptions(FilterOptions):
    """``rewrite``: change the path sent upstream (Traefik's StripPrefix,
    ReplacePathRegex); the query is kept. One of the three per filter."""

    NAME: ClassVar[str] = "rewrite"
    strip_prefix: str | None = None
    """Remove this prefix (``/api``: ``/api/users`` -> ``/users``, ``/api`` -> ``/``) and
    say so in ``X-Forwarded-Prefix``."""
    replace_prefix: PrefixChangeSpec | None = None
    """``{from: /v1, to: /api/v1}``."""
    path: PathRegexSpec | None = None
    """``{from: "^/users/(\\d+)$", to: "/u?id=\\1"}``: a regular expression substitution."""

    @field_validator("strip_prefix")
    @classmethod
    def _strip(cls, value: str | None) -> str | None:
        return None if value is None else check_path(value)

    @model_validator(mode="after")
    def _one(self) -> RewriteOptions:
        given = [k for k in ("strip_prefix", "replace_prefix", "path") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("use exactly one of strip_prefix, replace_prefix, path (list "
                             "several rewrite filters to chain them)")  # fmt: skip
        return self


class RedirectOptions(FilterOptions):
    """``redirect``: answer with a redirect (nginx ``return 301``), to ``to`` or to the
    request's own URL with some of ``scheme``, ``host``, ``port``, ``path`` replaced."""

    NAME: ClassVar[str] = "redirect"
    status: Literal[301, 302, 307, 308] = 302
    """301, 302 (the default: browsers do not cache it), 307 or 308."""
    to: str | None = None
    """A URL (``https://example.com/``) or a path (``/new``), used as it is."""
    scheme: Literal["http", "https"] | None = None
    """The request's URL with this scheme (its port dropped unless ``port`` is given)."""
    host: str | None = None
    """... with this host."""
    port: Annotated[int, Field(ge=1, le=65535)] | None = None
    """... with this port."""
    path: str | None = None
    """... with this path (the query is kept)."""

    @model_validator(mode="after")
    def _check(self) -> RedirectOptions:
        pieces = [k for k in ("scheme", "host", "port", "path") if getattr(self, k) is not None]
        if (self.to is None) == (not pieces):
            raise ValueError("give either to or some of scheme, host, port, path")
        for text in (self.to, self.host, self.path):
            if (text is not None and CONTROL_CHARACTER.search(text)) or (text and " " in text):
                raise ValueError(f"{text!r} cannot be part of a URL")
        if self.to is not None and not self.to.startswith(("http://", "https://", "/")):
            raise ValueError(f"to must be an http(s) URL or a path, got {self.to!r}")
        if self.path is not None:
            check_path(self.path)
        return self


class StickyOptions(FilterOptions):
    """``sticky``: a cookie pins a client to the upstream that served it (HAProxy
    ``cookie SERVERID insert``); the balancer picks while that upstream is unavailable."""

    NAME: ClassVar[str] = "sticky"
    cookie: str = "aiolb_sticky"
    """The cookie's name."""
    max_age: Annotated[Duration, Field(gt=0)] | None = None
    """How long the browser keeps it; null: until the browser closes (a session cookie)."""
    http_only: bool = True
    """``HttpOnly``: scripts cannot read it."""
    same_site: Literal["lax", "strict", "none"] = "lax"
    """``SameSite``; ``none`` needs ``secure: true``."""
    secure: bool = False
    """``Secure``: HTTPS only."""
    path: str = "/"
    """The cookie's ``Path``."""

    @field_validator("cookie")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_header_name(value)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return check_path(value)

    @model_validator(mode="after")
    def _check(self) -> StickyOptions:
        if self.same_site == "none" and not self.secure:
            raise ValueError("same_site: none needs secure: true (browsers refuse it otherwise)")
        return self


class AccessOptions(FilterOptions):
    """``access``: allow or deny by client address (nginx ``allow``/``deny``): a denied
    address gets 403. ``deny`` wins; with ``allow`` given, only those pass."""

    NAME: ClassVar[str] = "access"
    allow: list[Cidr] = []
    """Only these ranges pass (empty: every address not denied)."""
    deny: list[Cidr] = []
    """These ranges get 403."""
    trusted_proxies: list[Cidr] = []
    """Proxies in front of aiolb: when the client is one, the address judged is the last
    ``X-Forwarded-For`` entry not in these ranges (later filters see it as the client)."""

    @model_validator(mode="after")
    def _check(self) -> AccessOptions:
        if not self.allow and not self.deny:
            raise ValueError("give allow, deny or both")
        return self


class PythonOptions(FilterOptions):
    """``python``: a filter class of your own, ``module:Class``, a subclass of
    ``proxy.filters.Filter`` (imported when the config is checked)."""

    NAME: ClassVar[str] = "python"
    python: str
    """``package.module:ClassName``, importable by the proxy."""
    options: dict[str, Any] = {}
    """Handed to the class (validated by its ``Options`` model when it has one)."""

    @model_validator(mode="before")
    @classmethod
    def _unwrap(cls, data: Any) -> Any:
        return data

    @model_serializer(mode="wrap")
    def _wrap(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return dict(handler(self))

    @field_validator("python")
    @classmethod
    def _path(cls, value: str) -> str:
        if not _CLASS_PATH.fullmatch(value.strip()):
            raise ValueError(f"{value!r} is not module:Class (such as mypackage.filters:Auth)")
        return value.strip()


#: The encodings ``compress`` knows, in its default order of preference (Traefik's),
#: with the package each needs beyond the standard library.
COMPRESS_ENCODINGS: Mapping[str, str | None] = MappingProxyType(
    {"zstd": "zstandard", "br": "brotli", "gzip": None}
)
#: The levels ``compress`` uses unless told (``loadtests/compress_bench.py`` measures
#: them): zstd's own default; gzip 1, nginx's default (zlib's 6 costs 3.5x the CPU for
#: a body about 13% smaller); brotli's quality 4 (its default, 11, is made for files
#: compressed once: about 70x slower).
COMPRESS_LEVELS: Mapping[str, int] = MappingProxyType({"zstd": 3, "br": 4, "gzip": 1})
_LEVEL_RANGES: Mapping[str, tuple[int, int]] = MappingProxyType(
    {"zstd": (1, 22), "br": (0, 11), "gzip": (1, 9)}
)
#: The content types ``compress`` compresses unless told (text, JSON, JS, XML, SVG).
COMPRESS_TYPES: tuple[str, ...] = (
    "text/*", "application/json", "application/*+json", "application/javascript",
    "application/x-javascript", "application/xml", "application/*+xml", "image/svg+xml",
    "application/wasm",
)  # fmt: skip
_MEDIA_PATTERN = re.compile(r"(?:\*|[a-z0-9!#$&^_.+-]+)/[a-z0-9!#$&^_.+*-]+")


def _available(encoding: str) -> bool:
    package = COMPRESS_ENCODINGS[encoding]
    return package is None or importlib.util.find_spec(package) is not None


class CompressOptions(FilterOptions):
    """``compress``: compress responses for clients that accept it (Traefik
    ``compress``, Caddy ``encode``): ``zstd``, ``br`` or ``gzip`` by the request's
    ``Accept-Encoding`` (its q-values first, then the order of ``encodings``)."""

    NAME: ClassVar[str] = "compress"
    encodings: list[Literal["zstd", "br", "gzip"]] = Field(
        default_factory=lambda: [e for e in COMPRESS_ENCODINGS if _available(e)],  # type: ignore[arg-type]
        min_length=1,
    )
    """The encodings offered, most preferred first (default: ``[zstd, br, gzip]``, those
    of them whose package is installed: ``pip install 'aiolb[compress]'``)."""
    min_size: Size = 1024
    """A response with a ``Content-Length`` below this is sent as it is (Traefik's 1KiB)."""
    types: list[str] = Field(default_factory=lambda: list(COMPRESS_TYPES), min_length=1)
    """Content types compressed: ``type/subtype``, with ``*`` for any part
    (``text/*``, ``application/*+json``). ``text/event-stream`` never is."""
    levels: dict[Literal["zstd", "br", "gzip"], int] = {}
    """Compression level per encoding (default ``{zstd: 3, br: 4, gzip: 1}``, gzip's as
    nginx's; gzip 1-9, br 0-11, zstd 1-22)."""

    @field_validator("encodings")
    @classmethod
    def _encodings(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("an encoding is listed twice")
        for encoding in value:
            if not _available(encoding):
                package = COMPRESS_ENCODINGS[encoding]
                raise ValueError(
                    f"{encoding} needs the {package} package, which is not installed: "
                    f"pip install 'aiolb[compress]' (or leave {encoding} out)"
                )
        return value

    @field_validator("types")
    @classmethod
    def _types(cls, value: list[str]) -> list[str]:
        lowered = [t.strip().lower() for t in value]
        for text in lowered:
            if not _MEDIA_PATTERN.fullmatch(text):
                raise ValueError(f"{text!r} is not a content type pattern such as text/*")
        return lowered

    @field_validator("levels")
    @classmethod
    def _levels(cls, value: dict[str, int]) -> dict[str, int]:
        for encoding, level in value.items():
            low, high = _LEVEL_RANGES[encoding]
            if not low <= level <= high:
                raise ValueError(f"{encoding} level {level} is not within {low}-{high}")
        return value


#: Every filter's options model by the name used in YAML; ``proxy.filters.REGISTRY``
#: has exactly these keys (a test checks it).
FILTER_OPTIONS: Mapping[str, type[FilterOptions]] = MappingProxyType({
    model.NAME: model
    for model in (RateLimitOptions, HeadersOptions, RewriteOptions, RedirectOptions,
                  StickyOptions, AccessOptions, CompressOptions, PythonOptions)
})  # fmt: skip
FILTER_NAMES: tuple[str, ...] = tuple(FILTER_OPTIONS)


def _filter_name(value: Any) -> str | None:
    if isinstance(value, FilterOptions):
        return value.NAME
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and value:
        return "python" if "python" in value else str(next(iter(value)))
    return None


#: One item of a route's ``filters``: ``{NAME: {options}}``, ``NAME``, or
#: ``{python: module:Class, options: {...}}``.
FilterSpec = Annotated[
    Annotated[RateLimitOptions, Tag("rate_limit")]
    | Annotated[HeadersOptions, Tag("headers")]
    | Annotated[RewriteOptions, Tag("rewrite")]
    | Annotated[RedirectOptions, Tag("redirect")]
    | Annotated[StickyOptions, Tag("sticky")]
    | Annotated[AccessOptions, Tag("access")]
    | Annotated[CompressOptions, Tag("compress")]
    | Annotated[PythonOptions, Tag("python")],
    Discriminator(_filter_name),
    Kind("filter"),
]


def yaml_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """A validation error's location as the YAML has it: a python filter's fields sit
    beside ``python`` in the file, not under it (``filters[0].python.options`` ->
    ``filters[0].options``)."""
    for i in range(len(loc) - 3):
        if loc[i] == "filters" and isinstance(loc[i + 1], int) and loc[i + 2] == "python":
            return (*loc[: i + 2], *loc[i + 3 :])
    return loc
