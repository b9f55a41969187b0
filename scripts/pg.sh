#!/usr/bin/env bash
# Throwaway local PostgreSQL servers for shardlab, loopback only: one server per
# shard (its own data directory, port and process), plus a fifth server,
# "coordinator", holding the unsharded "oracle" database the tests compare with
# two empty databases (spare_1, spare_2) a continent can be moved to, and the
# shard map's catalog (shardlab_catalog), on a server no shard outage takes down.
#
#   scripts/pg.sh up            # initdb (first time), start all five, create databases, print exports
#   scripts/pg.sh env           # print the exports again
#   scripts/pg.sh down          # stop every server (data kept in .pg/)
#   scripts/pg.sh destroy       # stop and delete .pg/
#   scripts/pg.sh start NAME    # start one server again (e.g. after kill9)
#   scripts/pg.sh stop NAME     # stop one server cleanly (fast shutdown)
#   scripts/pg.sh kill9 NAME    # SIGKILL one server's postmaster and every backend: a crash
#   scripts/pg.sh status        # which servers run, with their ports and pids
#
# NAME is a shard id (north_america, asia, europe, south_america) or coordinator.
#
# Durable settings, as a production server runs: fsync, synchronous_commit and
# full_page_writes stay on, so a committed or PREPAREd transaction survives a
# crash (kill9 + start runs WAL crash recovery). Each server is small
# (shared_buffers=16MB) so five fit on a laptop or a CI runner.
# max_prepared_transactions > 0 enables two-phase commit (twophase=True).
#
# Uses Debian's postgresql package (apt-get install postgresql). Works as a
# normal user, and as root (CI), where the servers run as the postgres user.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PGLINK="$ROOT/.pg"
SHARDS="north_america asia europe south_america"
SERVERS="$SHARDS coordinator"
SPARES="spare_1 spare_2"
ORACLE_DB="shardlab_unsharded"
USER_NAME="shardlab"

BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
if [ -z "$BIN" ] || [ ! -x "$BIN/initdb" ]; then
    echo "PostgreSQL server binaries not found; install them with: sudo apt-get install postgresql" >&2
    exit 1
fi

as_server() {  # run a server-side command as the right user
    if [ "$(id -u)" = 0 ]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}

pgdir() {  # the cluster directory: .pg/, or a symlink to a place postgres can reach
    if [ -e "$PGLINK" ]; then readlink -f "$PGLINK"; return; fi
    if [ "$(id -u)" = 0 ] && ! runuser -u postgres -- test -x "$ROOT"; then
        # the checkout is not reachable by the postgres user (e.g. under a 0700 temp dir)
        local target
        target="$(mktemp -d /tmp/shardlab-pg.XXXXXX)"
        ln -s "$target" "$PGLINK"
    else
        mkdir -p "$PGLINK"
    fi
    readlink -f "$PGLINK"
}

check_name() {
    local n
    for n in $SERVERS; do [ "$n" = "${1:-}" ] && return 0; done
    echo "unknown server '${1:-}'; valid: $SERVERS" >&2
    exit 2
}

port_of() { cat "$(pgdir)/$1/port"; }

database_of() {  # the database a server holds
    if [ "$1" = coordinator ]; then echo "$ORACLE_DB"; else echo "shardlab_$1"; fi
}

print_env() {
    local urls="" sep=""
    for s in $SHARDS; do
        urls="$urls${sep}$s=postgresql+asyncpg://$USER_NAME@127.0.0.1:$(port_of "$s")/shardlab_$s"
        sep=","
    done
    echo "export SHARDLIB_URLS=\"$urls\""
    echo "export SHARDLIB_ORACLE_URL=\"postgresql+asyncpg://$USER_NAME@127.0.0.1:$(port_of coordinator)/$ORACLE_DB\""
    urls="" sep=""
    for s in $SPARES; do
        urls="$urls${sep}$s=postgresql+asyncpg://$USER_NAME@127.0.0.1:$(port_of coordinator)/shardlab_$s"
        sep=","
    done
    echo "export SHARDLIB_SPARE_URLS=\"$urls\""
    echo "export SHARDLIB_CATALOG_URL=\"postgresql+asyncpg://$USER_NAME@127.0.0.1:$(port_of coordinator)/shardlab_catalog\""
}

free_port() {
    python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
}

start_one() {
    local name="$1" dir port
    dir="$(pgdir)/$name"
    mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then chown postgres "$dir"; fi
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        as_server "$BIN/initdb" -D "$dir/data" -U "$USER_NAME" --auth=trust --locale=C -E UTF8 >"$dir/initdb.log"
    fi
    [ -f "$dir/port" ] || free_port >"$dir/port"
    port="$(port_of "$name")"
    if ! as_server "$BIN/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
        # after a kill9 the old postmaster.pid is left behind; pg_ctl start checks it itself
        as_server "$BIN/pg_ctl" -D "$dir/data" -l "$dir/data/server.log" -w -t 120 start -o \
            "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories='$dir/data' \
             -c max_prepared_transactions=64 -c max_connections=200 -c shared_buffers=16MB \
             -c fsync=on -c synchronous_commit=on -c full_page_writes=on" >/dev/null
    fi
    "$BIN/createdb" -h 127.0.0.1 -p "$port" -U "$USER_NAME" "$(database_of "$name")" 2>/dev/null || true
    if [ "$name" = coordinator ]; then  # empty databases a continent can be moved to (notebook 14)
        for s in $SPARES catalog; do "$BIN/createdb" -h 127.0.0.1 -p "$port" -U "$USER_NAME" "shardlab_$s" 2>/dev/null || true; done
    fi
}

up() {
    local name
    for name in $SERVERS; do start_one "$name"; done
    echo "# PostgreSQL: one server per shard plus the coordinator (data in $(pgdir)). Export:" >&2
    print_env
}

stop_one() {
    local dir
    dir="$(pgdir)/$1"
    if [ -f "$dir/data/PG_VERSION" ]; then
        as_server "$BIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
    fi
}

kill9() {  # SIGKILL the postmaster and all its children at once, as a machine crash would
    local dir pid children
    dir="$(pgdir)/$1"
    [ -f "$dir/data/postmaster.pid" ] || { echo "$1 is not running" >&2; return 1; }
    pid="$(head -n 1 "$dir/data/postmaster.pid")"
    children="$(pgrep -P "$pid" || true)"
    kill -9 "$pid" $children 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
    for c in $children; do while kill -0 "$c" 2>/dev/null; do sleep 0.05; done; done
}

down() {
    local name
    [ -e "$PGLINK" ] || return 0
    for name in $SERVERS; do stop_one "$name"; done
}

status() {
    local name dir
    for name in $SERVERS; do
        dir="$(pgdir)/$name"
        if as_server "$BIN/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
            echo "$name running port=$(port_of "$name") pid=$(head -n 1 "$dir/data/postmaster.pid")"
        else
            echo "$name stopped"
        fi
    done
}

case "${1:-}" in
    up) up ;;
    env) print_env ;;
    down) down ;;
    destroy) down; dir="$(readlink -f "$PGLINK" 2>/dev/null || true)"; rm -rf "$PGLINK" "${dir:-/nonexistent}" ;;
    start) check_name "${2:-}"; start_one "$2" ;;
    stop) check_name "${2:-}"; stop_one "$2" ;;
    kill9) check_name "${2:-}"; kill9 "$2" ;;
    status) status ;;
    *) echo "usage: $0 up|env|down|destroy|status|start NAME|stop NAME|kill9 NAME" >&2; exit 2 ;;
esac
