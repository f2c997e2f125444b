#!/usr/bin/env bash
# Several firstcome nodes on this machine behind one port: PostgreSQL (the record) and Redis (the
# gate), started the way this machine starts them if they are down; three nodes on
# 127.0.0.1:8081–8083; haproxy on 127.0.0.1:8080 in front of them. Logs, pid files and the
# haproxy config go to ./data/cluster/.
#
#   scripts/cluster.sh             # or `start`: start what is not running, then print the URLs
#   scripts/cluster.sh status      # what runs, and what each node's /readyz answers
#   scripts/cluster.sh stop        # stop what `start` started (nodes, haproxy, and PostgreSQL or
#                                  # Redis only if `start` had to start them)
#
# Settings (environment):
#   NODES         number of nodes                                          [3]
#   FRONT_PORT    haproxy's port; the nodes take the next NODES ports      [8080]
#   DATABASE_URL  [postgres://postgres@127.0.0.1:5432/firstcome_cluster], created if missing
#   REDIS_URL     [redis://127.0.0.1:6379]
#   FIRSTCOME_ADMIN_TOKEN  shared by every node [generated once, kept in data/cluster/admin-token]
#   SKIP_BUILD=1  use target/release/firstcome as it is
#   SERVER_BIN    run this binary instead (no build)                       [target/release/firstcome]
# Any other FIRSTCOME_* variable in the environment reaches every node, for example
# FIRSTCOME_RATE_LIMIT=false or FIRSTCOME_RECONCILE_AFTER_SECS=10.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DIR=$ROOT/data/cluster
BIN=${SERVER_BIN:-$ROOT/target/release/firstcome}
[[ -n ${SERVER_BIN:-} ]] && SKIP_BUILD=1
NODES=${NODES:-3}
FRONT_PORT=${FRONT_PORT:-8080}
DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/firstcome_cluster}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}

say() { printf 'cluster: %s\n' "$*" >&2; }
die() {
    say "error: $*"
    exit 1
}

# Host, port and database name out of the two URLs (user@host:port/db; no password in them here).
url_rest=${DATABASE_URL#*://}
PG_USER=${url_rest%%@*}
[[ $PG_USER == "$url_rest" ]] && PG_USER=postgres
PG_USER=${PG_USER%%:*}
url_rest=${url_rest#*@}
PG_HOSTPORT=${url_rest%%/*}
PG_DB=${url_rest#*/}
PG_DB=${PG_DB%%\?*}
PG_HOST=${PG_HOSTPORT%:*}
PG_PORT=${PG_HOSTPORT##*:}
[[ $PG_PORT == "$PG_HOSTPORT" ]] && PG_PORT=5432
redis_rest=${REDIS_URL#*://}
redis_rest=${redis_rest##*@}
redis_rest=${redis_rest%%/*}
REDIS_HOST=${redis_rest%:*}
REDIS_PORT=${redis_rest##*:}
[[ $REDIS_PORT == "$redis_rest" ]] && REDIS_PORT=6379

# Only a service on this machine is started here.
is_local() { [[ $1 == 127.0.0.1 || $1 == localhost || $1 == "[::1]" ]]; }
node_port() { echo $((FRONT_PORT + $1)); }
# Something accepts connections on this loopback port.
port_taken() { (: </dev/tcp/127.0.0.1/"$1") 2>/dev/null; }

# The pid in a pid file, if that process still runs the program named ($2).
running_pid() { # pidfile program
    local pid
    [[ -f $1 ]] || return 1
    pid=$(<"$1")
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 1
    # why: a pid can be reused after a reboot or a crash; only signal our own program.
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$2" || return 1
    echo "$pid"
}

wait_for() { # what seconds command...
    local what=$1 seconds=$2
    shift 2
    for _ in $(seq 1 $((seconds * 10))); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "$what did not come up within $seconds s"
}

pg_up() { pg_isready -h "$PG_HOST" -p "$PG_PORT" -q; }
redis_up() { [[ $(redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]; }
psql_admin() { psql -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -v ON_ERROR_STOP=1 -qAtc "$1"; }

start_services() {
    if pg_up; then
        say "PostgreSQL answers on $PG_HOST:$PG_PORT"
    else
        is_local "$PG_HOST" || die "PostgreSQL at $PG_HOST:$PG_PORT does not answer"
        say "starting PostgreSQL"
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
        wait_for PostgreSQL 30 pg_up
        touch "$DIR/started-postgres"
    fi
    if redis_up; then
        say "Redis answers on $REDIS_HOST:$REDIS_PORT"
    else
        is_local "$REDIS_HOST" || die "Redis at $REDIS_HOST:$REDIS_PORT does not answer"
        say "starting Redis (no persistence: a restart is always an empty, detectable ledger)"
        redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" --save "" \
            --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
        wait_for Redis 30 redis_up
        # The port it was started on: `stop` shuts down that one, whatever REDIS_URL says then.
        echo "$REDIS_PORT" >"$DIR/started-redis"
    fi
    local policy
    policy=$(redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" config get maxmemory-policy | sed -n 2p)
    [[ $policy == noeviction ]] ||
        say "warning: Redis maxmemory-policy is '$policy'; it must be noeviction (see README, Running several nodes)"

    if [[ -z $(psql_admin "select 1 from pg_database where datname = '$PG_DB'") ]]; then
        say "creating database $PG_DB"
        psql_admin "create database \"$PG_DB\"" >/dev/null
    fi
}

install_haproxy() {
    command -v haproxy >/dev/null && return 0
    say "haproxy is not installed; installing it with apt-get (Debian package haproxy)"
    local sudo=()
    [[ $(id -u) == 0 ]] || sudo=(sudo)
    # why: a fresh machine may have no package lists yet; retry once after an update.
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y haproxy >&2 ||
        { "${sudo[@]}" apt-get update >&2 && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y haproxy >&2; } ||
        die "could not install haproxy"
    command -v haproxy >/dev/null || die "haproxy was installed but is not on PATH"
}

write_haproxy_config() {
    # why: each proxied connection takes two descriptors (client and node); haproxy refuses to
    # start if maxconn does not fit the open-file limit.
    local maxconn=$((($(ulimit -n) - 100) / 2))
    ((maxconn > 20000)) && maxconn=20000
    {
        cat <<EOF
# Written by scripts/cluster.sh; rewritten at every start.
global
    maxconn $maxconn

defaults
    mode http
    log stderr format raw local0
    option httplog
    # Log only errors and abnormal sessions: a drop sends tens of thousands of requests a second.
    option dontlog-normal
    # X-Forwarded-For for the nodes' per-IP limits; the nodes trust 127.0.0.1 (FIRSTCOME_TRUSTED_PROXIES).
    option forwardfor
    # A connection that could not be made is tried once more on another node; a request that
    # reached a node is never sent twice (a reservation is not idempotent without its key).
    retries 1
    option redispatch
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout http-request 10s
    timeout http-keep-alive 60s
    # After a WebSocket upgrade both sides fall under the tunnel timeout. The nodes ping every
    # 5 s, so a live socket is never idle this long.
    timeout tunnel 1h
    timeout client-fin 5s

frontend firstcome
    bind 127.0.0.1:$FRONT_PORT
    default_backend nodes

backend nodes
    balance roundrobin
    option httpchk
    http-check send meth GET uri /readyz
    http-check expect status 200
EOF
        for n in $(seq 1 "$NODES"); do
            echo "    server node$n 127.0.0.1:$(node_port "$n") check inter 1s fall 2 rise 2"
        done
    } >"$DIR/haproxy.cfg"
    haproxy -c -q -f "$DIR/haproxy.cfg" || die "haproxy refused $DIR/haproxy.cfg"
}

admin_token() {
    if [[ -n ${FIRSTCOME_ADMIN_TOKEN:-} ]]; then
        echo "$FIRSTCOME_ADMIN_TOKEN"
        return
    fi
    if [[ ! -s $DIR/admin-token ]]; then
        (umask 077 && od -An -N24 -tx1 /dev/urandom | tr -d ' \n' >"$DIR/admin-token")
    fi
    cat "$DIR/admin-token"
}

start_node() { # n token
    local n=$1 token=$2 port pid
    port=$(node_port "$n")
    if pid=$(running_pid "$DIR/node$n.pid" firstcome); then
        say "node$n already runs (pid $pid) on 127.0.0.1:$port"
        return
    fi
    # why: otherwise another program's server on that port would answer the readiness check.
    port_taken "$port" && die "127.0.0.1:$port is taken by another program; choose other ports with FRONT_PORT"
    # The flag, not only the REDIS_URL variable: a binary without the several-node mode refuses an
    # unknown flag, but would ignore an unknown variable and serve alone, unaware of the others.
    FIRSTCOME_ADMIN_TOKEN=$token FIRSTCOME_NODE_ID=node$n \
        FIRSTCOME_TRUSTED_PROXIES=${FIRSTCOME_TRUSTED_PROXIES:-127.0.0.1} \
        setsid "$BIN" serve --bind "127.0.0.1:$port" --database-url "$DATABASE_URL" \
        --redis-url "$REDIS_URL" >>"$DIR/node$n.log" 2>&1 </dev/null &
    echo $! >"$DIR/node$n.pid"
}

await_node() { # n
    local n=$1 port pid
    port=$(node_port "$n")
    for _ in $(seq 1 300); do
        if ! pid=$(running_pid "$DIR/node$n.pid" firstcome); then
            rm -f "$DIR/node$n.pid"
            tail -n 20 "$DIR/node$n.log" >&2
            die "node$n exited during start-up (log above: data/cluster/node$n.log)"
        fi
        if curl -fsS -o /dev/null "http://127.0.0.1:$port/readyz" 2>/dev/null; then
            say "node$n ready on http://127.0.0.1:$port (pid $pid, log data/cluster/node$n.log)"
            return
        fi
        sleep 0.1
    done
    die "node$n did not answer /readyz within 30 s"
}

start() {
    mkdir -p "$DIR"
    trap '[[ $? == 0 ]] || say "start failed; scripts/cluster.sh stop stops what did start"' EXIT
    start_services
    if [[ ${SKIP_BUILD:-0} != 1 ]]; then
        say "building target/release/firstcome"
        cargo build --release -p firstcome >&2
    fi
    [[ -x $BIN ]] || die "$BIN is missing; run cargo build --release -p firstcome"
    "$BIN" serve --help | grep -q -- '--redis-url' ||
        say "warning: $BIN has no --redis-url (no several-node mode); its nodes will refuse to start"
    install_haproxy
    write_haproxy_config

    local token
    token=$(admin_token)
    # why: every node applies the migrations at start; on a new database, three nodes starting
    # at once would race to create the same tables. Applying them once first leaves nothing to do.
    FIRSTCOME_ADMIN_TOKEN=$token "$BIN" migrate --database-url "$DATABASE_URL" >>"$DIR/migrate.log" 2>&1 ||
        { tail -n 20 "$DIR/migrate.log" >&2; die "migrations failed (data/cluster/migrate.log)"; }
    for n in $(seq 1 "$NODES"); do start_node "$n" "$token"; done
    for n in $(seq 1 "$NODES"); do await_node "$n"; done

    local pid
    if pid=$(running_pid "$DIR/haproxy.pid" haproxy); then
        say "haproxy already runs (pid $pid); reloading its config"
        kill -USR2 "$pid" 2>/dev/null || true
    else
        port_taken "$FRONT_PORT" && die "127.0.0.1:$FRONT_PORT is taken by another program; choose another FRONT_PORT"
        # -W: master-worker, so that SIGUSR2 reloads the config; -db: stay in the foreground
        # (logs to stderr, which goes to the log file).
        setsid haproxy -W -db -f "$DIR/haproxy.cfg" >>"$DIR/haproxy.log" 2>&1 </dev/null &
        echo $! >"$DIR/haproxy.pid"
    fi
    wait_for "haproxy on 127.0.0.1:$FRONT_PORT" 10 curl -fsS -o /dev/null "http://127.0.0.1:$FRONT_PORT/readyz"
    cat <<EOF
firstcome: $NODES nodes behind http://127.0.0.1:$FRONT_PORT (haproxy, round robin)
  nodes:        $(for n in $(seq 1 "$NODES"); do printf 'http://127.0.0.1:%s ' "$(node_port "$n")"; done)
  database:     $DATABASE_URL
  redis:        $REDIS_URL
  admin token:  in data/cluster/admin-token (or FIRSTCOME_ADMIN_TOKEN)
  logs:         data/cluster/node*.log, data/cluster/haproxy.log
  stop:         scripts/cluster.sh stop
EOF
}

stop_pidfile() { # pidfile program name
    local pid
    if pid=$(running_pid "$1" "$2"); then
        say "stopping $3 (pid $pid)"
        kill -TERM "$pid"
        # A node drains for at most its shutdown timeout (30 s by default) before it exits.
        for _ in $(seq 1 400); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            say "$3 (pid $pid) still runs after 40 s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$1"
}

stop() {
    [[ -d $DIR ]] || { say "nothing to stop (no data/cluster)"; return; }
    stop_pidfile "$DIR/haproxy.pid" haproxy haproxy
    # SIGTERM to every node first (whatever NODES was at start), so that they drain together.
    local pids=() file pid
    for file in "$DIR"/node*.pid; do
        [[ -e $file ]] || continue
        if pid=$(running_pid "$file" firstcome); then
            say "stopping $(basename "$file" .pid) (pid $pid)"
            kill -TERM "$pid"
            pids+=("$pid")
        fi
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 1 400); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            say "pid $pid still runs after 40 s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    rm -f "$DIR"/node*.pid
    if [[ -f $DIR/started-redis ]]; then
        local port
        port=$(<"$DIR/started-redis")
        say "stopping Redis on 127.0.0.1:$port (started by scripts/cluster.sh)"
        redis-cli -h 127.0.0.1 -p "$port" shutdown nosave >/dev/null 2>&1 || true
        rm -f "$DIR/started-redis"
    fi
    if [[ -f $DIR/started-postgres ]]; then
        say "stopping PostgreSQL (started by scripts/cluster.sh)"
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main stop || true
        rm -f "$DIR/started-postgres"
    fi
    say "stopped"
}

status() {
    local n pid port
    if pg_up; then say "PostgreSQL: up ($PG_HOST:$PG_PORT, database $PG_DB)"; else say "PostgreSQL: down"; fi
    if redis_up; then say "Redis: up ($REDIS_HOST:$REDIS_PORT)"; else say "Redis: down"; fi
    for n in $(seq 1 "$NODES"); do
        port=$(node_port "$n")
        if pid=$(running_pid "$DIR/node$n.pid" firstcome); then
            say "node$n: pid $pid, 127.0.0.1:$port, /readyz $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/readyz" || true)"
        else
            say "node$n: not running"
        fi
    done
    if pid=$(running_pid "$DIR/haproxy.pid" haproxy); then
        say "haproxy: pid $pid, 127.0.0.1:$FRONT_PORT"
    else
        say "haproxy: not running"
    fi
}

case ${1:-start} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    -h | --help | help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' ;;
    *) die "unknown command '$1' (start, stop, status)" ;;
esac
