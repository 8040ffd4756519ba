"""Who may use the admin listener: loopback only, or anyone holding the bearer token;
and never another site's page in a browser.

The admin API can drain upstreams and reload the config, so it refuses to listen on a
non-loopback address without a token (``admin.token``, else ``AIOLB_ADMIN_TOKEN``).
With a token, every request but the open paths needs ``Authorization: Bearer TOKEN``,
compared in constant time (``hmac.compare_digest``). The open paths answer nothing
an outsider could use: ``/healthz``, ``/readyz`` (for orchestrators' probes) and ``/``,
the dashboard page, which holds no data and asks for the token before it calls the API.

A browser on the operator's machine reaches a loopback admin too, so ``browser_guard``
refuses (403, JSON) what a web page could make it send (``refusal`` decides):

- **DNS rebinding**: a ``Host`` other than a loopback name, ``admin.bind``'s address or
  one of ``admin.allowed_hosts`` (``*``: any). Without ``allowed_hosts``, this holds
  only when there is no token: with one, the page cannot read the API anyway, and a
  remote admin is reached by names the proxy cannot know. ``/healthz`` and ``/readyz``
  answer any ``Host`` (Kubernetes probes send the pod's IP).
- **Cross-site requests** that change state (any method but GET, HEAD, OPTIONS):
  ``Sec-Fetch-Site: cross-site`` or ``same-site`` (another port of ``localhost`` is
  the same site), or an ``Origin`` whose ``host[:port]`` is not the request's ``Host``
  (``Origin: null`` included).
- **CORS "simple" requests** that change state: the request must be one a page can
  send elsewhere only after a preflight, which the admin never grants: a
  ``Content-Type: application/json`` body, the ``X-Aiolb-Admin`` header (any value),
  or, when a token is set, an ``Authorization`` header (``bearer_auth`` checks it).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
from collections.abc import Mapping, Set
from typing import TYPE_CHECKING

from aiohttp import web

from proxy.admin.errors import ApiError

if TYPE_CHECKING:
    from aiohttp.typedefs import Handler, Middleware

    from proxy.config import AdminSpec

log = logging.getLogger("aiolb.admin")

TOKEN_ENV = "AIOLB_ADMIN_TOKEN"
#: answered without a token (probes, and the dashboard page that asks for it)
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/"})
#: answered whatever the ``Host`` (orchestrators probe the pod's IP)
PROBE_PATHS = frozenset({"/healthz", "/readyz"})
#: the header that makes a POST one a page cannot send cross-site without a preflight
ADMIN_HEADER = "X-Aiolb-Admin"
#: methods that change nothing, so another site's page may send them
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_WILDCARDS = frozenset({"", "0.0.0.0", "::"})


class AdminError(Exception):
    """The admin listener must not start as configured (one line, ready for stderr)."""


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (``127.0.0.0/8``, ``::1``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # any other name may resolve to a public address
        return False


def admin_token(admin: AdminSpec, env: Mapping[str, str] | None = None) -> str | None:
    """The configured token, else ``AIOLB_ADMIN_TOKEN``; None when neither is set."""
    env = os.environ if env is None else env
    return admin.token or env.get(TOKEN_ENV) or None


def exposure_problem(admin: AdminSpec, token: str | None) -> str | None:
    """Why the admin must not listen as configured (a non-loopback ``admin.bind`` and
    no token), or None. Shared by ``aiolb check`` (``proxy.runtime.preflight``) and the
    start itself, so both refuse the same configs in the same words."""
    if token is None and not is_loopback(admin.host):
        return (
            f"{admin.bind} is not a loopback address and no token is set: "
            f"set admin.token or {TOKEN_ENV}, or bind the admin to 127.0.0.1"
        )
    return None


def check_exposure(admin: AdminSpec, token: str | None) -> None:
    """Raise ``AdminError`` when ``admin.bind`` is not loopback and there is no token."""
    problem = exposure_problem(admin, token)
    if problem is not None:
        raise AdminError(f"admin.bind {problem}")


def authorized(header: str, expected: bytes) -> bool:
    """Does an ``Authorization`` header carry the bearer token? (constant time)"""
    scheme, _, value = header.partition(" ")
    given = value.strip().encode("utf-8", "replace")
    return hmac.compare_digest(given, expected) and scheme.lower() == "bearer"


def bearer_auth(token: str) -> Middleware:
    """Middleware: 401 (``WWW-Authenticate: Bearer``) unless the path is open or the
    request carries ``token``; runs before routing, so unknown paths leak nothing."""
    expected = token.encode()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        if not authorized(request.headers.get("Authorization", ""), expected):
            challenge = 'Bearer realm="aiolb admin"'
            raise ApiError(401, "missing or wrong bearer token", {"WWW-Authenticate": challenge})
        return await handler(request)

    return auth


def allowed_hosts(admin: AdminSpec, token: str | None) -> frozenset[str] | None:
    """The host names (besides loopback ones) a request's ``Host`` may carry; None: any.
    ``admin.allowed_hosts`` plus ``admin.bind``'s address (unless a wildcard); when
    ``allowed_hosts`` is null, any with a token, else only the bound address."""
    if admin.allowed_hosts is None and token is not None:
        return None
    names = set(admin.allowed_hosts or ())
    if "*" in names:
        return None
    bound = admin.host.strip("[]").lower()
    if bound not in _WILDCARDS:
        names.add(bound)
    return frozenset(names)


def host_name(host: str) -> str:
    """The name in a ``Host`` header: lower case, no port, brackets or trailing dot."""
    value = host.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    if value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


def same_origin(origin: str, host: str) -> bool:
    """Is ``origin`` (``http://host:port``) the admin's own, reached as ``host``? The
    scheme may be https: a TLS-terminating proxy in front keeps the ``Host``."""
    scheme, sep, authority = origin.strip().lower().partition("://")
    return bool(sep and host) and scheme in ("http", "https") and authority == host.lower()


def _is_simple(headers: Mapping[str, str], token_set: bool) -> bool:
    """Could a page on another site send this without a CORS preflight?"""
    content_type = headers.get("Content-Type", "").partition(";")[0].strip().lower()
    if content_type == "application/json" or ADMIN_HEADER in headers:
        return False
    return not (token_set and "Authorization" in headers)


def refusal(
    method: str,
    path: str,
    headers: Mapping[str, str],
    hosts: Set[str] | None,
    token_set: bool,
) -> str | None:
    """Why the admin refuses a request a browser may have sent for another site (403),
    or None. ``hosts``: ``allowed_hosts()``; ``headers`` match names case-insensitively."""
    host = headers.get("Host", "")
    if hosts is not None and path not in PROBE_PATHS:
        name = host_name(host)
        if not (is_loopback(name) or name in hosts):
            shown = repr(host[:100]) if host else "(none)"
            return (
                f"Host {shown} is not allowed: reach the admin as localhost or 127.0.0.1, "
                "or list the name in admin.allowed_hosts"
            )
    if method in SAFE_METHODS:
        return None
    site = headers.get("Sec-Fetch-Site", "").lower()
    if site in ("cross-site", "same-site"):
        return f"a {site} request (Sec-Fetch-Site) may not change the admin's state"
    origin = headers.get("Origin")
    if origin is not None and not same_origin(origin, host):
        return f"Origin {origin[:100]!r} is another site's: it may not change the admin's state"
    if _is_simple(headers, token_set):
        return (
            f"{method} needs Content-Type: application/json or an {ADMIN_HEADER}: 1 header "
            "(a page on another site can send neither)"
        )
    return None


def browser_guard(hosts: Set[str] | None, token_set: bool) -> Middleware:
    """Middleware: 403 for what ``refusal`` refuses; runs before routing, after
    ``bearer_auth`` (a request without the token hears 401, what to fix first)."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        problem = refusal(request.method, request.path, request.headers, hosts, token_set)
        if problem is not None:
            log.warning("admin refused %s %s: %s", request.method, request.path[:200], problem)
            raise ApiError(403, problem)
        return await handler(request)

    return guard
