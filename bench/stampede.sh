#!/usr/bin/env bash
# Builds side by side on PostgreSQL: for each server binary in turn, a fresh database and server,
# STAMPEDES stampedes (CLIENTS connections released at once on STOCK units, a fresh event each)
# and then DURATION seconds of reservations on one hot event at 256 connections. One line per
# server; the binaries alternate ROUNDS times, so a noisy machine hits them all alike.
#
#   bash bench/stampede.sh                                   # this build, 2 rounds
#   bash bench/stampede.sh /tmp/firstcome-old target/release/firstcome
#   ROUNDS=3 STAMPEDES=5 bash bench/stampede.sh old-binary new-binary
#
# Prints, per server: every stampede's all-answered time in ms, then b's req/s and p99. Also
# checks each stampede's answers: exactly STOCK × 201.
#
# Needs the release binaries (cargo build --release -p firstcome -p loadgen), psql, curl, python3,
# and a PostgreSQL at PG_URL_BASE where the user may create databases.
set -euo pipefail
cd "$(dirname "$0")/.."
PG_URL_BASE=${PG_URL_BASE:-postgres://postgres@127.0.0.1:5432}
ROUNDS=${ROUNDS:-2}
STAMPEDES=${STAMPEDES:-5}
CLIENTS=${CLIENTS:-1500}
STOCK=${STOCK:-1000}
DURATION=${DURATION:-5}
LOADGEN=$PWD/target/release/loadgen
servers=("$@")
[[ ${#servers[@]} -eq 0 ]] && servers=("$PWD/target/release/firstcome")
db=firstcome_stampede_$$
dir=$(mktemp -d target/bench/stampede.XXXXXX 2>/dev/null || { mkdir -p target/bench && mktemp -d target/bench/stampede.XXXXXX; })
server=
cleanup() {
  [[ -n $server ]] && kill "$server" 2>/dev/null
  psql "$PG_URL_BASE/postgres" -qc "DROP DATABASE IF EXISTS $db" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

create_event() { # base json → id
  curl -sf -X POST "$1/v1/events" -H 'Authorization: Bearer bench' -H 'content-type: application/json' -d "$2" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])'
}

for round in $(seq 1 "$ROUNDS"); do
  for bin in "${servers[@]}"; do
    psql "$PG_URL_BASE/postgres" -qc "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" 2>/dev/null
    FIRSTCOME_ADMIN_TOKEN=bench FIRSTCOME_RATE_LIMIT=false RUST_LOG=warn "$bin" serve --bind 127.0.0.1:0 \
      --database-url "$PG_URL_BASE/$db" > "$dir/stdout" 2> "$dir/stderr" &
    server=$!
    for _ in $(seq 1 100); do grep -q listening "$dir/stdout" 2>/dev/null && break; sleep 0.1; done
    base=$(sed -n 's/.*listening on \(http[^ ]*\).*/\1/p' "$dir/stdout")
    times=()
    for i in $(seq 1 "$STAMPEDES"); do
      event=$(create_event "$base" "{\"name\":\"stampede\",\"kind\":\"coupon\",\"stock\":$STOCK}")
      times+=("$("$LOADGEN" burst --url "$base/v1/events/$event/reservations" --clients "$CLIENTS" \
        --distinct-users "r$round-s$i" --prime /healthz | python3 -c '
import json, sys
d = json.load(sys.stdin)
status = d["status"]
if status.get("201") != int(sys.argv[1]):
    sys.exit("expected %s x 201, got %s" % (sys.argv[1], status))
print(round(d["all_answered_ms"]))' "$STOCK")")
    done
    hot=$(create_event "$base" '{"name":"hot","kind":"coupon","stock":100000000}')
    b=$("$LOADGEN" rate --connections 256 --warmup 1 --duration "$DURATION" \
      --url "$base/v1/events/$hot/reservations" --method POST --distinct-users "r$round-b" |
      python3 -c 'import json,sys; d=json.load(sys.stdin); print("%.0f req/s, p99 %s ms" % (d["rps"], d["p99_ms"]))')
    kill "$server"; wait "$server" 2>/dev/null || true; server=
    echo "round $round $(basename "$bin"): stampedes ${times[*]} ms | b $b"
  done
done
