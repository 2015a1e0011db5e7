"""The suite's own bookkeeping: the `db` mark that picks the PostgreSQL pass is complete.

`make test` runs every test on SQLite and only the `db`-marked ones on PostgreSQL. A test that
opens a database without the mark would silently skip PostgreSQL, so every unmarked test runs with
peewee's connections refused (conftest's `database_guard`); these tests show that guard works.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from _pytest.outcomes import Failed
from peewee import PostgresqlDatabase, SqliteDatabase

from conftest import ROOT, UNMARKED_DATABASE_URL


def test_an_unmarked_test_cannot_open_a_database(tmp_path, database_guard, monkeypatch):
    assert database_guard == []
    sqlite = SqliteDatabase(str(tmp_path / "x.db"))
    with pytest.raises(Failed, match="not marked `db`"):
        sqlite.connect()
    with pytest.raises(Failed, match="not marked `db`"):
        sqlite.execute_sql("SELECT 1")
    # refused before a server is even asked (nothing listens on port 1)
    with pytest.raises(Failed, match="PostgresqlDatabase"):
        PostgresqlDatabase("nothing", host="127.0.0.1", port=1).connect()
    # the app's own database object, as a query through a model would use it
    from app.db import database
    from app.models import Training

    monkeypatch.setattr(database, "obj", SqliteDatabase(str(tmp_path / "app.db")))
    with pytest.raises(Failed, match="not marked `db`"):
        Training.select().count()
    # an `except Exception` in the code under test cannot hide it
    swallowed = False
    try:
        sqlite.connect()
    except Exception:  # noqa: BLE001 - what app code might do
        swallowed = True
    except BaseException:  # noqa: BLE001 - the guard's failure gets here
        pass
    assert not swallowed
    # a worker or app process started from here has no database to open, not even the default file
    from playhouse.db_url import connect

    assert os.environ["DATABASE_URL"] == UNMARKED_DATABASE_URL
    with pytest.raises(RuntimeError, match="refused"):
        connect(os.environ["DATABASE_URL"])
    assert database_guard == ["SqliteDatabase.connect", "SqliteDatabase.cursor", "PostgresqlDatabase.connect",
                              "SqliteDatabase.cursor", "SqliteDatabase.connect"]
    database_guard.clear()  # so this test itself passes at teardown


@pytest.mark.db
def test_a_test_marked_db_may_open_one(tmp_path, database_guard):
    db = SqliteDatabase(str(tmp_path / "x.db"))
    db.connect()
    assert db.execute_sql("SELECT 1").fetchone() == (1,)
    db.close()
    assert database_guard == []


def test_the_database_fixtures_mark_a_test_db(request):
    items = request.session.items
    marked = {item.nodeid for item in items if item.get_closest_marker("db")}
    for item in items:
        if {"database_url", "empty_database_url"} & set(item.fixturenames):  # directly or via env, app, client, ...
            assert item.nodeid in marked, item.nodeid
    assert request.node.nodeid not in marked
    assert request.node.get_closest_marker("db") is None


def test_a_postgresql_pass_over_files_without_database_tests_is_not_an_error():
    """On PostgreSQL a selection with no database test in it (here: this file's unmarked tests)
    runs nothing, starts no cluster and exits 0, not pytest's 5; one that collects nothing is still 5."""
    env = {**os.environ, "TEST_DATABASE": "postgresql", "TEST_SPLIT": ""}
    here = "tests/test_suite_marks.py"
    pure_only = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not marked_db",
                                here], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert pure_only.returncode == 0, pure_only.stdout + pure_only.stderr
    assert "5 deselected" in pure_only.stdout and "passed" not in pure_only.stdout
    nothing_collected = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                        "tests/bounds.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                                       timeout=120)  # a helper module: no tests in it
    assert nothing_collected.returncode == 5, nothing_collected.stdout


def test_split_passes_run_each_test_that_opens_no_database_once_between_them(tmp_path):
    """`make test`'s two passes share a TEST_SPLIT folder: every `db` test runs in both, each of the
    others in the pass that claims it first (here the SQLite pass, run first) and is skipped in the other."""
    def run(backend: str) -> str:
        env = {**os.environ, "TEST_DATABASE": backend, "TEST_SPLIT": str(tmp_path)}
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                               "tests/test_quality.py", "tests/test_templates.py"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    pure = len([line for line in subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", "-m", "not db",
         "tests/test_quality.py", "tests/test_templates.py"], cwd=ROOT,
        env={**os.environ, "TEST_DATABASE": "sqlite", "TEST_SPLIT": ""}, capture_output=True, text=True,
        timeout=120).stdout.splitlines() if "::" in line])
    assert pure > 10
    first, second = run("sqlite"), run("postgresql")
    assert f"{pure + 5} passed" in first and "skipped" not in first, first[-2000:]
    assert f"5 passed, {pure} skipped" in second and "run in the other pass" in second, second[-2000:]
    assert len(list(tmp_path.iterdir())) == pure  # one claim each, and none for a `db` test
