"""Every admin error is a short JSON body ``{"error": "..."}``, never a traceback.

Handlers raise ``ApiError``; the ``json_errors`` middleware turns it, and aiohttp's own
HTTP errors (404 for an unknown path, 405 for a wrong method, 413 for a huge body),
into JSON answers, keeping the headers that matter (``Allow``, ``WWW-Authenticate``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from aiohttp.typedefs import Handler

log = logging.getLogger("aiolb.admin")

#: headers of aiohttp's errors worth keeping in the JSON answer
KEPT_HEADERS = ("Allow", "WWW-Authenticate")


class ApiError(Exception):
    """An answer other than success: ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def json_response(
    data: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """JSON with ``Cache-Control: no-store`` (admin state is live)."""
    return web.json_response(
        data, status=status, headers={"Cache-Control": "no-store", **(headers or {})}
    )


def error_response(
    status: int, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """``{"error": message}`` with ``status``."""
    return json_response({"error": message}, status, headers)


def _describe(request: web.Request, exc: web.HTTPException) -> str:
    if exc.status == 404:
        return f"not found: {request.path}"
    if exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        return f"method {request.method} not allowed for {request.path} (allowed: {allowed})"
    return exc.reason


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn ``ApiError``, aiohttp's HTTP errors and bugs into short JSON answers."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.message, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kept = {k: v for k in KEPT_HEADERS if (v := exc.headers.get(k)) is not None}
        return error_response(exc.status, _describe(request, exc), kept)
    except Exception:
        log.exception("admin %s %s failed", request.method, request.path)
        return error_response(500, "internal error (see the proxy's log)")
