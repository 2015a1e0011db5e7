"""The schema and its migrations: fresh databases and upgrades end in the same place."""
from __future__ import annotations

from playhouse.migrate import SchemaMigrator, migrate as run_migrations

from app.db import MIGRATIONS, SchemaVersion, database, migrate
from app.models import ActivationSet, Template
from conftest import BACKEND


def columns(table: str) -> set[str]:
    return {c.name for c in database.obj.get_columns(table)}


def test_fresh_database_is_at_the_latest_version_with_defaults_seeded(app):
    assert SchemaVersion.get().version == len(MIGRATIONS)
    # the easy synthetic default and the hierarchical one
    assert ActivationSet.select().count() == 2 and Template.select().count() > 0
    assert migrate() == len(MIGRATIONS)  # running again changes nothing
    assert ActivationSet.select().count() == 2


def test_the_database_is_the_backend_under_test(app):
    """SQLite runs in WAL mode with a busy timeout; PostgreSQL counts tokens in 64 bits."""
    if BACKEND == "sqlite":
        assert database.obj.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert database.obj.execute_sql("PRAGMA busy_timeout").fetchone()[0] >= 5000
    else:
        assert type(database.obj).__name__ == "PostgresqlDatabase"
        kinds = dict(database.obj.execute_sql(
            "SELECT table_name || '.' || column_name, data_type FROM information_schema.columns "
            "WHERE column_name IN ('tokens', 'tokens_seen')").fetchall())
        assert kinds == {"metric_point.tokens": "bigint", "training.tokens_seen": "bigint"}
        reals = database.obj.execute_sql("SELECT count(*) FROM information_schema.columns "
                                         "WHERE table_schema = current_schema() AND data_type = 'real'").fetchone()
        assert reals == (0,)  # every real number is stored as a double


def test_a_version_1_database_is_upgraded(app):
    db = database.obj
    added = ("early_stop", "early_stop_step", "early_stop_l0", "steer_l1_alpha", "dead_latent_remedy",
             "plateau_window")
    run_migrations(*(SchemaMigrator.from_database(db).drop_column("training", name) for name in added))
    db.execute_sql("DROP TABLE tune_job")
    db.execute_sql("DROP TABLE template")
    SchemaVersion.update(version=1).execute()
    assert not set(added) & columns("training")
    assert migrate() == len(MIGRATIONS)
    assert set(added) <= columns("training")
    assert "tune_job" in db.get_tables() and Template.select().where(Template.builtin == True).count() == 42  # noqa: E712 - 7 widths × 6 architectures
