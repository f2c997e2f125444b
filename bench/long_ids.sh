#!/usr/bin/env bash
# The hot path on PostgreSQL with short and long user ids: a statement over one 16 KiB TLS record
# waits for the server's delayed ACK, so row size matters as much as row count.
#
#   bash bench/long_ids.sh                        # this build; user-id prefixes of 5 and 100 characters
#   SERVER_BIN=path/to/firstcome bash bench/long_ids.sh
#   PREFIXES="5 50 120" DURATION=5 bash bench/long_ids.sh
#
# Needs the release binaries (cargo build --release -p firstcome -p loadgen), psql, curl, python3,
# and a PostgreSQL at PG_URL_BASE where the user may create databases.
set -euo pipefail
cd "$(dirname "$0")/.."
SERVER=${SERVER_BIN:-$PWD/target/release/firstcome}
PG_URL_BASE=${PG_URL_BASE:-postgres://postgres@127.0.0.1:5432}
PREFIXES=${PREFIXES:-5 100}
DURATION=${DURATION:-5}
db=firstcome_long_ids_$$
dir=$(mktemp -d target/bench/long_ids.XXXXXX 2>/dev/null || { mkdir -p target/bench && mktemp -d target/bench/long_ids.XXXXXX; })
server=
cleanup() {
  [[ -n $server ]] && kill "$server" 2>/dev/null
  psql "$PG_URL_BASE/postgres" -qc "DROP DATABASE IF EXISTS $db" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

for len in $PREFIXES; do
  psql "$PG_URL_BASE/postgres" -qc "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
  FIRSTCOME_ADMIN_TOKEN=bench FIRSTCOME_RATE_LIMIT=false RUST_LOG=warn "$SERVER" serve --bind 127.0.0.1:0 \
    --database-url "$PG_URL_BASE/$db" > "$dir/stdout" 2> "$dir/stderr" &
  server=$!
  for _ in $(seq 1 100); do grep -q listening "$dir/stdout" 2>/dev/null && break; sleep 0.1; done
  base=$(sed -n 's/.*listening on \(http[^ ]*\).*/\1/p' "$dir/stdout")
  event=$(curl -fsS -X POST "$base/v1/events" -H 'Authorization: Bearer bench' -H 'content-type: application/json' \
    -d '{"name":"hot","kind":"coupon","stock":100000000}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
  prefix=$(head -c "$len" /dev/zero | tr '\0' u)
  target/release/loadgen rate --url "$base/v1/events/$event/reservations" --method POST --distinct-users "$prefix" \
    --connections 256 --duration "$DURATION" --warmup 1 |
    python3 -c "import json,sys; d=json.load(sys.stdin); print('user-id prefix $len: %.0f req/s, p50 %s ms, p99 %s ms, status %s' % (d['rps'], d['p50_ms'], d['p99_ms'], d['status']))"
  kill "$server"; wait "$server" 2>/dev/null || true; server=
done
