#!/usr/bin/env bash
# What the rate-limit middleware costs on the cheapest limited route: POST reservations on a
# sold-out event (answered from memory, no database), distinct users, over keep-alive
# connections. Alternates servers with rate limits off and on (both limiters checked on every
# request, quotas too high to refuse) on the same database, ROUNDS times.
#
#   bench/rate_limit_overhead.sh          # needs target/release/{firstcome,loadgen}
#   ROUNDS=3 DURATION=5 CONNECTIONS=64 bench/rate_limit_overhead.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3} DURATION=${DURATION:-5} CONNECTIONS=${CONNECTIONS:-64}
mkdir -p target/bench
dir=$(mktemp -d target/bench/ratelimit.XXXXXX)
token=rate-limit-bench-token
server=
trap '[[ -n $server ]] && kill "$server" 2>/dev/null; rm -rf "$dir"' EXIT

start() { # on|off
    local flags=(--rate-limit false)
    [[ $1 == on ]] && flags=(--rate-limit true --rate-limit-writes-per-user '1000/s'
        --rate-limit-writes-per-ip '10000000/s')
    FIRSTCOME_ADMIN_TOKEN=$token RUST_LOG=warn target/release/firstcome serve --bind 127.0.0.1:0 \
        --database-url "sqlite://$PWD/$dir/bench.db" "${flags[@]}" >"$dir/stdout" 2>"$dir/stderr" &
    server=$!
    for _ in $(seq 1 100); do grep -q listening "$dir/stdout" 2>/dev/null && break; sleep 0.1; done
    base=$(sed -n 's/.*listening on //p' "$dir/stdout")
}
stop() { kill "$server"; wait "$server" 2>/dev/null || true; server=; : >"$dir/stdout"; }

start off
id=$(curl -fsS "$base/v1/events" -H "Authorization: Bearer $token" -H 'content-type: application/json' \
    -d '{"name":"sold out","kind":"coupon","stock":1}' | jq -er .id)
curl -fsS -o /dev/null -X POST "$base/v1/events/$id/reservations" -H 'X-User-Id: seed'
stop
echo "| round | limits | req/s | p99 ms | statuses |"
echo "|---|---|---|---|---|"
for round in $(seq 1 "$ROUNDS"); do
    for mode in off on; do
        start "$mode"
        target/release/loadgen rate --url "$base/v1/events/$id/reservations" --method POST \
            --distinct-users "r$round" --connections "$CONNECTIONS" --duration "$DURATION" --warmup 1 |
            jq -r --arg r "$round" --arg m "$mode" '"| \($r) | \($m) | \(.rps|floor) | \(.p99_ms) | \(.status|tojson) |"'
        stop
    done
done
