"""A small client of the Docker Engine API (aiohttp), for ``providers.docker``.

Only what the provider needs: list and inspect containers, follow the events stream,
start and stop containers, and the engine's version. The endpoint is the engine's unix
socket (``unix:///var/run/docker.sock``), a TCP address (``tcp://HOST:PORT``: plain
HTTP, typically a read-only socket proxy) or ``https://HOST:PORT`` with client TLS. No
Docker SDK: five requests do not justify one.

Every failure is a ``DockerError`` whose message says what to fix (an engine that cannot
be reached, an answer that is not 2xx: a socket proxy that refuses ``POST`` says 403).
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Mapping
from typing import Any, Final

import aiohttp

from proxy.config.providers import DockerProviderSpec

#: The API version asked for: Docker 17.06 and later answer it.
API: Final = "/v1.30"
REQUEST_TIMEOUT: Final = 10.0


class DockerError(Exception):
    """The engine could not be reached, or answered with an error."""


def _ssl_context(spec: DockerProviderSpec) -> ssl.SSLContext | None:
    if not spec.endpoint.startswith("https://"):
        return None
    tls = spec.tls
    context = ssl.create_default_context(cafile=tls.ca if tls is not None else None)
    if tls is not None and tls.cert is not None:
        context.load_cert_chain(tls.cert, tls.key)
    return context


class DockerClient:
    """One engine, one aiohttp session (opened on first use, closed by ``close``)."""

    def __init__(self, spec: DockerProviderSpec) -> None:
        self.spec = spec
        self.endpoint = spec.endpoint
        path = spec.socket_path
        if path is not None:
            self.base = "http://docker" + API
        else:
            hostport = spec.endpoint.split("://", 1)[1].rstrip("/")
            scheme = "https" if spec.endpoint.startswith("https://") else "http"
            self.base = f"{scheme}://{hostport}{API}"
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        session = self._session
        if session is None or session.closed:
            path = self.spec.socket_path
            connector: aiohttp.BaseConnector
            if path is not None:
                connector = aiohttp.UnixConnector(path=path)
            else:
                connector = aiohttp.TCPConnector(ssl=_ssl_context(self.spec) or False)
            session = self._session = aiohttp.ClientSession(connector=connector)
        return session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(self, method: str, path: str, params: Mapping[str, str] | None = None) -> Any:
        """One request; the decoded JSON answer (None for an empty one)."""
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                async with self._open().request(method, self.base + path, params=params) as r:
                    body = await r.read()
                    if r.status >= 300 and r.status != 304:
                        raise DockerError(self._refusal(method, path, r.status, body))
                    return json.loads(body) if body.strip() else None
        except TimeoutError:
            raise DockerError(f"{self.endpoint}: no answer to {method} {path} in "
                              f"{REQUEST_TIMEOUT:g}s") from None  # fmt: skip
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise DockerError(f"{self.endpoint}: {method} {path}: {_reason(exc)}") from None

    def _refusal(self, method: str, path: str, status: int, body: bytes) -> str:
        try:
            message = str(json.loads(body).get("message", ""))
        except (ValueError, AttributeError):
            message = body[:200].decode(errors="replace").strip()
        hint = ""
        if status in (401, 403, 405) and method != "GET":
            hint = " (a read-only socket proxy? wake: docker needs POST to start and stop)"
        return f"{self.endpoint}: {method} {path}: {status} {message}{hint}".rstrip()

    async def version(self) -> dict[str, Any]:
        answer: dict[str, Any] = await self._call("GET", "/version")
        return answer

    async def containers(self) -> list[dict[str, Any]]:
        """Every container, running or not (``docker ps -a``)."""
        answer: list[dict[str, Any]] = await self._call("GET", "/containers/json", {"all": "1"})
        return answer

    async def inspect(self, ident: str) -> dict[str, Any] | None:
        """``docker inspect``; None when the container is gone."""
        try:
            answer: dict[str, Any] = await self._call("GET", f"/containers/{ident}/json")
        except DockerError as exc:
            if ": 404 " in str(exc):
                return None
            raise
        return answer

    async def start(self, ident: str) -> None:
        await self._call("POST", f"/containers/{ident}/start")

    async def stop(self, ident: str, grace: int = 10) -> None:
        await self._call("POST", f"/containers/{ident}/stop", {"t": str(grace)})

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Container events as they happen, from the moment this generator first yields
        None (the stream is open: list now, and no later event is missed); then one
        decoded event at a time, until the stream ends (raises ``DockerError``)."""
        params = {"filters": json.dumps({"type": ["container"]})}
        url = self.base + "/events"
        try:
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=REQUEST_TIMEOUT)
            async with self._open().get(url, params=params, timeout=timeout) as r:
                if r.status != 200:
                    raise DockerError(self._refusal("GET", "/events", r.status, await r.read()))
                yield {}
                async for line in r.content:
                    if line.strip():
                        yield json.loads(line)
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise DockerError(f"{self.endpoint}: GET /events: {_reason(exc)}") from None
        raise DockerError(f"{self.endpoint}: the events stream ended")

    def __repr__(self) -> str:
        return f"<DockerClient {self.endpoint}>"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect ({exc.os_error.strerror or exc.os_error})"
    return str(exc) or type(exc).__name__
