#!/usr/bin/env bash
# docker_smoke.sh: build the aiolb image and check that it behaves as a container should.
#
#   bash loadtests/docker_smoke.sh          (from anywhere; builds from the repo root)
#
# What it checks, in order:
#   1. `docker build` succeeds; the image runs as uid 10001, stops with SIGTERM, has a
#      HEALTHCHECK, exposes 8080 and 9901, and `aiolb check` passes on its default
#      config (found through AIOLB_CONFIG).
#   2. On a private user-defined network: three demo upstreams and aiolb, all from the
#      image, all with a read-only root filesystem; aiolb is configured only through the
#      environment variables its default config reads.
#   3. Each container's health status becomes "healthy" (the image's HEALTHCHECK).
#   4. From a client container on the same network: requests through aiolb reach all
#      three upstreams; /readyz is open; /metrics needs the token and counts the
#      requests; the dashboard page is in the image.
#   5. `docker stop` drains and exits: exit code 0 (not 137 from SIGKILL) within
#      STOP_LIMIT seconds, with the drain in the log.
#
# Exit status: 0 passed, 1 failed, 77 skipped because no Docker engine is reachable
# (the automake/meson convention for "skipped"; never reported as a pass).
#
# Environment: AIOLB_SMOKE_IMAGE (tag to build, default aiolb:smoke), STOP_LIMIT
# (seconds, default 10), AIOLB_SMOKE_KEEP=1 keeps the containers and network on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

SKIPPED=77
IMAGE=${AIOLB_SMOKE_IMAGE:-aiolb:smoke}
STOP_LIMIT=${STOP_LIMIT:-10}
PREFIX="aiolb-smoke-$$"
NET="$PREFIX-net"
LB="$PREFIX-lb"
UPSTREAMS=("$PREFIX-up-1" "$PREFIX-up-2" "$PREFIX-up-3")
TOKEN="smoke-$$-$RANDOM$RANDOM"
WORK=$(mktemp -d)

say() { printf 'docker_smoke: %s\n' "$*"; }

skip() {
    say "SKIPPED: no Docker engine available ($1)"
    rm -rf "$WORK"
    exit "$SKIPPED"
}

# -- 0. is there an engine? -------------------------------------------------------------
command -v docker >/dev/null 2>&1 || skip "no docker command on PATH"
# `timeout` keeps an unreachable DOCKER_HOST from hanging the script.
info_cmd=(docker info --format '{{.ServerVersion}}')
command -v timeout >/dev/null 2>&1 && info_cmd=(timeout 30 "${info_cmd[@]}")
if ! engine=$("${info_cmd[@]}" 2>"$WORK/info.err"); then
    skip "docker info failed: $(tail -n 1 "$WORK/info.err")"
fi
say "Docker engine $engine"

# -- helpers that need an engine --------------------------------------------------------
CONTAINERS=()

dump_logs() {
    # ${a[@]+...}: an empty array is "unbound" under set -u in bash before 4.4 (macOS)
    for c in ${CONTAINERS[@]+"${CONTAINERS[@]}"}; do
        echo "----- docker logs $c (last 40 lines) -----"
        docker logs --tail 40 "$c" 2>&1 || true
    done
}

fail() {
    say "FAILED: $*"
    dump_logs
    exit 1
}

cleanup() {
    if [ "${AIOLB_SMOKE_KEEP:-0}" = 1 ]; then
        say "keeping containers ${CONTAINERS[*]:-} and network $NET"
    else
        if [ "${#CONTAINERS[@]}" -gt 0 ]; then
            docker rm -f "${CONTAINERS[@]}" >/dev/null 2>&1 || true
        fi
        docker network rm "$NET" >/dev/null 2>&1 || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

inspect() { docker inspect -f "$1" "$2"; }

# Poll until container $1 reports health "healthy", failing early if it exits or
# turns unhealthy. The HEALTHCHECK's first probe runs one interval (10 s) after start.
wait_healthy() {
    local name=$1 deadline=$((SECONDS + 60)) state health
    while :; do
        state=$(inspect '{{.State.Status}}' "$name")
        health=$(inspect '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$name")
        case "$state/$health" in
            running/healthy) say "$name is healthy"; return 0 ;;
            running/unhealthy) fail "$name is unhealthy: $(inspect '{{json .State.Health.Log}}' "$name")" ;;
            running/*) ;;
            *) fail "$name is $state (exit code $(inspect '{{.State.ExitCode}}' "$name"))" ;;
        esac
        [ "$SECONDS" -lt "$deadline" ] || fail "$name not healthy after 60 s (health: $health)"
        sleep 1
    done
}

# -- 1. build and image metadata --------------------------------------------------------
say "building $IMAGE"
if ! docker build -t "$IMAGE" . >"$WORK/build.log" 2>&1; then
    tail -n 40 "$WORK/build.log"
    fail "docker build failed"
fi
size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
say "built $IMAGE ($((size / 1000000)) MB)"

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
uid=$(docker run --rm "$IMAGE" id -u)
[ "$uid" = 10001 ] || fail "the container runs as uid $uid, expected 10001"
docker run --rm "$IMAGE" aiolb check || fail "aiolb check on the image's default config"
say "image metadata OK (user $user, $stopsignal, healthcheck $healthcheck, ports $ports)"

# -- 2. upstreams and aiolb on a private network ----------------------------------------
docker network create "$NET" >/dev/null
for name in "${UPSTREAMS[@]}"; do
    CONTAINERS+=("$name")
    docker run -d --name "$name" --network "$NET" --read-only \
        -e AIOLB_HEALTHCHECK_URL=http://127.0.0.1:8000/healthz \
        "$IMAGE" python /opt/aiolb/demo_upstream.py "$name" >/dev/null
done
CONTAINERS+=("$LB")
# Container names resolve on a user-defined network, so the upstream URLs use them.
docker run -d --name "$LB" --network "$NET" --read-only \
    -e AIOLB_UPSTREAM_1="http://${UPSTREAMS[0]}:8000" \
    -e AIOLB_UPSTREAM_2="http://${UPSTREAMS[1]}:8000" \
    -e AIOLB_UPSTREAM_3="http://${UPSTREAMS[2]}:8000" \
    -e AIOLB_ADMIN_BIND=0.0.0.0:9901 \
    -e AIOLB_ADMIN_TOKEN="$TOKEN" \
    "$IMAGE" >/dev/null

# -- 3. health --------------------------------------------------------------------------
for name in "${UPSTREAMS[@]}" "$LB"; do
    wait_healthy "$name"
done

# -- 4. traffic from a client container -------------------------------------------------
# The client runs the image's Python (no curl in the slim image) on the same network,
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
# The script travels as an argument, not a bind mount: that works with a remote engine too.
if ! docker run --rm --network "$NET" --read-only \
        "$IMAGE" python -c "$(cat "$WORK/client.py")" "$LB" "$TOKEN" "${UPSTREAMS[@]}"; then
    fail "requests through aiolb"
fi

# -- 5. graceful stop -------------------------------------------------------------------
# -t is generous on purpose: what is checked is that aiolb exits by itself, quickly.
started=$SECONDS
docker stop -t 30 "$LB" >/dev/null
took=$((SECONDS - started))
code=$(inspect '{{.State.ExitCode}}' "$LB")
oom=$(inspect '{{.State.OOMKilled}}' "$LB")
[ "$code" = 0 ] || fail "aiolb exited with $code after docker stop (137: killed, not drained)"
[ "$oom" = false ] || fail "aiolb was OOM-killed"
[ "$took" -le "$STOP_LIMIT" ] || fail "docker stop took ${took} s (limit ${STOP_LIMIT} s)"
docker logs "$LB" 2>&1 | grep -q "shutting down" || fail "no 'shutting down' line in aiolb's log"
say "docker stop: exit code 0 after ${took} s"

say "PASSED"
