"""What the admin API needs of the server it runs beside, as Protocols it owns.

``proxy.admin`` sits below ``proxy.runtime`` (see ``.importlinter``): it names what it
reads and calls here rather than importing ``ProxyServer`` (STYLE.md 15). The runtime's
classes match without naming these: ``runtime.server.ProxyServer`` is a ``Server``,
``runtime.workers.Supervisor`` and ``runtime.worker.WorkerControl`` are ``Control``s;
mypy checks that where the server hands itself to ``start_admin`` and where a
``control`` is set.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from proxy.metrics.source import Source

if TYPE_CHECKING:
    import asyncio

    from proxy.cache import Cache
    from proxy.config import Config
    from proxy.filters import FilterContext
    from proxy.upstream.pool import Pool


class Control(Protocol):
    """The link between a supervisor and its workers (``proxy.runtime.workers``), as the
    server and the admin API see it; None in a single process."""

    def enabled_changed(self, pool: str, address: str, enabled: bool) -> None: ...

    async def refresh(self) -> None: ...

    async def reload(self) -> list[str]: ...

    def request_stop(self) -> None: ...

    async def purge(self, cache: str, host: bytes | None, target: bytes, exact: bool) -> int: ...


class Server(Source, Protocol):
    """The server as the admin API sees it (``runtime.server.ProxyServer``): what the
    metrics collector reads (``Source``), plus the state the views show and what the
    POST endpoints call. The admin writes nothing here but an upstream's ``enabled``
    (through ``pools``)."""

    @property
    def config(self) -> Config: ...

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    @property
    def pools(self) -> Mapping[str, Pool]: ...

    @property
    def caches(self) -> Mapping[str, Cache]: ...

    @property
    def filters(self) -> FilterContext: ...

    @property
    def control(self) -> Control | None:
        """The supervisor/worker link; None in a single process."""
        ...

    @property
    def ready(self) -> bool:
        """Listeners bound and the config loaded (``/readyz``)."""
        ...

    @property
    def config_path(self) -> str | None:
        """The file ``aiolb run -c`` loaded; None when built in code."""
        ...

    @property
    def started_at(self) -> float:
        """Unix time."""
        ...

    @property
    def workers(self) -> int: ...

    @property
    def retry_budget_left(self) -> Mapping[str, float] | None:
        """Retries each pool's budget allows now, summed over the workers (a supervisor
        only; else None)."""
        ...

    def client_connection_counts(self) -> Mapping[str, int]: ...

    def listener_addresses(self) -> Mapping[str, str]:
        """``host:port`` each configured listener serves on, by name."""
        ...

    async def purge_cache(
        self, name: str, host: bytes | None, target: bytes, exact: bool
    ) -> int: ...

    async def reload_report(self) -> tuple[list[str], list[str]]:
        """Reload the config file: ``(problems, changes)``, one of them empty."""
        ...

    def request_exit(self) -> None:
        """Stop serving as SIGTERM does, workers included."""
        ...
