#!/usr/bin/env bash
# A throw-away PostgreSQL server for the history crate's PostgreSQL tests.
#
#   eval "$(history/ci-postgres.sh)"          # starts the server, exports the URL
#   cargo test -p history                     # the suite now also runs on PostgreSQL
#   history/ci-postgres.sh stop               # stops it and removes its data
#   history/ci-postgres.sh stop-server        # stops the server, keeps its data (an outage)
#   history/ci-postgres.sh start-server       # starts it again on the same port
#
# BC_PG_STATE_FILE names the state file (DATA_DIR, PORT) shared by these commands, so
# several servers can run side by side.
# Installs Debian's `postgresql` when missing (needs root), creates a cluster in a temp
# directory owned by the `postgres` user (PostgreSQL refuses to run as root), listening
# on 127.0.0.1 at a free port only, with password (SCRAM) authentication over TCP, and a
# role `bc_test` that may create the per-test databases. Only the final `export …` line
# goes to stdout; progress goes to stderr.
set -euo pipefail

STATE_FILE="${BC_PG_STATE_FILE:-/tmp/bc-history-postgres.state}"
ROLE=bc_test
DATABASE=bc_test

as_postgres() {
  if [ "$(id -u)" -eq 0 ]; then
    su postgres -s /bin/sh -c "$*"
  else
    sh -c "$*"
  fi
}

pg_bin_dir() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [ -n "$dir" ] || { echo "PostgreSQL binaries not found" >&2; exit 1; }
  echo "$dir"
}

if [ "${1:-start}" = "stop" ]; then
  [ -f "$STATE_FILE" ] || { echo "nothing to stop" >&2; exit 0; }
  # shellcheck disable=SC1090
  . "$STATE_FILE"
  as_postgres "'$(pg_bin_dir)/pg_ctl' -D '$DATA_DIR' -m fast stop" >&2 || true
  rm -rf "$DATA_DIR" "$STATE_FILE"
  echo "stopped" >&2
  exit 0
fi

if [ "${1:-start}" = "stop-server" ] || [ "${1:-start}" = "start-server" ]; then
  [ -f "$STATE_FILE" ] || { echo "no server recorded in $STATE_FILE" >&2; exit 1; }
  # shellcheck disable=SC1090
  . "$STATE_FILE"
  if [ "$1" = "stop-server" ]; then
    as_postgres "'$(pg_bin_dir)/pg_ctl' -D '$DATA_DIR' -m fast -w stop" >&2
  else
    as_postgres "'$(pg_bin_dir)/pg_ctl' -D '$DATA_DIR' -l '$DATA_DIR/server.log' -w \
      -o \"-c listen_addresses=127.0.0.1 -p $PORT -k '$DATA_DIR' -c fsync=off\" start" >&2
  fi
  exit 0
fi

if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  echo "installing postgresql…" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y postgresql >&2 || { apt-get update >&2 && apt-get install -y postgresql >&2; }
fi
BIN=$(pg_bin_dir)

# A free port: ask the kernel for one, then release it for PostgreSQL.
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
DATA_DIR=$(mktemp -d /tmp/bc-history-pg.XXXXXX)
chmod 700 "$DATA_DIR"
[ "$(id -u)" -eq 0 ] && chown postgres:postgres "$DATA_DIR"
PASSWORD=$(python3 -c 'import secrets; print(secrets.token_hex(12))')

# Local (socket) connections as the superuser are trusted, TCP needs a password.
as_postgres "'$BIN/initdb' -D '$DATA_DIR' -U postgres --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8" >/dev/null 2>&1 \
  || as_postgres "'$BIN/initdb' -D '$DATA_DIR' -U postgres --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C" >&2
as_postgres "'$BIN/pg_ctl' -D '$DATA_DIR' -l '$DATA_DIR/server.log' -w \
  -o \"-c listen_addresses=127.0.0.1 -p $PORT -k '$DATA_DIR' -c fsync=off\" start" >&2

as_postgres "'$BIN/psql' -h '$DATA_DIR' -p $PORT -U postgres -v ON_ERROR_STOP=1 -q -d postgres" >&2 <<SQL
CREATE ROLE $ROLE LOGIN CREATEDB PASSWORD '$PASSWORD';
CREATE DATABASE $DATABASE OWNER $ROLE;
SQL

cat >"$STATE_FILE" <<STATE
DATA_DIR='$DATA_DIR'
PORT='$PORT'
STATE

URL="postgres://$ROLE:$PASSWORD@127.0.0.1:$PORT/$DATABASE"
echo "PostgreSQL $("$BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PORT, data in $DATA_DIR (stop: $0 stop)" >&2
echo "export BC_TEST_POSTGRES_URL='$URL'"
