"""``providers``: where upstreams come from besides the file, and ``scale_from_zero``.

``providers.docker`` follows a Docker engine's containers (``proxy.upstream.docker``):
containers labelled ``aiolb.*`` join pools (Traefik's label shape). A pool's
``scale_from_zero`` says what happens to requests while it has no ready upstream: they
wait (``hold``, ``max_pending``) while aiolb wakes it (``wake``), and ``idle_stop``
puts it back to sleep.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from proxy.config.base import ConfigModel, Duration, Timeout
from proxy.config.values import split_host_port


class DockerTLSSpec(ConfigModel):
    """TLS to a Docker engine's ``https://`` endpoint (``dockerd --tlsverify``)."""

    ca: str | None = None
    """PEM file of CAs to verify the engine's certificate with; null: the system's."""
    cert: str | None = None
    """PEM file: the client certificate to present (with ``key``)."""
    key: str | None = None
    """PEM file: the client certificate's private key."""

    @model_validator(mode="after")
    def _pair(self) -> DockerTLSSpec:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together: set both or neither")
        return self


class DockerProviderSpec(ConfigModel):
    """Upstreams from a Docker engine's labelled containers, followed live.

    Labels: ``aiolb.enable``, ``aiolb.pool`` (a YAML pool, or a new one with every
    default), ``aiolb.port`` (default: the only exposed port), ``aiolb.weight``,
    ``aiolb.backup``, ``aiolb.scheme`` (``http``, ``https``, ``h2c``: HTTP/2 with prior
    knowledge, for a pool with ``http_version: "2"``), and for a pool no route
    names: ``aiolb.route.listener``, ``aiolb.route.host``, ``aiolb.route.path_prefix``.
    """

    endpoint: str = "unix:///var/run/docker.sock"
    """``unix:///PATH`` (the engine's socket: root on the host), ``tcp://HOST:PORT``
    (for example a read-only socket proxy) or ``https://HOST:PORT`` (with ``tls``)."""
    exposed_by_default: bool = False
    """false: only containers labelled ``aiolb.enable=true`` join a pool; true: every
    container with an ``aiolb.pool`` label unless ``aiolb.enable=false``."""
    network: str | None = None
    """Which network's address to use for a container; null: its only one, else the
    first by name."""
    host_address: str = "127.0.0.1"
    """The address of containers with ``network_mode: host`` (they have none of their
    own)."""
    tls: DockerTLSSpec | None = None
    """Client TLS for an ``https://`` endpoint; null: none."""

    @field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, value: str) -> str:
        value = value.strip()
        if value.startswith("unix://"):
            if not value[len("unix://") :].startswith("/"):
                raise ValueError(f"unix:// needs an absolute path, got {value!r}")
            return value
        for scheme in ("tcp://", "https://", "http://"):
            if value.startswith(scheme):
                split_host_port(value[len(scheme) :].rstrip("/"))
                return value
        raise ValueError(
            f"must be unix:///PATH, tcp://HOST:PORT or https://HOST:PORT, got {value!r}"
        )

    @model_validator(mode="after")
    def _tls_needs_https(self) -> DockerProviderSpec:
        if self.tls is not None and not self.endpoint.startswith("https://"):
            raise ValueError("tls applies to an https:// endpoint")
        return self

    @property
    def socket_path(self) -> str | None:
        """The unix socket's path, or None for a TCP endpoint."""
        return self.endpoint[len("unix://") :] if self.endpoint.startswith("unix://") else None


class ProvidersSpec(ConfigModel):
    """Sources of upstreams other than the file."""

    docker: DockerProviderSpec | None = None
    """Containers of a Docker engine, by their ``aiolb.*`` labels; null: none."""


class WebhookSpec(ConfigModel):
    """Wake a pool by a POST to a URL (a scaler's endpoint)."""

    webhook: str
    """The URL POSTed to with ``{"pool": NAME, "pending": N}`` as JSON."""

    @field_validator("webhook")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
        return value


class ScaleFromZeroSpec(ConfigModel):
    """What requests do while the pool has no ready upstream: wait (rather than 503)
    while the pool is woken (KEDA's HTTP add-on, Knative's activator, Sablier)."""

    hold: Timeout = 30.0
    """How long a request waits for an upstream to become ready (then 503)."""
    max_pending: Annotated[int, Field(ge=0)] = 200
    """Requests waiting at once; more get 503 at once."""
    wake: Literal["docker"] | WebhookSpec | None = None
    """``docker``: start the pool's stopped labelled containers; ``{webhook: URL}``:
    POST to URL; null: only wait (something else scales the pool)."""
    idle_stop: Annotated[Duration, Field(gt=0)] | None = None
    """``wake: docker``: stop the pool's containers after this long with no request;
    null: never."""

    @model_validator(mode="after")
    def _idle_stop_needs_docker(self) -> ScaleFromZeroSpec:
        if self.idle_stop is not None and self.wake != "docker":
            raise ValueError("idle_stop stops containers: it needs wake: docker")
        return self
