#!/usr/bin/env bash
# What SQLite's in-memory user index costs at start: time to listen and RSS on a database of N
# reservations, against an older server binary that kept an index on reservations(user_id).
#
#   OLD_BIN=path/to/older/firstcome bash bench/user_index.sh     # N=2000000 by default
#   N=500000 bash bench/user_index.sh                             # without OLD_BIN: this build only
#
# Needs the release binary (cargo build --release -p firstcome), sqlite3 and bc.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-2000000}
NEW=$PWD/target/release/firstcome
dir=$(mktemp -d target/bench/user_index.XXXXXX 2>/dev/null || { mkdir -p target/bench && mktemp -d target/bench/user_index.XXXXXX; })
server=
trap '[[ -n $server ]] && kill $server 2>/dev/null; rm -rf "$dir"' EXIT

"$NEW" migrate --database-url "sqlite://$dir/new.db" > /dev/null 2>&1
sqlite3 "$dir/new.db" "INSERT INTO events (name, kind, stock, per_user_limit, max_per_request, hold_seconds, created_at, updated_at)
  VALUES ('bench', 'coupon', 100000000, 1, 1, 600, '2026-12-01T00:00:00Z', '2026-12-01T00:00:00Z');"
started=$(date +%s.%N)
sqlite3 "$dir/new.db" "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $N)
  INSERT INTO reservations (id, event_id, user_id, quantity, status, idempotency_key, expires_at, created_at, updated_at)
  SELECT randomblob(16), 1, 'user-' || (abs(random()) % 1000000000), 1, 'issued', NULL, NULL,
         '2026-12-01T00:00:00Z', '2026-12-01T00:00:00Z' FROM n;"
echo "inserted $N reservations in $(echo "$(date +%s.%N) - $started" | bc) s"

measure() { # name binary database
  local name=$1 bin=$2 db=$3 began ready
  began=$(date +%s.%N)
  FIRSTCOME_ADMIN_TOKEN=bench RUST_LOG=info "$bin" serve --bind 127.0.0.1:0 --database-url "sqlite://$db" \
    > "$dir/$name.out" 2> "$dir/$name.err" &
  server=$!
  for _ in $(seq 1 600); do grep -q listening "$dir/$name.out" "$dir/$name.err" 2>/dev/null && break; sleep 0.1; done
  ready=$(echo "$(date +%s.%N) - $began" | bc)
  sleep 1
  echo "$name: listening after ${ready} s, RSS $(awk '/VmRSS/ {print $2}' "/proc/$server/status") kB"
  grep -h 'user index loaded' "$dir/$name.out" "$dir/$name.err" | sed 's/\x1b\[[0-9;]*m//g' | tail -n1 || true
  kill "$server"; wait "$server" 2>/dev/null || true; server=
}

if [[ -n ${OLD_BIN:-} ]]; then
  # The older binary predates the migration that drops the index: give it the index back.
  cp "$dir/new.db" "$dir/old.db"
  sqlite3 "$dir/old.db" "DELETE FROM seaql_migrations WHERE version LIKE 'm20261201_000005%';
    CREATE INDEX ix_reservations_user ON reservations (user_id);"
  measure old "$OLD_BIN" "$dir/old.db"
fi
measure new "$NEW" "$dir/new.db"
