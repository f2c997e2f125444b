#!/usr/bin/env bash
# CPU time per request, per server thread: what a reservation and a sold-out refusal cost
# compared with GET /healthz.
# Steadier than req/s on a shared machine, because it counts CPU time (utime + stime from
# /proc/<pid>/task/*/stat) rather than wall-clock throughput. Also the load generator's CPU time
# (it shares the cores) and, on PostgreSQL, that of every `postgres` process on the machine: the
# sum bounds what two cores can serve, 2 s of CPU per second / (µs per request). The last lines
# give those bounds on b/a and c/a (the `/healthz` sum over the scenario's sum) beside the ratios
# measured in the same run.
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
# Logging at the server's default level, as bench/run.sh runs it: the request span is part of
# the cost (RUST_LOG=warn leaves it out).
FIRSTCOME_ADMIN_TOKEN=$token FIRSTCOME_RATE_LIMIT=${FIRSTCOME_RATE_LIMIT:-false} RUST_LOG=${RUST_LOG:-info} "$SERVER" serve \
  --bind 127.0.0.1:0 --database-url "$url" > "$dir/stdout" 2> "$dir/stderr" &
server=$!
trap 'kill $server 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 1 100); do grep -q listening "$dir/stdout" 2>/dev/null && break; sleep 0.1; done
base=$(sed -n 's/.*listening on \(http[^ ]*\).*/\1/p' "$dir/stdout")
event=$(curl -sf -X POST "$base/v1/events" -H "Authorization: Bearer $token" \
  -H 'content-type: application/json' -d '{"name":"hot","kind":"coupon","stock":100000000}' |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')

# A second event whose only unit is sold: every claim on it is refused `409 sold_out`.
sold_out=$(curl -sf -X POST "$base/v1/events" -H "Authorization: Bearer $token" \
  -H 'content-type: application/json' -d '{"name":"gone","kind":"coupon","stock":1}' |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
curl -sf -o /dev/null -X POST "$base/v1/events/$sold_out/reservations" -H 'x-user-id: the-only-buyer'

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
    END { printf "  all server threads                  %6.1f us/request\n", total * 1e6 / hz / n }' | tee "$dir/server"
  awk -v n="$requests" -v a="$children_before" -v b="$children_after" \
    'BEGIN { printf "  load generator                      %6.1f us/request\n", (b - a) * 1e6 / n }' | tee "$dir/loadgen"
  awk -v n="$requests" -v hz="$tick" -v a="$pg_before" -v b="$pg_after" \
    'BEGIN { if (b > a) printf "  postgres processes                  %6.1f us/request\n", (b - a) * 1e6 / hz / n }' | tee "$dir/postgres"
  # The scenario's requests and its µs of CPU per request on the whole machine.
  cat "$dir/server" "$dir/loadgen" "$dir/postgres" |
    awk -v n="$requests" -v key="$key" '/all server|load generator|postgres processes/ { sum += $(NF - 1) }
      END { printf "%s %d %.1f\n", key, n, sum }' >> "$dir/sums"
}

key=a measure "GET /healthz" --url "$base/healthz"
key=b measure "POST reservations (one hot event, distinct users)" \
  --url "$base/v1/events/$event/reservations" --method POST --distinct-users "u$RANDOM"
key=c measure "POST reservations refused sold_out (distinct users)" \
  --url "$base/v1/events/$sold_out/reservations" --method POST --distinct-users "s$RANDOM"

echo "## bounds: what the CPU per request allows on fully used cores, beside the measured ratio"
awk '{ n[$1] = $2; us[$1] = $3 }
  END { for (k in n) if (k != "a") printf "  %s/a: bound %5.1f%% (%.1f / %.1f us), measured %5.1f%%\n", k, 100 * us["a"] / us[k], us["a"], us[k], 100 * n[k] / n["a"] }' "$dir/sums" | sort
