#!/usr/bin/env bash
# Server CPU time per request, per thread: what a reservation costs compared with GET /healthz.
# Steadier than req/s on a shared machine, because it counts the server's own CPU time
# (utime + stime from /proc/<pid>/task/*/stat) rather than wall-clock throughput.
#
#   bench/cpu_per_request.sh            # SQLite in target/bench, 256 connections, 6 s per run
#   DATABASE_URL=postgres://postgres@127.0.0.1:5432/somedb bench/cpu_per_request.sh
#
# Needs the release binaries (cargo build --release -p firstcome -p loadgen), curl and python3.
set -euo pipefail
cd "$(dirname "$0")/.."

CONNECTIONS=${CONNECTIONS:-256}
DURATION=${DURATION:-6}
dir=$(mktemp -d target/bench/cpu.XXXXXX 2>/dev/null || { mkdir -p target/bench && mktemp -d target/bench/cpu.XXXXXX; })
url=${DATABASE_URL:-sqlite://$PWD/$dir/cpu.db}
token=cpu-bench-token
tick=$(getconf CLK_TCK)

# Rate limits off by default: one load-generator IP would be refused by the per-IP quotas.
FIRSTCOME_ADMIN_TOKEN=$token FIRSTCOME_RATE_LIMIT=${FIRSTCOME_RATE_LIMIT:-false} RUST_LOG=warn target/release/firstcome serve \
  --bind 127.0.0.1:0 --database-url "$url" > "$dir/stdout" 2> "$dir/stderr" &
server=$!
trap 'kill $server 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 1 100); do grep -q listening "$dir/stdout" 2>/dev/null && break; sleep 0.1; done
base=$(sed -n 's/.*listening on \(http[^ ]*\).*/\1/p' "$dir/stdout")
event=$(curl -sf -X POST "$base/v1/events" -H "Authorization: Bearer $token" \
  -H 'content-type: application/json' -d '{"name":"hot","kind":"coupon","stock":100000000}' |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')

snapshot() { for t in /proc/$server/task/*; do echo "$(basename "$t") $(tr ' ' _ < "$t/comm") $(awk '{print $14+$15}' "$t/stat")"; done | sort; }

measure() { # name, loadgen args...
  local name=$1; shift
  snapshot > "$dir/before"
  local out; out=$(target/release/loadgen rate --connections "$CONNECTIONS" --warmup 0 --duration "$DURATION" "$@")
  snapshot > "$dir/after"
  local requests; requests=$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["requests"])')
  echo "## $name: $requests requests"
  join "$dir/before" "$dir/after" | awk -v n="$requests" -v hz="$tick" '
    { d = $5 - $3; total += d; if (d > 0) printf "  thread %-8s %-18s %6.1f us/request\n", $1, $2, d * 1e6 / hz / n }
    END { printf "  all threads                         %6.1f us/request\n", total * 1e6 / hz / n }'
}

measure "GET /healthz" --url "$base/healthz"
measure "POST reservations (one hot event, distinct users)" \
  --url "$base/v1/events/$event/reservations" --method POST --distinct-users "u$RANDOM"
