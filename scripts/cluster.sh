#!/usr/bin/env bash
# A private PostgreSQL 15 cluster owned by the postgres user, on its own port and
# socket directory, with meter_ext and pg_cron preloaded.
#
#   cluster.sh start DIR PORT DBNAME   create if missing, then (re)start: a rebuilt
#                                      meter_ext.so is only loaded at server start
#   cluster.sh stop DIR
set -euo pipefail

PGBIN=/usr/lib/postgresql/15/bin
command=$1
dir=$(realpath -m "$2")
data=$dir/data

as_postgres() {
    if [ "$(id -un)" = postgres ]; then "$@"; else sudo -u postgres "$@"; fi
}

running() { [ -f "$data/postmaster.pid" ] && as_postgres "$PGBIN/pg_ctl" -D "$data" status >/dev/null 2>&1; }

case $command in
start)
    port=$3 database=$4
    mkdir -p "$dir"
    [ "$(id -un)" = postgres ] || chown postgres: "$dir"
    if ! as_postgres test -w "$dir"; then
        echo "cluster.sh: the postgres user cannot write $dir (a parent directory is not searchable by it)." >&2
        echo "            Clone the project somewhere postgres can reach, for example under /srv or /tmp." >&2
        exit 1
    fi
    if [ ! -f "$data/PG_VERSION" ]; then
        as_postgres "$PGBIN/initdb" -D "$data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
    fi
    # Settings live in their own file, rewritten at every start (the data
    # directory may predate a change here).
    grep -qs "^include_if_exists = 'meter_ext_dev.conf'" "$data/postgresql.conf" ||
        echo "include_if_exists = 'meter_ext_dev.conf'" | as_postgres tee -a "$data/postgresql.conf" >/dev/null
    as_postgres tee "$data/meter_ext_dev.conf" >/dev/null <<CONF
# meter_ext development cluster (written by scripts/cluster.sh at every start)
port = $port
listen_addresses = 'localhost'
unix_socket_directories = '$dir'
shared_preload_libraries = 'meter_ext, pg_cron'
cron.database_name = '$database'
meter_ext.database = '$database'
max_worker_processes = 16
log_min_messages = warning
CONF
    if running; then
        as_postgres "$PGBIN/pg_ctl" -D "$data" -l "$dir/postgres.log" -w -m fast restart >/dev/null
    else
        as_postgres "$PGBIN/pg_ctl" -D "$data" -l "$dir/postgres.log" -w start >/dev/null
    fi
    ;;
stop)
    if running; then
        as_postgres "$PGBIN/pg_ctl" -D "$data" -w -m fast stop >/dev/null
    fi
    ;;
*)
    echo "usage: cluster.sh start DIR PORT DBNAME | stop DIR" >&2
    exit 2
    ;;
esac
