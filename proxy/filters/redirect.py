"""``redirect``: answer with a redirect instead of forwarding (nginx ``return 301``,
Traefik's RedirectScheme and RedirectRegex, Caddy's ``redir``).

``to: URL`` (or a path) is the ``Location`` as it is. Otherwise the location is the
request's own URL (``http://``, its ``Host``, its path and query) with the pieces given
replaced: ``{scheme: https}`` moves a site to HTTPS (the port goes with the old scheme
unless ``port`` is given), ``{host: www.example.com}`` to another name, ``{path: /new}``
to another page (the query is kept). A request without ``Host`` gets the listener's
address as its host.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.filters.base import Filter, LocalResponse, Request

if TYPE_CHECKING:
    from proxy.config.filters import RedirectOptions
    from proxy.filters.context import Site

_DEFAULT_PORTS = {"http": 80, "https": 443}


class Redirect(Filter):
    """A redirect answer (see the module)."""

    def __init__(self, options: RedirectOptions, site: Site) -> None:
        super().__init__(options)
        self._options = options

    def request_filter(self, request: Request) -> LocalResponse:
        location = self.location(request)
        body = f"{self._options.status} redirect to {location}\n"
        return LocalResponse(self._options.status, [("Location", location)], body)

    def location(self, request: Request) -> str:
        """Where ``request`` is sent."""
        o = self._options
        if o.to is not None:
            return o.to
        ex = request.ex
        given = ex.host.decode("latin-1") if ex.host else ex.client.listener.bind
        host, port = _split(given)
        scheme = o.scheme or "http"
        if o.port is not None:
            port = str(o.port)
        elif o.scheme is not None and o.scheme != "http":
            port = ""
        if o.host is not None:
            host = o.host
        path = request.path
        if o.path is not None:
            _, mark, query = path.partition("?")
            path = o.path + mark + query
        shown = f":{port}" if port and int(port) != _DEFAULT_PORTS[scheme] else ""
        return f"{scheme}://{host}{shown}{path}"


def _split(authority: str) -> tuple[str, str]:
    """``host:port`` -> (host, port or ""), ``[::1]:80`` -> (``[::1]``, ``80``)."""
    if authority.startswith("["):
        end = authority.find("]")
        return authority[: end + 1], authority[end + 2 :]
    host, _, port = authority.partition(":")
    return host, port if port.isdigit() else ""
