#!/usr/bin/env bash
# The bulk-issuance benchmark: USERS distinct users given one coupon by one bulk job, on SQLite
# and on PostgreSQL, with live reservations on another event running the whole time. Results as
# a markdown table on stdout (progress on stderr); BENCHMARKS.md ("Bulk issuance") records them.
#
#   bench/bulk.sh                       # 10,000,000 users, SQLite then PostgreSQL
#   USERS=1000000 BACKENDS=sqlite bench/bulk.sh
#
# Settings (environment):
#   USERS             distinct users in the target list                       [10000000]
#   ORDER             sequential (user-00000001, user-00000002, …) or shuffled [shuffled]
#   BACKENDS          any of: sqlite postgres                                 [sqlite postgres]
#   LIVE_CONNECTIONS  keep-alive connections claiming on the other event      [16]
#   LIVE_RPS          their paced rate, claims per second (0: as fast as they can) [2000]
#   LIVE_WINDOW       seconds per live-load measurement window                [5]
#   PG_HOST PG_PORT PG_USER   PostgreSQL for scratch databases  [127.0.0.1 5432 postgres]
#   BENCH_DIR         scratch space on a real disk (not tmpfs)  [target/bench]
#   KEEP=1            keep the run folder;  SKIP_BUILD=1  use the binaries in target/release
#
# Per backend, on one fresh server:
#   1. live alone: LIVE_CONNECTIONS claim on a live event for one window (the p99 baseline);
#   2. the job: the list is uploaded (streamed) and the job runs while the live load goes on in
#      back-to-back windows; the server's RSS is sampled every 200 ms;
#   3. checks: the grants table holds USERS rows, the event shows sold = USERS, and every
#      window's answers were 201.
# And, as the yardstick the issue names, the same list loaded raw: `psql \copy` into a table
# with a unique index (PostgreSQL), `sqlite3 .import` into a WITHOUT ROWID table (SQLite).

set -euo pipefail

USERS=${USERS:-10000000}
ORDER=${ORDER:-shuffled}
BACKENDS=${BACKENDS:-sqlite postgres}
LIVE_CONNECTIONS=${LIVE_CONNECTIONS:-16}
LIVE_RPS=${LIVE_RPS:-2000}
LIVE_WINDOW=${LIVE_WINDOW:-5}
PG_HOST=${PG_HOST:-127.0.0.1}
PG_PORT=${PG_PORT:-5432}
PG_USER=${PG_USER:-postgres}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
SERVER=$ROOT/target/release/firstcome
LOADGEN=$ROOT/target/release/loadgen

log() { printf '[bulk %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}
for tool in curl jq python3 psql sqlite3; do
    command -v "$tool" >/dev/null || die "$tool is required"
done

BENCH_DIR=${BENCH_DIR:-$ROOT/target/bench}
mkdir -p "$BENCH_DIR"
WORK=$(mktemp -d "$BENCH_DIR/bulk.XXXXXX")
TOKEN=bench-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
SERVER_PID=
SAMPLER_PID=
PG_DATABASES=()

psql_admin() { psql -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -v ON_ERROR_STOP=1 -qAtc "$1"; }

stop_server() {
    [[ -n $SAMPLER_PID ]] && kill "$SAMPLER_PID" 2>/dev/null || true
    SAMPLER_PID=
    if [[ -n $SERVER_PID ]]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=
    fi
}

cleanup() {
    local status=$?
    stop_server
    for db in "${PG_DATABASES[@]}"; do
        psql_admin "drop database if exists $db with (force)" >/dev/null 2>&1 || log "could not drop $db"
    done
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

# --- the target list --------------------------------------------------------------------------
TARGETS=$WORK/targets.txt
log "writing $USERS user ids ($ORDER)"
if [[ $ORDER == shuffled ]]; then
    seq -f 'user-%08.0f' 1 "$USERS" | shuf --random-source=<(yes) >"$TARGETS"
else
    seq -f 'user-%08.0f' 1 "$USERS" >"$TARGETS"
fi
log "target list: $(du -h "$TARGETS" | cut -f1)"

# --- server helpers ---------------------------------------------------------------------------
BASE=
start_server() { # name database-url
    local name=$1 url=$2 out=$WORK/server-$1.out
    FIRSTCOME_ADMIN_TOKEN=$TOKEN FIRSTCOME_RATE_LIMIT=false "$SERVER" serve --bind 127.0.0.1:0 \
        --database-url "$url" --bulk-dir "$WORK/uploads-$name" --bulk-progress-secs 5 \
        >"$out" 2>"$WORK/server-$name.log" &
    SERVER_PID=$!
    for _ in $(seq 1 600); do
        if grep -q 'listening on' "$out"; then
            BASE=$(grep -o 'http://[0-9.]*:[0-9]*' "$out" | head -n1)
            return 0
        fi
        kill -0 "$SERVER_PID" 2>/dev/null || {
            cat "$WORK/server-$name.log" >&2
            die "the $name server exited during start-up"
        }
        sleep 0.1
    done
    die "the $name server did not start"
}

admin() { # method path [json]
    local body=()
    [[ $# -ge 3 ]] && body=(-H 'Content-Type: application/json' --data "$3")
    curl -fsS -X "$1" "$BASE$2" -H "Authorization: Bearer $TOKEN" "${body[@]}"
}

# The highest RSS of the server process, in MiB, sampled every 200 ms into $1.
sample_rss() {
    local file=$1 pid=$SERVER_PID
    (
        max=0
        while kill -0 "$pid" 2>/dev/null; do
            kb=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
            ((kb > max)) && max=$kb && echo "$max" >"$file"
            sleep 0.2
        done
    ) &
    SAMPLER_PID=$!
}

live_window() { # event-id prefix → one JSON line
    "$LOADGEN" rate --scenario live --method POST --url "$BASE/v1/events/$1/reservations" --connections "$LIVE_CONNECTIONS" \
        --rps "$LIVE_RPS" --duration "$LIVE_WINDOW" --warmup 0.5 --distinct-users "$2"
}

# --- one backend ------------------------------------------------------------------------------
ROWS=()
bench_backend() { # name url
    local name=$1 url=$2
    start_server "$name" "$url"
    local rss_file=$WORK/rss-$name
    echo 0 >"$rss_file"
    sample_rss "$rss_file"
    local bulk live
    bulk=$(admin POST /v1/events "{\"name\":\"bulk\",\"kind\":\"coupon\",\"stock\":$USERS}" | jq -er .id)
    live=$(admin POST /v1/events '{"name":"live","kind":"coupon","stock":100000000}' | jq -er .id)
    local rss_idle
    rss_idle=$(awk '/^VmRSS:/ {print int($2/1024)}' "/proc/$SERVER_PID/status")

    log "$name: live load alone"
    local alone
    alone=$(live_window "$live" "alone-")
    log "  alone: $(jq -r '"\(.rps) req/s, p99 \(.p99_ms) ms"' <<<"$alone")"

    log "$name: uploading and running the job"
    local t0 job
    t0=$(date +%s.%N)
    job=$(curl -fsS -X POST "$BASE/v1/admin/events/$bulk/bulk-issues" -H "Authorization: Bearer $TOKEN" \
        -H 'Content-Type: text/plain' -T "$TARGETS" | jq -er .id)
    local t_uploaded
    t_uploaded=$(date +%s.%N)
    local windows=$WORK/live-$name.jsonl
    : >"$windows"
    local state=queued n=0
    while [[ $state == queued || $state == running ]]; do
        n=$((n + 1))
        live_window "$live" "during$n-" >>"$windows"
        state=$(admin GET "/v1/admin/jobs/$job" | jq -er .state)
    done
    local t_done
    t_done=$(date +%s.%N)
    local view
    view=$(admin GET "/v1/admin/jobs/$job")
    [[ $(jq -r .state <<<"$view") == succeeded ]] || die "job ended $(jq -c . <<<"$view")"
    kill "$SAMPLER_PID" 2>/dev/null || true
    SAMPLER_PID=

    local rows sold
    case $name in
    sqlite) rows=$(sqlite3 "${url#sqlite://}" "select count(*) from bulk_grants where event_id=$bulk and status='issued'") ;;
    postgres) rows=$(psql "$url" -qAtc "select count(*) from bulk_grants where event_id=$bulk and status='issued'") ;;
    esac
    sold=$(curl -fsS "$BASE/v1/events/$bulk" | jq -er .sold)
    [[ $rows == "$USERS" && $sold == "$USERS" ]] || die "$name: $rows rows, sold $sold, expected $USERS"
    jq -e -s 'all(.[]; (.status | keys) == ["201"] and .errors == 0)' "$windows" >/dev/null ||
        die "$name: a live answer was not 201: $(jq -c '.status' "$windows" | sort | uniq -c)"

    local job_s upload_s total_s
    job_s=$(python3 -c "
import datetime,json,sys
v=json.loads(sys.argv[1]); p=lambda s: datetime.datetime.fromisoformat(s.replace('Z','+00:00'))
print(f'{(p(v[\"finished_at\"])-p(v[\"started_at\"])).total_seconds():.1f}')" "$view")
    upload_s=$(python3 -c "print(f'{$t_uploaded-$t0:.1f}')")
    total_s=$(python3 -c "print(f'{$t_done-$t0:.1f}')")
    local rss_max=$(($(cat "$rss_file") / 1024))
    local during_p99 during_max_p99 during_rps
    during_p99=$(jq -s '[.[].p99_ms] | sort | .[length/2|floor]' "$windows")
    during_max_p99=$(jq -s '[.[].p99_ms] | max' "$windows")
    during_rps=$(jq -s '[.[].rps] | sort | .[length/2|floor] | floor' "$windows")
    log "  job $job_s s (upload $upload_s s, submit to done $total_s s), RSS max $rss_max MiB (idle $rss_idle)"
    log "  live during: median p99 $during_p99 ms, worst window p99 $during_max_p99 ms, $during_rps req/s"
    ROWS+=("| $name | $job_s s | $upload_s s | $total_s s | $(python3 -c "print(f'{$USERS/$job_s:,.0f}')") | $rss_idle → $rss_max MiB | $(jq -r .p99_ms <<<"$alone") ms ($(jq -r '.rps|floor' <<<"$alone")/s) | $during_p99 ms / $during_max_p99 ms ($during_rps/s) |")
    stop_server
}

baseline_sqlite() {
    local db=$WORK/baseline.db
    local t0 t1
    t0=$(date +%s.%N)
    sqlite3 "$db" <<EOF >/dev/null
PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;
CREATE TABLE baseline (user_id TEXT PRIMARY KEY) WITHOUT ROWID;
.mode csv
.import $TARGETS baseline
EOF
    t1=$(date +%s.%N)
    BASELINES+=("sqlite3 .import into a WITHOUT ROWID table: $(python3 -c "print(f'{$t1-$t0:.1f}')") s")
}

baseline_postgres() {
    local db=bulk_baseline_$$
    PG_DATABASES+=("$db")
    psql_admin "create database $db"
    local url="postgres://$PG_USER@$PG_HOST:$PG_PORT/$db"
    psql "$url" -qc "create table baseline (user_id varchar(128) primary key)"
    local t0 t1
    t0=$(date +%s.%N)
    psql "$url" -qc "\\copy baseline from '$TARGETS'"
    t1=$(date +%s.%N)
    BASELINES+=("psql \\copy into a table with a unique index: $(python3 -c "print(f'{$t1-$t0:.1f}')") s")
}

BASELINES=()
for backend in $BACKENDS; do
    case $backend in
    sqlite)
        baseline_sqlite
        bench_backend sqlite "sqlite://$WORK/bulk.db"
        ;;
    postgres)
        baseline_postgres
        db=bulk_bench_$$
        PG_DATABASES+=("$db")
        psql_admin "create database $db"
        bench_backend postgres "postgres://$PG_USER@$PG_HOST:$PG_PORT/$db"
        ;;
    *) die "unknown backend $backend" ;;
    esac
done

echo "Bulk issuance of $USERS distinct users ($ORDER), live load $LIVE_RPS claims/s on $LIVE_CONNECTIONS connections, $(nproc) cores, $(date -u +%F)"
echo
echo "| backend | job (started → finished) | upload | submit → done | users/s | server RSS idle → max | live p99 alone | live p99 during the job: median / worst window |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
printf '%s\n' "${ROWS[@]}"
echo
printf -- '- raw baseline, same list, same run: %s\n' "${BASELINES[@]}"
