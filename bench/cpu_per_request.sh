#!/usr/bin/env bash
# CPU time per request, per server thread: what a reservation costs compared with GET /healthz.
# Steadier than req/s on a shared machine, because it counts CPU time (utime + stime from
# /proc/<pid>/task/*/stat) rather than wall-clock throughput. Also the load generator's CPU time
# (it shares the cores) and, on PostgreSQL, that of every `postgres` process on the machine: the
# sum bounds what two cores can serve, 2 s of CPU per second / (µs per request).
#
#   bench/cpu_per_request.sh            # SQLite in target/bench, 256 connections, 6 s per run
#   DATABASE_URL=postgres://postgres@127.0.0.1:5432/somedb bench/cpu_per_request.sh
#   SERVER_BIN=/path/to/firstcome bench/cpu_per_request.sh   # another build of the server
#
# Needs the release binaries (cargo build --release -p firstcome -p loadgen), curl and python3.
set -euo pipefail
cd "$(dirname "$0")/.."

CONNECTIONS=${CONNECTIONS:-256}
SERVER=${SERVER_BIN:-target/release/firstcome}
DURATION=${DURATION:-6}
dir=$(mktemp -d target/bench/cpu.XXXXXX 2>/dev/null || { mkdir -p target/bench && mktemp -d target/bench/cpu.XXXXXX; })
url=${DATABASE_URL:-sqlite://$PWD/$dir/cpu.db}
token=cpu-bench-token
tick=$(getconf CLK_TCK)

# Rate limits off by default: one load-generator IP would be refused by the per-IP quotas.
FIRSTCOME_ADMIN_TOKEN=$token FIRSTCOME_RATE_LIMIT=${FIRSTCOME_RATE_LIMIT:-false} RUST_LOG=warn "$SERVER" serve \
  --bind 127.0.0.1:0 --database-url "$url" > "$dir/stdout" 2> "$dir/stderr" &
server=$!
trap 'kill $server 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 1 100); do grep -q listening "$dir/stdout" 2>/dev/null && break; sleep 0.1; done
base=$(sed -n 's/.*listening on \(http[^ ]*\).*/\1/p' "$dir/stdout")
event=$(curl -sf -X POST "$base/v1/events" -H "Authorization: Bearer $token" \
  -H 'content-type: application/json' -d '{"name":"hot","kind":"coupon","stock":100000000}' |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')

snapshot() { for t in /proc/$server/task/*; do echo "$(basename "$t") $(tr ' ' _ < "$t/comm") $(awk '{print $14+$15}' "$t/stat")"; done | sort; }

# The CPU ticks of every `postgres` process (0 when there is none).
postgres_ticks() {
  local total=0 pid t
  for pid in $(pgrep -x postgres || true); do
    t=$(awk '{print $14+$15}' "/proc/$pid/stat" 2>/dev/null || echo 0)
    total=$((total + t))
  done
  echo "$total"
}

# The CPU seconds of this shell's waited-for children (user + system), from `times` in a file:
# in a command substitution it would report the substitution's own children.
children_seconds() { tail -n1 "$1" | tr 'ms' '  ' | awk '{print $1*60 + $2 + $3*60 + $4}'; }

measure() { # name, loadgen args...
  local name=$1; shift
  snapshot > "$dir/before"
  local pg_before; pg_before=$(postgres_ticks)
  times > "$dir/times.before"
  # Not in a command substitution: its CPU time must accrue to this shell for `times`.
  target/release/loadgen rate --connections "$CONNECTIONS" --warmup 0 --duration "$DURATION" "$@" > "$dir/loadgen.json"
  times > "$dir/times.after"
  local pg_after; pg_after=$(postgres_ticks)
  local children_before children_after
  children_before=$(children_seconds "$dir/times.before"); children_after=$(children_seconds "$dir/times.after")
  snapshot > "$dir/after"
  local requests; requests=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["requests"])' "$dir/loadgen.json")
  echo "## $name: $requests requests"
  join "$dir/before" "$dir/after" | awk -v n="$requests" -v hz="$tick" '
    { d = $5 - $3; total += d; if (d > 0) printf "  thread %-8s %-18s %6.1f us/request\n", $1, $2, d * 1e6 / hz / n }
    END { printf "  all server threads                  %6.1f us/request\n", total * 1e6 / hz / n }'
  awk -v n="$requests" -v a="$children_before" -v b="$children_after" \
    'BEGIN { printf "  load generator                      %6.1f us/request\n", (b - a) * 1e6 / n }'
  awk -v n="$requests" -v hz="$tick" -v a="$pg_before" -v b="$pg_after" \
    'BEGIN { if (b > a) printf "  postgres processes                  %6.1f us/request\n", (b - a) * 1e6 / hz / n }'
}

measure "GET /healthz" --url "$base/healthz"
measure "POST reservations (one hot event, distinct users)" \
  --url "$base/v1/events/$event/reservations" --method POST --distinct-users "u$RANDOM"
