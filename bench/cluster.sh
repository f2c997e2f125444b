#!/usr/bin/env bash
# Several nodes: 1 node against NODES nodes (3) on this machine, all through one Redis and one
# PostgreSQL, then the reconciliation time after a kill -9. Progress on stderr, a markdown report
# on stdout. See BENCHMARKS.md ("Several nodes") for the recorded figures.
#
#   bench/cluster.sh                  # builds release binaries first
#   SKIP_BUILD=1 bash bench/cluster.sh
#   ROUNDS=5 DURATION=10 bench/cluster.sh
#   bench/cluster.sh --check          # the set-up alone (binaries, Redis, a database, migrations), no load
#
# Settings (environment):
#   ROUNDS        rounds; each measures 1 node and NODES nodes, the order alternating     [3]
#   NODES         nodes in the larger cluster                                             [3]
#   DURATION      measured seconds per phase                                              [10]
#   WARMUP        warm-up seconds before each measured window                             [2]
#   CONNECTIONS   keep-alive connections in all, spread round-robin over the nodes        [256]
#   RECONCILE_AFTER   --reconcile-after-secs of the kill -9 run (the server's default)    [30]
#   RECONCILE_LOAD    seconds of load in that run; node NODES is killed at RECONCILE_KILL_AT [8 / 4]
#   RECONCILE_TIMEOUT give up waiting for the ledger to match PostgreSQL after this long   [RECONCILE_AFTER + 30]
#   SKIP_RECONCILE=1  leave the kill -9 run out
#   PG_HOST PG_PORT PG_USER   PostgreSQL to create scratch databases on [127.0.0.1 5432 postgres]
#   REDIS_URL     use this Redis [unset: a private redis-server on a free port, started and stopped
#                 here; CONFIG RESETSTAT and INFO commandstats are server-wide, so a Redis that
#                 other programs use at the same time would count their commands too]
#   BENCH_DIR     scratch files (logs, raw JSON)                                          [target/bench]
#   KEEP=1        keep BENCH_DIR's run folder (raw JSON lines in results.jsonl)
#   SKIP_BUILD=1  use the binaries already in target/release
#   SERVER_BIN    run this server binary instead of target/release/firstcome
#
# Each phase gets a fresh PostgreSQL database (migrated once, before its nodes start) and a fresh
# Redis key prefix; rate limits are off (FIRSTCOME_RATE_LIMIT=false: the load generator is one IP).
# One hot coupon event (stock 10,000,000, per_user_limit 1, a new user per request) takes
# POST reservations in a closed loop. Measured per phase:
#   - reservations/s, p50, p99 (loadgen, measured window);
#   - Redis commands per reservation over the whole run (warm-up included), against the
#     reservations committed in that time (rows in PostgreSQL): CONFIG RESETSTAT before the load,
#     INFO commandstats after it. "sent" is what the nodes sent (their
#     firstcome_redis_calls_total, all nodes summed); "scripts" is cmdstat_evalsha + evalsha_ro
#     (+ eval, eval_ro, fcall, fcall_ro); "all" counts every command Redis executed, those called
#     inside scripts included (the bench's own INFO and CONFIG RESETSTAT left out);
#   - Redis main-thread CPU per reservation and per script call (INFO cpu), and EVALSHA's
#     usec_per_call: what one Redis shard can take;
#   - the persisters' rows per commit and commit latency, all nodes together (/v1/admin/stats);
#   - a check that every answer was 201 and the event's held + sold equals PostgreSQL's active units.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
NODES=${NODES:-3}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
CONNECTIONS=${CONNECTIONS:-256}
RECONCILE_AFTER=${RECONCILE_AFTER:-30}
RECONCILE_LOAD=${RECONCILE_LOAD:-8}
RECONCILE_KILL_AT=${RECONCILE_KILL_AT:-4}
RECONCILE_TIMEOUT=${RECONCILE_TIMEOUT:-$((RECONCILE_AFTER + 30))}
PG_HOST=${PG_HOST:-127.0.0.1}
PG_PORT=${PG_PORT:-5432}
PG_USER=${PG_USER:-postgres}
CHECK_ONLY=0

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
SERVER=${SERVER_BIN:-$ROOT/target/release/firstcome}
LOADGEN=$ROOT/target/release/loadgen

log() { printf '[cluster %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
    case $1 in
        --check) CHECK_ONLY=1 ;;
        -h | --help)
            usage
            exit 0
            ;;
        *) die "unknown argument '$1' (settings are environment variables; see --help)" ;;
    esac
    shift
done

is_count() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }
is_seconds() { [[ $1 =~ ^([0-9]+(\.[0-9]+)?)$ ]]; }
for name in ROUNDS NODES CONNECTIONS RECONCILE_AFTER RECONCILE_TIMEOUT; do
    is_count "${!name}" || die "$name must be a positive integer, not '${!name}'"
done
for name in DURATION WARMUP RECONCILE_LOAD RECONCILE_KILL_AT; do
    is_seconds "${!name}" || die "$name must be a number of seconds, not '${!name}'"
done
((NODES >= 2)) || die "NODES must be at least 2 (it is compared with 1 node)"
((CONNECTIONS >= NODES)) || die "CONNECTIONS ($CONNECTIONS) must be at least NODES ($NODES)"
python3 -c "import sys; sys.exit(0 if 0 < float(sys.argv[1]) < float(sys.argv[2]) else 1)" \
    "$RECONCILE_KILL_AT" "$RECONCILE_LOAD" ||
    die "RECONCILE_KILL_AT ($RECONCILE_KILL_AT) must fall inside RECONCILE_LOAD ($RECONCILE_LOAD)"

for tool in curl jq python3 psql redis-cli redis-server; do
    command -v "$tool" >/dev/null || die "$tool is required"
done

BENCH_DIR=${BENCH_DIR:-$ROOT/target/bench}
mkdir -p "$BENCH_DIR"
WORK=$(mktemp -d "$BENCH_DIR/cluster.XXXXXX")
RESULTS=$WORK/results.jsonl
: >"$RESULTS"
TOKEN=bench-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
RUN_ID=$$
NODE_PIDS=()
NODE_BASES=()
PG_DATABASES=()
REDIS_PREFIXES=()
LOADGEN_PID=
PRIVATE_REDIS_PORT=
PRIVATE_REDIS_PID=

psql_admin() { psql -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -v ON_ERROR_STOP=1 -qAtc "$1"; }
psql_db() { psql -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d "$1" -v ON_ERROR_STOP=1 -qAtc "$2"; }
rcli() { redis-cli -u "$REDIS_URL" "$@"; }

stop_nodes() {
    local pid
    for pid in "${NODE_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${NODE_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    NODE_PIDS=()
    NODE_BASES=()
}

drop_prefix() { # prefix: delete its keys (a shared Redis keeps nothing of ours)
    rcli --scan --pattern "$1:*" 2>/dev/null | while read -r key; do rcli unlink "$key" >/dev/null; done || true
}

cleanup() {
    local status=$?
    [[ -n $LOADGEN_PID ]] && kill "$LOADGEN_PID" 2>/dev/null
    stop_nodes
    local db prefix
    for db in "${PG_DATABASES[@]}"; do
        psql_admin "drop database if exists $db with (force)" >/dev/null 2>&1 ||
            log "could not drop PostgreSQL database $db"
    done
    if [[ -n $PRIVATE_REDIS_PID ]]; then
        redis-cli -p "$PRIVATE_REDIS_PORT" shutdown nosave >/dev/null 2>&1 || kill "$PRIVATE_REDIS_PID" 2>/dev/null
        wait "$PRIVATE_REDIS_PID" 2>/dev/null || true
    elif [[ -n ${REDIS_URL:-} ]]; then
        for prefix in "${REDIS_PREFIXES[@]}"; do drop_prefix "$prefix"; done
    fi
    if [[ ${KEEP:-0} == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- build -----------------------------------------------------------------------------------
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    log "building release binaries"
    cargo build --release -p firstcome -p loadgen >&2
fi
[[ -x $SERVER && -x $LOADGEN ]] || die "release binaries missing; run cargo build --release -p firstcome -p loadgen"
"$LOADGEN" rate --help | grep -q -- '--target' || die "$LOADGEN has no --target option; rebuild it"

# --- Redis -----------------------------------------------------------------------------------
if [[ -z ${REDIS_URL:-} ]]; then
    PRIVATE_REDIS_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    # As this machine runs Redis, and as README "Running several nodes" requires it: nothing on
    # disk, no eviction.
    redis-server --bind 127.0.0.1 --port "$PRIVATE_REDIS_PORT" --save "" --appendonly no \
        --maxmemory-policy noeviction --dir "$WORK" >"$WORK/redis.log" 2>&1 &
    PRIVATE_REDIS_PID=$!
    REDIS_URL=redis://127.0.0.1:$PRIVATE_REDIS_PORT
    for _ in $(seq 1 50); do
        [[ $(rcli ping 2>/dev/null) == PONG ]] && break
        kill -0 "$PRIVATE_REDIS_PID" 2>/dev/null || { cat "$WORK/redis.log" >&2; die "redis-server exited"; }
        sleep 0.1
    done
    log "private Redis at $REDIS_URL"
fi
[[ $(rcli ping 2>/dev/null) == PONG ]] || die "Redis at $REDIS_URL does not answer"
REDIS_VERSION=$(rcli info server | tr -d '\r' | sed -n 's/^redis_version://p')
REDIS_POLICY=$(rcli config get maxmemory-policy | sed -n 2p)

# --- PostgreSQL ------------------------------------------------------------------------------
psql_admin 'select 1' >/dev/null || die "PostgreSQL at $PG_HOST:$PG_PORT does not answer (user $PG_USER)"
PG_VERSION=$(psql_admin 'show server_version')
PG_MAX_CONNECTIONS=$(psql_admin 'show max_connections')

new_database() { # tag → a fresh, migrated database's name
    local db=fccluster_${RUN_ID}_$1
    psql_admin "create database $db" >/dev/null
    PG_DATABASES+=("$db")
    FIRSTCOME_ADMIN_TOKEN=$TOKEN "$SERVER" migrate --database-url "postgres://$PG_USER@$PG_HOST:$PG_PORT/$db" \
        >"$WORK/migrate-$1.log" 2>&1 || {
        cat "$WORK/migrate-$1.log" >&2
        die "migrations failed on $db"
    }
    echo "$db"
}

drop_database() { # name
    psql_admin "drop database if exists $1 with (force)" >/dev/null
    local kept=() db
    for db in "${PG_DATABASES[@]}"; do [[ $db == "$1" ]] || kept+=("$db"); done
    PG_DATABASES=("${kept[@]}")
}

# The server must know the several-node settings. An older binary refuses the unknown flag; an
# unknown variable would be ignored and the nodes would serve alone, so flags are used below.
cluster_mode_built() { "$SERVER" serve --help | grep -q -- '--redis-url'; }

if [[ $CHECK_ONLY == 1 ]]; then
    db=$(new_database check)
    tables=$(psql_db "$db" "select count(*) from information_schema.tables where table_name in ('events', 'reservations')")
    [[ $tables == 2 ]] || die "the migrated database lacks events/reservations"
    drop_database "$db"
    log "ok: loadgen has --target"
    log "ok: Redis $REDIS_VERSION at $REDIS_URL (maxmemory-policy $REDIS_POLICY)"
    log "ok: PostgreSQL $PG_VERSION (max_connections $PG_MAX_CONNECTIONS); created, migrated and dropped $db"
    if cluster_mode_built; then
        log "ok: the server has --redis-url"
    else
        die "the server in $SERVER has no --redis-url: several-node mode is not built in"
    fi
    exit 0
fi
cluster_mode_built || die "the server in $SERVER has no --redis-url: several-node mode is not built in"
# Each node: its pool (db_max_connections, 8 by default) + the persister's own connection.
need=$((NODES * 9 + 1))
((PG_MAX_CONNECTIONS >= need)) || die "PostgreSQL max_connections is $PG_MAX_CONNECTIONS; $NODES nodes need at least $need"

# --- nodes -----------------------------------------------------------------------------------
start_nodes() { # tag count database prefix [extra serve flags...]
    local tag=$1 count=$2 db=$3 prefix=$4
    shift 4
    local i out pid
    REDIS_PREFIXES+=("$prefix")
    for i in $(seq 1 "$count"); do
        out=$WORK/node-$tag-$i
        FIRSTCOME_ADMIN_TOKEN=$TOKEN FIRSTCOME_RATE_LIMIT=false RUST_LOG=${RUST_LOG:-warn} \
            "$SERVER" serve --bind 127.0.0.1:0 --database-url "postgres://$PG_USER@$PG_HOST:$PG_PORT/$db" \
            --redis-url "$REDIS_URL" --redis-prefix "$prefix" --node-id "bench-$tag-$i" "$@" \
            >"$out.out" 2>"$out.log" &
        NODE_PIDS+=($!)
    done
    for i in $(seq 1 "$count"); do
        out=$WORK/node-$tag-$i
        pid=${NODE_PIDS[$((i - 1))]}
        for _ in $(seq 1 600); do
            grep -q 'listening on' "$out.out" 2>/dev/null && break
            kill -0 "$pid" 2>/dev/null || {
                tail -n 20 "$out.log" >&2
                die "node $i of $tag exited during start-up"
            }
            sleep 0.1
        done
        NODE_BASES+=("$(grep -o 'http://[0-9.]*:[0-9]*' "$out.out" | head -n1)")
        [[ -n ${NODE_BASES[$((i - 1))]} ]] || die "node $i of $tag did not start within 60 s"
        curl -fsS -o /dev/null "${NODE_BASES[$((i - 1))]}/readyz" || die "node $i of $tag is not ready"
    done
    log "  $count node(s): ${NODE_BASES[*]}"
}

admin() { # base method path [json]
    local body=()
    [[ $# -ge 4 ]] && body=(-H 'Content-Type: application/json' --data "$4")
    curl -fsS -X "$2" "$1$3" -H "Authorization: Bearer $TOKEN" "${body[@]}"
}

hot_event() { # → id, created on the first node and visible on every node
    local id base
    id=$(admin "${NODE_BASES[0]}" POST /v1/events \
        '{"name":"cluster bench hot coupon","kind":"coupon","stock":10000000,"per_user_limit":1,"max_per_request":1}' | jq -er .id)
    for base in "${NODE_BASES[@]}"; do
        curl -fsS -o /dev/null "$base/v1/events/$id" || die "event $id is not visible on $base"
    done
    echo "$id"
}

active_units() { # database event → units in active reservations (issued, redeemed, confirmed, held)
    psql_db "$1" "select coalesce(sum(quantity), 0) from reservations where event_id = $2 and status in ('issued', 'redeemed', 'confirmed', 'held')"
}

# held + sold as one node shows the event, and PostgreSQL's active units, read around it.
ledger_matches_db() { # base database event → prints "ledger db"; true when they agree
    local before after event
    before=$(active_units "$2" "$3")
    event=$(curl -fsS "$1/v1/events/$3") || return 1
    after=$(active_units "$2" "$3")
    local taken
    taken=$(jq -r '.held + .sold' <<<"$event")
    echo "$taken $after"
    # why: the two reads are not one snapshot; agreeing counts only mean something when no
    # commit landed between them.
    [[ $before == "$after" && $taken == "$after" ]]
}

metrics_sum() { # series [label=value]: summed over every running node's /metrics; null if none has it
    local base
    for base in "${NODE_BASES[@]}"; do
        curl -fsS "$base/metrics" 2>/dev/null || true
    done | python3 -c '
import re, sys
name, want = sys.argv[1], dict(a.split("=", 1) for a in sys.argv[2:])
total, found = 0.0, False
for line in sys.stdin:
    m = re.match(r"([A-Za-z_:][A-Za-z0-9_:]*)(\{(.*)\})?\s+(\S+)", line)
    if not m or m.group(1) != name:
        continue
    labels = dict(re.findall(r"(\w+)=\"((?:[^\"\\]|\\.)*)\"", m.group(3) or ""))
    if all(labels.get(k) == v for k, v in want.items()):
        total, found = total + float(m.group(4)), True
print(f"{total:.0f}" if found else "null")
' "$@"
}

all_stats() { # every node's /v1/admin/stats, as one JSON array
    local base
    for base in "${NODE_BASES[@]}"; do admin "$base" GET /v1/admin/stats; done | jq -cs .
}

# --- one measured phase ----------------------------------------------------------------------
phase() { # round nodes
    local round=$1 count=$2 tag="r$1-n$2"
    log "round $round/$ROUNDS: $count node(s)"
    local db prefix event
    db=$(new_database "${tag//-/_}")
    prefix=fcbench-$RUN_ID-$tag
    start_nodes "$tag" "$count" "$db" "$prefix"
    event=$(hot_event)

    local targets sent_before
    targets=$(IFS=,; echo "${NODE_BASES[*]}")
    sent_before=$(metrics_sum firstcome_redis_calls_total)
    all_stats >"$WORK/$tag.stats-before"
    rcli info cpu >"$WORK/$tag.cpu-before"
    rcli config resetstat >/dev/null
    "$LOADGEN" rate --scenario "reserve-$count" --url "${NODE_BASES[0]}/v1/events/$event/reservations" \
        --target "$targets" --method POST --distinct-users "$tag" --connections "$CONNECTIONS" \
        --duration "$DURATION" --warmup "$WARMUP" >"$WORK/$tag.load.json"
    rcli info commandstats >"$WORK/$tag.cmdstats"
    rcli info cpu >"$WORK/$tag.cpu-after"
    all_stats >"$WORK/$tag.stats-after"
    local sent_after units check ok
    sent_after=$(metrics_sum firstcome_redis_calls_total)
    units=$(active_units "$db" "$event")
    # Every request has been answered (closed loop), so nothing is in flight: the ledger must
    # match PostgreSQL at once, on every node.
    local base one checks=()
    ok=true
    for base in "${NODE_BASES[@]}"; do
        for _ in $(seq 1 10); do
            one=$(ledger_matches_db "$base" "$db" "$event") && break
            one="$one mismatch"
            sleep 0.05
        done
        [[ $one == *mismatch* ]] && ok=false
        checks+=("$base held+sold/db: $one")
    done
    check=$(IFS=';'; echo "${checks[*]}")
    python3 - "$WORK/$tag" "$round" "$count" "$units" "$sent_before" "$sent_after" "$ok" "$check" >>"$RESULTS" <<'PY'
import json, sys
base, rnd, nodes, units, sent_before, sent_after, ok, check = sys.argv[1:9]

def info(path):
    out = {}
    for line in open(path):
        line = line.strip()
        if ":" in line and not line.startswith("#"):
            key, value = line.split(":", 1)
            out[key] = value
    return out

load = json.load(open(base + ".load.json"))
calls, usec = {}, {}
for key, value in info(base + ".cmdstats").items():
    if key.startswith("cmdstat_"):
        fields = dict(f.split("=", 1) for f in value.split(","))
        calls[key[8:]] = int(fields["calls"])
        usec[key[8:]] = int(fields["usec"])
ours = {"info", "config|resetstat"}  # sent by this script around the load
scripts = sum(calls.get(c, 0) for c in ("evalsha", "evalsha_ro", "eval", "eval_ro", "fcall", "fcall_ro"))
script_usec = sum(usec.get(c, 0) for c in ("evalsha", "evalsha_ro", "eval", "eval_ro", "fcall", "fcall_ro"))
total = sum(n for c, n in calls.items() if c not in ours)
cpu = lambda d: float(d.get("used_cpu_user_main_thread", d.get("used_cpu_user", 0))) + float(
    d.get("used_cpu_sys_main_thread", d.get("used_cpu_sys", 0)))
cpu_s = cpu(info(base + ".cpu-after")) - cpu(info(base + ".cpu-before"))
units = int(units)
# The persisters of all nodes over the same window: rows per commit and commit latency.
batches = writes = commit_ms = 0
for before, after in zip(json.load(open(base + ".stats-before")), json.load(open(base + ".stats-after"))):
    b, a = before["persister"], after["persister"]
    batches += a["batches"] - b["batches"]
    writes += a["writes"] - b["writes"]
    commit_ms += a["mean_commit_ms"] * a["batches"] - b["mean_commit_ms"] * b["batches"]
sent = None if "null" in (sent_before, sent_after) else int(sent_after) - int(sent_before)
per = lambda n: None if n is None or units == 0 else n / units
print(json.dumps({
    "round": int(rnd), "nodes": int(nodes),
    "rps": load["rps"], "p50_ms": load["p50_ms"], "p99_ms": load["p99_ms"], "max_ms": load["max_ms"],
    "requests": load["requests"], "status": load["status"], "errors": load["errors"],
    "targets": load.get("targets"), "samples": load.get("samples"),
    "reservations": units,
    "sent_per_res": per(sent), "scripts_per_res": per(scripts), "all_per_res": per(total),
    "res_per_script": units / scripts if scripts else None,
    "script_usec_per_call": script_usec / scripts if scripts else None,
    "redis_cpu_us_per_res": cpu_s * 1e6 / units if units else None,
    "redis_cpu_us_per_script": cpu_s * 1e6 / scripts if scripts else None,
    "pg_rows_per_commit": writes / batches if batches else None,
    "pg_commit_ms": commit_ms / batches if batches else None,
    "commandstats": calls,
    "ok": ok == "true" and load["errors"] == 0 and load["status"].get("201", 0) == load["requests"],
    "ledger_vs_db": check,
}))
PY
    log "  $(tail -n1 "$RESULTS" | jq -r '"\(.rps) res/s, p99 \(.p99_ms) ms, status \(.status|tojson), sent/res \(.sent_per_res), scripts/res \(.scripts_per_res), all/res \(.all_per_res), ok \(.ok)"')"
    stop_nodes
    drop_database "$db"
}

# --- node death: reconciliation --------------------------------------------------------------
reconcile_run() {
    log "reconciliation: $NODES nodes, --reconcile-after-secs $RECONCILE_AFTER, kill -9 of node $NODES at ${RECONCILE_KILL_AT}s of ${RECONCILE_LOAD}s load"
    local db prefix event targets victim t_kill
    db=$(new_database reconcile)
    prefix=fcbench-$RUN_ID-reconcile
    start_nodes reconcile "$NODES" "$db" "$prefix" --reconcile-after-secs "$RECONCILE_AFTER"
    event=$(hot_event)
    targets=$(IFS=,; echo "${NODE_BASES[*]}")
    "$LOADGEN" rate --scenario reconcile-load --url "${NODE_BASES[0]}/v1/events/$event/reservations" \
        --target "$targets" --method POST --distinct-users reconcile --connections "$CONNECTIONS" \
        --duration "$RECONCILE_LOAD" --warmup 0 >"$WORK/reconcile.load.json" &
    LOADGEN_PID=$!
    sleep "$RECONCILE_KILL_AT"
    victim=${NODE_PIDS[$((NODES - 1))]}
    kill -KILL "$victim"
    t_kill=$(date +%s.%N)
    wait "$victim" 2>/dev/null || true
    # The survivors stay; the victim leaves the lists.
    NODE_PIDS=("${NODE_PIDS[@]:0:$((NODES - 1))}")
    NODE_BASES=("${NODE_BASES[@]:0:$((NODES - 1))}")
    wait "$LOADGEN_PID" || die "loadgen failed in the reconciliation run"
    LOADGEN_PID=
    local t_load_end first now check matched=false elapsed
    t_load_end=$(date +%s.%N)
    first=$(ledger_matches_db "${NODE_BASES[0]}" "$db" "$event" || true)
    log "  load over $(python3 -c "import sys; print(f'{float(sys.argv[1]) - float(sys.argv[2]):.1f}')" "$t_load_end" "$t_kill") s after the kill; held+sold vs PostgreSQL active units: $first"
    while :; do
        now=$(date +%s.%N)
        elapsed=$(python3 -c "import sys; print(f'{float(sys.argv[1]) - float(sys.argv[2]):.3f}')" "$now" "$t_kill")
        if check=$(ledger_matches_db "${NODE_BASES[0]}" "$db" "$event"); then
            matched=true
            break
        fi
        python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) < float(sys.argv[2]) else 1)" "$elapsed" "$RECONCILE_TIMEOUT" || break
        sleep 0.05
    done
    local released kept
    released=$(metrics_sum firstcome_reconciled_total outcome=released)
    kept=$(metrics_sum firstcome_reconciled_total outcome=kept)
    jq -c --argjson after "$RECONCILE_AFTER" --argjson matched "$matched" --argjson elapsed "$elapsed" \
        --arg first "$first" --arg last "$check" --argjson released "$released" --argjson kept "$kept" \
        --argjson load_after_kill "$(python3 -c "import sys; print(round(float(sys.argv[1]) - float(sys.argv[2]), 3))" "$t_load_end" "$t_kill")" \
        '{scenario: "reconcile", reconcile_after: $after, matched: $matched, seconds_after_kill: $elapsed,
          load_seconds_after_kill: $load_after_kill, at_load_end: $first, final: $last,
          released: $released, kept: $kept, rps: .rps, status: .status, errors: .errors, targets: .targets}' \
        "$WORK/reconcile.load.json" >>"$RESULTS"
    log "  $(tail -n1 "$RESULTS" | jq -r '"matched \(.matched) \(.seconds_after_kill) s after the kill (bound \(.reconcile_after + 1) s); released \(.released), kept \(.kept)"')"
    stop_nodes
    drop_database "$db"
}

# --- run ---------------------------------------------------------------------------------------
CPU_MODEL=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
DIRTY=$(git status --porcelain -- src entity migration Cargo.toml Cargo.lock loadgen 2>/dev/null || true)
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
STARTED=$(date -u '+%Y-%m-%d %H:%M:%S UTC')

for round in $(seq 1 "$ROUNDS"); do
    if ((round % 2 == 1)); then order=(1 "$NODES"); else order=("$NODES" 1); fi
    for count in "${order[@]}"; do phase "$round" "$count"; done
done
[[ ${SKIP_RECONCILE:-0} == 1 ]] || reconcile_run
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

cat <<EOF
# firstcome several-node benchmark

- date: $STARTED
- commit: $COMMIT${DIRTY:+ (with uncommitted changes to the server or loadgen)}
- machine: $(nproc) cores, $CPU_MODEL, Linux $(uname -r); load generator, nodes, Redis and PostgreSQL on it
- load average before / after: $LOAD_BEFORE / $LOAD_AFTER
- PostgreSQL $PG_VERSION (synchronous_commit on); Redis $REDIS_VERSION (${PRIVATE_REDIS_PORT:+private instance, }maxmemory-policy $REDIS_POLICY, no persistence)
- settings: ROUNDS=$ROUNDS NODES=$NODES DURATION=${DURATION}s WARMUP=${WARMUP}s CONNECTIONS=$CONNECTIONS (spread round-robin over the nodes), rate limits off

EOF
python3 - "$RESULTS" "$NODES" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
big = int(sys.argv[2])
phases = [r for r in rows if "nodes" in r]
recon = [r for r in rows if r.get("scenario") == "reconcile"]

def f(v, kind):
    if v is None:
        return "n/a"
    return {"rps": f"{v:,.0f}", "ms": f"{v:.2f} ms", "ratio": f"{v * 100:.0f}%", "per": f"{v:.3f}",
            "n": f"{v:.1f}", "us": f"{v:.1f} µs"}[kind]

cols = [("reservations/s", "rps", "rps"), ("p50", "p50_ms", "ms"), ("p99", "p99_ms", "ms"),
        ("Redis cmds sent / res", "sent_per_res", "per"), ("scripts / res", "scripts_per_res", "per"),
        ("all cmds incl. in scripts / res", "all_per_res", "per"), ("res / script call", "res_per_script", "n"),
        ("script µs/call", "script_usec_per_call", "us"), ("Redis CPU / res", "redis_cpu_us_per_res", "us"),
        ("Redis CPU / script call", "redis_cpu_us_per_script", "us"),
        ("PG rows / commit", "pg_rows_per_commit", "n"), ("PG commit", "pg_commit_ms", "ms")]

print("## Every round\n")
print("| round | nodes | " + " | ".join(c[0] for c in cols) + " | statuses | check |")
print("|---:|---:|" + "---:|" * len(cols) + "---|---|")
for r in phases:
    print(f"| {r['round']} | {r['nodes']} | " + " | ".join(f(r[k], kind) for _, k, kind in cols)
          + f" | {json.dumps(r['status'])} | {'ok' if r['ok'] else 'FAILED: ' + r['ledger_vs_db']} |")

short = [r for r in phases if r["sent_per_res"] is not None and r["scripts_per_res"] is not None
         and r["sent_per_res"] < r["scripts_per_res"]]
if short:
    print("\n**Warning:** in rounds " + ", ".join(f"{r['round']} ({r['nodes']} nodes)" for r in short)
          + " the nodes' firstcome_redis_calls_total counted fewer calls than Redis saw scripts;"
          " the metric misses some calls, so \"sent\" is too low.")
if any(r["sent_per_res"] is None for r in phases):
    print("\nNo node exports firstcome_redis_calls_total, so the commands the nodes sent are not known (n/a).")

def med(nodes, key):
    xs = [r[key] for r in phases if r["nodes"] == nodes and r[key] is not None]
    return statistics.median(xs) if xs else None

ratios = []
for n in sorted({r["round"] for r in phases}):
    one = [r for r in phases if r["round"] == n and r["nodes"] == 1]
    many = [r for r in phases if r["round"] == n and r["nodes"] == big]
    if one and many and one[0]["rps"]:
        ratios.append(many[0]["rps"] / one[0]["rps"])
print(f"\n## Medians over {len(ratios)} rounds\n")
print(f"| measure | 1 node | {big} nodes | target | met? |")
print("|---|---:|---:|---|---|")
for label, key, kind in cols:
    target, met = "", ""
    if key == "sent_per_res":
        target = "≤ 0.1 at load"
        v = med(big, key)
        met = "n/a" if v is None else ("**yes**" if v <= 0.1 else "**no**")
    print(f"| {label} | {f(med(1, key), kind)} | {f(med(big, key), kind)} | {target} | {met} |")
ratio = statistics.median(ratios) if ratios else None
print(f"| **{big} nodes / 1 node, reservations/s** (within each round) | | {f(ratio, 'ratio')} | ≥ 100% | "
      + ("n/a" if ratio is None else ("**yes**" if ratio >= 1 else "**no**")) + " |")
print(f"| rounds whose checks all passed | {sum(r['ok'] for r in phases if r['nodes'] == 1)}/{len(ratios)} "
      f"| {sum(r['ok'] for r in phases if r['nodes'] == big)}/{len(ratios)} | all | |")
if ratios:
    print(f"\nPer-round {big}/1 ratios: " + ", ".join(f(x, "ratio") for x in ratios) + ".")

for r in recon:
    print("\n## Reconciliation after kill -9\n")
    print("| measure | value |\n|---|---|")
    print(f"| --reconcile-after-secs | {r['reconcile_after']} |")
    print(f"| load that went on after the kill | {r['load_seconds_after_kill']} s ({r['rps']:,.0f} res/s over the whole load, statuses {json.dumps(r['status'])}, {r['errors']} connection errors) |")
    def pair(text):
        parts = text.split()
        if len(parts) < 2:
            return "n/a"
        ledger, db = int(parts[0]), int(parts[1])
        return f"{ledger:,} / {db:,} (ledger − PostgreSQL: {ledger - db:,})"
    print(f"| held+sold on a survivor / PostgreSQL's active units, when the load ended | {pair(r['at_load_end'])} |")
    print(f"| the same, at the last read | {pair(r['final'])} |")
    verdict = (f"{r['seconds_after_kill']} s" if r["matched"] else f"not within {r['seconds_after_kill']} s")
    print(f"| **kill → held+sold on a survivor equals PostgreSQL's active units** | **{verdict}** |")
    bound = r["reconcile_after"] + 1
    met = r["matched"] and float(r["seconds_after_kill"]) <= bound
    print(f"| within reconcile_after + 1 s ({bound} s)? | {'**yes**' if met else '**no**'} |")
    na = lambda v: "n/a" if v is None else v
    print(f"| reconciled on the survivors (released / kept) | {na(r['released'])} / {na(r['kept'])} |")
PY
