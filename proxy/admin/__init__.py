"""The admin and metrics server (aiohttp): /metrics, /healthz, /readyz, /api/..., /.

``start_admin(server, config.admin)`` starts it next to a ``ProxyServer``; nothing here
runs on the request hot path.
"""

from proxy.admin.app import AdminHandle, start_admin
from proxy.admin.security import AdminError

__all__ = ["AdminError", "AdminHandle", "start_admin"]
