"""Balancing algorithms, keyed by the name used in YAML (``balancer: NAME``).

Adding an algorithm touches exactly: ``proxy/balancing/<name>.py``, ``REGISTRY`` here,
``BALANCER_NAMES`` in ``proxy.config.balancer`` (plus an options model there if it
takes options) and its tests. ``slow_start`` is the pool's weight ramp helper, not an
algorithm; ``ring`` is the hash ring shared by ``consistent_hash`` and ``ip_hash``.
"""

from __future__ import annotations

from proxy.balancing.base import Balancer, RequestView, Target
from proxy.balancing.consistent_hash import ConsistentHash
from proxy.balancing.ip_hash import IpHash
from proxy.balancing.least_connections import LeastConnections
from proxy.balancing.peak_ewma import PeakEwma
from proxy.balancing.power_of_two import PowerOfTwo
from proxy.balancing.random import WeightedRandom
from proxy.balancing.round_robin import RoundRobin
from proxy.balancing.slow_start import SlowStart
from proxy.balancing.weighted_round_robin import WeightedRoundRobin

REGISTRY: dict[str, type[Balancer]] = {
    "round_robin": RoundRobin,
    "weighted_round_robin": WeightedRoundRobin,
    "least_connections": LeastConnections,
    "random": WeightedRandom,
    "power_of_two": PowerOfTwo,
    "ip_hash": IpHash,
    "consistent_hash": ConsistentHash,
    "peak_ewma": PeakEwma,
}

__all__ = ["REGISTRY", "Balancer", "RequestView", "SlowStart", "Target"]
