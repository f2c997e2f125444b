#!/usr/bin/env bash
# Reservations with the protected edge on (JWT bearer auth + rate limits) against the core
# settings (trusted X-User-Id header, rate limits off), side by side: ROUNDS rounds, each runs
# GET /healthz and POST reservations (one hot event, a new user per request) on a core server,
# and the same on an edge server, each mode on its own SQLite database (so both tables grow
# alike), the order alternating between rounds. Medians; ratios within a round.
#
#   bench/edge.sh                       # needs target/release/{firstcome,loadgen}
#   ROUNDS=3 DURATION=10 bench/edge.sh
#
# The load generator is one IP, so the edge server's per-IP write quota is raised (a real
# deployment sees the crowd from many addresses); every per-user check still runs, and each
# request carries a freshly signed HS256 token that the server verifies.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5} DURATION=${DURATION:-6} WARMUP=${WARMUP:-2} CONNECTIONS=${CONNECTIONS:-256}
mkdir -p target/bench
dir=$(mktemp -d target/bench/edge.XXXXXX)
token=edge-bench-admin-token
secret=edge-bench-jwt-secret-of-at-least-32-bytes
server=
trap '[[ -n $server ]] && kill "$server" 2>/dev/null; rm -rf "$dir"' EXIT

start() { # core|edge
    local flags=(--rate-limit false)
    [[ $1 == edge ]] && flags=(--auth-mode jwt --jwt-secret "$secret" --rate-limit true
        --rate-limit-writes-per-ip '100000000/s')
    FIRSTCOME_ADMIN_TOKEN=$token RUST_LOG=warn target/release/firstcome serve --bind 127.0.0.1:0 \
        --database-url "sqlite://$PWD/$dir/$1.db" "${flags[@]}" >"$dir/stdout" 2>"$dir/stderr" &
    server=$!
    for _ in $(seq 1 200); do grep -q listening "$dir/stdout" 2>/dev/null && break; sleep 0.1; done
    base=$(sed -n 's/.*listening on //p' "$dir/stdout")
    [[ -n $base ]] || { cat "$dir/stderr" >&2; exit 1; }
}
stop() { kill "$server"; wait "$server" 2>/dev/null || true; server=; : >"$dir/stdout"; }
rate() { # label, loadgen args...
    local label=$1; shift
    target/release/loadgen rate --connections "$CONNECTIONS" --duration "$DURATION" --warmup "$WARMUP" "$@" |
        jq -c --arg name "$label" '{"label": $name, rps, p50_ms, p99_ms, status}'
}

declare -A event
for mode in core edge; do
    start "$mode"
    event[$mode]=$(curl -fsS "$base/v1/events" -H "Authorization: Bearer $token" \
        -H 'content-type: application/json' -d '{"name":"hot","kind":"coupon","stock":100000000}' | jq -er .id)
    stop
done
results=$dir/results.jsonl
for round in $(seq 1 "$ROUNDS"); do
    order=(core edge)
    (( round % 2 == 0 )) && order=(edge core)
    for mode in "${order[@]}"; do
        start "$mode"
        users=(--distinct-users "r$round-$mode")
        [[ $mode == edge ]] && users+=(--jwt-secret "$secret")
        rate "$round $mode healthz" --url "$base/healthz" >>"$results"
        rate "$round $mode reserve" --url "$base/v1/events/${event[$mode]}/reservations" --method POST "${users[@]}" >>"$results"
        stop
    done
    echo "round $round done" >&2
done
python3 - "$results" "$ROUNDS" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {r["label"]: r for r in rows}
rounds = int(sys.argv[2])
def med(xs): return statistics.median(xs)
print("| round | core healthz | core reserve | core b/a | core p99 | edge healthz | edge reserve | edge b/a | edge p99 | edge / core reserve | edge statuses |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
cols = {k: [] for k in ("ch", "cr", "cra", "cp", "eh", "er", "era", "ep", "ratio")}
for n in range(1, rounds + 1):
    ch, cr = by[f"{n} core healthz"], by[f"{n} core reserve"]
    eh, er = by[f"{n} edge healthz"], by[f"{n} edge reserve"]
    vals = dict(ch=ch["rps"], cr=cr["rps"], cra=cr["rps"] / ch["rps"], cp=cr["p99_ms"], eh=eh["rps"],
                er=er["rps"], era=er["rps"] / eh["rps"], ep=er["p99_ms"], ratio=er["rps"] / cr["rps"])
    for k, v in vals.items(): cols[k].append(v)
    print(f"| {n} | {vals['ch']:,.0f} | {vals['cr']:,.0f} | {vals['cra']:.0%} | {vals['cp']:.1f} ms | {vals['eh']:,.0f} | {vals['er']:,.0f} | {vals['era']:.0%} | {vals['ep']:.1f} ms | {vals['ratio']:.0%} | {json.dumps(er['status'])} |")
m = {k: med(v) for k, v in cols.items()}
print(f"| **median** | {m['ch']:,.0f} | {m['cr']:,.0f} | {m['cra']:.0%} | {m['cp']:.1f} ms | {m['eh']:,.0f} | {m['er']:,.0f} | {m['era']:.0%} | {m['ep']:.1f} ms | {m['ratio']:.0%} | |")
PY
