#!/usr/bin/env bash
# The firstcome benchmark: one command, results as a markdown table on stdout (progress on
# stderr). See BENCHMARKS.md for the method and the last recorded results.
#
#   bench/run.sh                   # 5 rounds, SQLite then PostgreSQL
#   ROUNDS=3 DURATION=5 bench/run.sh
#   BACKENDS=sqlite bench/run.sh
#
# Settings (environment):
#   ROUNDS       rounds per backend; medians are reported           [5]
#   DURATION     measured seconds per rate scenario                 [10]
#   WARMUP       warm-up seconds before each rate scenario          [2]
#   CONNECTIONS  keep-alive connections in the rate scenarios       [256]
#   STAMPEDE_CLIENTS / STAMPEDE_STOCK   scenario d                  [1500 / 1000]
#   MULTI_CLIENTS / MULTI_QUANTITY      scenario e                  [1000 / 3]
#   BACKENDS     any of: sqlite postgres                            [sqlite postgres]
#   PG_HOST PG_PORT PG_USER   PostgreSQL to create scratch databases on [127.0.0.1 5432 postgres]
#   BENCH_DIR    where scratch files go (SQLite databases, logs, raw JSON); must be on a real
#                disk, not tmpfs, or SQLite's fsyncs cost nothing  [target/bench]
#   KEEP=1       keep BENCH_DIR's run folder afterwards (raw JSON lines are in results.jsonl)
#   SKIP_BUILD=1 use the binaries already in target/release
#   SERVER_BIN   the server binary to measure [target/release/firstcome]; with SKIP_BUILD=1, an
#                older build can be measured against the current one, run after run
#   FIRSTCOME_RATE_LIMIT  rate limits on the server under test [false: the load generator is
#                one IP sending tens of thousands of requests a second, which the default
#                per-IP quotas would refuse; set quotas with FIRSTCOME_RATE_LIMIT_* to measure them]
#
# Each round runs, on the same server and back to back:
#   a. GET /healthz, closed loop                  (the HTTP ceiling: no I/O)
#   b. POST reservations on one hot coupon event with distinct users (never sells out)
#   c. POST reservations on a sold-out event with distinct users (409 refusals)
#   d. stampede: STAMPEDE_CLIENTS connections released at once on STAMPEDE_STOCK units
#   e. MULTI_CLIENTS concurrent reservations of MULTI_QUANTITY units each, released at once
#   and, as a reference for d and e, the same burst of STAMPEDE_CLIENTS on GET /healthz: what the
#   load generator and the HTTP layer alone take to answer a burst of that size.
# a runs twice, before b and again after c; a round's /healthz figure is the mean of the two, so
# b and c, measured between them, are compared with the HTTP ceiling of the same half-minute.
# Ratios b/a and c/a are taken within a round (same machine load), then the median over rounds.

set -euo pipefail

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
CONNECTIONS=${CONNECTIONS:-256}
STAMPEDE_CLIENTS=${STAMPEDE_CLIENTS:-1500}
STAMPEDE_STOCK=${STAMPEDE_STOCK:-1000}
MULTI_CLIENTS=${MULTI_CLIENTS:-1000}
MULTI_QUANTITY=${MULTI_QUANTITY:-3}
BACKENDS=${BACKENDS:-sqlite postgres}
PG_HOST=${PG_HOST:-127.0.0.1}
PG_PORT=${PG_PORT:-5432}
PG_USER=${PG_USER:-postgres}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
SERVER=${SERVER_BIN:-$ROOT/target/release/firstcome}
LOADGEN=$ROOT/target/release/loadgen

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

for tool in curl jq python3; do
    command -v "$tool" >/dev/null || die "$tool is required"
done

BENCH_DIR=${BENCH_DIR:-$ROOT/target/bench}
mkdir -p "$BENCH_DIR"
WORK=$(mktemp -d "$BENCH_DIR/run.XXXXXX")
RESULTS=$WORK/results.jsonl
: >"$RESULTS"
TOKEN=bench-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
SERVER_PID=
PG_DATABASES=()

psql_admin() { psql -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -v ON_ERROR_STOP=1 -qAtc "$1"; }

stop_server() {
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
        psql_admin "drop database if exists $db with (force)" >/dev/null 2>&1 ||
            log "could not drop PostgreSQL database $db"
    done
    if [[ ${KEEP:-0} == 1 ]]; then
        log "kept $WORK"
    else
        rm -rf "$WORK"
    fi
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

# --- server helpers --------------------------------------------------------------------------
BASE=
SERVER_SETTINGS=
start_server() { # name database-url
    local name=$1 url=$2 out=$WORK/server-$1.out
    FIRSTCOME_ADMIN_TOKEN=$TOKEN FIRSTCOME_RATE_LIMIT=${FIRSTCOME_RATE_LIMIT:-false} "$SERVER" serve --bind 127.0.0.1:0 --database-url "$url" \
        >"$out" 2>"$WORK/server-$name.log" &
    SERVER_PID=$!
    for _ in $(seq 1 600); do
        if grep -q 'listening on' "$out"; then
            BASE=$(grep -o 'http://[0-9.]*:[0-9]*' "$out" | head -n1)
            log "$name server (pid $SERVER_PID) at $BASE"
            # The server logs its resolved settings at start-up; keep the ones that shape load.
            SERVER_SETTINGS=$(sed 's/\x1b\[[0-9;]*m//g' "$WORK/server-$name.log" |
                grep -m1 -o 'http_workers: [0-9]*, event_arbiters: [0-9]*, db_max_connections: [0-9]*, max_batch: [0-9]*' ||
                true)
            return 0
        fi
        kill -0 "$SERVER_PID" 2>/dev/null || {
            cat "$WORK/server-$name.log" >&2
            die "the $name server exited during start-up"
        }
        sleep 0.1
    done
    die "the $name server did not start within 60 s"
}

admin() { # method path [json]
    local body=()
    [[ $# -ge 3 ]] && body=(-H 'Content-Type: application/json' --data "$3")
    curl -fsS -X "$1" "$BASE$2" -H "Authorization: Bearer $TOKEN" "${body[@]}"
}

create_event() { # json → id
    admin POST /v1/events "$1" | jq -er .id
}

stats() { admin GET /v1/admin/stats; }

# record backend round json: appends one result line tagged with backend and round
record() {
    jq -c --arg backend "$1" --argjson round "$2" '. + {backend: $backend, round: $round}' >>"$RESULTS"
}

run_rate() { # backend round scenario path user-prefix [extra loadgen args...]
    local backend=$1 round=$2 scenario=$3 path=$4 prefix=$5
    shift 5
    local user_args=()
    [[ -n $prefix ]] && user_args=(--distinct-users "$prefix")
    "$LOADGEN" rate --scenario "$scenario" --url "$BASE$path" --connections "$CONNECTIONS" \
        --duration "$DURATION" --warmup "$WARMUP" "${user_args[@]}" "$@" | record "$backend" "$round"
    log "  $scenario: $(tail -n1 "$RESULTS" | jq -r '"\(.rps) req/s, p99 \(.p99_ms) ms, status \(.status|tojson), errors \(.errors)"')"
}

run_burst() { # backend round scenario event-id clients prefix [extra loadgen args...]
    local backend=$1 round=$2 scenario=$3 id=$4 clients=$5 prefix=$6
    shift 6
    local before after
    before=$(stats)
    local line
    line=$("$LOADGEN" burst --scenario "$scenario" --url "$BASE/v1/events/$id/reservations" \
        --clients "$clients" --distinct-users "$prefix" --prime /healthz "$@")
    after=$(stats)
    local event
    event=$(curl -fsS "$BASE/v1/events/$id")
    jq -c --argjson before "$before" --argjson after "$after" --argjson event "$event" \
        '. + {probe_before: $before, probe_after: $after, event_after: ($event | {remaining, held, sold})}' \
        <<<"$line" | record "$backend" "$round"
    log "  $scenario: $(tail -n1 "$RESULTS" | jq -r '"all answered in \(.all_answered_ms) ms, max \(.max_ms) ms, status \(.status|tojson), event \(.event_after|tojson)"')"
}

run_burst_floor() { # backend round clients: the same burst on GET /healthz (client + HTTP only)
    local backend=$1 round=$2 clients=$3
    "$LOADGEN" burst --scenario burst_healthz --url "$BASE/healthz" --method GET \
        --clients "$clients" --prime /healthz | record "$backend" "$round"
    log "  burst_healthz: $(tail -n1 "$RESULTS" | jq -r '"all answered in \(.all_answered_ms) ms, max \(.max_ms) ms, status \(.status|tojson)"')"
}

# --- one backend -----------------------------------------------------------------------------
bench_backend() { # name url
    local backend=$1 url=$2
    start_server "$backend" "$url"
    curl -fsS "$BASE/healthz" >/dev/null

    local hot sold_out
    hot=$(create_event '{"name":"bench hot coupon","kind":"coupon","stock":10000000,"per_user_limit":1,"max_per_request":1}')
    sold_out=$(create_event '{"name":"bench sold out","kind":"coupon","stock":1,"per_user_limit":1,"max_per_request":1}')
    curl -fsS -o /dev/null -X POST "$BASE/v1/events/$sold_out/reservations" -H 'X-User-Id: bench-seed' ||
        die "could not sell the one unit of the sold-out event"

    for round in $(seq 1 "$ROUNDS"); do
        log "$backend round $round/$ROUNDS"
        run_rate "$backend" "$round" healthz /healthz ""
        run_rate "$backend" "$round" reserve "/v1/events/$hot/reservations" "r$round-b" \
            --method POST --probe-url "$BASE/v1/admin/stats" --probe-header "Authorization: Bearer $TOKEN"
        run_rate "$backend" "$round" sold_out "/v1/events/$sold_out/reservations" "r$round-c" --method POST
        run_rate "$backend" "$round" healthz_after /healthz ""

        local stampede multi
        run_burst_floor "$backend" "$round" "$STAMPEDE_CLIENTS"
        stampede=$(create_event "{\"name\":\"bench stampede $round\",\"kind\":\"coupon\",\"stock\":$STAMPEDE_STOCK,\"per_user_limit\":1,\"max_per_request\":1}")
        run_burst "$backend" "$round" stampede "$stampede" "$STAMPEDE_CLIENTS" "r$round-d"

        # A ticket event: each success is a hold (the hold outlives the run, so no expiry work
        # lands in later rounds).
        multi=$(create_event "{\"name\":\"bench quantity $round\",\"kind\":\"ticket\",\"stock\":$((MULTI_CLIENTS * MULTI_QUANTITY)),\"per_user_limit\":$MULTI_QUANTITY,\"max_per_request\":$MULTI_QUANTITY,\"hold_seconds\":86400}")
        run_burst "$backend" "$round" multi "$multi" "$MULTI_CLIENTS" "r$round-e" \
            --body "{\"quantity\":$MULTI_QUANTITY}"
    done

    local final
    final=$(stats)
    jq -c --arg backend "$backend" '{scenario: "final_stats", backend: $backend, stats: .}' <<<"$final" >>"$RESULTS"
    stop_server
}

# --- machine ---------------------------------------------------------------------------------
CPU_MODEL=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
MEM=$(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
DIRTY=$(git status --porcelain -- src entity migration Cargo.toml Cargo.lock loadgen 2>/dev/null || true)
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
STARTED=$(date -u '+%Y-%m-%d %H:%M:%S UTC')
FS=$(df -PT "$WORK" | awk 'NR==2 {print $2}')

for backend in $BACKENDS; do
    case $backend in
        sqlite)
            bench_backend sqlite "sqlite://$WORK/bench.db"
            ;;
        postgres)
            db=fcbench_$$_$(date +%s)
            psql_admin "create database $db" >/dev/null
            PG_DATABASES+=("$db")
            PG_VERSION=$(psql_admin 'show server_version')
            PG_FSYNC=$(psql_admin 'show fsync')
            bench_backend postgres "postgres://$PG_USER@$PG_HOST:$PG_PORT/$db"
            ;;
        *) die "unknown backend $backend (use sqlite and/or postgres)" ;;
    esac
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# --- report ----------------------------------------------------------------------------------
cat <<EOF
# firstcome benchmark

- date: $STARTED
- commit: $COMMIT${DIRTY:+ (with uncommitted changes to the server or loadgen)}
- machine: $(nproc) cores, $CPU_MODEL, $MEM RAM, Linux $(uname -r), scratch files on $FS
- load average before / after: $LOAD_BEFORE / $LOAD_AFTER
- PostgreSQL: ${PG_VERSION:-not run} (fsync ${PG_FSYNC:-?}, synchronous_commit on); SQLite: WAL, synchronous=FULL
- settings: ROUNDS=$ROUNDS DURATION=${DURATION}s WARMUP=${WARMUP}s CONNECTIONS=$CONNECTIONS STAMPEDE=$STAMPEDE_CLIENTS clients on $STAMPEDE_STOCK units, MULTI=$MULTI_CLIENTS × quantity $MULTI_QUANTITY
- server: its default settings (${SERVER_SETTINGS:-see its start-up log}); load generator on the same machine

EOF
python3 - "$RESULTS" "$STAMPEDE_STOCK" "$STAMPEDE_CLIENTS" "$MULTI_CLIENTS" "$MULTI_QUANTITY" <<'PY'
import json
import statistics
import sys

path, stock, clients, multi_clients, quantity = sys.argv[1], *map(int, sys.argv[2:6])
rows = [json.loads(line) for line in open(path) if line.strip()]
backends = [b for b in ("sqlite", "postgres") if any(r["backend"] == b for r in rows)]
NAMES = {"sqlite": "SQLite", "postgres": "PostgreSQL"}


def persister(row):
    """Mean batch size and commit latency over the measured window, from the stats counters."""
    before, after = row["probe_before"]["persister"], row["probe_after"]["persister"]
    batches = after["batches"] - before["batches"]
    writes = after["writes"] - before["writes"]
    commit_ms = after["mean_commit_ms"] * after["batches"] - before["mean_commit_ms"] * before["batches"]
    if batches <= 0:
        return 0, 0.0, 0.0, after["failed_batches"] - before["failed_batches"]
    return batches, writes / batches, commit_ms / batches, after["failed_batches"] - before["failed_batches"]


def rounds_of(backend):
    """Per-round figures for one backend."""
    out = []
    by_round = {}
    for r in rows:
        if r["backend"] == backend and "round" in r:
            by_round.setdefault(r["round"], {})[r["scenario"]] = r
    for n in sorted(by_round):
        sc = by_round[n]
        a, b, c, d, e, f = (sc.get(k) for k in ("healthz", "reserve", "sold_out", "stampede", "multi", "burst_healthz"))
        if not all((a, b, c, d, e, f)):
            continue
        # The round's HTTP ceiling: the mean of the /healthz runs before b and after c.
        a_after = sc.get("healthz_after") or a
        ceiling = (a["rps"] + a_after["rps"]) / 2
        batches, mean_batch, mean_commit, failed = persister(b)
        st = lambda row, code: row["status"].get(str(code), 0)
        out.append({
            "round": n,
            "a": ceiling, "a_before": a["rps"], "a_after": a_after["rps"], "b": b["rps"], "c": c["rps"],
            "b_a": b["rps"] / ceiling if ceiling else 0.0,
            "c_a": c["rps"] / ceiling if ceiling else 0.0,
            "a_p99": a["p99_ms"], "b_p50": b["p50_ms"], "b_p99": b["p99_ms"], "b_max": b["max_ms"],
            "c_p99": c["p99_ms"],
            "batch": mean_batch, "commit": mean_commit, "batches_per_s": batches / b["seconds"],
            "failed": failed,
            "b_ok": st(b, 201) == b["requests"] and b["errors"] == 0,
            "c_ok": st(c, 409) == c["requests"] and c["errors"] == 0,
            "a_ok": all(st(x, 200) == x["requests"] and x["errors"] == 0 for x in (a, a_after)),
            "d_ms": d["all_answered_ms"], "d_p99": d["p99_ms"],
            "d_201": st(d, 201), "d_409": st(d, 409),
            "d_ok": st(d, 201) == stock and st(d, 409) == clients - stock and d["errors"] == 0
                    and d["event_after"]["sold"] == stock and d["event_after"]["remaining"] == 0,
            "f_ms": f["all_answered_ms"], "f_ok": st(f, 200) == clients and f["errors"] == 0,
            "e_ms": e["all_answered_ms"], "e_max": e["max_ms"], "e_p99": e["p99_ms"],
            "e_ok": st(e, 201) == multi_clients and e["errors"] == 0
                    and e["event_after"]["held"] == multi_clients * quantity,
        })
    return out


data = {b: rounds_of(b) for b in backends}
med = lambda b, k: statistics.median(r[k] for r in data[b]) if data[b] else float("nan")
count_ok = lambda b, k: f"{sum(r[k] for r in data[b])}/{len(data[b])}"
yes = lambda ok: "**yes**" if ok else "**no**"


def fmt(v, kind):
    if kind == "rps":
        return f"{v:,.0f}"
    if kind == "ratio":
        return f"{v * 100:.0f}%"
    if kind == "ms":
        return f"{v:.1f} ms" if v >= 10 else f"{v:.2f} ms"
    if kind == "n":
        return f"{v:,.0f}"
    return str(v)


# (label, key, kind, {backend: (target text, predicate)} or None)
MEASURES = [
    ("a. `/healthz` req/s (HTTP ceiling: mean of the runs before b and after c)", "a", "rps", None),
    ("b. reservations req/s (hot event, distinct users)", "b", "rps", None),
    ("**b / a**", "b_a", "ratio", {"sqlite": ("≥ 50%", lambda v: v >= 0.5), "postgres": ("≥ 40%", lambda v: v >= 0.4)}),
    ("b. p50 latency", "b_p50", "ms", None),
    ("**b. p99 latency**", "b_p99", "ms", {"sqlite": ("≤ 10 ms", lambda v: v <= 10.0)}),
    ("b. max latency", "b_max", "ms", None),
    ("b. persister mean batch (writes/commit)", "batch", "n", None),
    ("b. persister mean commit latency", "commit", "ms", None),
    ("b. persister commits/s", "batches_per_s", "n", None),
    ("c. sold-out refusals req/s", "c", "rps", None),
    ("**c / a**", "c_a", "ratio", {"sqlite": ("≥ 90%", lambda v: v >= 0.9), "postgres": ("≥ 90%", lambda v: v >= 0.9)}),
    ("c. p99 latency", "c_p99", "ms", None),
    ("a. p99 latency", "a_p99", "ms", None),
    (f"**d. stampede: {clients:,} clients on {stock:,} units, all answered**", "d_ms", "ms",
     {"sqlite": ("< 100 ms", lambda v: v < 100), "postgres": ("< 100 ms", lambda v: v < 100)}),
    ("d. p99 latency", "d_p99", "ms", None),
    (f"reference: the same {clients:,}-client burst on `GET /healthz`, all answered", "f_ms", "ms", None),
    (f"**e. {multi_clients:,} × quantity {quantity}, all done**", "e_ms", "ms",
     {"sqlite": ("< 1 s", lambda v: v < 1000), "postgres": ("< 1 s", lambda v: v < 1000)}),
    ("**e. max latency (from each request's send)**", "e_max", "ms",
     {"sqlite": ("< 100 ms", lambda v: v < 100), "postgres": ("< 100 ms", lambda v: v < 100)}),
]

n_rounds = max((len(v) for v in data.values()), default=0)
print(f"## Results: medians over {n_rounds} rounds\n")
print("| measure | " + " | ".join(NAMES[b] for b in backends) + " | target | met? |")
print("|---|" + "---:|" * len(backends) + "---|---|")
for label, key, kind, targets in MEASURES:
    cells = [fmt(med(b, key), kind) for b in backends]
    target_txt, met_txt = "", ""
    if targets:
        texts = {b: targets[b][0] for b in backends if b in targets}
        if len(texts) == len(backends) and len(set(texts.values())) == 1:
            target_txt = next(iter(texts.values()))
        else:
            target_txt = "; ".join(f"{NAMES[b]} {t}" for b, t in texts.items())
        met_txt = "; ".join(f"{NAMES[b]} {yes(targets[b][1](med(b, key)))}" for b in backends if b in targets)
    print(f"| {label} | " + " | ".join(cells) + f" | {target_txt} | {met_txt} |")

print("\n## Correctness in every round\n")
print("| check | " + " | ".join(NAMES[b] for b in backends) + " |")
print("|---|" + "---|" * len(backends))
checks = [
    ("a. every answer 200 (both runs), no errors", "a_ok"),
    ("b. every answer 201, no errors", "b_ok"),
    ("c. every answer 409 sold_out, no errors", "c_ok"),
    (f"d. exactly {stock:,} × 201 and {clients - stock:,} × 409; event sold {stock:,}, remaining 0", "d_ok"),
    (f"e. all {multi_clients:,} × 201; event holds {multi_clients * quantity:,}", "e_ok"),
    (f"reference burst: all {clients:,} × 200", "f_ok"),
]
for label, key in checks:
    print(f"| {label} | " + " | ".join(f"{count_ok(b, key)} rounds" for b in backends) + " |")
failed = {b: sum(r["failed"] for r in data[b]) for b in backends}
print("| persister failed batches during b | " + " | ".join(str(failed[b]) for b in backends) + " |")

print("\n## Every round\n")
print("| backend | round | a req/s (before b / after c) | b req/s | c req/s | b/a | c/a | b p99 | batch | commit | d all answered | d 201/409 | healthz burst | e all done | e max |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|")
for b in backends:
    for r in data[b]:
        print(f"| {NAMES[b]} | {r['round']} | {fmt(r['a'], 'rps')} ({fmt(r['a_before'], 'rps')} / {fmt(r['a_after'], 'rps')}) "
              f"| {fmt(r['b'], 'rps')} | {fmt(r['c'], 'rps')} "
              f"| {fmt(r['b_a'], 'ratio')} | {fmt(r['c_a'], 'ratio')} | {fmt(r['b_p99'], 'ms')} "
              f"| {r['batch']:.0f} | {fmt(r['commit'], 'ms')} | {fmt(r['d_ms'], 'ms')} | {r['d_201']}/{r['d_409']} "
              f"| {fmt(r['f_ms'], 'ms')} | {fmt(r['e_ms'], 'ms')} | {fmt(r['e_max'], 'ms')} |")
PY
