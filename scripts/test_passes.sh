#!/usr/bin/env bash
# `make test`'s two passes, run at the same time: every test on SQLite, and the tests marked `db`
# on PostgreSQL (tests/conftest.py sets the mark). Much of the PostgreSQL pass waits on its server
# (a database per test) and on worker processes, so on two cores the passes overlap well.
#
# The SQLite pass prints as it runs; the PostgreSQL pass writes to a log, printed when both are
# done. Each pass has its own temp folder, Redis and (for PostgreSQL) cluster. The exit status is
# non-zero when either pass fails. PYTEST_ARGS (from the environment) go to both.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
work=$(mktemp -d -t sae-studio-tests-XXXXXX)
pg_log="$work/postgresql.log"
# shellcheck disable=SC2086  # PYTEST_ARGS is a word list by design (e.g. -m 'not slow')
eval "set -- ${PYTEST_ARGS:-}"

started=$(date +%s)
TEST_DATABASE=postgresql "$PY" -m pytest -p no:cacheprovider --basetemp="$work/postgresql" --durations=15 "$@" \
  >"$pg_log" 2>&1 &
pg_pid=$!
trap 'kill "$pg_pid" 2>/dev/null; wait "$pg_pid" 2>/dev/null; exit 130' INT TERM

echo "== SQLite pass (every test); the PostgreSQL pass runs beside it, its output follows =="
TEST_DATABASE=sqlite "$PY" -m pytest --basetemp="$work/sqlite" --durations=15 "$@"
sqlite_status=$?
sqlite_done=$(date +%s)
wait "$pg_pid"
pg_status=$?
pg_done=$(date +%s)
trap - INT TERM

echo
echo "== PostgreSQL pass (the tests marked db) =="
cat "$pg_log"
echo
echo "SQLite pass: exit $sqlite_status, $(( (sqlite_done - started) / 60 )) min $(( (sqlite_done - started) % 60 )) s;" \
     "PostgreSQL pass: exit $pg_status, $(( (pg_done - started) / 60 )) min $(( (pg_done - started) % 60 )) s (both from the start)"
rm -rf "$work"
if [ "$sqlite_status" -ne 0 ] || [ "$pg_status" -ne 0 ]; then
  exit 1
fi
