"""Configuration: pydantic models with every default, and YAML loading with
``FILE:LINE`` errors and ``${VAR}`` expansion.

``load_config(path)`` is the entry point; ``Config.model_validate(data)`` builds a
config from plain data (tests, the demo). Both validate everything once; the result
is immutable.
"""

from proxy.config.loader import ConfigError, load_config, parse_config
from proxy.config.models import (
    BALANCER_NAMES,
    Admin,
    BalancerName,
    BalancerSpec,
    Config,
    Duration,
    Limits,
    Listener,
    ListenerTimeouts,
    Match,
    Pool,
    PoolTimeouts,
    Route,
    Size,
    UpstreamSpec,
)
from proxy.config.values import parse_duration, parse_size

__all__ = [
    "BALANCER_NAMES",
    "Admin",
    "BalancerName",
    "BalancerSpec",
    "Config",
    "ConfigError",
    "Duration",
    "Limits",
    "Listener",
    "ListenerTimeouts",
    "Match",
    "Pool",
    "PoolTimeouts",
    "Route",
    "Size",
    "UpstreamSpec",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
]
