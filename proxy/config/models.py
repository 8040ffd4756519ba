"""The configuration model: ``Config``, the root of every key ``aiolb.yaml`` may hold.

Defaults live in the models and nowhere else. All models are frozen (a reload builds a
new ``Config`` and swaps one reference) and forbid unknown keys, so a misspelt key is
an error rather than a silently ignored setting. ``Config.model_validate`` accepts the
plain data YAML produces; ``proxy.config.loader`` adds file and line numbers to the
errors. Checks that span sections (routes naming pools, clashing bind addresses,
duplicate names and upstreams) live in ``proxy.config.checks`` and are reported
together with the field errors.

This module holds the root and its small sections (``admin``, ``metrics``,
``access_log``, ``tracing``); the larger ones have a module each, named after their
key: ``listeners``, ``pools`` (with ``balancer``, ``health_check``, ``retries``),
``tls``, ``caches`` and ``filters``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    ModelWrapValidatorHandler,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    field_validator,
    model_validator,
)

from proxy.config.base import BindAddress, ConfigModel, Kind, Name, Timeout
from proxy.config.caches import CacheSpec
from proxy.config.checks import cross_check, merge_errors
from proxy.config.listeners import ListenerSpec
from proxy.config.log_fields import DEFAULT_FIELDS, FIELDS, is_field, parse_template
from proxy.config.pools import PoolSpec
from proxy.config.providers import ProvidersSpec
from proxy.config.values import split_host_port


def _check_workers(value: object) -> int | Literal["auto"]:
    if value == "auto":
        return "auto"
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError(f"must be an integer >= 1 or 'auto', got {value!r}")


#: A worker process count >= 1, or ``"auto"`` for one per CPU core.
Workers = Annotated[
    int | Literal["auto"], PlainValidator(_check_workers), Kind('integer or "auto"')
]


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
    (nginx's ``$http_NAME``: ``http_x_custom`` is ``X-Custom``), ``trace_id`` (the
    trace sent upstream: ``tracing`` on, a routed request) and ``grpc_status`` (the
    ``grpc-status`` number a gRPC call ended with, null / ``-`` for other requests). The
    default is every field but ``upstream_name`` and the ones added after it
    (``upstream_status`` on)."""


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
    providers: ProvidersSpec = ProvidersSpec()
    """Where upstreams come from besides this file: ``docker``."""
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
