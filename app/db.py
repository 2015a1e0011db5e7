"""The one database object shared by web and worker, its connection, and migrations.

SQLite runs in WAL mode with a busy timeout so the web server reads while the worker
writes. ``DATABASE_URL`` may point at PostgreSQL instead (``playhouse.db_url``).

Migrations are an ordered list of functions; each runs once, in a transaction, and the
number of the last one applied is kept in ``schema_version``. To change the schema,
change the model and append a function (``add_column_if_missing`` for new columns:
migration 1 creates tables from the current models, so a fresh database already has
them); never edit one that has shipped. A migration carries the rows it writes (``app/migration_rows.py``)
or a private copy of the logic it applies: it never calls code that keeps changing (a seed
function, the L0 model, ``training_config``), which would silently change what it does.
"""
from __future__ import annotations

from collections.abc import Callable

from peewee import DatabaseProxy, IntegerField, Model, SqliteDatabase
from playhouse.db_url import connect

database = DatabaseProxy()

SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "foreign_keys": 1,
    "synchronous": "normal",
}
BUSY_TIMEOUT_MS = 10_000  # SQLITE_BUSY_TIMEOUT_MS's default (app/config.py)


def open_database(url: str, busy_timeout_ms: int = BUSY_TIMEOUT_MS):
    """Connect ``database`` to ``url`` and return the concrete database object. On SQLite a write
    waits up to ``busy_timeout_ms`` for another process's instead of failing at once (then it fails,
    and a worker retries it)."""
    if url.startswith("sqlite"):
        db = connect(url, pragmas={**SQLITE_PRAGMAS, "busy_timeout": busy_timeout_ms})
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
    from .migration_rows import SOURCES

    db.create_tables(models.ALL_MODELS)
    for row in SOURCES:  # the built-in synthetic sources, so a first training needs nothing downloaded
        _insert_source(db, row)


def _insert_source(db, row: dict) -> None:
    """A built-in synthetic source, written as the row it is (no model code)."""
    import json

    db.execute_sql("INSERT INTO activation_set (name, kind, d_in, n_tokens, params, created_at) "
                   "VALUES (%s, %s, %s, NULL, %s, %s)" % ((db.param,) * 5),
                   (row["name"], row["kind"], row["d_in"], json.dumps(row["params"]), _now()))


def _insert_preset(db, row: dict) -> None:
    """A built-in preset, written as the row it is (no model code)."""
    import json

    db.execute_sql("INSERT INTO template (name, d_in, config, provenance, builtin, created_at) "
                   "VALUES (%s, %s, %s, %s, %s, %s)" % ((db.param,) * 6),
                   (row["name"], row["d_in"], json.dumps(row["config"]), row["provenance"], True, _now()))


def _now():
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def add_column_if_missing(db, table: str, name: str, field) -> None:
    """Add a column unless it is there (a fresh database gets it from migration 1).

    On SQLite the column is added nullable (existing rows get the default): SQLite cannot add a
    NOT NULL column in place, so peewee would rebuild the table, and with foreign keys on,
    dropping the old copy deletes every row that cascades from it (a run's events and metric
    points). The models still give every new row a value.
    """
    import copy

    from playhouse.migrate import SchemaMigrator, migrate as run_migrations

    if name not in {c.name for c in db.get_columns(table)}:
        migrator = SchemaMigrator.from_database(db)
        if isinstance(db, SqliteDatabase) and not field.null:
            nullable = copy.copy(field)
            nullable.null = True
            run_migrations(migrator.add_column(table, name, nullable))
            if field.default is not None:
                run_migrations(migrator.apply_default(table, name, field))
        else:
            run_migrations(migrator.add_column(table, name, field))


def _migration_2_quality_control(db) -> None:
    from peewee import BooleanField, CharField, DoubleField, IntegerField

    for name, field in (("early_stop", BooleanField(default=True)), ("early_stop_step", IntegerField(default=1000)),
                        ("early_stop_l0", DoubleField(default=0.20)), ("steer_l1_alpha", BooleanField(default=False)),
                        ("dead_latent_remedy", CharField(default="none")),
                        ("plateau_window", IntegerField(default=2000))):
        add_column_if_missing(db, "training", name, field)


def _migration_3_tune_jobs(db) -> None:
    from .models import TuneJob

    db.create_tables([TuneJob])


def _migration_4_templates(db) -> None:
    from .migration_rows import PRESETS
    from .models import Template

    db.create_tables([Template])
    if not Template.select().where(Template.builtin == True).exists():  # noqa: E712 - Peewee expression
        for row in PRESETS:  # presets for common widths and every architecture, l1_alpha from the L0 model
            _insert_preset(db, row)


def _migration_5_extractions(db) -> None:
    from .models import Extraction

    db.create_tables([Extraction])


def _migration_6_features(db) -> None:
    from .models import FeatureJob, FeatureStat, ImportedSAE

    db.create_tables([ImportedSAE, FeatureJob, FeatureStat])


def _migration_7_model_precision(db) -> None:
    from peewee import CharField

    add_column_if_missing(db, "extraction", "model_dtype", CharField(default="float32"))


def _migration_8_durable_work(db) -> None:
    """Heartbeats and worker names on every job, checkpoint settings, worker beats, 64-bit token counts."""
    from peewee import CharField, DateTimeField, DoubleField, IntegerField

    from .models import WorkerBeat

    for table in ("training", "tune_job", "extraction", "feature_job"):
        add_column_if_missing(db, table, "heartbeat_at", DateTimeField(null=True))
        add_column_if_missing(db, table, "worker_name", CharField(null=True))
    add_column_if_missing(db, "training", "checkpoint_every_steps", IntegerField(default=2000))
    add_column_if_missing(db, "training", "checkpoint_every_minutes", DoubleField(default=5.0))
    db.create_tables([WorkerBeat])
    if not isinstance(db, SqliteDatabase):  # SQLite's INTEGER is 64-bit already
        db.execute_sql("ALTER TABLE training ALTER COLUMN tokens_seen TYPE BIGINT")
        db.execute_sql("ALTER TABLE metric_point ALTER COLUMN tokens TYPE BIGINT")


def _migration_9_precision_and_chart(db) -> None:
    from peewee import CharField

    from .models import JSONField

    # runs from before the setting trained in float32
    add_column_if_missing(db, "training", "precision", CharField(default="float32"))
    add_column_if_missing(db, "training", "chart", JSONField(null=True))
    from .models import Template

    for template in Template.select(Template.id, Template.config):  # complete configs: older ones get the default
        if "precision" not in template.config:
            Template.update(config={**template.config, "precision": "auto"}).where(Template.id == template.id).execute()


def _migration_10_double_precision(db) -> None:
    """PostgreSQL: every REAL column becomes DOUBLE PRECISION (SQLite's REAL is a double already)."""
    if isinstance(db, SqliteDatabase):
        return
    columns = db.execute_sql("SELECT table_name, column_name FROM information_schema.columns "
                             "WHERE table_schema = current_schema() AND data_type = 'real'").fetchall()
    for table, column in columns:
        db.execute_sql(f'ALTER TABLE "{table}" ALTER COLUMN "{column}" TYPE DOUBLE PRECISION')


def _migration_11_accounts(db) -> None:
    """Users, API tokens, and who created each record."""
    from peewee import ForeignKeyField

    from .models import ApiToken, User

    db.create_tables([User, ApiToken])
    for table in ("activation_set", "training", "tune_job", "extraction", "imported_sae", "feature_job", "template"):
        add_column_if_missing(db, table, "created_by_id",
                              ForeignKeyField(User, field=User.id, null=True, on_delete="SET NULL"))


def _migration_12_architectures(db) -> None:
    """BatchTopK, JumpReLU and Matryoshka: their settings (null on runs of other architectures)."""
    from peewee import CharField, DoubleField

    from .migration_rows import PRESETS, SOURCES
    from .models import ActivationSet, Template

    for name, field in (("l0_coefficient", DoubleField(null=True)), ("jumprelu_bandwidth", DoubleField(null=True)),
                        ("matryoshka_prefixes", CharField(null=True))):
        add_column_if_missing(db, "training", name, field)
    if not ActivationSet.select().where(ActivationSet.name.startswith("Synthetic (hierarchical)")).exists():
        _insert_source(db, SOURCES[1])  # migration 1 seeds it on a fresh database
    for template in Template.select(Template.id, Template.config):  # older templates get the new fields
        Template.update(config=_complete_v12(template.config)).where(Template.id == template.id).execute()
    if not Template.select().where(Template.builtin == True, Template.name.contains("JumpReLU")).exists():  # noqa: E712
        widths = {preset.d_in for preset in Template.select(Template.d_in).where(
            Template.builtin == True, Template.name.contains("TopK k="))}  # noqa: E712
        for row in PRESETS:  # BatchTopK, JumpReLU and Matryoshka at each width that has a TopK preset
            if row["d_in"] in widths and row["config"]["architecture"] in ("batchtopk", "jumprelu", "matryoshka"):
                _insert_preset(db, row)


# A template's fields and their defaults, and the architectures each architecture-specific one
# applies to, as they stood when migration 12 shipped (a copy: training_config keeps changing).
_TEMPLATE_DEFAULTS_V12 = {
    "architecture": "standard", "latent_dim": 1024, "l1_alpha": 0.003, "k": 32, "learning_rate": 0.001,
    "batch_size": 512, "total_steps": 2000, "lr_warmup_steps": 100, "l1_warmup_steps": 200, "target_l0": 0.02,
    "l0_coefficient": 10.0, "jumprelu_bandwidth": 0.05, "matryoshka_prefixes": "", "steer_l1_alpha": False,
    "precision": "auto"}
_APPLIES_V12 = {"l1_alpha": ("standard",), "k": ("topk", "batchtopk", "matryoshka"), "l0_coefficient": ("jumprelu",),
                "jumprelu_bandwidth": ("jumprelu",), "matryoshka_prefixes": ("matryoshka",)}


def _complete_v12(config: dict) -> dict:
    """A template's config with every template field of migration 12 (defaults, then nulls where
    the architecture has no use), as ``models.complete`` did then."""
    full = {**_TEMPLATE_DEFAULTS_V12, **config}
    for name, architectures in _APPLIES_V12.items():
        if full["architecture"] not in architectures:
            full[name] = None
    if full["architecture"] != "standard":
        full["steer_l1_alpha"] = False
    return {name: full[name] for name in _TEMPLATE_DEFAULTS_V12}


def _migration_13_downstream(db) -> None:
    """Downstream evaluations: a run's SAE spliced into its model."""
    from .models import DownstreamEval

    db.create_tables([DownstreamEval])


def _migration_14_l0_model(db) -> None:
    """The L0 model replaces the old calibration: an auto-tune knows the run it tunes for, and the built-in standard presets take the model's l1_alpha with steering on."""
    from peewee import IntegerField

    from .migration_rows import PRESETS
    from .models import Template

    add_column_if_missing(db, "tune_job", "run_steps", IntegerField(null=True))
    add_column_if_missing(db, "tune_job", "run_batch", IntegerField(null=True))
    # the standard presets as the L0 model of that day (279 measured runs) gave them, by width
    standard = {row["d_in"]: row for row in PRESETS if row["config"]["architecture"] == "standard"}
    for preset in Template.select().where(Template.builtin == True):  # noqa: E712
        row = standard.get(preset.d_in)
        if preset.config.get("architecture") == "standard" and row is not None:
            Template.update(config=row["config"], provenance=row["provenance"]).where(Template.id == preset.id).execute()


def _migration_15_fencing(db) -> None:
    """One writer per record: an attempt number (fencing token) on every job record, the attempt
    on each metric point and event, and the checkpoint in force on the run's row."""
    from peewee import CharField, IntegerField

    for table in ("training", "tune_job", "extraction", "feature_job", "downstream_eval"):
        add_column_if_missing(db, table, "attempt", IntegerField(default=0))
    add_column_if_missing(db, "training", "checkpoint_name", CharField(null=True))
    add_column_if_missing(db, "training", "checkpoint_at", IntegerField(null=True))
    add_column_if_missing(db, "metric_point", "attempt", IntegerField(null=True))
    add_column_if_missing(db, "event", "attempt", IntegerField(null=True))


def _migration_16_maintenance_failures(db) -> None:
    """A worker's beat records the maintenance parts that keep failing, for the banner."""
    from peewee import IntegerField, TextField

    add_column_if_missing(db, "worker_beat", "maintenance_error", TextField(null=True))
    add_column_if_missing(db, "worker_beat", "maintenance_failures", IntegerField(default=0))


def _migration_17_sessions(db) -> None:
    """Sessions that can be ended: disabled accounts, a server-side session table, and the
    sign-in throttle's counters. Self-contained (its own table definitions, not the live models)."""
    from peewee import CharField, DateTimeField, ForeignKeyField, IntegerField

    add_column_if_missing(db, "app_user", "disabled_at", DateTimeField(null=True))

    class _User(Model):
        class Meta:
            database = db
            table_name = "app_user"

    class _UserSession(Model):
        key_hash = CharField(unique=True)
        user = ForeignKeyField(_User, on_delete="CASCADE", column_name="user_id")
        created_at = DateTimeField()
        last_seen_at = DateTimeField()

        class Meta:
            database = db
            table_name = "user_session"

    class _LoginThrottle(Model):
        key = CharField(unique=True)
        failures = IntegerField(default=0)
        last_failure_at = DateTimeField(index=True)
        locked_until = DateTimeField(null=True)

        class Meta:
            database = db
            table_name = "login_throttle"

    db.create_tables([_UserSession, _LoginThrottle])  # IF NOT EXISTS: a fresh database has them from migration 1


def _migration_18_placement(db) -> None:
    """Placement by memory: each job's device, reservation, wait reason, requested device and
    per-attempt log; each worker's device and memory on its beat; the installation's id (the
    shared DATA_DIR's marker). Self-contained (its own column and table definitions)."""
    from peewee import BigIntegerField, CharField, DateTimeField, TextField

    for table in ("training", "tune_job", "extraction", "feature_job", "downstream_eval"):
        add_column_if_missing(db, table, "placed_on", CharField(null=True))
        add_column_if_missing(db, table, "reserved_bytes", BigIntegerField(null=True))
        add_column_if_missing(db, table, "wait_reason", TextField(null=True))
        add_column_if_missing(db, table, "requested_device", CharField(null=True))
        add_column_if_missing(db, table, "attempts_log", TextField(null=True))
    for name, field in (("device_key", CharField(null=True)), ("device_label", CharField(null=True)),
                        ("device_names", TextField(null=True)), ("memory_free_bytes", BigIntegerField(null=True)),
                        ("memory_total_bytes", BigIntegerField(null=True))):
        add_column_if_missing(db, "worker_beat", name, field)

    class _Installation(Model):
        data_id = CharField(unique=True)
        created_at = DateTimeField()

        class Meta:
            database = db
            table_name = "installation"

    db.create_tables([_Installation])  # IF NOT EXISTS: a fresh database has it from migration 1


def _migration_19_queued_at(db) -> None:
    """When each job was last put on the queue, so a queued job's page can say what it waits behind."""
    from peewee import DateTimeField

    for table in ("training", "tune_job", "extraction", "feature_job", "downstream_eval"):
        add_column_if_missing(db, table, "queued_at", DateTimeField(null=True))


def _migration_20_gated_presets(db) -> None:
    """Gated SAE presets, one per width beside each built-in TopK preset (a fresh database has them
    from migration 4). Literal data: a later edit of app/sae/architectures/gated.py does not change it."""
    from .models import Template

    if Template.select().where(Template.builtin == True, Template.name.contains("· Gated ·")).exists():  # noqa: E712
        return
    presets = Template.select().where(Template.builtin == True).order_by(Template.id)  # noqa: E712
    for preset in [p for p in presets if (p.config or {}).get("architecture") == "topk"]:
        config = {**preset.config, "architecture": "gated", "k": None, "l1_alpha": 0.03, "steer_l1_alpha": True}
        Template.create(name=f"d_in {preset.d_in} · Gated · {config['latent_dim']:,} latents", d_in=preset.d_in,
                        builtin=True, config=config,
                        provenance="Gated SAE starting at l1_alpha 0.03 with steering on, which moves the penalty "
                                   "to the target L0 (the L0 model is fitted on standard SAEs only).")


def _migration_21_sweeps(db) -> None:
    """Sweeps: their table, and each run's link to the sweep it is a member of. Self-contained (its
    own table definition; a fresh database has both from migration 1)."""
    from peewee import BigIntegerField, BooleanField, CharField, DateTimeField, TextField

    class _Sweep(Model):
        created_by_id = IntegerField(null=True)
        status = CharField(default="queued", index=True)
        reason = TextField(null=True)
        cancel_requested = BooleanField(default=False)
        rq_job_id = CharField(null=True)
        created_at = DateTimeField()
        queued_at = DateTimeField(null=True)
        started_at = DateTimeField(null=True)
        finished_at = DateTimeField(null=True)
        heartbeat_at = DateTimeField(null=True)
        worker_name = CharField(null=True)
        attempt = IntegerField(default=0)
        placed_on = CharField(null=True)
        reserved_bytes = BigIntegerField(null=True)
        wait_reason = TextField(null=True)
        requested_device = CharField(null=True)
        attempts_log = TextField(null=True)
        name = CharField(default="")
        source_id = IntegerField()
        base = TextField()
        axes = TextField()
        mode = CharField(default="grid")
        finding = TextField(null=True)

        class Meta:
            database = db
            table_name = "sweep"

    db.create_tables([_Sweep])  # IF NOT EXISTS
    add_column_if_missing(db, "training", "sweep_id", IntegerField(null=True))


def _migration_22_model_size_for_placement(db) -> None:
    """The size of the model an extraction or a downstream evaluation loads, recorded when it is
    submitted, so that placement counts a Hub model's memory (it measured only local folders)."""
    from peewee import BigIntegerField

    for table in ("extraction", "downstream_eval"):
        add_column_if_missing(db, table, "model_size_bytes", BigIntegerField(null=True))


def _migration_23_final_folders(db) -> None:
    """One writer per run for its final SAE too: the folder of final files in force, named on the
    run's row by the end of the attempt that wrote it. Self-contained (its own column definition);
    runs that ended before it keep their files in the run folder and a null here."""
    from peewee import CharField

    add_column_if_missing(db, "training", "final_name", CharField(null=True))


def _migration_24_hook_points(db) -> None:
    """Streamed sources: each run names the hook point of its source it trains on ("" for a source
    that has one, or none), and keeps the model's side of its throughput while it runs.
    Self-contained (its own column definitions)."""
    from peewee import CharField, TextField

    add_column_if_missing(db, "training", "hook_point", CharField(default=""))
    add_column_if_missing(db, "training", "stream_stats", TextField(null=True))


def _migration_25_matryoshka_topk_presets(db) -> None:
    """Matryoshka TopK presets, one beside each built-in Matryoshka BatchTopK preset (same width, k and
    prefixes). Literal data: a later edit of app/sae/architectures/matryoshka_topk.py does not change it."""
    from .models import Template

    if Template.select().where(Template.builtin == True, Template.name.contains("· Matryoshka TopK ")).exists():  # noqa: E712
        return
    presets = Template.select().where(Template.builtin == True).order_by(Template.id)  # noqa: E712
    for preset in [p for p in presets if (p.config or {}).get("architecture") == "matryoshka"]:
        config = {**preset.config, "architecture": "matryoshka_topk"}
        _insert_preset(db, {
            "name": preset.name.replace("· Matryoshka k=", "· Matryoshka TopK k="), "d_in": preset.d_in,
            "config": config,
            "provenance": f"Matryoshka TopK, k = {config['k']} on every token; prefixes of 1/16, 1/8, 1/4 and 1/2 of "
                          "the latents each reconstruct alone. Matched more true features than Matryoshka BatchTopK "
                          "on both synthetic benchmarks."})


def _migration_26_aux_window(db) -> None:
    """AuxK's own window (``aux_window_tokens``), shorter than the dead-latent window. Runs stored before
    it keep a null: they resume with AuxK on the dead-latent window, as they trained. Self-contained."""
    from peewee import IntegerField

    add_column_if_missing(db, "training", "aux_window_tokens", IntegerField(null=True))


def _migration_27_sweep_templates(db) -> None:
    """Sweep templates: a template may hold a sweep's axes and mode beside its base configuration.
    Self-contained (its own column definition); every template before it is a run's (null)."""
    from peewee import TextField

    add_column_if_missing(db, "template", "sweep", TextField(null=True))


def _migration_28_keep_store(db) -> None:
    """Streamed runs may keep an activation store as they train ("no", "float16" or "float32"). Runs
    stored before it kept none. Self-contained (its own column definition)."""
    from peewee import CharField

    add_column_if_missing(db, "training", "keep_store", CharField(default="no"))


def _migration_29_sweep_parts(db) -> None:
    """A sweep no one GPU could hold is split into parts, each a sweep of its own naming the first
    (``part_of``) and its place (``part`` of ``parts``). Every sweep before it is part 1 of 1.
    Self-contained (its own column definitions)."""
    from peewee import IntegerField

    add_column_if_missing(db, "sweep", "part_of", IntegerField(null=True))
    add_column_if_missing(db, "sweep", "part", IntegerField(default=1))
    add_column_if_missing(db, "sweep", "parts", IntegerField(default=1))


# migration 30: the Gated presets' start, by d_in (app/sae/architectures/gated.py's start_l1_alpha on the
# preset's run, as the L0 model gave it that day)
GATED_PRESET_START = {384: 0.003, 512: 0.0028, 768: 0.0024, 1024: 0.0022, 2048: 0.00093, 2304: 0.00089, 4096: 0.00074}


def _migration_30_gated_preset_start(db) -> None:
    """The built-in Gated presets start steering at the standard SAE's l1_alpha for their run, not at 0.03:
    a start far above where steering ends lands on target with worse features (the module's docstring).
    Literal data; a preset whose l1_alpha is no longer migration 20's is left as it is."""
    from .models import Template

    for preset in Template.select().where(Template.builtin == True, Template.name.contains("· Gated ·")):  # noqa: E712
        start = GATED_PRESET_START.get(preset.d_in)
        if start is None or (preset.config or {}).get("l1_alpha") != 0.03:
            continue
        Template.update(config={**preset.config, "l1_alpha": start},
                        provenance=f"Gated SAE starting at l1_alpha {start:g} (the standard SAE's value from the L0 "
                                   "model) with steering on, which moves the penalty to the target L0.",
                        ).where(Template.id == preset.id).execute()


MIGRATIONS: list[Callable] = [_migration_1_initial, _migration_2_quality_control, _migration_3_tune_jobs,
                              _migration_4_templates, _migration_5_extractions, _migration_6_features,
                              _migration_7_model_precision, _migration_8_durable_work, _migration_9_precision_and_chart,
                              _migration_10_double_precision, _migration_11_accounts,
                              _migration_12_architectures, _migration_13_downstream,
                              _migration_14_l0_model, _migration_15_fencing,
                              _migration_16_maintenance_failures, _migration_17_sessions,
                              _migration_18_placement, _migration_19_queued_at, _migration_20_gated_presets,
                              _migration_21_sweeps, _migration_22_model_size_for_placement,
                              _migration_23_final_folders, _migration_24_hook_points,
                              _migration_25_matryoshka_topk_presets, _migration_26_aux_window,
                              _migration_27_sweep_templates, _migration_28_keep_store,
                              _migration_29_sweep_parts, _migration_30_gated_preset_start]


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
