"""Health: active probes, passive outlier detection, and the verdicts they feed.

The state machines (``state.RiseFall``, ``outlier.OutlierDetector``) are pure: fed
results and times, they answer whether the state changed. ``active.HealthChecker``
runs the probes and reports verdicts through a callback, so the process that probes
need not be the one that serves (see ARCHITECTURE.md, "Health").
"""

from proxy.health.outlier import OutlierDetector
from proxy.health.state import RiseFall

__all__ = ["OutlierDetector", "RiseFall"]
