"""Checks of the files a config names: the TLS certificates, keys and CA files.

The models validate what the YAML says; this opens what it points to, the way the
proxy will when it starts or reloads: every certificate with its key (a missing file,
a key that is not the certificate's, a cipher string that matches nothing are errors),
every CA file. An expired certificate and ``verify: false`` are warnings: the proxy
still starts. ``check_files`` is what the preflight (``proxy.runtime.preflight``:
``tls_files`` and ``tls_warnings``) runs for ``aiolb check``, ``aiolb run`` and every
reload, turning each problem's ``loc`` into ``FILE:LINE``. Relative paths are taken
from the working directory, as the proxy opens them.
"""

from __future__ import annotations

import datetime as dt
import ssl
from collections.abc import Iterator
from dataclasses import dataclass

from proxy.config import Config, ListenerTLSSpec, UpstreamTLSSpec
from proxy.tls import ServerTLS, TLSFileError, client_context, load_pair, read_certificate

Loc = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class FileProblem:
    """One problem at ``loc`` (the config path of the key that names the file)."""

    loc: Loc
    message: str
    warning: bool = False


def check_files(config: Config, now: dt.datetime | None = None) -> list[FileProblem]:
    """Every problem with the files ``config`` names; ``now`` for the expiry check."""
    when = now or dt.datetime.now(dt.UTC)
    found: list[FileProblem] = []
    for i, listener in enumerate(config.listeners):
        if listener.tls is not None:
            found += _listener(("listeners", i, "tls"), listener.tls, when)
    for name, pool in config.pools.items():
        if any(spec.https for spec in pool.upstreams):
            found += _pool(("pools", name, "tls"), pool.tls, when)
    return found


def _listener(loc: Loc, spec: ListenerTLSSpec, now: dt.datetime) -> Iterator[FileProblem]:
    failed = False
    for j, certificate in enumerate(spec.certificates):
        where = (*loc, "certificates", j)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            load_pair(context, certificate.cert, certificate.key)
            info = read_certificate(certificate.cert)
        except TLSFileError as exc:
            failed = True
            yield FileProblem((*where, exc.field), exc.message)
            continue
        if info.not_after is not None and info.not_after <= now:
            yield _expired((*where, "cert"), certificate.cert, info.not_after)
        if j and not info.names:
            message = f"{certificate.cert} names no host: SNI can never choose it"
            yield FileProblem((*where, "cert"), message, warning=True)
    if failed:
        return
    try:
        ServerTLS(spec)  # the ciphers and the client CA, as the listener will load them
    except TLSFileError as exc:
        yield FileProblem((*loc, exc.field), exc.message)


def _pool(loc: Loc, spec: UpstreamTLSSpec | None, now: dt.datetime) -> Iterator[FileProblem]:
    try:
        client_context(spec)
    except TLSFileError as exc:
        yield FileProblem((*loc, exc.field), exc.message)
        return
    if spec is None:
        return
    if not spec.verify:
        message = "certificate verification of the https upstreams is off (verify: false)"
        yield FileProblem((*loc, "verify"), message, warning=True)
    if spec.cert is not None:
        info = read_certificate(spec.cert)
        if info.not_after is not None and info.not_after <= now:
            yield _expired((*loc, "cert"), spec.cert, info.not_after)


def _expired(loc: Loc, path: str, when: dt.datetime) -> FileProblem:
    message = f"certificate {path} expired on {when:%Y-%m-%d %H:%M:%S} UTC"
    return FileProblem(loc, message, warning=True)
