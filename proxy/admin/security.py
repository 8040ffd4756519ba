"""Who may use the admin listener: loopback only, or anyone holding the bearer token.

The admin API can drain upstreams and reload the config, so it refuses to listen on a
non-loopback address without a token (``admin.token``, else ``AIOLB_ADMIN_TOKEN``).
With a token, every request but the open paths needs ``Authorization: Bearer TOKEN``,
compared in constant time (``hmac.compare_digest``). The open paths answer nothing
an outsider could use: ``/healthz``, ``/readyz`` (for orchestrators' probes) and ``/``,
the dashboard page, which holds no data and asks for the token before it calls the API.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from aiohttp import web

from proxy.admin.errors import ApiError

if TYPE_CHECKING:
    from aiohttp.typedefs import Handler, Middleware

    from proxy.config import Admin

TOKEN_ENV = "AIOLB_ADMIN_TOKEN"
#: answered without a token (probes, and the dashboard page that asks for it)
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/"})


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


def admin_token(admin: Admin, env: Mapping[str, str] | None = None) -> str | None:
    """The configured token, else ``AIOLB_ADMIN_TOKEN``; None when neither is set."""
    env = os.environ if env is None else env
    return admin.token or env.get(TOKEN_ENV) or None


def exposure_problem(admin: Admin, token: str | None) -> str | None:
    """Why the admin must not listen as configured (a non-loopback ``admin.bind`` and
    no token), or None. Shared by ``aiolb check`` (``proxy.runtime.preflight``) and the
    start itself, so both refuse the same configs in the same words."""
    if token is None and not is_loopback(admin.host):
        return (
            f"{admin.bind} is not a loopback address and no token is set: "
            f"set admin.token or {TOKEN_ENV}, or bind the admin to 127.0.0.1"
        )
    return None


def check_exposure(admin: Admin, token: str | None) -> None:
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
