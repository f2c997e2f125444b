#!/usr/bin/env bash
# WebSocket fan-out benchmark: CLIENTS listeners on one event (SQLite), then the sale of its last
# unit over HTTP; per client, the time from that 201 to reading `sold_out`. Each run starts a
# fresh server on a fresh database. Progress on stderr, a markdown table of medians on stdout.
#
#   bench/ws_fanout.sh
#   RUNS=1 CLIENTS=2000 bench/ws_fanout.sh
#
# Settings (environment):
#   RUNS          runs; medians are reported                          [3]
#   CLIENTS       concurrent WebSocket clients                        [10000]
#   CONNECT_RATE  new connections per second                          [2000]
#   BENCH_DIR     scratch files (on a real disk: SQLite fsyncs)       [target/bench]
#   KEEP=1        keep the run folder (raw JSON in results.jsonl)
#   SKIP_BUILD=1  use the binaries already in target/release

set -euo pipefail

RUNS=${RUNS:-3}
CLIENTS=${CLIENTS:-10000}
CONNECT_RATE=${CONNECT_RATE:-2000}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
SERVER=$ROOT/target/release/firstcome
LOADGEN=$ROOT/target/release/loadgen

log() { printf '[ws-fanout %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}
for tool in curl jq python3; do
    command -v "$tool" >/dev/null || die "$tool is required"
done

# Each side holds one descriptor per client, plus a margin.
ulimit -n $((CLIENTS + 1024)) 2>/dev/null || die "cannot raise the open-file limit to $((CLIENTS + 1024)) (ulimit -Hn is $(ulimit -Hn))"

BENCH_DIR=${BENCH_DIR:-$ROOT/target/bench}
mkdir -p "$BENCH_DIR"
WORK=$(mktemp -d "$BENCH_DIR/ws.XXXXXX")
RESULTS=$WORK/results.jsonl
: >"$RESULTS"
TOKEN=bench-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
SERVER_PID=

stop_server() {
    if [[ -n $SERVER_PID ]]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=
    fi
}
cleanup() {
    local status=$?
    stop_server
    if [[ ${KEEP:-0} == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    log "building release binaries"
    cargo build --release -p firstcome -p loadgen >&2
fi
[[ -x $SERVER && -x $LOADGEN ]] || die "release binaries missing"

BASE=
start_server() { # run
    local out=$WORK/server-$1.out
    # Rate limits off: every client comes from this one IP, so the per-IP connect quota
    # would refuse all but the first hundred (the limits have their own tests and benchmark).
    FIRSTCOME_ADMIN_TOKEN=$TOKEN "$SERVER" serve --bind 127.0.0.1:0 --rate-limit false \
        --database-url "sqlite://$WORK/run-$1.db" >"$out" 2>"$WORK/server-$1.log" &
    SERVER_PID=$!
    for _ in $(seq 1 600); do
        if grep -q 'listening on' "$out"; then
            BASE=$(grep -o 'http://[0-9.]*:[0-9]*' "$out" | head -n1)
            return 0
        fi
        kill -0 "$SERVER_PID" 2>/dev/null || {
            cat "$WORK/server-$1.log" >&2
            die "the server exited during start-up"
        }
        sleep 0.1
    done
    die "the server did not start within 60 s"
}

for run in $(seq 1 "$RUNS"); do
    start_server "$run"
    event=$(curl -fsS -X POST "$BASE/v1/events" -H "Authorization: Bearer $TOKEN" \
        -H 'Content-Type: application/json' \
        --data '{"name":"ws fan-out","kind":"coupon","stock":1}' | jq -er .id)
    log "run $run/$RUNS: $CLIENTS clients on event $event at $BASE (server pid $SERVER_PID)"
    "$LOADGEN" ws-fanout --url "$BASE" --event "$event" --clients "$CLIENTS" \
        --connect-rate "$CONNECT_RATE" --server-pid "$SERVER_PID" |
        jq -c --argjson run "$run" '. + {run: $run}' >>"$RESULTS"
    log "  $(tail -n1 "$RESULTS" | jq -r '"delivered \(.delivered)/\(.clients), all in \(.all_delivered_ms) ms, p50 \(.p50_ms) ms, p99 \(.p99_ms) ms, RSS \(.rss_connected_kib) KiB connected"')"
    stop_server
    delivered=$(tail -n1 "$RESULTS" | jq -r .delivered)
    [[ $delivered == "$CLIENTS" ]] || die "only $delivered of $CLIENTS clients got sold_out"
done

python3 - "$RESULTS" "$CLIENTS" <<'EOF'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
clients = sys.argv[2]

def med(key, scale=1.0, digits=1):
    values = [r[key] for r in runs if r.get(key) is not None]
    return f"{statistics.median(values) * scale:.{digits}f}" if values else "n/a"

print(f"| WebSocket fan-out, {clients} clients, SQLite ({len(runs)} runs, medians) | value |")
print("|---|---|")
print(f"| clients connected | {med('connected', digits=0)} |")
print(f"| connect time (s) | {med('connect_secs')} |")
print(f"| `sold_out` delivered | {med('delivered', digits=0)} |")
print(f"| all delivered after the 201 (ms) | {med('all_delivered_ms')} |")
print(f"| p50 after the 201 (ms) | {med('p50_ms')} |")
print(f"| p99 after the 201 (ms) | {med('p99_ms')} |")
print(f"| p99 after the sale request was sent (ms) | {med('from_request_p99_ms')} |")
print(f"| server RSS idle (MiB) | {med('rss_idle_kib', 1 / 1024)} |")
print(f"| server RSS with all clients connected (MiB) | {med('rss_connected_kib', 1 / 1024)} |")
print(f"| runs: all delivered ms | {', '.join(str(r.get('all_delivered_ms')) for r in runs)} |")
EOF
