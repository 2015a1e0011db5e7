"""The one database object shared by web and worker, its connection, and migrations.

SQLite runs in WAL mode with a busy timeout so the web server reads while the worker
writes. ``DATABASE_URL`` may point at PostgreSQL instead (``playhouse.db_url``).

Migrations are an ordered list of functions; each runs once, in a transaction, and the
number of the last one applied is kept in ``schema_version``. To change the schema,
append a function (use ``playhouse.migrate`` for column changes); never edit one that
has shipped.
"""
from __future__ import annotations

from collections.abc import Callable

from peewee import DatabaseProxy, IntegerField, Model, SqliteDatabase
from playhouse.db_url import connect

database = DatabaseProxy()

SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "busy_timeout": 10_000,  # ms: wait for the other process's write instead of failing
    "foreign_keys": 1,
    "synchronous": "normal",
}


def open_database(url: str):
    """Connect ``database`` to ``url`` and return the concrete database object."""
    if url.startswith("sqlite"):
        db = connect(url, pragmas=SQLITE_PRAGMAS)
    else:
        db = connect(url)
    database.initialize(db)
    return db


class SchemaVersion(Model):
    version = IntegerField()

    class Meta:
        database = database
        table_name = "schema_version"


def _migration_1_initial(db) -> None:
    from . import models

    db.create_tables(models.ALL_MODELS)
    models.seed_default_sources()


MIGRATIONS: list[Callable] = [_migration_1_initial]


def migrate() -> int:
    """Apply every pending migration; return the schema version now in force."""
    db = database.obj
    # Web and worker may start together: take the write lock before reading the version.
    with (db.atomic("IMMEDIATE") if isinstance(db, SqliteDatabase) else db.atomic()):
        if not isinstance(db, SqliteDatabase):
            db.execute_sql("SELECT pg_advisory_xact_lock(72730)")
        db.create_tables([SchemaVersion])
        row = SchemaVersion.select().first()
        current = row.version if row else 0
        for number, step in enumerate(MIGRATIONS, start=1):
            if number > current:
                step(db)
                current = number
        if row is None:
            SchemaVersion.create(version=current)
        else:
            SchemaVersion.update(version=current).execute()
    return current


def is_sqlite() -> bool:
    return isinstance(database.obj, SqliteDatabase)
