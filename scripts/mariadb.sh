#!/usr/bin/env bash
# scripts/mariadb.sh {start|stop|status|url}
# A private MariaDB for tests: own datadir under .run/, own socket, 127.0.0.1 only, no systemd
# (docs/development.md). Safe to run again at any time: "start" on a running instance only
# re-checks it and re-applies the grants; "stop" stops by PID, never by process name.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PORT="${MISHARDS_MYSQL_PORT:-13306}"
BASE="${MISHARDS_MYSQL_BASE:-$ROOT/.run/mariadb-$PORT}"
SOCK="${MISHARDS_MYSQL_SOCKET:-$BASE/mysqld.sock}"
# Unix socket paths are limited to ~100 characters; a deep checkout falls back to /tmp.
if [ "${#SOCK}" -gt 100 ]; then SOCK="${TMPDIR:-/tmp}/mishards-mariadb-$PORT.sock"; fi
DB="${MISHARDS_MYSQL_DB:-milvus}"
DB_USER="${MISHARDS_MYSQL_USER:-mishards}"
DB_PASS="${MISHARDS_MYSQL_PASSWORD:-mishards}"
WAIT_S="${MISHARDS_MYSQL_WAIT_S:-30}"
DATA="$BASE/data"; PIDFILE="$BASE/mysqld.pid"; PORTFILE="$BASE/port"; ERRLOG="$BASE/mysqld.err"

admin() { mariadb-admin --no-defaults --protocol=socket --socket="$SOCK" -uroot "$@"; }
sql()   { mariadb --no-defaults --protocol=socket --socket="$SOCK" -uroot "$@"; }
pid()   { [ -s "$PIDFILE" ] && cat "$PIDFILE"; }
# Alive only if the PID still is *our* server: a stale pid file may name a reused PID.
alive() {
  local p; p="$(pid)" || return 1
  kill -0 "$p" 2>/dev/null && tr '\0' '\n' <"/proc/$p/cmdline" 2>/dev/null | grep -qxF -- "--datadir=$DATA"
}
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }
url() { echo "mysql+pymysql://$DB_USER:$DB_PASS@127.0.0.1:$PORT/$DB?charset=utf8mb4"; }

ensure_installed() {
  command -v mariadbd >/dev/null 2>&1 && command -v mariadb-install-db >/dev/null 2>&1 && return 0
  # The package's maintainer scripts try to start a service; with no init system that is
  # refused, which is harmless: this script starts the server itself.
  echo "installing mariadb-server with apt-get" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mariadb-server >/dev/null
}

start() {
  ensure_installed
  mkdir -p "$BASE"
  if alive; then
    local running; running="$(cat "$PORTFILE" 2>/dev/null || echo "?")"
    if [ "$running" != "$PORT" ]; then
      echo "the server in $BASE already runs on port $running; stop it first" >&2; exit 1
    fi
  else
    rm -f "$PIDFILE" "$SOCK"
    if port_in_use; then echo "port $PORT is taken by another process" >&2; exit 1; fi
    if [ ! -d "$DATA/mysql" ]; then
      mariadb-install-db --no-defaults --user=root --datadir="$DATA" \
        --auth-root-authentication-method=normal --skip-test-db >"$BASE/install.log" 2>&1
    fi
    echo "$PORT" >"$PORTFILE"
    # --no-defaults: ignore the distribution's global option files entirely.
    nohup mariadbd --no-defaults --user=root --datadir="$DATA" \
      --port="$PORT" --bind-address=127.0.0.1 --socket="$SOCK" --pid-file="$PIDFILE" \
      --log-error="$ERRLOG" --skip-name-resolve --innodb-buffer-pool-size=128M \
      --character-set-server=utf8mb4 --collation-server=utf8mb4_unicode_ci \
      </dev/null >/dev/null 2>&1 &
  fi
  local deadline=$((SECONDS + WAIT_S))
  until admin ping >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "MariaDB did not become ready in ${WAIT_S}s; last log lines:" >&2
      tail -n 20 "$ERRLOG" >&2 2>/dev/null || true
      exit 1
    fi
    sleep 0.2
  done
  sql <<SQL
CREATE DATABASE IF NOT EXISTS \`$DB\` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;
CREATE USER IF NOT EXISTS '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL PRIVILEGES ON *.* TO '$DB_USER'@'127.0.0.1';
GRANT ALL PRIVILEGES ON *.* TO '$DB_USER'@'localhost';
FLUSH PRIVILEGES;
SQL
  echo "ready pid=$(pid) url=$(url)"
}

stop() {
  alive || { rm -f "$PIDFILE"; echo "not running"; return 0; }
  local p; p="$(pid)"
  kill -TERM "$p"
  for _ in $(seq 1 150); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
  if kill -0 "$p" 2>/dev/null; then kill -KILL "$p"; fi
  rm -f "$PIDFILE"; echo "stopped pid=$p"
}

case "${1:-start}" in
  start)  start ;;
  stop)   stop ;;
  status) if alive && admin ping >/dev/null 2>&1; then echo "running pid=$(pid) port=$(cat "$PORTFILE")"; else echo "stopped"; exit 3; fi ;;
  url)    url ;;
  *)      echo "usage: $0 {start|stop|status|url}" >&2; exit 2 ;;
esac
