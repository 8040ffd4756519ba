"""The configuration model: every key ``aiolb.yaml`` may hold, and every default.

Defaults live here and nowhere else. All models are frozen (a reload builds a new
``Config`` and swaps one reference) and forbid unknown keys, so a misspelt key is an
error rather than a silently ignored setting. ``Config.model_validate`` accepts the
plain data YAML produces; ``proxy.config.loader`` adds file and line numbers to the
errors. Checks that span sections (routes naming pools, clashing bind addresses,
duplicate names and upstreams) live in ``proxy.config.checks`` and are reported
together with the field errors.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Field,
    ModelWrapValidatorHandler,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from proxy.config.base import ConfigModel, Duration, Kind, Name, Size, Timeout
from proxy.config.checks import cross_check, merge_errors
from proxy.config.filters import FilterSpec, RateLimitOptions
from proxy.config.keys import parse_key
from proxy.config.log_fields import DEFAULT_FIELDS, FIELDS, is_field, parse_template
from proxy.config.values import (
    format_address,
    is_dns_url,
    is_https_url,
    parse_upstream_url,
    split_host_port,
)
from proxy.http.target import normal_target

# These two must name exactly the keys of ``proxy.balancing.REGISTRY`` (a test checks it):
# adding an algorithm adds its name to both.
BALANCER_NAMES: tuple[str, ...] = (
    "round_robin",
    "weighted_round_robin",
    "least_connections",
    "random",
    "power_of_two",
    "ip_hash",
    "consistent_hash",
    "peak_ewma",
)
BalancerName = Literal[
    "round_robin",
    "weighted_round_robin",
    "least_connections",
    "random",
    "power_of_two",
    "ip_hash",
    "consistent_hash",
    "peak_ewma",
]

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?"
_HOST = re.compile(rf"(?:\*\.)?(?:{_LABEL}\.)*{_LABEL}")


def _check_bind(value: str) -> str:
    split_host_port(value)
    return value.strip()


def _check_upstream_url(value: str) -> str:
    parse_upstream_url(value)
    return value.strip()


def _check_workers(value: object) -> int | Literal["auto"]:
    if value == "auto":
        return "auto"
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError(f"must be an integer >= 1 or 'auto', got {value!r}")


#: ``host:port`` to bind, ``[::1]:8080`` for IPv6; port 0..65535.
BindAddress = Annotated[str, AfterValidator(_check_bind), Kind("host:port")]
#: ``http://host:port`` or ``http://host`` (port 80).
UpstreamURL = Annotated[str, AfterValidator(_check_upstream_url), Kind("url")]
#: A worker process count >= 1, or ``"auto"`` for one per CPU core.
Workers = Annotated[
    int | Literal["auto"], PlainValidator(_check_workers), Kind('integer or "auto"')
]


def _option_problems(name: str, exc: ValidationError) -> str:
    found = "; ".join(_option_problem(error) for error in exc.errors())
    return f"invalid options for balancer {name!r}: {found}"


def _option_problem(error: ErrorDetails) -> str:
    key = ".".join(map(str, error["loc"]))
    kind, ctx = error["type"], error.get("ctx", {})
    if kind == "extra_forbidden":
        return f"unknown option {key!r}"
    if kind == "missing":
        return f"option {key!r} is required"
    if kind == "greater_than":
        return f"{key}: must be > {ctx['gt']}"
    return f"{key}: {error['msg'].removeprefix('Value error, ')}"


def _check_allowed_hosts(value: object) -> tuple[str, ...]:
    """``admin.allowed_hosts``: host names (lower case, IPv6 without brackets), or ``*``."""
    if not isinstance(value, list | tuple):
        raise ValueError("expected a list of host names, such as [aiolb.internal]")
    out: list[str] = []
    for item in value:
        name = str(item).strip().lower().rstrip(".")
        name = name[1:-1] if name.startswith("[") and name.endswith("]") else name
        if not name or any(c in name for c in "/@[] \t") or ("*" in name and name != "*"):
            raise ValueError(f'invalid host name {item!r}; use a name, an IP address or "*"')
        if name.count(":") == 1:
            raise ValueError(f"list host names without a port: {item!r}")
        out.append(name)
    return tuple(out)


#: Host names the admin answers (``admin.allowed_hosts``); ``*`` for any.
AllowedHosts = Annotated[
    tuple[str, ...], BeforeValidator(_check_allowed_hosts), Kind("list of host names")
]


class AdminSpec(ConfigModel):
    """The admin and metrics server. An empty ``token`` means none (no auth)."""

    bind: BindAddress = "127.0.0.1:9901"
    """Address of the admin API, the dashboard and ``/metrics``. Any address but a
    loopback one needs a token."""
    token: str | None = Field(default=None, json_schema_extra={"secret": True})
    """Bearer token the admin API asks for (``Authorization: Bearer TOKEN``); null:
    ``AIOLB_ADMIN_TOKEN`` if set, else no token."""
    allowed_hosts: AllowedHosts | None = None
    """Host names a request's ``Host`` may carry, besides loopback ones (``localhost``,
    ``127.0.0.1``, ``[::1]``) and ``bind``'s address, which are always accepted; others
    get 403 (against DNS rebinding). ``["*"]``: any. null: any when a token is set (the
    token guards the API), else only those. ``/healthz`` and ``/readyz`` answer any."""

    @field_validator("token", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @property
    def host(self) -> str:
        return split_host_port(self.bind)[0]

    @property
    def port(self) -> int:
        return split_host_port(self.bind)[1]


class ConsistentHashOptions(ConfigModel):
    """``consistent_hash``: ``key`` is ``header:NAME``, ``cookie:NAME``, ``query:NAME``,
    ``path`` or ``client_ip`` (see ``proxy.config.keys``)."""

    key: str
    """What to hash: ``header:NAME``, ``cookie:NAME``, ``query:NAME``, ``path`` or
    ``client_ip``."""

    @field_validator("key")
    @classmethod
    def _check_key(cls, value: str) -> str:
        parse_key(value)  # raises ValueError naming the accepted forms
        return value


#: ``peak_ewma``'s ``decay`` when the options leave it out, in seconds.
DEFAULT_DECAY: Final = 10.0


class PeakEwmaOptions(ConfigModel):
    """``peak_ewma``: ``decay``, how long latencies are remembered (see
    ``proxy.balancing.peak_ewma``)."""

    decay: Annotated[Duration, Field(gt=0)] = DEFAULT_DECAY
    """How long latencies are remembered."""


#: Options model per balancer name; a balancer not listed here takes no options.
#: The pool hands the balancer the validated values (durations in seconds, defaults
#: filled in), not what the YAML said.
BALANCER_OPTIONS: Mapping[str, type[BaseModel]] = MappingProxyType(
    {"consistent_hash": ConsistentHashOptions, "peak_ewma": PeakEwmaOptions}
)


class ListenerTimeoutsSpec(ConfigModel):
    """Client-side timeouts, in seconds.

    ``header``: time to receive a complete request header (then 408). ``idle``: time a
    keep-alive connection may sit between requests. ``body``: longest gap between two
    reads of a request body.
    """

    header: Timeout = 10.0
    """Time to receive a complete request head (then 408)."""
    idle: Timeout = 60.0
    """Time a keep-alive connection may wait for its next request."""
    body: Timeout = 60.0
    """Longest gap between two reads of a request body (then 408); also how long an
    upstream may take none of a request body before the request fails (504)."""
    send: Timeout = 60.0
    """How long a client may read nothing of a response while the proxy has more to
    send (its write buffer full); then the connection is closed, freeing its upstream
    connection (nginx's ``send_timeout``)."""


class LimitsSpec(ConfigModel):
    """Request size limits, in bytes (ints or sizes such as ``64KiB``, see ``parse_size``).

    ``max_header_size``: the whole request head (else 431). ``max_uri_size``: the request
    target (else 414). ``max_body_size``: the request body (else 413); None = unlimited,
    since bodies stream and nothing is buffered. ``max_requests_per_connection``: the
    response to the last one says ``Connection: close`` (nginx's ``keepalive_requests``),
    which also re-spreads long-lived clients over the workers; None = unlimited.
    """

    max_header_size: Annotated[Size, Field(ge=1)] = 65536
    """Largest request head (then 431)."""
    max_uri_size: Annotated[Size, Field(ge=1)] = 8192
    """Longest request target (then 414)."""
    max_body_size: Annotated[Size, Field(ge=0)] | None = None
    """Largest request body (then 413); null: unlimited (bodies stream)."""
    max_requests_per_connection: Annotated[int, Field(ge=1)] | None = 1000
    """Requests per client connection; the last answer says ``Connection: close``
    (nginx's ``keepalive_requests``). null: unlimited."""
    body_buffer_size: Annotated[Size, Field(ge=0, le=16 * 1024 * 1024)] = 65536
    """A request body up to this size is read whole before an upstream connection is
    taken, so a client that sends it slowly holds no upstream connection (nginx's
    ``proxy_request_buffering`` with ``client_body_buffer_size``, in memory only);
    larger bodies stream. 0: every body streams at once."""
    max_headers: Annotated[int, Field(ge=1)] = 100
    """Most header lines in a request head (then 431): Envoy's ``max_headers_count``."""
    underscores_in_headers: bool = False
    """Forward request headers whose names contain ``_``. Off (nginx's default): they
    are dropped, since CGI and WSGI read ``X_Forwarded_Proto`` as the proxy's own
    ``X-Forwarded-Proto``."""


class MatchSpec(ConfigModel):
    """What a request must look like to take a route; both parts must match.

    ``host``: an exact host (``api.example.com``) or a wildcard (``*.example.com``, which
    matches any subdomain but not ``example.com`` itself), stored lower-case, without a
    port; None matches every host. ``path_prefix``: the request's normalised target
    (``proxy.http.target``) starts with it, so it must be written normalised itself.
    """

    host: str | None = None
    """``api.example.com`` or ``*.example.com`` (subdomains only); null: any host."""
    path_prefix: str = "/"
    """The request path starts with this, after normalisation (RFC 3986: `%61` is `a`,
    other escapes in upper case, `//`, `/./` and `/x/../` merged or removed)."""

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host = value.strip().lower()
        if host.startswith("[") and host.endswith("]"):
            return host
        if ":" in host:
            raise ValueError(f"host must not include a port: {value!r}")
        if not _HOST.fullmatch(host):
            raise ValueError(f"invalid host {value!r}; use a name such as api.example.com "
                             "or a wildcard such as *.example.com")  # fmt: skip
        return host

    @field_validator("path_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"must start with '/', got {value!r}")
        if not value.isascii() or not value.isprintable() or " " in value:
            raise ValueError(f"must be printable ASCII without spaces, got {value!r}")
        normal = normal_target(value.encode() + b"x")  # "x": a prefix may end in a segment
        if normal != value.encode() + b"x":
            written = "" if normal is None else f"; write {normal[:-1].decode()!r}"
            raise ValueError(f"{value!r} can never match a normalised request path{written}")
        return value


#: ``Upgrade`` protocols a route may tunnel (RFC 9110 7.8): lower-case tokens.
_UPGRADE_TOKEN = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")


def _check_upgrades(value: list[str]) -> tuple[str, ...]:
    out: list[str] = []
    for item in value:
        token = item.strip().lower()
        if token == "h2c":
            raise ValueError("h2c upgrades are never forwarded (aiolb speaks HTTP/1.1 to "
                             "upstreams); remove 'h2c'")  # fmt: skip
        if not _UPGRADE_TOKEN.fullmatch(token):
            raise ValueError(f"invalid upgrade protocol {item!r}; use a token such as websocket")
        out.append(token)
    return tuple(out)


#: Upgrade protocols (``websocket``), lower-case; ``h2c`` is refused.
Upgrades = Annotated[
    tuple[str, ...],
    BeforeValidator(list),
    AfterValidator(_check_upgrades),
    Kind("list of protocols"),
]
#: ``true`` (redirect to ``https://host/...``), a port (``https://host:PORT/...``), or false.
RedirectHTTPS = bool | Annotated[int, Field(ge=1, le=65535)]


class RouteSpec(ConfigModel):
    """Send requests that ``match`` to the pool named ``pool``, through ``filters`` and
    its ``cache``.

    ``upgrades``: the ``Upgrade`` protocols this route tunnels (a ``101`` from the
    upstream turns the connection into a byte tunnel); a request for another one gets
    403. ``redirect_https``: answer with ``308`` to the same URL on https (true: the
    default port, a number: that port) instead of forwarding; no pool is needed then.
    None: the listener's ``redirect_https``.
    """

    name: Name | None = None
    """The route's name: the ``route`` label of ``aiolb_rate_limited_total``, the
    dashboard, log lines and rate-limit keys; unique in the config. null:
    ``LISTENER/INDEX`` (``public/0``: the listener's first route)."""
    match: MatchSpec = MatchSpec()
    """What a request must look like to take this route (both parts must match)."""
    pool: str | None = None
    """The pool that serves the requests this route matches (required unless the route
    redirects to https)."""
    upgrades: Upgrades = ("websocket",)
    """``Upgrade`` protocols tunnelled after a ``101`` (others get 403; ``h2c`` is never
    forwarded); ``[]`` refuses every Upgrade."""
    redirect_https: RedirectHTTPS | None = None
    """``true`` or a port: answer ``308`` to the same URL on https instead of
    forwarding; ``false``: forward; null: the listener's ``redirect_https``."""
    cache: str | None = None
    """A cache (``caches``) for the responses of this route; null: none, nothing of the
    cache runs."""
    filters: list[FilterSpec] = []
    """Traffic policy, in order: ``rate_limit``, ``headers``, ``rewrite``, ``redirect``,
    ``sticky``, ``access``, ``python`` (see "Filters" below); [] runs none."""

    @model_validator(mode="after")
    def _distinct_rate_limits(self) -> RouteSpec:
        names = [f.name for f in self.filters if isinstance(f, RateLimitOptions)]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"two rate_limit filters named {name!r}: give each its own "
                                 "name (the filter label)")  # fmt: skip
        return self


class BalancerSpec(ConfigModel):
    """Which algorithm a pool uses, and its options.

    YAML takes either a name (``balancer: round_robin``) or a mapping whose ``name`` is
    the algorithm and whose other keys are its options (``{name: consistent_hash, key:
    "header:X-User"}``); the dumped form ``{name: ..., options: {...}}`` is accepted too.
    """

    name: BalancerName = "round_robin"
    """The algorithm."""
    options: dict[str, Any] = {}
    """The algorithm's options (in YAML, the mapping's other keys)."""

    @model_validator(mode="before")
    @classmethod
    def _from_yaml(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"name": data}
        if not isinstance(data, Mapping):
            return data
        if set(data) <= {"name", "options"} and isinstance(data.get("options", {}), Mapping):
            return data
        options = {key: value for key, value in data.items() if key != "name"}
        return {"name": data["name"], "options": options} if "name" in data else data

    @model_validator(mode="after")
    def _check_options(self) -> BalancerSpec:
        model = BALANCER_OPTIONS.get(self.name)
        if model is None and self.options:
            keys = ", ".join(repr(key) for key in self.options)
            raise ValueError(f"balancer {self.name!r} takes no options, got {keys}")
        if model is not None:
            try:
                parsed = model.model_validate(self.options)
            except ValidationError as exc:
                raise ValueError(_option_problems(self.name, exc)) from None
            # frozen: store the validated values once, as the balancer will read them
            object.__setattr__(self, "options", parsed.model_dump())
        return self


class PoolTimeoutsSpec(ConfigModel):
    """Upstream-side timeouts, in seconds.

    ``connect``: TCP connect, and the TLS handshake for https upstreams (then 502 or a
    retry). ``response_header``: from the request
    sent to the complete response head (then 504). ``idle``: how long an idle keep-alive
    connection stays pooled. ``read``: longest gap between two upstream reads once the
    response started.
    """

    connect: Timeout = 3.0
    """TCP connect to an upstream (then 502, or a retry)."""
    response_header: Timeout = 30.0
    """From the request sent to the complete response head (then 504)."""
    idle: Timeout = 60.0
    """How long an idle keep-alive upstream connection stays pooled."""
    read: Timeout = 60.0
    """Longest gap between two upstream reads once the response started."""
    send: Timeout = 60.0
    """Longest an upstream may take none of a request body (its connection's write
    buffer full) before the request fails (504, or closed mid-response): nginx's
    ``proxy_send_timeout``."""
    tunnel_idle: Timeout = 3600.0
    """An Upgrade tunnel (WebSocket) with no traffic either way for this long is
    closed."""


def _parse_statuses(value: object) -> tuple[tuple[int, int], ...]:
    """``200``, ``"200-399"`` or a list of those -> inclusive ``(low, high)`` ranges."""
    items = value if isinstance(value, list | tuple) else [value]
    ranges: list[tuple[int, int]] = []
    for item in items:
        if isinstance(item, list | tuple) and len(item) == 2:  # the dumped (low, high) form
            item = f"{item[0]}-{item[1]}"
        text = str(item).strip()
        low, dash, high = text.partition("-")
        try:
            lo, hi = int(low), int(high) if dash else int(low)
        except ValueError:
            raise ValueError(
                f'invalid status {item!r}; use a code (200) or a range ("200-399")'
            ) from None
        if not 100 <= lo <= hi <= 599:
            raise ValueError(f"invalid status range {item!r}; codes are 100-599, low first")
        ranges.append((lo, hi))
    if not ranges:
        raise ValueError("list at least one status code or range")
    return tuple(ranges)


#: Expected status codes: inclusive ranges, from ``200``, ``"200-399"`` or a list.
StatusRanges = Annotated[
    tuple[tuple[int, int], ...],
    PlainValidator(_parse_statuses),
    Kind("statuses"),
    PlainSerializer(lambda ranges: [f"{lo}-{hi}" if lo != hi else lo for lo, hi in ranges]),
]


class ActiveHealthCheckSpec(ConfigModel):
    """Probes sent to each upstream every ``interval`` (give or take ``jitter``).

    ``type: http`` sends ``method path`` (with ``host`` as the Host header when set) and
    expects a status in ``expected_status``; ``type: tcp`` only connects. The state
    flips after ``unhealthy_threshold`` consecutive failures or ``healthy_threshold``
    consecutive successes (HAProxy's ``fall``/``rise``). ``initial_state`` applies to
    upstreams the proxy has not seen before (a cold start serves at once by default).
    """

    type: Literal["http", "tcp"] = "http"
    """``http`` sends a request; ``tcp`` only connects."""
    path: str = "/"
    """Path the probe requests."""
    method: Literal["GET", "HEAD"] = "GET"
    """Method of the probe."""
    host: str | None = None
    """``Host`` header of the probe; null: the upstream's own ``host:port``."""
    expected_status: StatusRanges = ((200, 399),)
    """Statuses that pass: a code, a range (``"200-399"``) or a list of both."""
    interval: Timeout = 5.0
    """Time between two probes of one upstream."""
    jitter: Annotated[Duration, Field(ge=0)] | None = None
    """Random spread added to each interval, so probes do not march in step; null: 10%
    of ``interval``."""
    timeout: Timeout = 1.0
    """A probe without an answer in this time fails."""
    healthy_threshold: Annotated[int, Field(ge=1)] = 2
    """Consecutive passes that bring an upstream back (HAProxy's ``rise``)."""
    unhealthy_threshold: Annotated[int, Field(ge=1)] = 3
    """Consecutive failures that take an upstream down (HAProxy's ``fall``)."""
    initial_state: Literal["healthy", "unhealthy"] = "healthy"
    """State of an upstream not seen before; ``unhealthy`` keeps it out until it passes."""

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        if not value.startswith("/") or not value.isascii() or not value.isprintable() \
                or " " in value:  # fmt: skip
            raise ValueError(f"must be an origin-form path such as /healthz, got {value!r}")
        return value

    @property
    def spread(self) -> float:
        return self.interval / 10 if self.jitter is None else self.jitter


class PassiveHealthCheckSpec(ConfigModel):
    """Outlier detection from real traffic (Envoy's ``outlier_detection``).

    ``consecutive_failures`` connect errors, timeouts or resets in a row (and 5xx
    responses when ``consecutive_5xx``) eject the upstream for ``ejection_time`` times
    the number of times it was ejected, at most ``max_ejection_time``. At most
    ``max_ejection_percent`` of a pool is ejected at once, and never its last available
    upstream.
    """

    consecutive_failures: Annotated[int, Field(ge=1)] = 5
    """Connect errors, timeouts or resets in a row that eject an upstream."""
    consecutive_5xx: bool = False
    """Count 5xx responses as failures too."""
    ejection_time: Timeout = 30.0
    """How long an ejection lasts, times the number of times the upstream was ejected."""
    max_ejection_time: Timeout = 300.0
    """The longest an ejection lasts."""
    max_ejection_percent: Annotated[int, Field(ge=0, le=100)] = 50
    """Most of a pool ejected at once; the last available upstream is never ejected."""


class HealthCheckSpec(ConfigModel):
    """``active`` probes are off unless configured (``active: {}`` takes every default);
    ``passive`` outlier detection is on by default (``passive: null`` turns it off)."""

    active: ActiveHealthCheckSpec | None = None
    """Active probes; null: none (``active: {}`` probes with every default)."""
    passive: PassiveHealthCheckSpec | None = PassiveHealthCheckSpec()
    """Outlier detection on real traffic; null: off."""


RETRY_CONDITIONS: tuple[str, ...] = ("connect_failure", "reset_before_response", "timeout")


def _check_retry_on(value: object) -> tuple[str | int, ...]:
    items = value if isinstance(value, list | tuple) else [value]
    out: list[str | int] = []
    for item in items:
        if isinstance(item, str) and item in RETRY_CONDITIONS:
            out.append(item)
            continue
        text = str(item).strip()
        if text.isdigit() and 400 <= int(text) <= 599:
            out.append(int(text))
            continue
        names = ", ".join(RETRY_CONDITIONS)
        raise ValueError(f"unknown retry condition {item!r}; use {names} or a status 400-599")
    return tuple(out)


#: Retry conditions: the names in ``RETRY_CONDITIONS`` and status codes.
RetryOn = Annotated[
    tuple[str | int, ...],
    PlainValidator(_check_retry_on),
    PlainSerializer(list),
    Kind("list of conditions"),
]


class BackoffSpec(ConfigModel):
    """Wait before retry n: a random time up to ``min(max, base * 2**(n-1))`` (full jitter)."""

    base: Annotated[Duration, Field(ge=0)] = 0.025
    """The first retry waits up to this; each later one up to twice the one before."""
    max: Annotated[Duration, Field(ge=0)] = 0.25
    """The longest wait before a retry."""


class RetryBudgetSpec(ConfigModel):
    """Retries may add at most ``percent`` % to a pool's requests (over about ten
    seconds), plus a reserve of ``min_retries_per_second`` so that a quiet or freshly
    started pool can still retry (Finagle's ``minRetriesPerSec``)."""

    percent: Annotated[float, Field(ge=0, le=100)] = 20.0
    """Retries may add at most this percentage to the pool's requests."""
    min_retries_per_second: Annotated[float, Field(ge=0)] = 10.0
    """Retries always allowed on top, refilled every second (at most one second's worth
    held), so that a quiet or freshly started pool can retry at all."""

    @model_validator(mode="before")
    @classmethod
    def _replaced_key(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "min_retries" in data:
            raise ValueError(
                "'min_retries' (a fixed reserve of retries) was replaced by "
                "'min_retries_per_second' (a reserve that refills every second; "
                "default 10): rename the key"
            )
        return data


class RetriesSpec(ConfigModel):
    """Try a failed request again on another upstream.

    ``attempts`` counts every try, the first included (nginx's
    ``proxy_next_upstream_tries``): the default 2 is one retry. Only safe requests are
    retried: idempotent methods, or any method when nothing reached the upstream; a
    request body only while it fits ``buffer``. ``per_try_timeout``: from the request
    sent to the response head, per try (default: ``timeouts.response_header``).
    """

    attempts: Annotated[int, Field(ge=1)] = 2
    """Tries in all, the first included (2: one retry)."""
    retry_on: RetryOn = ("connect_failure", "reset_before_response")
    """Failures that are retried: ``connect_failure``, ``reset_before_response``,
    ``timeout`` and status codes such as ``502``, ``503``, ``504``."""
    per_try_timeout: Timeout | None = None
    """From the request sent to the response head, per try; null:
    ``timeouts.response_header``."""
    backoff: BackoffSpec = BackoffSpec()
    """Wait before each retry: exponential, with full jitter."""
    budget: RetryBudgetSpec = RetryBudgetSpec()
    """How much retrying the pool may do."""
    buffer: Annotated[Size, Field(ge=0)] = 65536
    """Request bodies up to this size are kept for a retry; larger ones are not retried."""


class CircuitBreakerSpec(ConfigModel):
    """Bounds on what one pool may hold (Envoy's circuit breakers, HAProxy's
    ``maxconn``/``timeout queue``): ``max_connections`` open connections per upstream
    (an upstream's own ``max_connections`` overrides it); requests beyond wait, at most
    ``max_pending`` per pool for at most ``queue_timeout``; more answer 503 at once."""

    max_connections: Annotated[int, Field(ge=1)] = 1024
    """Open connections per upstream."""
    max_pending: Annotated[int, Field(ge=0)] = 1024
    """Requests waiting for a connection, per pool; more get 503 at once."""
    queue_timeout: Timeout = 5.0
    """The longest a request waits for a connection (then 503)."""


TLSVersion = Literal["TLSv1.2", "TLSv1.3"]


class CertificateSpec(ConfigModel):
    """A certificate chain (PEM, the leaf first) and its private key (PEM)."""

    cert: str
    """PEM file: the certificate, then its intermediates."""
    key: str
    """PEM file: the certificate's private key."""


class ListenerTLSSpec(ConfigModel):
    """TLS termination on a listener.

    ``certificates``: the first is the default; the others are chosen by SNI, by the
    names in their subjectAltName (``*.example.com`` wildcards too). ``min_version``:
    the oldest protocol accepted. ``ciphers``: an OpenSSL cipher string for TLS 1.2
    (None: Python's secure defaults; TLS 1.3 suites are OpenSSL's). ``client_ca``: a
    PEM file of CAs; set, every client must present a certificate signed by one (mTLS).
    """

    certificates: Annotated[list[CertificateSpec], Field(min_length=1)]
    """The first is the default; the others are chosen by SNI, by the names in their
    subjectAltName (wildcards too)."""
    min_version: TLSVersion = "TLSv1.2"
    """The oldest TLS version accepted."""
    ciphers: str | None = None
    """An OpenSSL cipher string for TLS 1.2; null: Python's secure defaults."""
    client_ca: str | None = None
    """PEM file of CAs; set, every client must present a certificate one of them signed
    (mTLS)."""


class UpstreamTLSSpec(ConfigModel):
    """How a pool talks TLS to its ``https://`` upstreams.

    ``ca``: a PEM file of CAs to verify upstream certificates with (None: the system's
    store). ``server_name``: the SNI and verification name (None: each url's host).
    ``cert``/``key``: a client certificate to present. ``verify: false`` accepts any
    certificate (logged as a warning at start): only when written out.
    """

    ca: str | None = None
    """PEM file of CAs to verify the upstreams' certificates with; null: the system's
    store."""
    server_name: str | None = None
    """The SNI and verification name; null: each url's host."""
    cert: str | None = None
    """PEM file: a client certificate to present (with ``key``)."""
    key: str | None = None
    """PEM file: the client certificate's private key."""
    verify: bool = True
    """``false`` accepts any certificate (a warning at start)."""
    min_version: TLSVersion = "TLSv1.2"
    """The oldest TLS version used."""

    @model_validator(mode="after")
    def _pair(self) -> UpstreamTLSSpec:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together: set both or neither")
        return self


class UpstreamSpec(ConfigModel):
    """One upstream server. ``backup`` ones serve only when no primary is available."""

    url: UpstreamURL
    """``http://host:port`` (``http://host``: port 80), ``https://host:port`` (TLS;
    ``https://host``: port 443), or ``dns://name:port`` for one upstream per address
    ``name`` resolves to."""
    name: Name | None = None
    """What the dashboard and ``/api/pools`` call this upstream; null: its
    ``host:port``."""
    weight: Annotated[int, Field(ge=1)] = 1
    """Share of the traffic, relative to the pool's other upstreams."""
    backup: bool = False
    """Serve only while no primary upstream is available."""
    max_connections: Annotated[int, Field(ge=1)] | None = None
    """Open connections to this upstream; null: the pool's
    ``circuit_breaker.max_connections``."""

    @property
    def host(self) -> str:
        """Lower-case host; an IPv6 literal without brackets (ready for ``connect``)."""
        return parse_upstream_url(self.url)[0]

    @property
    def port(self) -> int:
        return parse_upstream_url(self.url)[1]

    @property
    def address(self) -> str:
        """``host:port`` (``[::1]:80`` for IPv6): the upstream's identity and metric label."""
        return format_address(*parse_upstream_url(self.url))

    @property
    def label(self) -> str:
        """The upstream's display name: ``name``, else its address."""
        return self.name or self.address

    @property
    def dns(self) -> bool:
        """``url: dns://name:port``: this entry stands for every address ``name`` has."""
        return is_dns_url(self.url)

    @property
    def https(self) -> bool:
        """``url: https://...``: the proxy talks TLS to this upstream."""
        return is_https_url(self.url)

    def resolved(self, host: str) -> UpstreamSpec:
        """This entry for one address ``name`` resolved to (same weight, backup, limits)."""
        return self.model_copy(update={"url": f"http://{format_address(host, self.port)}"})


class PoolSpec(ConfigModel):
    """A set of upstreams behind one balancer.

    ``max_idle_connections``: idle keep-alive connections kept per upstream; None (the
    default) keeps every connection that ends a response cleanly, up to the upstream's
    ``max_connections``, and ``timeouts.idle`` trims the ones not used (HAProxy's and
    Envoy's unbounded idle pools). A lower cap closes connections a steady load needs
    again a moment later.
    """

    balancer: BalancerSpec = BalancerSpec()
    """``NAME`` or ``{name: NAME, ...options}``: ``round_robin``,
    ``weighted_round_robin``, ``least_connections``, ``random``, ``power_of_two``,
    ``ip_hash``, ``consistent_hash`` (option ``key``), ``peak_ewma`` (option ``decay``)."""
    upstreams: Annotated[list[UpstreamSpec], Field(min_length=1)]
    """The servers behind the pool."""
    timeouts: PoolTimeoutsSpec = PoolTimeoutsSpec()
    """Upstream-side timeouts."""
    max_idle_connections: Annotated[int, Field(ge=0)] | None = None
    """Idle keep-alive connections kept per upstream; null: every connection that ends a
    response cleanly, up to the upstream's ``max_connections`` (``timeouts.idle`` trims
    the ones not used)."""
    slow_start: Annotated[Duration, Field(gt=0)] | None = None
    """Time over which an upstream that became available ramps its weight from 10% to
    100% (HAProxy's ``slowstart``); null: at once."""
    health_check: HealthCheckSpec = HealthCheckSpec()
    """Active probes and passive outlier detection."""
    retries: RetriesSpec = RetriesSpec()
    """Trying a failed request again on another upstream."""
    circuit_breaker: CircuitBreakerSpec = CircuitBreakerSpec()
    """Bounds on connections and waiting requests."""
    dns_refresh: Timeout = 5.0
    """How often ``dns://`` upstreams are resolved again (sooner when a record's TTL is
    shorter and the resolver reports it)."""
    dns_resolver: BindAddress | None = None
    """``host:port`` of a DNS server to ask directly (honours TTLs); null: the system
    resolver (``/etc/hosts``, search domains)."""
    tls: UpstreamTLSSpec | None = None
    """TLS to the pool's ``https://`` upstreams; null: verified against the system's CA
    store, SNI from each url's host."""

    @model_validator(mode="after")
    def _tls_needs_https(self) -> PoolSpec:
        if self.tls is not None and not any(spec.https for spec in self.upstreams):
            raise ValueError("tls applies to https:// upstreams; this pool has none")
        return self


class ListenerSpec(ConfigModel):
    """One address clients connect to, with its routes (the first match wins).

    ``tls``: terminate HTTPS here (None: plain HTTP). ``redirect_https`` (plain-HTTP
    listeners only): every route answers ``308`` to the https URL unless it says
    otherwise; such a listener needs no routes.
    """

    name: Name
    """Used in logs and in the ``listener`` metric label."""
    bind: BindAddress
    """``host:port`` clients connect to: ``0.0.0.0:8080`` for every IPv4 address,
    ``[::]:8080`` for IPv6, port 0 for any free port."""
    routes: list[RouteSpec] = []
    """Where requests go; the first match wins, none answers 404. Required unless the
    listener redirects to https."""
    timeouts: ListenerTimeoutsSpec = ListenerTimeoutsSpec()
    """Client-side timeouts."""
    limits: LimitsSpec = LimitsSpec()
    """Request size limits."""
    tls: ListenerTLSSpec | None = None
    """Terminate HTTPS here; null: plain HTTP."""
    redirect_https: RedirectHTTPS = False
    """Plain-HTTP listeners: ``true`` (or a port) makes every route answer ``308`` to the
    https URL unless the route says otherwise."""
    forwarded: Literal["drop", "replace", "append"] = "drop"
    """The RFC 7239 ``Forwarded`` request header. ``drop``: the client's is removed and
    none is sent (``X-Forwarded-*`` say the same); ``replace``: the client's is removed
    and aiolb sends ``Forwarded: for=CLIENT;proto=SCHEME``; ``append``: the client's is
    kept and aiolb's element follows it (only behind a proxy you trust to set it, like
    ``X-Forwarded-For``). Never passed on unchecked: an application that prefers
    ``Forwarded`` would trust a client's spoofed one."""

    @property
    def host(self) -> str:
        """The host to bind; an IPv6 literal without brackets."""
        return split_host_port(self.bind)[0]

    @property
    def port(self) -> int:
        """The configured port; 0 means the system picks one."""
        return split_host_port(self.bind)[1]

    def route_names(self) -> list[str]:
        """Each route's ``name``, else ``LISTENER/INDEX``."""
        return [r.name or f"{self.name}/{i}" for i, r in enumerate(self.routes)]


class MetricsSpec(ConfigModel):
    """Hot-path counters behind ``/metrics``; ``enabled: false`` skips recording."""

    enabled: bool = True
    """Record the hot-path counters behind ``/metrics`` (an access log records them
    anyway: its lines are written where requests are counted)."""


def _check_log_format(value: object) -> str | tuple[str, ...]:
    """A list of field names (a JSON line with those keys) or a ``$field`` template."""
    if isinstance(value, str):
        parse_template(value)  # raises ValueError naming the unknown field
        return value
    if isinstance(value, list | tuple) and value and all(isinstance(v, str) for v in value):
        unknown = [name for name in value if not is_field(name)]
        if unknown:
            raise ValueError(f"unknown access log field {unknown[0]!r}; fields: "
                             f"{', '.join(FIELDS)}, http_NAME")  # fmt: skip
        if len(set(value)) != len(value):
            raise ValueError("each access log field may be listed once")
        return tuple(value)
    raise ValueError("must be a list of field names or a template string such as "
                     "'$client \"$method $path\" $status'")  # fmt: skip


#: What an access log line holds: a list of fields (JSON) or a template (text).
LogFormat = Annotated[
    str | tuple[str, ...],
    PlainValidator(_check_log_format),
    PlainSerializer(lambda value: value if isinstance(value, str) else list(value)),
    Kind("field list or template"),
]


class AccessLogSpec(ConfigModel):
    """One line per request: ``path: stdout`` (or ``-``) or a file path.

    Lines are buffered and written by a background thread: a slow or full disk never
    blocks the event loop; lines that cannot be written are dropped and counted.
    """

    path: str = "stdout"
    """``stdout`` (or ``-``), or a file, opened for appending."""
    format: LogFormat = DEFAULT_FIELDS
    """A list of fields (one JSON object per line, keys in that order), or a text
    template like nginx's ``log_format``, ``$field`` or ``${field}`` for a value (``$$``:
    a dollar sign). Fields: ``time``, ``client``, ``method``, ``path``, ``status``,
    ``bytes_in``, ``bytes_out``, ``duration_ms``, ``host``, ``user_agent``,
    ``listener``, ``pool``, ``upstream``, ``upstream_name``, ``attempts``,
    ``request_id``, ``upstream_status``, ``upstream_connect_time``,
    ``upstream_header_time``, ``referer``, ``http_NAME`` for any request header
    (nginx's ``$http_NAME``: ``http_x_custom`` is ``X-Custom``), and ``trace_id`` (the
    trace sent upstream: ``tracing`` on, a routed request). The default is every field
    but ``upstream_name`` and the ones added after it (``upstream_status`` on)."""


class CacheRedisStoreSpec(ConfigModel):
    """A cache store in Redis, shared by every worker and every instance that uses it."""

    type: Literal["redis"]
    """``redis``."""
    url: str = "redis://127.0.0.1:6379/0"
    """The Redis server (``redis://[:password@]host:port/db``, or ``rediss://`` for TLS)."""
    key_prefix: str = "aiolb:"
    """Prefix of every key the cache writes; caches on one Redis need different ones."""
    timeout: Timeout = 0.25
    """A Redis operation slower than this counts as an error: the request bypasses
    the cache."""

    @model_validator(mode="after")
    def _check(self) -> CacheRedisStoreSpec:
        if not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"url must start with redis://, rediss:// or unix://, got {self.url!r}"
            )
        if importlib.util.find_spec("redis") is None:
            raise ValueError("the redis store needs the redis package: pip install 'aiolb[redis]'")
        return self


#: Conditions under which a stale entry is served instead of an upstream's failure.
USE_STALE: tuple[str, ...] = ("error", "timeout")


def _check_use_stale(value: object) -> tuple[str | int, ...]:
    items = value if isinstance(value, list | tuple) else [value]
    out: list[str | int] = []
    for item in items:
        if isinstance(item, str) and item in USE_STALE:
            out.append(item)
        elif str(item).strip().isdigit() and 500 <= int(str(item)) <= 599:
            out.append(int(str(item)))
        else:
            raise ValueError(f"unknown condition {item!r}; use error, timeout or a status "
                             "500-599")  # fmt: skip
    return tuple(out)


#: When a stale entry may stand in for a failure: the names in ``USE_STALE`` and statuses.
UseStale = Annotated[
    tuple[str | int, ...],
    PlainValidator(_check_use_stale),
    PlainSerializer(list),
    Kind("list of conditions"),
]


class CacheSpec(ConfigModel):
    """A shared HTTP cache (RFC 9111) that routes opt into with ``cache: NAME``."""

    store: Literal["memory"] | CacheRedisStoreSpec = "memory"
    """``memory`` (per process, LRU) or ``{type: redis, url: ..., key_prefix: ...}``."""
    max_size: Annotated[Size, Field(ge=1)] = 256 * 1024 * 1024
    """Memory store: bytes of heads and bodies held; the least recently used go first."""
    max_object_size: Annotated[Size, Field(ge=0)] = 8 * 1024 * 1024
    """Larger responses stream through uncached."""
    default_ttl: Annotated[Duration, Field(gt=0)] | None = None
    """Freshness for responses that carry none but are heuristically cacheable (200,
    301, 404, ...); null: only explicitly fresh responses are stored (RFC 9111 4.2.2
    heuristics off)."""
    keep_stale: Annotated[Duration, Field(ge=0)] = 3600.0
    """How long an entry is kept after it turns stale: to revalidate it with a
    conditional request, and to serve it when every upstream fails."""
    lock_timeout: Annotated[Duration, Field(ge=0)] = 5.0
    """Concurrent misses for one key wait this long for the first one's response
    (request collapsing, nginx's ``proxy_cache_lock``), then go upstream themselves."""
    use_stale: UseStale = ("error", "timeout", 502, 503, 504)
    """When the upstream fails this way (``error``: no upstream available, refused or
    reset; ``timeout``; a status), a stored response is served however stale, unless it
    says ``must-revalidate``/``proxy-revalidate`` (nginx ``proxy_cache_use_stale``)."""
    surrogate_control: bool = True
    """Read the upstream's ``Surrogate-Control`` (untargeted or ``;aiolb`` directives
    replace ``Cache-Control``'s for this cache; a header with some is not passed on:
    one with only other devices' is), and send
    ``Surrogate-Capability: aiolb="Surrogate/1.0"`` upstream (Edge Architecture
    Specification 1.0, as Fastly and Varnish do); false: the header passes through."""


class TracingSpec(ConfigModel):
    """OpenTelemetry traces: W3C ``traceparent`` to the upstreams, spans over OTLP/HTTP.

    Every request routed to a pool carries a ``traceparent`` upstream (the client's
    trace continued, or a new one); a sampled request also makes a SERVER span and a
    CLIENT span per upstream attempt, exported by each worker in batches. Without this
    section the trace headers pass through untouched and nothing is added.
    """

    endpoint: str
    """The OTLP/HTTP collector: ``http://collector:4318`` (``/v1/traces`` is added to a
    URL without a path) or the full URL to POST to."""
    protocol: Literal["http/protobuf"] = "http/protobuf"
    """The OTLP transport; ``http/protobuf`` is the one there is."""
    sample_rate: Annotated[float, Field(ge=0.0, le=1.0)] = 0.01
    """The share of new traces sampled (0 to 1); a client's ``traceparent`` decides
    for its own requests (parent-based sampling; ingress-nginx's default ratio)."""
    service_name: str = "aiolb"
    """The ``service.name`` of the spans' resource."""
    headers: dict[str, str] = Field(default={}, json_schema_extra={"secret": True})
    """Headers sent with every export (a vendor's API key, ``Authorization``)."""

    @field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")) or len(value.split("/")) < 3 or not (
            value.split("/")[2]
        ):
            raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
        return value

    @property
    def url(self) -> str:
        """Where spans are POSTed: ``endpoint``, with ``/v1/traces`` when it has no path."""
        rest = self.endpoint.split("://", 1)[1]
        return self.endpoint.rstrip("/") + "/v1/traces" if "/" not in rest.rstrip("/") else (
            self.endpoint
        )


class Config(ConfigModel):
    """The whole configuration: at least one listener and one pool."""

    listeners: Annotated[list[ListenerSpec], Field(min_length=1)]
    """Addresses clients connect to, each with its routes."""
    pools: Annotated[dict[Name, PoolSpec], Field(min_length=1)]
    """Sets of upstreams by name; routes name them."""
    caches: dict[Name, CacheSpec] = {}
    """HTTP caches by name; routes opt in with ``cache: NAME``."""
    admin: AdminSpec = AdminSpec()
    """The admin API, dashboard and metrics listener."""
    metrics: MetricsSpec = MetricsSpec()
    """Prometheus metrics."""
    access_log: AccessLogSpec | None = None
    """One line per request; null: no access log."""
    workers: Workers = 1
    """Worker processes; ``auto``: one per CPU core (``aiolb run --workers`` overrides)."""
    shutdown_timeout: Timeout = 30.0
    """On SIGTERM, how long in-flight requests may take before connections are cut."""
    tracing: TracingSpec | None = None
    """OpenTelemetry traces (OTLP/HTTP); null: none, trace headers pass through."""
    pid_file: str | None = None
    """Write the process id here once the listeners and admin API are bound (the
    supervisor's, with workers) and remove it on exit if it still holds it; a start that
    fails leaves the file alone. ``aiolb reload`` and ``aiolb stop`` signal it when the
    admin API cannot be reached. null: no file."""

    @property
    def records_requests(self) -> bool:
        """Whether finished requests are recorded: for the metrics, or for the access
        log, whose line is written where a request is counted (``metrics.enabled:
        false`` with an access log still counts, rather than logging nothing)."""
        return self.metrics.enabled or self.access_log is not None

    @model_validator(mode="wrap")
    @classmethod
    def _cross_check(cls, data: Any, handler: ModelWrapValidatorHandler[Config]) -> Config:
        """Run ``checks.cross_check`` on the input and report its errors with the rest."""
        problems = cross_check(data) if isinstance(data, Mapping) else []
        try:
            config = handler(data)
        except ValidationError as exc:
            if not problems:
                raise
            raise merge_errors(cls.__name__, exc, problems) from None
        if problems:
            raise merge_errors(cls.__name__, None, problems)
        return config
