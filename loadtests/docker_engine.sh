#!/usr/bin/env bash
# docker_engine.sh: a private Docker engine with no bridge network, and a stand-in
# python:3.12-slim built from Debian's packages, for machines where no engine runs and
# Docker Hub cannot be reached (this project's CI machines).
#
#   bash loadtests/docker_engine.sh start DIR    start dockerd under DIR (empty or new);
#                                                prints the DOCKER_HOST to export
#   bash loadtests/docker_engine.sh base         load the stand-in python:3.12-slim into
#                                                that engine ($DOCKER_HOST)
#   bash loadtests/docker_engine.sh stop DIR     stop it and delete DIR
#
# docker_smoke.sh sources this file and does the same when `docker info` finds no engine.
#
# The engine: dockerd as root with its own --data-root, --exec-root and socket under DIR,
# so nothing of a system engine (/var/lib/docker, /var/run/docker.sock) is touched, and
# with --bridge=none --iptables=false --ip6tables=false --ip-masq=false: it creates no
# network interface and no firewall rule. Only the "host" and "none" networks exist;
# builds need `--network host`, containers run with `--network none` (alone or sharing
# one such namespace: its loopback is the only interface).
#
# The stand-in base: `debootstrap --variant=minbase` of the host's Debian release from the
# mirror apt uses, with python3, python3-venv, python-is-python3 and ca-certificates,
# trimmed (docs, man pages, locales, apt lists and caches) and imported as
# local/debian-python:SUITE; then a derived image tagged python:3.12-slim that carries
# this machine's CA bundle and pip index settings (a TLS-intercepting egress proxy would
# otherwise fail every pip download in the build). It holds Debian's Python (3.11 on
# bookworm), not 3.12: it stands in for the real image so that the project's Dockerfile
# builds unchanged, and is only ever loaded into an engine this script started. The
# rootfs tarball is cached in $AIOLB_DOCKER_CACHE (default ~/.cache/aiolb); delete it to
# rebuild from the mirror.

# The stand-in's packages; part of the cache key, so changing them rebuilds the tarball.
STANDIN_PACKAGES=python3,python3-venv,python-is-python3,ca-certificates
STANDIN_TAG=python:3.12-slim

engine_say() { printf 'docker_engine: %s\n' "$*" >&2; }

# Why a private engine cannot be started here, or nothing (status 1) when it can.
engine_unavailable() {
    if ! command -v docker >/dev/null 2>&1; then
        echo "no docker command on PATH"
    elif ! command -v dockerd >/dev/null 2>&1; then
        echo "no engine is reachable and dockerd is not installed (apt-get install docker.io debootstrap)"
    elif [ "$(id -u)" != 0 ]; then
        echo "no engine is reachable, and starting dockerd needs root"
    else
        return 1
    fi
}

# Paths outside DIR that dockerd and containerd create whatever their roots are: each one
# that does not exist before the start is removed again by engine_stop (if still empty).
_engine_outside_paths() { echo /etc/docker/key.json /etc/docker /run/docker/plugins /run/docker /run/containerd/s /run/containerd; }

# engine_start DIR: start dockerd under DIR and wait until it answers (60 s at most).
# Sets and exports DOCKER_HOST; ENGINE_PID is dockerd's pid. Status 1 with the reason on
# stderr when it does not come up.
engine_start() {
    local dir=$1 path deadline
    mkdir -p "$dir/data" "$dir/exec"
    : >"$dir/created-outside"
    for path in $(_engine_outside_paths); do
        [ -e "$path" ] || echo "$path" >>"$dir/created-outside"
    done
    dockerd --data-root "$dir/data" --exec-root "$dir/exec" --pidfile "$dir/dockerd.pid" \
        -H "unix://$dir/docker.sock" --bridge=none --iptables=false --ip6tables=false \
        --ip-masq=false >"$dir/dockerd.log" 2>&1 &
    ENGINE_PID=$!
    echo "$ENGINE_PID" >"$dir/engine.pid"
    export DOCKER_HOST="unix://$dir/docker.sock"
    deadline=$((SECONDS + 60))
    until docker info >/dev/null 2>&1; do
        if ! kill -0 "$ENGINE_PID" 2>/dev/null; then
            tail -n 10 "$dir/dockerd.log" >&2
            engine_say "dockerd exited: $(tail -n 1 "$dir/dockerd.log")"
            return 1
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            tail -n 10 "$dir/dockerd.log" >&2
            engine_say "dockerd did not answer within 60 s: $(tail -n 1 "$dir/dockerd.log")"
            return 1
        fi
        sleep 0.2
    done
}

# engine_stop DIR: stop the dockerd started under DIR (SIGTERM; SIGKILL after 30 s), its
# containerd and the containers with it, unmount what is left under DIR, delete DIR.
engine_stop() {
    local dir=$1 pid deadline path
    [ -d "$dir" ] || return 0
    pid=$(cat "$dir/engine.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        deadline=$((SECONDS + 30))
        while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    # dockerd stops its containerd; after a SIGKILL that one may still run
    pid=$(cat "$dir/exec/containerd/containerd.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
    fi
    # e.g. exec/netns/default, which dockerd leaves mounted; deepest first
    awk -v d="$dir/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r |
        while read -r mount; do umount "$mount" 2>/dev/null || umount -l "$mount" || true; done
    if [ -f "$dir/created-outside" ]; then
        while read -r path; do
            if [ -f "$path" ]; then rm -f "$path"; else rmdir "$path" 2>/dev/null || true; fi
        done <"$dir/created-outside"
    fi
    rm -rf "$dir"
}

# The mirror apt uses for the host's release: the first site serving RELEASE main.
_debian_mirror() {
    local release=$1 site
    # shellcheck disable=SC2016  # $(SITE) and the rest are apt's placeholders
    site=$(apt-get indextargets --no-release-info --format '$(SITE) $(RELEASE) $(COMPONENT)' \
               2>/dev/null | awk -v r="$release" '$2 == r && $3 == "main" {print $1; exit}')
    echo "${site:-http://deb.debian.org/debian}"
}

# _pip_conf FILE: write to FILE the host's pip settings that make sense inside a
# container: the index URLs that are http(s) (not file:// or local paths), the trusted
# hosts, and `cert` pointing at the image's CA bundle; print the CA bundle to copy there
# (pip's `cert` when one is configured, else the system's). pip's order: the config
# files, then the PIP_* variables, the later winning.
_pip_conf() {
    python3 - "$1" <<'PY'
import configparser, os, sys
files = ["/etc/xdg/pip/pip.conf", "/etc/pip.conf", os.path.expanduser("~/.pip/pip.conf"),
         os.path.expanduser("~/.config/pip/pip.conf"), os.environ.get("PIP_CONFIG_FILE", "")]
keys = ("index-url", "extra-index-url", "trusted-host", "cert")
found = {}
for name in files:
    parser = configparser.ConfigParser()
    if name and parser.read(name):
        for section in ("global", "install"):
            for key in keys:
                if parser.has_option(section, key):
                    found[key] = parser.get(section, key)
for key in keys:
    found[key] = os.environ.get("PIP_" + key.upper().replace("-", "_")) or found.get(key, "")
lines = ["[global]", "cert = /etc/ssl/certs/ca-certificates.crt"]
for key in ("index-url", "extra-index-url", "trusted-host"):
    words = [w for w in found[key].split() if key == "trusted-host" or w.startswith("http")]
    if words:
        lines.append(f"{key} = {' '.join(words)}")
with open(sys.argv[1], "w") as out:
    out.write("\n".join(lines) + "\n")
cert = found["cert"]
print(cert if os.path.isfile(cert) else "/etc/ssl/certs/ca-certificates.crt")
PY
}

# The trimmed rootfs tarball for SUITE, from the cache or made now; prints its path.
standin_rootfs() {
    local suite=$1 cache key tarball mirror work partial
    cache=${AIOLB_DOCKER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/aiolb}
    key=$(printf '%s %s v1' "$suite" "$STANDIN_PACKAGES" | sha256sum | cut -c1-12)
    tarball="$cache/debian-$suite-python-$key.tar"
    if [ -s "$tarball" ]; then
        engine_say "stand-in rootfs from the cache: $tarball"
        echo "$tarball"
        return 0
    fi
    command -v debootstrap >/dev/null 2>&1 || {
        engine_say "debootstrap is not installed (apt-get install debootstrap)"
        return 1
    }
    mirror=$(_debian_mirror "$suite")
    work=$(mktemp -d)
    engine_say "debootstrap $suite from $mirror (about a minute)"
    if ! debootstrap --variant=minbase --include="$STANDIN_PACKAGES" "$suite" "$work/rootfs" \
            "$mirror" >"$work/debootstrap.log" 2>&1; then
        tail -n 20 "$work/debootstrap.log" >&2
        rm -rf "$work"
        engine_say "debootstrap failed"
        return 1
    fi
    rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/* \
        "$work"/rootfs/usr/share/{doc,man,info,locale}/*
    mkdir -p "$cache"
    # written beside the final name, then renamed: a concurrent run sees all or nothing
    partial=$(mktemp "$tarball.XXXXXX")
    tar --numeric-owner -C "$work/rootfs" -cf "$partial" .
    mv "$partial" "$tarball"
    rm -rf "$work"
    echo "$tarball"
}

# standin_base: load the stand-in python:3.12-slim into the engine at $DOCKER_HOST.
standin_base() {
    local suite tarball ctx cert
    # shellcheck disable=SC1091
    suite=$( (. /etc/os-release && [ "${ID:-}" = debian ] && echo "${VERSION_CODENAME:-}") || true)
    suite=${suite:-bookworm}
    tarball=$(standin_rootfs "$suite") || return 1
    docker import "$tarball" "local/debian-python:$suite" >/dev/null || return 1
    ctx=$(mktemp -d)
    if ! cert=$(_pip_conf "$ctx/pip.conf") || ! cp "$cert" "$ctx/ca-certificates.crt"; then
        rm -rf "$ctx"
        engine_say "could not write the stand-in's pip configuration"
        return 1
    fi
    cat >"$ctx/Dockerfile" <<EOF
FROM local/debian-python:$suite
LABEL org.opencontainers.image.description="aiolb test stand-in for python:3.12-slim: Debian $suite's python3, not 3.12"
# this machine's CA bundle and pip settings, so that pip in the build reaches the index
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY pip.conf /etc/pip.conf
ENV LANG=C.UTF-8
CMD ["python3"]
EOF
    if ! DOCKER_BUILDKIT=0 docker build --network host -t "$STANDIN_TAG" "$ctx" >"$ctx/build.log" 2>&1; then
        cat "$ctx/build.log" >&2
        rm -rf "$ctx"
        return 1
    fi
    rm -rf "$ctx"
    engine_say "$STANDIN_TAG is a stand-in: $(docker run --rm --network none "$STANDIN_TAG" python --version) from Debian $suite"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    case "${1:-}" in
        start)
            [ -n "${2:-}" ] || { echo "usage: $0 start DIR" >&2; exit 2; }
            if reason=$(engine_unavailable); then engine_say "$reason"; exit 1; fi
            engine_start "$(realpath -m "$2")"
            echo "export DOCKER_HOST=$DOCKER_HOST"
            disown "$ENGINE_PID" ;;
        stop)
            [ -n "${2:-}" ] || { echo "usage: $0 stop DIR" >&2; exit 2; }
            engine_stop "$(realpath -m "$2")" ;;
        base)
            standin_base ;;
        *)
            echo "usage: $0 start DIR | base | stop DIR" >&2
            exit 2 ;;
    esac
fi
