"""The ``tls`` sections: termination on a listener, and TLS to a pool's upstreams.

These say which files to use; ``proxy.tls`` builds the SSL contexts from them, and
``proxy.runtime.files`` opens the files when a config is checked.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from proxy.config.base import ConfigModel

TLSVersion = Literal["TLSv1.2", "TLSv1.3"]


class CertificateSpec(ConfigModel):
    """A certificate chain (PEM, the leaf first) and its private key (PEM)."""

    cert: str
    """PEM file: the certificate, then its intermediates."""
    key: str
    """PEM file: the certificate's private key."""


class ListenerTLSSpec(ConfigModel):
    """TLS termination on a listener.

    ``certificates``: the first is the default; the others are chosen by SNI, by the
    names in their subjectAltName (``*.example.com`` wildcards too). ``min_version``:
    the oldest protocol accepted. ``ciphers``: an OpenSSL cipher string for TLS 1.2
    (None: Python's secure defaults; TLS 1.3 suites are OpenSSL's). ``client_ca``: a
    PEM file of CAs; set, every client must present a certificate signed by one (mTLS).
    """

    certificates: Annotated[list[CertificateSpec], Field(min_length=1)]
    """The first is the default; the others are chosen by SNI, by the names in their
    subjectAltName (wildcards too)."""
    min_version: TLSVersion = "TLSv1.2"
    """The oldest TLS version accepted."""
    ciphers: str | None = None
    """An OpenSSL cipher string for TLS 1.2; null: Python's secure defaults."""
    client_ca: str | None = None
    """PEM file of CAs; set, every client must present a certificate one of them signed
    (mTLS)."""


class UpstreamTLSSpec(ConfigModel):
    """How a pool talks TLS to its ``https://`` upstreams.

    ``ca``: a PEM file of CAs to verify upstream certificates with (None: the system's
    store). ``server_name``: the SNI and verification name (None: each url's host).
    ``cert``/``key``: a client certificate to present. ``verify: false`` accepts any
    certificate (logged as a warning at start): only when written out.
    """

    ca: str | None = None
    """PEM file of CAs to verify the upstreams' certificates with; null: the system's
    store."""
    server_name: str | None = None
    """The SNI and verification name; null: each url's host."""
    cert: str | None = None
    """PEM file: a client certificate to present (with ``key``)."""
    key: str | None = None
    """PEM file: the client certificate's private key."""
    verify: bool = True
    """``false`` accepts any certificate (a warning at start)."""
    min_version: TLSVersion = "TLSv1.2"
    """The oldest TLS version used."""

    @model_validator(mode="after")
    def _pair(self) -> UpstreamTLSSpec:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together: set both or neither")
        return self
