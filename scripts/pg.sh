#!/usr/bin/env bash
# A throwaway local PostgreSQL cluster for shardlab: four shard databases and
# one unsharded "oracle" database, loopback only, on a free port.
#
#   scripts/pg.sh up      # initdb (first time), start, create databases, print exports
#   scripts/pg.sh env     # print the exports again
#   scripts/pg.sh down    # stop the server (data kept in .pg/)
#   scripts/pg.sh destroy # stop and delete .pg/
#
# Uses Debian's postgresql package (apt-get install postgresql). Works as a
# normal user, and as root (CI), where the server runs as the postgres user.
# max_prepared_transactions > 0 enables two-phase commit (twophase=True).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PGLINK="$ROOT/.pg"
SHARDS="north_america asia europe south_america"
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

port_of() { cat "$(pgdir)/port"; }

print_env() {
    local port urls="" sep=""
    port="$(port_of)"
    for s in $SHARDS; do
        urls="$urls${sep}$s=postgresql+asyncpg://$USER_NAME@127.0.0.1:$port/shardlab_$s"
        sep=","
    done
    echo "export SHARDLIB_URLS=\"$urls\""
    echo "export SHARDLIB_ORACLE_URL=\"postgresql+asyncpg://$USER_NAME@127.0.0.1:$port/$ORACLE_DB\""
}

up() {
    local dir port
    dir="$(pgdir)"
    if [ "$(id -u)" = 0 ]; then chown postgres "$dir"; fi
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        as_server "$BIN/initdb" -D "$dir/data" -U "$USER_NAME" --auth=trust --locale=C -E UTF8 >"$dir/initdb.log"
    fi
    if [ ! -f "$dir/port" ]; then
        python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])" >"$dir/port"
    fi
    port="$(port_of)"
    if ! as_server "$BIN/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
        as_server "$BIN/pg_ctl" -D "$dir/data" -l "$dir/data/server.log" -w -t 60 start -o \
            "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories='$dir/data' \
             -c max_prepared_transactions=64 -c max_connections=300 -c fsync=off \
             -c synchronous_commit=off -c full_page_writes=off" >/dev/null
    fi
    for db in $SHARDS; do
        "$BIN/createdb" -h 127.0.0.1 -p "$port" -U "$USER_NAME" "shardlab_$db" 2>/dev/null || true
    done
    "$BIN/createdb" -h 127.0.0.1 -p "$port" -U "$USER_NAME" "$ORACLE_DB" 2>/dev/null || true
    echo "# PostgreSQL is up on 127.0.0.1:$port (data in $dir). Export:" >&2
    print_env
}

down() {
    local dir
    [ -e "$PGLINK" ] || return 0
    dir="$(pgdir)"
    if [ -f "$dir/data/PG_VERSION" ]; then
        as_server "$BIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
    fi
}

case "${1:-}" in
    up) up ;;
    env) print_env ;;
    down) down ;;
    destroy) down; dir="$(readlink -f "$PGLINK" 2>/dev/null || true)"; rm -rf "$PGLINK" "${dir:-/nonexistent}" ;;
    *) echo "usage: $0 up|env|down|destroy" >&2; exit 2 ;;
esac
