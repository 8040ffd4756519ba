"""``rewrite``: change the path sent upstream; the query is kept (Traefik's
StripPrefix and ReplacePathRegex, Caddy's ``uri``).

- ``strip_prefix: /api``: ``/api/users?x=1`` -> ``/users?x=1``, ``/api`` -> ``/``;
  the removed prefix goes upstream as ``X-Forwarded-Prefix`` (as Traefik sends it).
- ``replace_prefix: {from: /v1, to: /api/v1}``.
- ``path: {from: REGEX, to: REPLACEMENT}``: ``re.sub`` on the path, every match.

A path that does not start with the prefix (or that the regex does not match) passes
unchanged. The access log and the balancers see the path the client sent.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from proxy.filters.base import Filter, Request

if TYPE_CHECKING:
    from proxy.config.filters import RewriteOptions
    from proxy.filters.context import Site


def _prefixed(path: bytes, prefix: bytes) -> bool:
    """``path`` starts with ``prefix`` as a whole segment (``/api`` is not ``/apix``)."""
    return path.startswith(prefix) and (
        len(path) == len(prefix) or prefix.endswith(b"/") or path[len(prefix)] in b"/?"
    )


class Rewrite(Filter):
    """One path rewrite (see the module)."""

    def __init__(self, options: RewriteOptions, site: Site) -> None:
        super().__init__(options)
        self._strip = options.strip_prefix.rstrip("/").encode() if options.strip_prefix else None
        change = options.replace_prefix
        self._replace = (change.from_.encode(), change.to.encode()) if change else None
        regex = options.path
        self._regex = (re.compile(regex.from_.encode()), regex.to.encode()) if regex else None

    def request_filter(self, request: Request) -> None:
        path, mark, query = request.target.partition(b"?")
        new = self._rewrite(path, request)
        if new is not None and new != path:
            request.target = (new or b"/") + mark + query

    def _rewrite(self, path: bytes, request: Request) -> bytes | None:
        strip = self._strip
        if strip is not None:
            if not _prefixed(path, strip):
                return None
            request.headers.set("X-Forwarded-Prefix", strip.decode() or "/")
            rest = path[len(strip) :]
            return rest if rest.startswith(b"/") else b"/" + rest
        if self._replace is not None:
            old, new = self._replace
            return new + path[len(old) :] if _prefixed(path, old) else None
        assert self._regex is not None
        pattern, template = self._regex
        result = pattern.sub(template, path)
        return result if result.startswith(b"/") else b"/" + result
