"""TLS contexts for both sides, the certificates' names and dates, handshake failures.

Theory of operation
-------------------
A TLS listener has one ``ServerTLS``: an ``ssl.SSLContext`` per certificate, all with
the same settings (minimum version, ciphers, ALPN: the listener's ``protocols``, client
verification).
The first is the default; its ``sni_callback`` moves a handshake to the context whose
certificate names the server name the client asked for (an exact name first, then a
``*.`` wildcard one label deep), and leaves the default for any other name or none.
Session tickets stay on (OpenSSL's default): a returning client resumes without a
full handshake. The listener builds a new ``ServerTLS`` on a reload, and each new
connection takes the one in force when it is accepted: certificates change without a
restart, and connections already open keep theirs.

Upstream connections use ``client_context``: the system's CA store or the pool's
``ca`` file, hostname checking on, an optional client certificate, or, only when the
config says ``verify: false``, no verification at all.

Every function that reads a file raises ``TLSFileError`` naming the field (``cert``,
``key``, ``ca``, ...) and saying what is wrong, so that ``proxy.runtime.files`` can
report it at the right ``FILE:LINE`` and the runtime can refuse a bad reload.
"""

from __future__ import annotations

import datetime as dt
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from proxy.config import CertificateSpec, ListenerTLSSpec, UpstreamTLSSpec

#: Protocols offered with ALPN when a listener says nothing else (``protocols``).
ALPN: Final = ("h2", "http/1.1")

_VERSIONS: Final = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}

#: ``aiolb_tls_handshake_errors_total`` reasons (a bounded set), by OpenSSL reason code.
_REASONS: Final = {
    "HTTP_REQUEST": "plaintext",
    "HTTPS_PROXY_REQUEST": "plaintext",
    "WRONG_VERSION_NUMBER": "protocol",
    "UNSUPPORTED_PROTOCOL": "version",
    "VERSION_TOO_LOW": "version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "version",
    "NO_SHARED_CIPHER": "cipher",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "client_certificate",
    "CERTIFICATE_VERIFY_FAILED": "client_certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "client_certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "client_certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "unknown_ca",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "unknown_ca",
    "NO_PROTOCOLS_AVAILABLE": "version",
}
#: Every reason ``handshake_reason`` can return.
REASONS: Final = (
    "plaintext", "protocol", "version", "cipher", "client_certificate", "unknown_ca",
    "timeout", "reset", "other",
)  # fmt: skip


class TLSFileError(Exception):
    """A TLS file that cannot be used; ``field`` names the config key it came from."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    """What the proxy needs to know of a certificate: its DNS names (subjectAltName,
    or the subject's commonName when it has none) and when it expires."""

    names: tuple[str, ...]
    not_after: dt.datetime | None


def read_certificate(path: str, field: str = "cert") -> CertificateInfo:
    """The names and expiry of the first certificate in the PEM file ``path``."""
    try:
        with open(path, "rb"):
            pass
        decoded: dict[str, Any] = ssl._ssl._test_decode_cert(path)  # type: ignore[attr-defined]
    except FileNotFoundError:
        raise TLSFileError(field, f"cannot read {path}: no such file") from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise TLSFileError(field, f"cannot read {path}: {reason.lower()}") from None
    except ssl.SSLError:
        _expect(field, path, "certificate")
        raise TLSFileError(field, f"{path} is damaged: its PEM data does not decode") from None
    sans = decoded.get("subjectAltName", ())
    names = tuple(value.lower() for kind, value in sans if kind == "DNS")
    if not names:
        names = tuple(
            value.lower()
            for rdn in decoded.get("subject", ())
            for key, value in rdn
            if key == "commonName"
        )
    not_after = decoded.get("notAfter")
    when = None
    if not_after:
        when = dt.datetime.fromtimestamp(ssl.cert_time_to_seconds(not_after), dt.UTC)
    return CertificateInfo(names, when)


def load_pair(context: ssl.SSLContext, cert: str, key: str) -> None:
    """Load a certificate chain and its key into ``context``; ``TLSFileError`` says
    which file is missing or unreadable, or that the key does not match."""
    for field, path in (("cert", cert), ("key", key)):
        try:
            with open(path, "rb"):
                pass
        except FileNotFoundError:
            raise TLSFileError(field, f"cannot read {path}: no such file") from None
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise TLSFileError(field, f"cannot read {path}: {reason.lower()}") from None
    _expect("cert", cert, "certificate")
    _expect("key", key, "private key")
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except _Encrypted:
        raise TLSFileError("key", f"{key} holds an encrypted private key: {_DECRYPT}") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TLSFileError("key", f"{key} is not the private key of {cert}") from None
        field, path = ("key", key) if _decodes(cert) else ("cert", cert)
        raise TLSFileError(field, f"{path} is damaged: its PEM data does not decode") from None


#: What to do with an encrypted key: the proxy starts unattended, with no one to ask.
_DECRYPT = "aiolb cannot ask for its passphrase; write it decrypted (openssl pkey -in KEY -out NEW)"
_BEGIN = re.compile(rb"^-----BEGIN ([A-Z0-9 ]+)-----", re.MULTILINE)


class _Encrypted(Exception):
    """OpenSSL asked for a passphrase."""


def _no_password() -> bytes:
    raise _Encrypted


def _expect(field: str, path: str, what: str) -> None:
    """``TLSFileError`` in plain words unless the PEM file ``path`` holds a ``what``
    (``certificate`` or ``private key``): not PEM at all, PEM of another kind, an
    encrypted key."""
    try:
        with open(path, "rb") as file:
            data = file.read(1 << 20)
    except OSError:
        return  # the loader says why
    labels = [label.decode() for label in _BEGIN.findall(data)]
    if not labels:
        if not data.strip():
            raise TLSFileError(field, f"{path} is empty: it should hold a PEM {what}")
        kind = "binary (DER?)" if data[:1] == b"\x30" else "text"
        raise TLSFileError(field, f"{path} is not a PEM file ({kind}): it should hold a "
                           f"{what} (-----BEGIN ...-----)")  # fmt: skip
    if what == "private key" and (
        "ENCRYPTED PRIVATE KEY" in labels or b"Proc-Type: 4,ENCRYPTED" in data
    ):
        raise TLSFileError(field, f"{path} holds an encrypted private key: {_DECRYPT}")
    wanted = "CERTIFICATE" if what == "certificate" else "PRIVATE KEY"
    if not any(label.endswith(wanted) for label in labels):
        found = ", ".join(dict.fromkeys(labels))
        other = "PRIVATE KEY" if what == "certificate" else "CERTIFICATE"
        swapped = any(label.endswith(other) for label in labels)
        hint = f": is it the {other.lower().removeprefix('private ')}?" if swapped else ""
        raise TLSFileError(field, f"{path} holds no {what} (it holds: {found}){hint}")


def _decodes(path: str) -> bool:
    """True if the first certificate in ``path`` decodes."""
    try:
        ssl._ssl._test_decode_cert(path)  # type: ignore[attr-defined]
    except (ssl.SSLError, OSError):
        return False
    return True


def load_cas(context: ssl.SSLContext, path: str, field: str) -> None:
    """Trust the CA certificates in the PEM file ``path``."""
    try:
        _expect(field, path, "certificate")
        context.load_verify_locations(cafile=path)
    except FileNotFoundError:
        raise TLSFileError(field, f"cannot read {path}: no such file") from None
    except ssl.SSLError:
        raise TLSFileError(field, f"{path} holds no usable CA certificate: its PEM data does "
                           "not decode") from None  # fmt: skip
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise TLSFileError(field, f"cannot read {path}: {reason.lower()}") from None


def _server_context(
    spec: ListenerTLSSpec, certificate: CertificateSpec, alpn: Sequence[str] = ALPN
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[spec.min_version]
    if spec.ciphers is not None:
        try:
            context.set_ciphers(spec.ciphers)
        except ssl.SSLError:
            raise TLSFileError("ciphers", f"no cipher matches {spec.ciphers!r}") from None
    context.set_alpn_protocols(list(alpn))
    if spec.client_ca is not None:
        load_cas(context, spec.client_ca, "client_ca")
        context.verify_mode = ssl.CERT_REQUIRED
    load_pair(context, certificate.cert, certificate.key)
    return context


class ServerTLS:
    """The contexts of one TLS listener: ``context`` (the default certificate's) is the
    one every handshake starts with; SNI may move it to another certificate's."""

    __slots__ = ("_exact", "_wildcard", "context", "names")

    def __init__(self, spec: ListenerTLSSpec, alpn: Sequence[str] = ALPN) -> None:
        """``alpn``: the protocols offered, in the order of preference."""
        contexts = [_server_context(spec, c, alpn) for c in spec.certificates]
        self.context = contexts[0]
        self._exact: dict[str, ssl.SSLContext] = {}
        self._wildcard: dict[str, ssl.SSLContext] = {}
        #: the names of each certificate, in config order
        self.names: list[tuple[str, ...]] = []
        for certificate, context in zip(spec.certificates, contexts, strict=True):
            names = read_certificate(certificate.cert).names
            self.names.append(names)
            for name in names:
                table = self._wildcard if name.startswith("*.") else self._exact
                table.setdefault(name.removeprefix("*."), context)
        if len(contexts) > 1:
            self.context.sni_callback = self._pick

    def select(self, server_name: str | None) -> ssl.SSLContext:
        """The context whose certificate names ``server_name`` (the default otherwise)."""
        if not server_name:
            return self.context
        name = server_name.lower().rstrip(".")
        found = self._exact.get(name)
        if found is None:
            parent = name.partition(".")[2]
            found = self._wildcard.get(parent) if parent else None
        return found if found is not None else self.context

    def _pick(self, sock: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        context = self.select(server_name)
        if context is not self.context:
            sock.context = context

    def __repr__(self) -> str:
        return f"<ServerTLS [{len(self.names)} certificates: {self.names}]>"


def client_context(spec: UpstreamTLSSpec | None, h2: bool = False) -> ssl.SSLContext:
    """The context for connections to a pool's https upstreams (``h2``: ALPN offers
    only ``h2``: the pool speaks HTTP/2 to its upstreams)."""
    if spec is None or spec.ca is None:
        context = ssl.create_default_context()
    else:  # only the pool's CAs: hostname checked, certificate required (the defaults)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        load_cas(context, spec.ca, "ca")
    context.set_alpn_protocols(["h2"] if h2 else ["http/1.1"])
    if spec is None:
        return context
    context.minimum_version = _VERSIONS[spec.min_version]
    if not spec.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if spec.cert is not None and spec.key is not None:
        load_pair(context, spec.cert, spec.key)
    return context


def tls_failure(exc: ssl.SSLError) -> str:
    """A short reason for a failed handshake with an upstream."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    return str(exc.reason or exc).lower().replace("_", " ")


def handshake_reason(exc: BaseException | None) -> str:
    """The ``reason`` label of a failed handshake (one of ``REASONS``)."""
    if isinstance(exc, ssl.SSLError):
        return _REASONS.get(str(exc.reason), "other")
    if isinstance(exc, ConnectionAbortedError):  # the handshake timeout
        return "timeout"
    if exc is None or isinstance(exc, ConnectionError | EOFError):
        return "reset"
    if isinstance(exc, OSError):
        return "reset"
    return "other"

