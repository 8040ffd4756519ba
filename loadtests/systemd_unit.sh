#!/usr/bin/env bash
# systemd_unit.sh: run deploy/systemd/aiolb.service under a real systemd and check what
# `systemd-analyze verify` and the fake NOTIFY_SOCKET test cannot: that the unit works.
#
#   sudo PYTHON=/path/to/venv/bin/python bash loadtests/systemd_unit.sh [--keep]
#
# A Debian rootfs (debootstrap --variant=minbase with systemd, python3-venv and curl; the
# host's release when it is Debian, else bookworm, from the mirror apt uses) is booted
# with `systemd-nspawn --boot`, so that systemd is PID 1 of the container whatever runs
# the host, with only a loopback interface (--private-network). aiolb goes in as the
# unit's install notes say: /opt/aiolb a venv filled from wheels built here (this
# checkout's aiolb, its dependencies for the container's Python: the container needs no
# index), a system user aiolb, the unit in /etc/systemd/system. Two test upstreams
# (upstream@9001, upstream@9002: they answer "PORT PATH", /slow after 3 s) run beside
# it. The container is driven with nsenter (no machined needed on the host).
#
# Checked, each a PASS or FAIL line (exit status 1 when one fails, 2 when the container
# could not be set up):
#   - the control: aiolb started without NOTIFY_SOCKET (a drop-in) serves, but the unit
#     stays activating until the start times out: systemd waits for READY=1;
#   - `systemctl start` returns with the unit active (running), systemd got READY=1 from
#     the main pid before it changed start -> running;
#   - a request through port 80 answers, served by a process of user aiolb whose only
#     capability is CAP_NET_BIND_SERVICE; the access log is /var/log/aiolb/access.log;
#   - `systemctl reload` with a changed upstream: the new one answers (RELOADING=1 and
#     READY=1 reached systemd), the main pid is the same;
#   - `systemctl reload` with a broken config fails, the unit stays active (running)
#     and the old config keeps answering;
#   - `systemctl stop` during a 3 s request: the request ends 200, the unit is inactive
#     with Result=success and exit status 0 (STOPPING=1 reached systemd), no restarts;
#   - no traceback, EPERM or kill in aiolb's journal;
# for `workers: 1`, `workers: 2`, and `workers: 2` with a drop-in that kills (SIGSYS)
# instead of answering EPERM to a system call outside @system-service. INFO lines: the
# versions, `systemd-analyze security`, and whether MemoryDenyWriteExecute=yes (which the
# unit leaves off) would work.
#
# Needs root, debootstrap, systemd-nspawn (systemd-container) and nsenter (util-linux):
# installed with apt-get when missing. PYTHON (default python3) builds the wheels: a
# python with pip that can reach the package index (or the host's pip configuration).
# The pristine rootfs is cached as a tarball in $AIOLB_DOCKER_CACHE (default
# ~/.cache/aiolb; delete it to build again); everything else goes in a tmpfs (about
# 400 MB) on a temp dir under /var/tmp, deleted at the end unless --keep. About 1 min
# with the rootfs cached (the debootstrap adds 2-3 min), most of it the checks' waits.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
# shellcheck source=loadtests/docker_engine.sh
. "$HERE/docker_engine.sh" # _debian_mirror

PACKAGES=systemd,systemd-sysv,dbus,python3,python3-venv,curl,ca-certificates
MACHINE=aiolb-systemd-check
PYTHON=${PYTHON:-python3}
KEEP=0
FAILS=0
STARTED=$SECONDS
WORK=""
NSPAWN_PID=""
LEADER=""
NSPAWN_DIR_EXISTED=1

say() { printf 'systemd_unit: %s\n' "$*" >&2; }
die() { say "$*"; exit 2; }
pass() { printf 'PASS %s\n' "$*"; }
fail() { printf 'FAIL %s\n' "$*"; FAILS=$((FAILS + 1)); }
info() { printf 'INFO %s\n' "$*"; }
# check DESCRIPTION COMMAND...: PASS when COMMAND succeeds; its stdout is the detail
check() {
    local desc=$1 detail
    shift
    if detail=$("$@" 2>&1); then
        pass "$desc${detail:+ ($detail)}"
    else
        fail "$desc${detail:+ ($detail)}"
    fi
}

for arg in "$@"; do
    case $arg in
        --keep) KEEP=1 ;;
        -h | --help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) die "unknown argument: $arg (usage: $0 [--keep])" ;;
    esac
done

# -- the host ---------------------------------------------------------------------------

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, systemd-nspawn)"
missing=()
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
command -v systemd-nspawn >/dev/null 2>&1 || missing+=(systemd-container)
command -v nsenter >/dev/null 2>&1 || missing+=(util-linux)
if [ "${#missing[@]}" -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]}, and no apt-get to install them"
    say "apt-get install ${missing[*]}"
    # no recommends: systemd-container's would put mymachines in the host's nsswitch.conf
    install=(apt-get install -y --no-install-recommends "${missing[@]}")
    "${install[@]}" >/dev/null 2>&1 || { apt-get update >/dev/null 2>&1 && "${install[@]}" >/dev/null; } ||
        die "apt-get install ${missing[*]} failed"
fi
"$PYTHON" -m pip --version >/dev/null 2>&1 || die "$PYTHON has no pip (set PYTHON=...)"

# The pristine rootfs tarball for SUITE, from the cache or made now; prints its path.
systemd_rootfs() {
    local suite=$1 cache key tarball mirror tmp partial
    cache=${AIOLB_DOCKER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/aiolb}
    key=$(printf '%s %s v1' "$suite" "$PACKAGES" | sha256sum | cut -c1-12)
    tarball="$cache/debian-$suite-systemd-$key.tar"
    if [ -s "$tarball" ]; then
        say "rootfs from the cache: $tarball"
        echo "$tarball"
        return 0
    fi
    mirror=$(_debian_mirror "$suite")
    tmp=$(mktemp -d /var/tmp/aiolb-debootstrap.XXXXXX)
    say "debootstrap $suite from $mirror (2-3 min)"
    if ! debootstrap --variant=minbase --include="$PACKAGES" "$suite" "$tmp/rootfs" "$mirror" \
            >"$tmp/debootstrap.log" 2>&1; then
        tail -n 20 "$tmp/debootstrap.log" >&2
        rm -rf --one-file-system "$tmp"
        return 1
    fi
    rm -rf "$tmp"/rootfs/var/cache/apt/archives/*.deb "$tmp"/rootfs/var/lib/apt/lists/* \
        "$tmp"/rootfs/usr/share/{doc,man,info}/*
    mkdir -p "$cache"
    partial=$(mktemp "$tarball.XXXXXX")
    tar --numeric-owner -C "$tmp/rootfs" -cf "$partial" .
    mv "$partial" "$tarball"
    rm -rf --one-file-system "$tmp"
    echo "$tarball"
}

cleanup() {
    local status=$? deadline mount
    if [ -n "$NSPAWN_PID" ] && kill -0 "$NSPAWN_PID" 2>/dev/null; then
        kill -TERM "$NSPAWN_PID" 2>/dev/null || true # nspawn powers the container off
        deadline=$((SECONDS + 30))
        # until it is a zombie (kill -0 still finds one), or 30 s
        while [ "$(awk '{print $3}' "/proc/$NSPAWN_PID/stat" 2>/dev/null || echo Z)" != Z ] &&
                [ "$SECONDS" -lt "$deadline" ]; do
            sleep 0.2
        done
        kill -KILL "$NSPAWN_PID" 2>/dev/null || true
        wait "$NSPAWN_PID" 2>/dev/null || true
    fi
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        awk -v d="$WORK/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r |
            while read -r mount; do umount "$mount" 2>/dev/null || umount -l "$mount" || true; done
        if [ "$KEEP" = 1 ]; then
            say "kept $WORK (rootfs, nspawn.log, journal.txt; a tmpfs: umount it, then rmdir)"
        elif awk -v d="$WORK/" 'index($2, d) == 1 {found = 1} END {exit !found}' /proc/mounts; then
            say "not deleting $WORK: something is still mounted under it"
        else
            umount "$WORK" 2>/dev/null || true
            rm -rf --one-file-system "$WORK"
        fi
    fi
    # what systemd-nspawn leaves on a host whose /run/systemd it did not find
    rmdir "/run/systemd/nspawn/propagate/$MACHINE" 2>/dev/null || true
    if [ "$NSPAWN_DIR_EXISTED" = 0 ]; then
        rmdir /run/systemd/nspawn/propagate /run/systemd/nspawn/locks /run/systemd/nspawn \
            2>/dev/null || true
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# -- the rootfs -------------------------------------------------------------------------

# shellcheck disable=SC1091
SUITE=$( (. /etc/os-release && [ "${ID:-}" = debian ] && echo "${VERSION_CODENAME:-}") || true)
SUITE=${AIOLB_SYSTEMD_SUITE:-${SUITE:-bookworm}}
tarball=$(systemd_rootfs "$SUITE") || die "debootstrap failed"
WORK=$(mktemp -d /var/tmp/aiolb-systemd.XXXXXX)
# a tmpfs: deleting the unpacked rootfs from a disk right after the container took 35 s
mount -t tmpfs -o size=2g,mode=0755 aiolb-systemd "$WORK"
ROOT=$WORK/rootfs
mkdir "$ROOT"
tar --numeric-owner -C "$ROOT" -xpf "$tarball"

# in_root CMD...: CMD in the rootfs (before boot) with none of this shell's environment
in_root() { env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 chroot "$ROOT" "$@"; }

PYVER=$(in_root python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
say "wheels of $REPO for the container's Python $PYVER"
mkdir "$WORK/wheels"
"$PYTHON" -m pip wheel -q --no-deps "$REPO" -w "$WORK/wheels" >"$WORK/pip.log" 2>&1 ||
    { tail -n 20 "$WORK/pip.log" >&2; die "pip wheel $REPO failed"; }
arch=$(uname -m)
platforms=()
for tag in manylinux_2_17 manylinux_2_28 manylinux_2_31 manylinux_2_34 manylinux2014 manylinux1 manylinux_2_5; do
    platforms+=(--platform "${tag}_$arch")
done
"$PYTHON" -m pip download -q --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${platforms[@]}" -d "$WORK/wheels" "$WORK"/wheels/aiolb-*.whl >>"$WORK/pip.log" 2>&1 ||
    { tail -n 20 "$WORK/pip.log" >&2; die "pip download of aiolb's dependencies failed"; }
cp -r "$WORK/wheels" "$ROOT/tmp/wheels"
in_root python3 -m venv /opt/aiolb
in_root /opt/aiolb/bin/pip install -q --no-index --find-links /tmp/wheels aiolb >>"$WORK/pip.log" 2>&1 ||
    { tail -n 20 "$WORK/pip.log" >&2; die "pip install in the rootfs failed"; }
rm -rf "$ROOT/tmp/wheels"
in_root useradd --system --no-create-home --shell /usr/sbin/nologin aiolb
install -d "$ROOT/etc/aiolb"
install -m 0644 "$REPO/deploy/systemd/aiolb.service" "$ROOT/etc/systemd/system/aiolb.service"
echo "$MACHINE" >"$ROOT/etc/hostname"

cat >"$ROOT/usr/local/bin/upstream.py" <<'EOF'
#!/usr/bin/python3
"""A test upstream on 127.0.0.1:PORT: answers "PORT PATH"; /slow... after 3 s."""
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = int(sys.argv[1])


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path.startswith("/slow"):
            time.sleep(3)
        body = f"{PORT} {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
EOF
chmod 0755 "$ROOT/usr/local/bin/upstream.py"
cat >"$ROOT/etc/systemd/system/upstream@.service" <<'EOF'
[Unit]
Description=aiolb test upstream on port %i
[Service]
ExecStart=/usr/local/bin/upstream.py %i
DynamicUser=yes
EOF

# -- boot -------------------------------------------------------------------------------

[ -d /run/systemd/nspawn ] || NSPAWN_DIR_EXISTED=0
say "booting the container (systemd-nspawn --boot)"
systemd-nspawn -D "$ROOT" -M "$MACHINE" --boot --register=no --keep-unit --private-network \
    --console=pipe -q </dev/null >"$WORK/nspawn.log" 2>&1 &
NSPAWN_PID=$!

# The container's PID 1: the child of systemd-nspawn that runs systemd.
deadline=$((SECONDS + 30))
while [ -z "$LEADER" ]; do
    for status in /proc/[0-9]*/status; do
        pid=${status#/proc/}
        pid=${pid%/status}
        if [ "$(awk '/^PPid:/ {print $2}' "$status" 2>/dev/null)" = "$NSPAWN_PID" ] &&
                [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = systemd ]; then
            LEADER=$pid
        fi
    done
    if [ -z "$LEADER" ]; then
        kill -0 "$NSPAWN_PID" 2>/dev/null || { tail -n 20 "$WORK/nspawn.log" >&2; die "systemd-nspawn exited"; }
        [ "$SECONDS" -lt "$deadline" ] || die "no container after 30 s"
        sleep 0.2
    fi
done

# ct CMD...: CMD in the container, as root, with a clean environment
ct() {
    nsenter -t "$LEADER" -m -u -i -n -p -- env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
        LANG=C.UTF-8 SYSTEMD_PAGER= SYSTEMD_COLORS=0 "$@"
}

state=$(timeout 90 nsenter -t "$LEADER" -m -u -i -n -p -- systemctl is-system-running --wait 2>/dev/null) || true
case $state in
    running) ;;
    degraded) say "the container booted degraded: $(ct systemctl --failed --plain --no-legend | tr '\n' ' ')" ;;
    *) tail -n 30 "$WORK/nspawn.log" >&2; die "the container did not boot (state: ${state:-none})" ;;
esac
info "host: $(uname -sr), PID 1 $(cat /proc/1/comm); container: Debian $SUITE, $(ct systemctl --version | head -n 1)"
info "container PID 1: $(ct cat /proc/1/comm), cgroup fs $(ct stat -fc %T /sys/fs/cgroup), python $PYVER, aiolb $(ct /opt/aiolb/bin/aiolb version)"
ct systemctl log-level debug # systemd logs each sd_notify message it gets
ct systemctl start upstream@9001 upstream@9002

# -- helpers for the checks -------------------------------------------------------------

show() { ct systemctl show -p "$1" --value aiolb.service; }
cursor() { ct journalctl -q -n 0 --show-cursor | sed -n 's/^-- cursor: //p'; }
# aiolb's journal (systemd's lines about the unit and aiolb's own) since cursor $1
journal() { ct journalctl -q -u aiolb.service -o cat --no-pager --after-cursor="$1"; }
# journal_has CURSOR REGEX: the journal shows REGEX within 5 s
journal_has() {
    local deadline=$((SECONDS + 5))
    until journal "$1" | grep -Eq -- "$2"; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}
get() { ct curl -sS -m 10 "http://127.0.0.1:80$1"; }
# all_from PORT PATH: 10 requests in a row answered by upstream PORT (5 s to get there)
all_from() {
    local port=$1 path=$2 deadline=$((SECONDS + 5)) i body
    while :; do
        for i in 1 2 3 4 5 6 7 8 9 10; do
            body=$(get "$path-$i" 2>&1) || break
            [ "$body" = "$port $path-$i" ] || break
        done
        if [ "$body" = "$port $path-10" ]; then echo "10 of 10 from $port"; return 0; fi
        if [ "$SECONDS" -ge "$deadline" ]; then echo "got: $body"; return 1; fi
        sleep 0.2
    done
}

# write_config PORT WORKERS [broken]: /etc/aiolb/aiolb.yaml with upstream PORT; a rate
# limit (with workers, a table in a memfd shared by them) and active checks, so that
# more of aiolb runs under the sandbox; "broken" names a pool that does not exist
write_config() {
    local pool=web
    [ "${3:-}" != broken ] || pool=nosuch
    cat >"$ROOT/etc/aiolb/aiolb.yaml" <<EOF
listeners:
  - name: public
    bind: "0.0.0.0:80"
    routes:
      - pool: $pool
        filters:
          - rate_limit: {rate: 1000/s}
pools:
  web:
    upstreams:
      - url: "http://127.0.0.1:$1"
    health_check:
      active: {interval: 1s}
admin:
  bind: "127.0.0.1:9901"
access_log:
  path: /var/log/aiolb/access.log
pid_file: /run/aiolb/aiolb.pid
shutdown_timeout: 10s
workers: $2
EOF
    chmod 0644 "$ROOT/etc/aiolb/aiolb.yaml"
}

# drop_in NAME [LINES...]: /etc/systemd/system/aiolb.service.d/NAME.conf with the
# [Service] LINES, or without LINES removed; then daemon-reload
drop_in() {
    local name=$1 dir="$ROOT/etc/systemd/system/aiolb.service.d"
    shift
    if [ "$#" -gt 0 ]; then
        mkdir -p "$dir"
        printf '[Service]\n' >"$dir/$name.conf"
        printf '%s\n' "$@" >>"$dir/$name.conf"
    else
        rm -f "$dir/$name.conf"
    fi
    ct systemctl daemon-reload
}

ready_before_running() { # CURSOR MAINPID
    journal "$1" | awk -v pid="$2" '
        index($0, "Got notification message from PID " pid " (READY=1)") && !r {r = NR}
        index($0, "Changed start -> running") && !s {s = NR}
        END {
            if (r && s && r < s) {print "READY=1 from pid " pid ", then start -> running"; exit 0}
            print "READY=1 at line " r + 0 ", start -> running at line " s + 0; exit 1
        }'
}

answers() { # PATH PORT
    local body
    body=$(get "$1" 2>&1) || true
    echo "$body"
    [ "$body" = "$2 $1" ]
}

port80_closed() {
    if ct curl -sS -m 2 -o /dev/null http://127.0.0.1:80/ 2>/dev/null; then
        echo "something still answers"
        return 1
    fi
}

seccomp_kills() {
    local value
    value=$(show SystemCallErrorNumber)
    echo "SystemCallErrorNumber=$value"
    [ "$value" != EPERM ] && [ "$value" != 1 ]
}

is_() { # PROPERTY VALUE
    local value
    value=$(show "$1")
    echo "$1=$value"
    [ "$value" = "$2" ]
}

served_by_aiolb_user() { # MAINPID
    local user cap bnd
    user=$(ct stat -c %U "/proc/$1")
    # shellcheck disable=SC2016  # awk's $2
    cap=$(ct awk '/^CapEff:/ {print $2}' "/proc/$1/status")
    # shellcheck disable=SC2016
    bnd=$(ct awk '/^CapBnd:/ {print $2}' "/proc/$1/status")
    echo "user $user, CapEff $cap, CapBnd $bnd"
    # 0x400: CAP_NET_BIND_SERVICE (10) alone
    [ "$user" = aiolb ] && [ "$cap" = 0000000000000400 ] && [ "$bnd" = 0000000000000400 ]
}

worker_count() { # MAINPID WANTED
    local n
    # shellcheck disable=SC2016  # expanded by the container's sh
    n=$(ct sh -c 'for f in /proc/[0-9]*/cmdline; do
            d=${f%/cmdline}
            if [ "$(awk "/^PPid:/ {print \$2}" "$d/status" 2>/dev/null)" = "$1" ] &&
               tr "\0" " " <"$f" 2>/dev/null | grep -q " _worker "; then echo "$d"; fi
        done' sh "$1" | wc -l)
    echo "$n worker processes under pid $1"
    [ "$n" = "$2" ]
}

access_logged() { # PATH
    local deadline=$((SECONDS + 3)) owner
    until ct grep -q "\"path\":\"$1\"" /var/log/aiolb/access.log 2>/dev/null; do
        [ "$SECONDS" -lt "$deadline" ] || { echo "no line for $1"; return 1; }
        sleep 0.2
    done
    owner=$(ct stat -c '%U:%G %a' /var/log/aiolb/access.log)
    echo "a line for $1; the file is $owner"
    case $owner in aiolb:aiolb\ *) ;; *) return 1 ;; esac
}

# journal_clean CURSOR: nothing wrong in aiolb's lines, no kill or exec failure in systemd's
# the admin API's /metrics, with what prometheus_client reads from /proc
metrics_ok() {
    local text
    text=$(ct curl -sS -m 10 http://127.0.0.1:9901/metrics) || return 1
    grep -E '^(process_cpu_seconds_total|process_start_time_seconds|process_open_fds) ' <<<"$text" |
        tr '\n' ' '
    grep -q '^process_start_time_seconds ' <<<"$text" && grep -q '^process_open_fds ' <<<"$text"
}

journal_clean() {
    local bad
    bad=$(ct journalctl -q -u aiolb.service -o short --no-pager --after-cursor="$1" |
        grep -E ' aiolb\[[0-9]+\]: .*(Traceback|ERROR|CRITICAL|Errno|not permitted|Permission denied)| systemd\[1\]: .*(code=killed|code=dumped|SIGSYS|status=(203|31)/)' |
        head -n 3)
    if [ -n "$bad" ]; then echo "$bad" | tr '\n' ' '; return 1; fi
    echo "no traceback, error, EPERM or kill"
}

slow_ok() { # FILE PATH: the body and the status, as one line
    local got
    got=$(tr '\n' ' ' <"$1" | tr -s ' ')
    echo "got: $got"
    [ "$got" = "9002 $2 200" ]
}

# -- the checks -------------------------------------------------------------------------

check "systemd-analyze verify aiolb.service (the container's systemd)" \
    ct systemd-analyze verify /etc/systemd/system/aiolb.service

# The control: systemd waits for READY=1, not for the process or its port. aiolb started
# without NOTIFY_SOCKET (a drop-in; NotifyAccess=none would not do: systemd turns it into
# main for Type=notify) serves, yet the unit stays activating until the start times out.
write_config 9001 1
drop_in no-notify ExecStart= 'ExecStart=/usr/bin/env -u NOTIFY_SOCKET /opt/aiolb/bin/aiolb run' \
    TimeoutStartSec=8s Restart=no
ct systemctl start --no-block aiolb
serving_unready() {
    local deadline=$((SECONDS + 6)) state
    until [ "$(get /unready 2>/dev/null)" = "9001 /unready" ]; do
        [ "$SECONDS" -lt "$deadline" ] || { echo "port 80 did not answer"; return 1; }
        sleep 0.2
    done
    state=$(show ActiveState)/$(show SubState)
    echo "port 80 answers, the unit is $state"
    [ "$state" = activating/start ]
}
check "no READY=1 (NOTIFY_SOCKET unset): aiolb serves but the unit stays activating" serving_unready
timed_out() {
    local deadline=$((SECONDS + 15))
    while [ "$(show ActiveState)" != failed ]; do
        [ "$SECONDS" -lt "$deadline" ] || { echo "ActiveState=$(show ActiveState)"; return 1; }
        sleep 0.5
    done
    is_ Result timeout
}
check "no READY=1: the start fails after TimeoutStartSec" timed_out
ct systemctl stop aiolb 2>/dev/null || true
ct systemctl reset-failed aiolb 2>/dev/null || true
drop_in no-notify

# scenario WORKERS LABEL: start, request, reload, broken reload, stop while a request is in flight
scenario() {
    local workers=$1 label=$2 begin mark pid path stop_start
    say "$label"
    write_config 9001 "$workers"
    begin=$(cursor)
    if ! ct systemctl start aiolb; then
        fail "$label: systemctl start aiolb"
        journal "$begin" | tail -n 20 >&2
        ct systemctl stop aiolb 2>/dev/null || true
        ct systemctl reset-failed aiolb 2>/dev/null || true
        return
    fi
    check "$label: systemctl start: active (running)" is_ SubState running
    pid=$(show MainPID)
    check "$label: systemd got READY=1 before it counted the unit started" ready_before_running "$begin" "$pid"
    [ "$workers" = 1 ] || check "$label: $workers workers" worker_count "$pid" "$workers"
    path=/port80-w$workers
    check "$label: GET $path on port 80 answers" answers "$path" 9001
    check "$label: the main process is user aiolb with CAP_NET_BIND_SERVICE only" served_by_aiolb_user "$pid"
    check "$label: access log in /var/log/aiolb (LogsDirectory=)" access_logged "$path"
    check "$label: /metrics with the process metrics (ProtectProc=invisible)" metrics_ok

    write_config 9002 "$workers"
    mark=$(cursor)
    check "$label: systemctl reload with a changed upstream succeeds" ct systemctl reload aiolb
    check "$label: the new upstream answers" all_from 9002 /reloaded-w"$workers"
    check "$label: RELOADING=1 reached systemd" \
        journal_has "$mark" "Got notification message from PID $pid \(RELOADING=1"
    check "$label: READY=1 after the reload" journal_has "$mark" "PID $pid \(READY=1\)"
    check "$label: same main pid after the reload" is_ MainPID "$pid"

    write_config 9002 "$workers" broken
    mark=$(cursor)
    if ct systemctl reload aiolb 2>/dev/null; then
        fail "$label: systemctl reload with a broken config must fail, it succeeded"
    else
        pass "$label: systemctl reload with a broken config fails"
    fi
    check "$label: still active (running) after the failed reload" is_ SubState running
    check "$label: same main pid after the failed reload" is_ MainPID "$pid"
    check "$label: the old config keeps answering" all_from 9002 /after-broken-w"$workers"
    check "$label: the journal says why (FILE:LINE)" journal_has "$mark" "aiolb.yaml:[0-9]+: .*nosuch"
    write_config 9002 "$workers"

    check "$label: no restart (NRestarts=0)" is_ NRestarts 0
    ct curl -sS -m 30 -w ' %{http_code}' "http://127.0.0.1:80/slow-w$workers" >"$WORK/slow-$workers" 2>&1 &
    local curl_pid=$!
    sleep 1 # the request is at the upstream, which answers after 3 s
    mark=$(cursor)
    stop_start=$SECONDS
    check "$label: systemctl stop" ct systemctl stop aiolb
    wait "$curl_pid" || true
    check "$label: the request in flight at the stop ended 200 (drained)" slow_ok "$WORK/slow-$workers" "/slow-w$workers"
    info "$label: systemctl stop took $((SECONDS - stop_start)) s with a 3 s request in flight"
    check "$label: STOPPING=1 reached systemd" journal_has "$mark" "PID $pid \(STOPPING=1\)"
    check "$label: inactive after the stop" is_ ActiveState inactive
    check "$label: Result=success" is_ Result success
    check "$label: main process exit status 0" is_ ExecMainStatus 0
    check "$label: port 80 is closed" port80_closed
    check "$label: aiolb's journal is clean" journal_clean "$begin"
    ct systemctl reset-failed aiolb 2>/dev/null || true
}

scenario 1 "workers: 1"
scenario 2 "workers: 2"
drop_in strict-seccomp 'SystemCallErrorNumber='
check "drop-in SystemCallErrorNumber= (a call outside @system-service kills) in force" seccomp_kills
scenario 2 "workers: 2, seccomp kills"
drop_in strict-seccomp

# Informational: the hardening the unit leaves off
drop_in mdwe MemoryDenyWriteExecute=yes
write_config 9001 2
if ct systemctl start aiolb 2>/dev/null && [ "$(get /mdwe 2>&1)" = "9001 /mdwe" ] &&
        ct systemctl stop aiolb && [ "$(show Result)" = success ]; then
    info "MemoryDenyWriteExecute=yes (off in the unit) would work here: started, served, stopped"
else
    info "MemoryDenyWriteExecute=yes (off in the unit) breaks aiolb here: $(show Result)"
    ct systemctl stop aiolb 2>/dev/null || true
fi
ct systemctl reset-failed aiolb 2>/dev/null || true
drop_in mdwe
info "systemd-analyze security: $(ct systemd-analyze security aiolb.service --no-pager 2>&1 | tail -n 1 | sed 's/^→ //')"

if [ "$KEEP" = 1 ]; then
    ct journalctl -q -u aiolb.service -o short-monotonic --no-pager >"$WORK/journal.txt" || true
fi
if [ "$FAILS" -gt 0 ]; then
    say "aiolb's journal, the last lines:"
    ct journalctl -q -u aiolb.service -o cat --no-pager |
        grep -vE 'mount|Mount|duplicate|redundant|symlink|parse system call|Collecting|unit change signal' | tail -n 30 >&2 || true
fi
echo "$([ "$FAILS" = 0 ] && echo PASS || echo FAIL): $FAILS failed; $((SECONDS - STARTED)) s"
[ "$FAILS" = 0 ]
