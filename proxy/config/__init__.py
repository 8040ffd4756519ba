"""Configuration: pydantic models with every default, and YAML loading with
``FILE:LINE`` errors and ``${VAR}`` expansion.

``load_config(path)`` is the entry point; ``Config.model_validate(data)`` builds a
config from plain data (tests, the demo). Both validate everything once; the result
is immutable.

Naming: config models are named ``*Spec`` (``PoolSpec``, ``ListenerSpec``), except the
root ``Config`` and the options of filters and balancers (``*Options``:
``RateLimitOptions``, ``PeakEwmaOptions``). A runtime class takes the plain name
(``proxy.upstream.pool.Pool`` is built from a ``PoolSpec``), so no import aliases one
(a test holds every model to this rule).

Modules, each named after the YAML key whose models it holds: ``models`` (the root
``Config`` and its small sections: ``admin``, ``metrics``, ``access_log``,
``tracing``), ``listeners`` (listeners and their routes), ``pools`` (pools and
upstreams), ``balancer``, ``health_check``, ``retries``, ``tls``, ``caches`` and
``filters`` (with ``filter_values``). Below them: ``base`` (``ConfigModel`` and the
value types), ``values`` (durations, sizes, addresses), ``keys`` (the request key
syntax) and ``log_fields`` (the access log format's grammar). Around them: ``checks``
(checks across sections), ``source`` and ``loader`` (YAML to a ``Config``, with lines),
``schema`` (the keys as data: the reference, ``aiolb check --print``) and ``diff``
(what a reload changes).

``proxy.config`` imports only itself, ``proxy.http``, ``proxy.errors``,
``proxy.clock``, ``proxy.tcp``, the standard library, pydantic and PyYAML: no runtime
package (balancing, metrics, tls, ...). What the runtime needs to read a setting (a
request key, a log field) is parsed here and built there.
"""

from proxy.config.balancer import BALANCER_NAMES, BalancerName, BalancerSpec
from proxy.config.base import Duration, Size
from proxy.config.caches import CacheRedisStoreSpec, CacheSpec
from proxy.config.health_check import (
    ActiveHealthCheckSpec,
    HealthCheckSpec,
    PassiveHealthCheckSpec,
)
from proxy.config.listeners import (
    LimitsSpec,
    ListenerSpec,
    ListenerTimeoutsSpec,
    MatchSpec,
    RouteSpec,
)
from proxy.config.loader import (
    ConfigError,
    Document,
    load_config,
    load_document,
    parse_config,
    parse_document,
)
from proxy.config.models import AccessLogSpec, AdminSpec, Config, MetricsSpec, TracingSpec
from proxy.config.pools import CircuitBreakerSpec, PoolSpec, PoolTimeoutsSpec, UpstreamSpec
from proxy.config.retries import BackoffSpec, RetriesSpec, RetryBudgetSpec
from proxy.config.tls import CertificateSpec, ListenerTLSSpec, UpstreamTLSSpec
from proxy.config.values import parse_duration, parse_size

__all__ = [
    "BALANCER_NAMES",
    "AccessLogSpec",
    "ActiveHealthCheckSpec",
    "AdminSpec",
    "BackoffSpec",
    "BalancerName",
    "BalancerSpec",
    "CacheRedisStoreSpec",
    "CacheSpec",
    "CertificateSpec",
    "CircuitBreakerSpec",
    "Config",
    "ConfigError",
    "Document",
    "Duration",
    "HealthCheckSpec",
    "LimitsSpec",
    "ListenerSpec",
    "ListenerTLSSpec",
    "ListenerTimeoutsSpec",
    "MatchSpec",
    "MetricsSpec",
    "PassiveHealthCheckSpec",
    "PoolSpec",
    "PoolTimeoutsSpec",
    "RetriesSpec",
    "RetryBudgetSpec",
    "RouteSpec",
    "Size",
    "TracingSpec",
    "UpstreamSpec",
    "UpstreamTLSSpec",
    "load_config",
    "load_document",
    "parse_config",
    "parse_document",
    "parse_duration",
    "parse_size",
]
