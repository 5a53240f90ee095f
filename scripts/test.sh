#!/usr/bin/env bash
# Runs pytest against a private MariaDB that lives exactly as long as this run.
# Port: MISHARDS_MYSQL_PORT if given, else a free one. Without MariaDB the MySQL tests skip,
# except under CI=true, where a MariaDB that cannot start fails the run.
# Exit code: pytest's (5, "no tests collected", is a failure like any other non-zero code).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python

if [ -z "${MISHARDS_MYSQL_PORT:-}" ]; then
  MISHARDS_MYSQL_PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
export MISHARDS_MYSQL_PORT
# No developer .env may configure the proxies under test (tests name their own .env files).
export MISHARDS_ENV_FILE=none
export MISHARDS_MYSQL_BASE="${MISHARDS_MYSQL_BASE:-$PWD/.run/mariadb-test}"

trap 'scripts/mariadb.sh stop >/dev/null' EXIT
scripts/mariadb.sh stop >/dev/null   # a leftover of an interrupted run holds the datadir
if scripts/mariadb.sh start; then
  MISHARDS_TEST_MYSQL_URL="$(scripts/mariadb.sh url)"
  export MISHARDS_TEST_MYSQL_URL
elif [ "${CI:-}" = "true" ]; then
  echo "error: MariaDB could not be started, and CI needs it" >&2
  exit 1
else
  echo "warning: MariaDB could not be started; tests that need MySQL will skip" >&2
  unset MISHARDS_TEST_MYSQL_URL
fi

# shellcheck disable=SC2086  # PYTEST_ARGS is a list of words on purpose
# Arguments name what to run (e.g. scripts/test.sh tests/proxy/test_faults.py); none: every test,
# then the fault and cluster tests again with two worker processes per proxy (SERVER_WORKERS=2).
if [ "$#" -gt 0 ]; then
  "$PY" -m pytest -q ${PYTEST_ARGS:-} "$@"
  rc=$?
else
  "$PY" -m pytest -q ${PYTEST_ARGS:-} tests
  rc=$?
  if [ "$rc" -eq 0 ] && [ -z "${MISHARDS_TEST_WORKERS:-}" ]; then
    echo "== the fault and cluster tests with SERVER_WORKERS=2"
    MISHARDS_TEST_WORKERS=2 "$PY" -m pytest -q ${PYTEST_ARGS:-} tests/proxy/test_faults.py \
      tests/proxy/test_cluster_features.py tests/proxy/test_meta_visibility.py tests/test_local_cluster.py \
      tests/discovery
    rc=$?
  fi
fi
exit "$rc"
