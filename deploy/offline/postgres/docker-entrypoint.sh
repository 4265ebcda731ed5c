#!/bin/sh
# OFFLINE CI ONLY: the part of the official postgres image's entrypoint that docker-compose.yml
# relies on: initialise an empty PGDATA with POSTGRES_USER (superuser), POSTGRES_PASSWORD and
# POSTGRES_DB, accept password (scram) connections from the network, run the server as `postgres`.
set -eu
if [ "${1:-}" != "postgres" ]; then
    exec "$@"
fi
shift
if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chown -R postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" postgres "$@"
fi
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    : "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD must be set}"
    user=${POSTGRES_USER:-postgres}
    db=${POSTGRES_DB:-$user}
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    initdb -D "$PGDATA" -U "$user" --pwfile="$pwfile" -E UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    if [ "$db" != postgres ]; then
        echo "CREATE DATABASE \"$db\" OWNER \"$user\"" | postgres --single -D "$PGDATA" postgres >/dev/null
    fi
    echo "initialised $PGDATA: user $user, database $db"
fi
exec postgres -D "$PGDATA" -c listen_addresses='*' "$@"
