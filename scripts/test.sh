#!/usr/bin/env bash
# `make test`: the whole suite on SQLite and, beside it, the tests marked `db` on PostgreSQL (each pass
# starts its own Redis; the PostgreSQL pass its own cluster). The two passes share nothing but the CPUs,
# so they run at the same time, each with one torch thread (and so every worker process a test starts):
# two passes of one thread keep two cores busy where one pass of two threads left them idle while its
# tests waited on workers, browsers and polls (benchmarks/results/suite_durations.md has the figures).
# The SQLite pass prints as it goes; the PostgreSQL pass's log follows it. Exit status: non-zero if
# either pass failed.
set -uo pipefail
PY=${PY:-.venv/bin/python}
threads=${TEST_TORCH_THREADS:-1}
export OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads
work=$(mktemp -d "${TMPDIR:-/tmp}/sae-studio-tests.XXXXXX")
# shellcheck disable=SC2086 # PYTEST_ARGS is a list of arguments
TEST_DATABASE=postgresql $PY -m pytest --durations=15 -p no:cacheprovider --basetemp="$work/postgresql" \
  ${PYTEST_ARGS:-} > "$work/postgresql.log" 2>&1 &
pg=$!
trap 'kill $pg 2>/dev/null; wait $pg 2>/dev/null; exit 130' INT TERM
# shellcheck disable=SC2086
TEST_DATABASE=sqlite $PY -m pytest --durations=15 --basetemp="$work/sqlite" ${PYTEST_ARGS:-}
sqlite_rc=$?
wait $pg
pg_rc=$?
trap - INT TERM
echo
echo "================ the PostgreSQL pass (the tests marked db), run beside the SQLite pass ================"
cat "$work/postgresql.log"
echo
echo "SQLite pass: exit status $sqlite_rc; PostgreSQL pass: exit status $pg_rc"
if [[ $sqlite_rc -eq 0 && $pg_rc -eq 0 ]]; then
  rm -rf "$work"
  exit 0
fi
echo "Logs and temporary files kept in $work"
exit 1
