#!/usr/bin/env bash
# `make test`: the tests marked `db` on SQLite and, beside it, on PostgreSQL, and the others once, in
# whichever pass claims each first (each pass starts its own Redis; the PostgreSQL pass its own cluster).
# The two passes share nothing but the CPUs and the folder of claims, so they run at the same time,
# each with one torch thread (and so every worker process a test starts):
# two passes of one thread keep two cores busy where one pass of two threads left them idle while its
# tests waited on workers, browsers and polls (benchmarks/results/suite_durations.md has the figures).
# The SQLite pass prints as it goes; the PostgreSQL pass's log follows it. PYTEST_ARGS goes to both, read
# as a shell would (quotes included). Exit status: non-zero if either pass failed. Ctrl-C (or SIGTERM)
# stops both; each runs its fixtures' teardown (tests/conftest.py turns SIGTERM into KeyboardInterrupt).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PY:-.venv/bin/python}
threads=${TEST_TORCH_THREADS:-1}
export OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads
eval "args=(${PYTEST_ARGS:-})"
work=$(mktemp -d "${TMPDIR:-/tmp}/sae-studio-tests.XXXXXX") || exit 1
pids=()
# the tests that open no database run once, in whichever pass claims each first (tests/conftest.py: SPLIT_DIR)
mkdir -p "$work/split" "$work/built" || exit 1
export TEST_SPLIT="$work/split"
# what both passes would build the same way (tiny models the tests train), built once (tests/conftest.py)
export TEST_SHARED_BUILDS="$work/built"

stop() {
  trap - INT TERM
  echo "Stopping both passes..."
  kill -TERM "${pids[@]}" 2>/dev/null
  wait "${pids[@]}" 2>/dev/null
  echo "Logs and temporary files kept in $work"
  exit "$1"
}
trap 'stop 130' INT
trap 'stop 143' TERM

# both in the background, so that `wait` (unlike a foreground command) lets the traps run at once
TEST_DATABASE=postgresql "$PY" -m pytest --durations=15 -o cache_dir=.pytest_cache/postgresql \
  --basetemp="$work/postgresql" "${args[@]}" > "$work/postgresql.log" 2>&1 &
pids+=($!)
TEST_DATABASE=sqlite "$PY" -m pytest --durations=15 --basetemp="$work/sqlite" "${args[@]}" &
pids+=($!)
wait "${pids[1]}"
sqlite_rc=$?
wait "${pids[0]}"
pg_rc=$?
trap - INT TERM
echo
echo "================ the PostgreSQL pass (the tests marked db, and its share of the rest), run beside the SQLite pass ================"
cat "$work/postgresql.log"
echo
echo "SQLite pass: exit status $sqlite_rc; PostgreSQL pass: exit status $pg_rc"
if [[ $sqlite_rc -eq 0 && $pg_rc -eq 0 ]]; then
  rm -rf "$work"
  exit 0
fi
echo "Logs and temporary files kept in $work"
exit $(( sqlite_rc != 0 ? sqlite_rc : pg_rc ))
