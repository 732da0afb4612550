#!/usr/bin/env bash
# A real S3 server for the S3 backend's tests: SeaweedFS (`weed server -s3`, installed
# by scripts/deps.sh into /opt/seaweedfs), on 127.0.0.1 only, on free ports, with its
# data in a temporary directory and an identities config, so signatures are checked
# and a wrong secret gets a 403.
#
#   scripts/s3-test-server.sh start      start it; print the environment the tests read
#   scripts/s3-test-server.sh stop       stop it and remove its data
#   scripts/s3-test-server.sh run CMD... start, run CMD with the environment, stop
#                                        (also when CMD fails); exits with CMD's status
#
# The environment (also written to $DM_S3_STATE/env, for `source`):
#   DM_S3_ENDPOINT=http://127.0.0.1:PORT  DM_S3_REGION=us-east-1  DM_S3_BUCKET=dm-test
#   DM_S3_ACCESS_KEY_ID=...  DM_S3_SECRET_ACCESS_KEY=...  (random for each start)
#
# DM_S3_STATE (default .build/s3-test-server) holds the pid, the env file, the config,
# the log and the data. WEED (default /opt/seaweedfs/bin/weed, else `weed` on PATH).
# Every wait has a deadline: DM_S3_START_SECONDS (default 90: under load SeaweedFS
# takes a while to elect its master and grow a volume) for start, 10 s for stop.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
state=${DM_S3_STATE:-$root/.build/s3-test-server}
start_seconds=${DM_S3_START_SECONDS:-90}
bucket=dm-test
region=us-east-1

weed_binary() {
    if [[ -n "${WEED:-}" ]]; then
        echo "$WEED"
    elif [[ -x /opt/seaweedfs/bin/weed ]]; then
        echo /opt/seaweedfs/bin/weed
    else
        command -v weed || { echo "s3-test-server: no weed binary (run scripts/deps.sh)" >&2; return 1; }
    fi
}

# Prints N distinct free TCP ports on 127.0.0.1 (all held open at once, so they differ).
free_ports() {
    /usr/bin/python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# Succeeds once the S3 port answers HTTP with any status: an unsigned request gets an
# S3 error document, which proves the gateway is up and checking signatures.
s3_answers() {
    /usr/bin/python3 - "$1" <<'EOF'
import sys, urllib.request, urllib.error
try:
    urllib.request.urlopen(sys.argv[1] + "/", timeout=2)
except urllib.error.HTTPError:
    sys.exit(0)
except Exception:
    sys.exit(1)
EOF
}

# Creates the test bucket: SeaweedFS keeps a bucket as a directory under the filer's
# /buckets, made here through the filer's HTTP API, retried until the filer is ready,
# within the start deadline.
create_bucket() {
    local filer=$1 deadline=$2
    while ((SECONDS < deadline)); do
        /usr/bin/python3 - "http://127.0.0.1:$filer/buckets/$bucket/" <<'EOF' 2>/dev/null && return 0
import sys, urllib.request
request = urllib.request.Request(sys.argv[1], method="POST")
sys.exit(0 if urllib.request.urlopen(request, timeout=5).status in (200, 201) else 1)
EOF
        sleep 1
    done
    return 1
}

stop_server() {
    [[ -d "$state" ]] || return 0
    if [[ -f "$state/pid" ]]; then
        local pid
        pid=$(<"$state/pid")
        # The server runs in its own process group (setsid), so the group is only its own.
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
            # Its graceful shutdown can take half a minute on a loaded host, and the data
            # is thrown away, so it gets 10 s before SIGKILL.
            local deadline=$((SECONDS + 10))
            while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
            if kill -0 "$pid" 2>/dev/null; then
                kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
            fi
        fi
    fi
    rm -rf "$state"
}

start_server() {
    local weed
    weed=$(weed_binary)
    if [[ -f "$state/pid" ]] && kill -0 "$(<"$state/pid")" 2>/dev/null; then
        echo "s3-test-server: already running (pid $(<"$state/pid")); stop it first" >&2
        return 1
    fi
    rm -rf "$state"
    mkdir -p "$state/data"
    local ports
    read -r -a ports <<<"$(free_ports 9)"
    local master=${ports[0]} master_grpc=${ports[1]} volume=${ports[2]} volume_grpc=${ports[3]}
    local filer=${ports[4]} filer_grpc=${ports[5]} s3=${ports[6]} s3_grpc=${ports[7]}
    local key secret
    key=DMTEST$(/usr/bin/python3 -c 'import secrets; print(secrets.token_hex(7).upper())')
    secret=$(/usr/bin/python3 -c 'import secrets; print(secrets.token_urlsafe(30))')
    umask 077
    cat >"$state/s3.json" <<EOF
{
  "identities": [
    {
      "name": "dm-test",
      "credentials": [{ "accessKey": "$key", "secretKey": "$secret" }],
      "actions": ["Admin", "Read", "List", "Tagging", "Write"]
    }
  ]
}
EOF
    local endpoint=http://127.0.0.1:$s3
    cat >"$state/env" <<EOF
export DM_S3_ENDPOINT=$endpoint
export DM_S3_REGION=$region
export DM_S3_BUCKET=$bucket
export DM_S3_ACCESS_KEY_ID=$key
export DM_S3_SECRET_ACCESS_KEY=$secret
EOF
    setsid "$weed" server -ip=127.0.0.1 -ip.bind=127.0.0.1 -dir="$state/data" \
        -master.port="$master" -master.port.grpc="$master_grpc" -master.volumeSizeLimitMB=64 \
        -volume.port="$volume" -volume.port.grpc="$volume_grpc" -volume.max=32 \
        -filer.port="$filer" -filer.port.grpc="$filer_grpc" -filer.localSocket="$state/filer.sock" \
        -s3 -s3.port="$s3" -s3.port.grpc="$s3_grpc" -s3.config="$state/s3.json" \
        -s3.localSocket="$state/s3.sock" -s3.port.iceberg=0 -s3.port.lance=0 \
        </dev/null >"$state/weed.log" 2>&1 &
    echo $! >"$state/pid"
    local deadline=$((SECONDS + start_seconds))
    until s3_answers "$endpoint"; do
        if ! kill -0 "$(<"$state/pid")" 2>/dev/null; then
            echo "s3-test-server: weed exited; last lines of $state/weed.log:" >&2
            tail -n 20 "$state/weed.log" >&2
            return 1
        fi
        if ((SECONDS >= deadline)); then
            echo "s3-test-server: S3 did not answer at $endpoint within ${start_seconds}s" >&2
            tail -n 20 "$state/weed.log" >&2
            return 1
        fi
        sleep 0.5
    done
    if ! create_bucket "$filer" "$deadline"; then
        echo "s3-test-server: could not create bucket $bucket within ${start_seconds}s; see $state/weed.log" >&2
        return 1
    fi
    echo "s3-test-server: SeaweedFS S3 at $endpoint (pid $(<"$state/pid"), bucket $bucket, data $state/data)" >&2
    cat "$state/env"
}

case "${1:-}" in
    start)
        start_server || { stop_server; exit 1; }
        ;;
    stop)
        stop_server
        ;;
    run)
        shift
        (($#)) || { echo "usage: $0 run CMD [ARGS...]" >&2; exit 2; }
        trap stop_server EXIT
        start_server >/dev/null || exit 1
        # shellcheck disable=SC1091
        source "$state/env"
        rc=0
        "$@" || rc=$?
        exit "$rc"
        ;;
    *)
        echo "usage: $0 start|stop|run CMD [ARGS...]" >&2
        exit 2
        ;;
esac
