"""A pool's ``health_check``: active probes and passive outlier detection.

The state machines that act on these settings are ``proxy.health`` (``active``,
``outlier``); here are their settings and defaults.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, PlainSerializer, PlainValidator, ValidationInfo, field_validator

from proxy.config.base import ConfigModel, Duration, Kind, Timeout


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
    expects a status in ``expected_status``; ``type: tcp`` only connects; ``type: grpc``
    calls ``grpc.health.v1.Health/Check`` for ``service`` over HTTP/2 (prior knowledge
    to ``http://`` upstreams, ALPN ``h2`` to ``https://`` ones) and passes on
    ``SERVING``. A key of another type (``path``, ``method`` or ``expected_status`` with
    ``grpc``, ``service`` without it) is refused unless it holds its default. The state
    flips after ``unhealthy_threshold`` consecutive failures or ``healthy_threshold``
    consecutive successes (HAProxy's ``fall``/``rise``). ``initial_state`` applies to
    upstreams the proxy has not seen before (a cold start serves at once by default).
    """

    type: Literal["http", "tcp", "grpc"] = "http"
    """``http`` sends a request; ``tcp`` only connects; ``grpc`` calls
    ``grpc.health.v1.Health/Check`` over HTTP/2 and passes on ``SERVING`` (nginx's
    ``health_check type=grpc``, Envoy's ``grpc_health_check``)."""
    service: str = ""
    """``type: grpc``: the service whose health the probe asks for (the request's
    ``service`` field; nginx's ``grpc_service``, Envoy's ``service_name``); ``""``: the
    server as a whole. Another type refuses it, unless empty."""
    path: str = "/"
    """``type: http``: the path the probe requests (a ``grpc`` check refuses it, unless
    left at ``/``)."""
    method: Literal["GET", "HEAD"] = "GET"
    """``type: http``: the method of the probe (a ``grpc`` check refuses it, unless left
    at ``GET``)."""
    host: str | None = None
    """``Host`` header of the probe (``:authority`` of a ``grpc`` one); null: the
    upstream's own ``host:port``."""
    expected_status: StatusRanges = ((200, 399),)
    """``type: http``: statuses that pass: a code, a range (``"200-399"``) or a list of
    both (a ``grpc`` check, which passes on ``SERVING`` alone, refuses it unless left at
    the default)."""
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

    @field_validator("path", "method", "expected_status")
    @classmethod
    def _http_only(cls, value: object, info: ValidationInfo) -> object:
        """A key of ``type: http`` set to anything but its default on a ``grpc`` check
        is a mistake (``check --print`` writes every default: those load back)."""
        name = info.field_name or ""
        if info.data.get("type") == "grpc" and value != cls.model_fields[name].default:
            raise ValueError(
                f"{name} applies to type: http; a grpc check calls "
                "grpc.health.v1.Health/Check and passes on SERVING: remove it"
            )
        return value

    @field_validator("service")
    @classmethod
    def _grpc_only(cls, value: str, info: ValidationInfo) -> str:
        kind = info.data.get("type")
        if value and kind is not None and kind != "grpc":
            raise ValueError(f"service applies to type: grpc, not {kind}: remove it")
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
