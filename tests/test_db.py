"""The schema and its migrations: fresh databases and upgrades end in the same place."""
from __future__ import annotations

import json
from pathlib import Path

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
        assert database.obj.execute_sql("PRAGMA busy_timeout").fetchone()[0] == 10_000  # SQLITE_BUSY_TIMEOUT_MS
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
    assert "tune_job" in db.get_tables() and Template.select().where(Template.builtin == True).count() == 49  # noqa: E712 - 7 widths × 7 architectures


# A fresh database's built-in rows as migrations 1-19 wrote them before the migrations were frozen
# (computed then, by the seed functions and the L0 model of that day, and kept as data). The test
# compares against this file, not against app/migration_rows.py or live seed code: an edit of
# either that changes what a migration writes fails here.
EXPECTED = json.loads((Path(__file__).parent / "fresh_database_rows.json").read_text())


# Migration 20's rows: a Gated preset beside each width's TopK preset (literal data in app/db.py), whose
# l1_alpha migration 30 set by d_in (it was 0.03 for all).
GATED = {"architecture": "gated", "k": None, "steer_l1_alpha": True}
GATED_START = {384: 0.003, 512: 0.0028, 768: 0.0024, 1024: 0.0022, 2048: 0.00093, 2304: 0.00089, 4096: 0.00074}
# Migration 25's: a Matryoshka TopK preset beside each Matryoshka BatchTopK preset.
MATRYOSHKA_TOPK = {"architecture": "matryoshka_topk"}
LATER = {20: GATED["architecture"], 25: MATRYOSHKA_TOPK["architecture"]}  # presets added after the frozen rows


def built_in_rows(*, since: int = 0) -> tuple[list[dict], list[dict]]:
    """The built-in templates (those the migrations before 20 wrote, or with ``since`` in LATER that
    migration's) and sources."""
    templates = [{"name": t.name, "d_in": t.d_in, "builtin": t.builtin, "provenance": t.provenance, "config": t.config}
                 for t in Template.select().where(Template.builtin == True).order_by(Template.id)]  # noqa: E712
    if since:
        templates = [t for t in templates if t["config"]["architecture"] == LATER[since]]
    else:
        templates = [t for t in templates if t["config"]["architecture"] not in LATER.values()]
    sources = [{"name": s.name, "kind": s.kind, "d_in": s.d_in, "n_tokens": s.n_tokens, "path": s.path,
                "params": s.params} for s in ActivationSet.select().order_by(ActivationSet.id)]
    return templates, sources


def test_a_fresh_database_holds_exactly_the_built_in_rows_it_always_had(app):
    templates, sources = built_in_rows()
    assert sources == EXPECTED["sources"]
    assert len(templates) == 35 and templates == EXPECTED["templates"]
    topk = [t for t in templates if t["config"]["architecture"] == "topk"]
    gated, _ = built_in_rows(since=20)
    assert [g["config"] for g in gated] == [{**t["config"], **GATED, "l1_alpha": GATED_START[t["d_in"]]} for t in topk]
    assert [g["d_in"] for g in gated] == [t["d_in"] for t in topk] and all(" · Gated · " in g["name"] for g in gated)
    assert_matryoshka_topk_beside_matryoshka(templates)
    # the order of each config's keys too (pages list a template's fields in it)
    assert [list(t["config"]) for t in templates] == [list(t["config"]) for t in EXPECTED["templates"]]


def assert_matryoshka_topk_beside_matryoshka(templates):
    matryoshka = [t for t in templates if t["config"]["architecture"] == "matryoshka"]
    added, _ = built_in_rows(since=25)
    assert [m["config"] for m in added] == [{**t["config"], **MATRYOSHKA_TOPK} for t in matryoshka]
    assert [m["name"] for m in added] == [t["name"].replace("· Matryoshka k=", "· Matryoshka TopK k=") for t in matryoshka]
    assert [m["d_in"] for m in added] == [t["d_in"] for t in matryoshka] and len(added) == 7


def test_the_migrations_call_no_seed_code():
    """What a migration writes is data (app/migration_rows.py) or a private copy: never a call
    into code that keeps changing (seed functions, the L0 model, training_config)."""
    import ast
    import inspect

    from app import db as db_module

    tree = ast.parse(inspect.getsource(db_module))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            names = [alias.name for alias in node.names]
            assert node.module in ("models", "migration_rows", None), f"a migration imports app.{node.module}"
            if node.module is None:
                assert names == ["models"], names
            if node.module == "models":  # tables only (classes): no function of the models module
                assert all(name[0].isupper() for name in names), names
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "models":
            assert node.attr[0].isupper(), f"a migration calls models.{node.attr}"


def test_an_upgrade_through_the_preset_migrations_ends_with_the_same_rows(app):
    """A database from before migration 12 (no BatchTopK, JumpReLU or Matryoshka presets, no hard
    source) whose standard presets still hold an older l1_alpha ends with the rows a fresh one has
    (migration 25 then adds Matryoshka TopK's beside the re-added Matryoshka presets)."""
    hard = ActivationSet.get(ActivationSet.name.startswith("Synthetic (hierarchical)"))
    hard.delete_instance()
    for t in Template.select().where(Template.builtin == True):  # noqa: E712
        if t.config["architecture"] in ("batchtopk", "jumprelu", "matryoshka", "matryoshka_topk"):
            t.delete_instance()
        elif t.config["architecture"] == "standard":
            t.config = {key: value for key, value in t.config.items()
                        if key not in ("l0_coefficient", "jumprelu_bandwidth", "matryoshka_prefixes")}
            t.config["l1_alpha"], t.config["steer_l1_alpha"] = 0.0042, False
            t.provenance = "an older calibration"
            t.save()
    SchemaVersion.update(version=11).execute()
    assert migrate() == len(MIGRATIONS)
    templates, sources = built_in_rows()
    assert sources == EXPECTED["sources"]
    key = lambda row: row["name"]  # noqa: E731 - the re-added presets come after the kept ones
    assert sorted(templates, key=key) == sorted(EXPECTED["templates"], key=key)
    assert_matryoshka_topk_beside_matryoshka(templates)


def test_a_database_from_before_final_folders_is_upgraded_and_keeps_its_runs(client):
    """Migration 23 adds the run's final folder (``final_name``); a run from before it keeps its row,
    its events and a null name (its final files, if any, lie in its run folder)."""
    from app.models import Event, Training
    from app.work import lifecycle
    from conftest import create_run

    run = create_run(client)
    lifecycle.add_event(run.id, "info", "before", "an event from before the upgrade")
    db = database.obj
    run_migrations(SchemaMigrator.from_database(db).drop_column("training", "final_name"))
    SchemaVersion.update(version=[m.__name__ for m in MIGRATIONS].index("_migration_23_final_folders")).execute()
    assert "final_name" not in columns("training")
    assert migrate() == len(MIGRATIONS)
    assert "final_name" in columns("training")
    assert Training.get_by_id(run.id).final_name is None
    assert Event.select().where(Event.training == run.id).count() == 1
