"""Configuration: pydantic models with every default, and YAML loading with
``FILE:LINE`` errors and ``${VAR}`` expansion.

``load_config(path)`` is the entry point; ``Config.model_validate(data)`` builds a
config from plain data (tests, the demo). Both validate everything once; the result
is immutable.
"""

from proxy.config.base import Duration, Size
from proxy.config.loader import (
    ConfigError,
    Document,
    load_config,
    load_document,
    parse_config,
    parse_document,
)
from proxy.config.models import (
    BALANCER_NAMES,
    ActiveHealthCheckSpec,
    AdminSpec,
    BalancerName,
    BalancerSpec,
    CircuitBreakerSpec,
    Config,
    HealthCheckSpec,
    LimitsSpec,
    ListenerSpec,
    ListenerTimeoutsSpec,
    MatchSpec,
    PassiveHealthCheckSpec,
    PoolSpec,
    PoolTimeoutsSpec,
    RetriesSpec,
    RouteSpec,
    UpstreamSpec,
)
from proxy.config.values import parse_duration, parse_size

__all__ = [
    "BALANCER_NAMES",
    "ActiveHealthCheckSpec",
    "AdminSpec",
    "BalancerName",
    "BalancerSpec",
    "CircuitBreakerSpec",
    "Config",
    "ConfigError",
    "Document",
    "Duration",
    "HealthCheckSpec",
    "LimitsSpec",
    "ListenerSpec",
    "ListenerTimeoutsSpec",
    "MatchSpec",
    "PassiveHealthCheckSpec",
    "PoolSpec",
    "PoolTimeoutsSpec",
    "RetriesSpec",
    "RouteSpec",
    "Size",
    "UpstreamSpec",
    "load_config",
    "load_document",
    "parse_config",
    "parse_document",
    "parse_duration",
    "parse_size",
]
