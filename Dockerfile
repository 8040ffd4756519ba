# aiolb container image.
#
#   docker build -t aiolb .
#   docker run --rm -p 8080:8080 -e AIOLB_UPSTREAM_1=http://host.docker.internal:9001 aiolb
#
# Two stages on the same base: the builder installs aiolb and its dependencies into a
# virtual environment at /opt/venv; the final stage copies only that environment, so
# no build tooling or pip cache ends up in the image. Both stages must use the same
# Python at the same path, since the venv's scripts point at /opt/venv/bin/python,
# which links to the base image's /usr/local/bin/python3.12.

FROM python:3.12-slim AS builder

# Every dependency (uvloop, httptools, aiohttp, pydantic-core) ships manylinux wheels
# for CPython 3.12 on amd64 and arm64, so no compiler is needed even here.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Only what the package build reads (.dockerignore keeps the rest out of the context):
# config/ is the package's proxy.example_configs (aiolb example).
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY config ./config
# The redis extra: rate_limit's shared store works in the image without a rebuild.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir ".[redis]"


FROM python:3.12-slim

LABEL org.opencontainers.image.title="aiolb" \
      org.opencontainers.image.description="asyncio HTTP/1.1 reverse proxy and load balancer" \
      org.opencontainers.image.licenses="MIT"

# PYTHONDONTWRITEBYTECODE: the install already holds compiled modules, and the non-root
# user could not write new ones anyway. PYTHONUNBUFFERED: log lines reach `docker logs`
# as they happen. AIOLB_CONFIG is the default for `aiolb run/check -c`, so
# `docker run IMAGE` serves the file below and `docker run IMAGE aiolb check` checks it.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    AIOLB_CONFIG=/etc/aiolb/aiolb.yaml

# A fixed numeric uid/gid: Kubernetes' runAsNonRoot can only verify a numeric USER,
# and deploy/kubernetes/deployment.yaml runs as the same 10001.
RUN groupadd --system --gid 10001 aiolb \
    && useradd --system --uid 10001 --gid aiolb --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin aiolb

COPY --from=builder /opt/venv /opt/venv
# Owned by root and read-only for aiolb: the proxy never writes its own config.
COPY deploy/docker/aiolb.yaml /etc/aiolb/aiolb.yaml
# The HEALTHCHECK probe, and a demo upstream for docker-compose and the Kubernetes example.
COPY deploy/docker/healthcheck.py deploy/docker/demo_upstream.py /opt/aiolb/

USER 10001:10001

# 8080: the listener in the default config; 9901: the admin API (/metrics, /healthz,
# /readyz, the dashboard), bound to loopback unless AIOLB_ADMIN_BIND and a token say so.
EXPOSE 8080 9901

# SIGTERM drains: stop accepting, finish in-flight requests (up to 30 s), exit 0.
# `docker stop` waits 10 s by default before SIGKILL; give it -t 35 (compose:
# stop_grace_period) when long requests must finish.
STOPSIGNAL SIGTERM

# GET the admin /healthz from inside the container (no curl in the slim image);
# AIOLB_HEALTHCHECK_URL overrides the URL when the admin listens elsewhere.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "/opt/aiolb/healthcheck.py"]

# Exec form: aiolb is PID 1 and receives SIGTERM itself (no shell in between).
CMD ["aiolb", "run"]
