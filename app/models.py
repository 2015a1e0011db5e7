"""Peewee models: the durable record of runs, their metric points and events.

The database row is the truth about a run; Redis only carries the job.
"""
from __future__ import annotations

import datetime as dt
import json

from peewee import (
    BigIntegerField, BooleanField, CharField, DateTimeField, DoubleField, ForeignKeyField, IntegerField, Model,
    TextField,
)

from . import training_config
from .db import database

# Every real number is a double: Peewee's FloatField is PostgreSQL's 4-byte REAL, which would
# store l1_alpha 0.0119524564 as 0.011952456.

STATUSES = ("queued", "running", "completed", "failed", "cancelled", "stopped_early", "interrupted")
ACTIVE_STATUSES = ("queued", "running")
RESUMABLE_STATUSES = ("interrupted", "failed", "cancelled")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class JSONField(TextField):
    def db_value(self, value):
        return None if value is None else json.dumps(value)

    def python_value(self, value):
        return None if value is None else json.loads(value)


class BaseModel(Model):
    class Meta:
        database = database


class User(BaseModel):
    """A member of the team. Everyone sees everything; only a record's creator or an admin
    may cancel, resume or delete it."""

    username = CharField(unique=True)
    password_hash = CharField()
    is_admin = BooleanField(default=False)
    created_at = DateTimeField(default=utcnow)
    disabled_at = DateTimeField(null=True)  # set: no sign-in, no session, no API token

    class Meta:
        table_name = "app_user"

    @property
    def is_disabled(self) -> bool:
        return self.disabled_at is not None


class ApiToken(BaseModel):
    """A personal token for the JSON API; only its SHA-256 is stored."""

    user = ForeignKeyField(User, backref="tokens", on_delete="CASCADE")
    name = CharField()
    token_hash = CharField(unique=True)
    prefix = CharField()  # the first characters, so a user can tell tokens apart
    created_at = DateTimeField(default=utcnow)
    last_used_at = DateTimeField(null=True)
    revoked_at = DateTimeField(null=True)

    class Meta:
        table_name = "api_token"


class UserSession(BaseModel):
    """A signed-in browser. The cookie carries a random id; only its SHA-256 is stored, so ending
    a session is deleting its row (sign-out, a password change, an admin's disable or demote)."""

    key_hash = CharField(unique=True)
    user = ForeignKeyField(User, backref="sessions", on_delete="CASCADE")
    created_at = DateTimeField(default=utcnow)  # the absolute lifetime counts from here
    last_seen_at = DateTimeField(default=utcnow)  # the idle lifetime from here (kept to a minute)

    class Meta:
        table_name = "user_session"


class LoginThrottle(BaseModel):
    """Failed sign-ins per key ("user:NAME" or "addr:IP") and the lock they earned."""

    key = CharField(unique=True)
    failures = IntegerField(default=0)
    last_failure_at = DateTimeField(index=True)
    locked_until = DateTimeField(null=True)

    class Meta:
        table_name = "login_throttle"


class Owned(BaseModel):
    """A record someone created: shown with their name, changed only by them or an admin."""

    created_by = ForeignKeyField(User, null=True, on_delete="SET NULL")

    def may_change(self, user) -> bool:
        return user is not None and (user.is_admin or self.created_by_id == user.id)

    @property
    def creator(self) -> str:
        return self.created_by.username if self.created_by_id else "—"


class JobRecord(Owned):
    """What every queued piece of work has: a status, a reason, a cancel flag, its RQ job, times."""

    status = CharField(default="queued", index=True)
    reason = TextField(null=True)  # why it failed, stopped or was cancelled
    cancel_requested = BooleanField(default=False)
    rq_job_id = CharField(null=True)
    created_at = DateTimeField(default=utcnow)
    queued_at = DateTimeField(null=True)  # when it was last put on the queue (created, or resumed)
    started_at = DateTimeField(null=True)
    finished_at = DateTimeField(null=True)
    heartbeat_at = DateTimeField(null=True)  # stamped by the running job; a stale one means it died
    worker_name = CharField(null=True)  # the worker that claimed it
    # The fencing token: each claim of the row adds one. Every write a job makes is conditional on
    # the attempt it claimed still being this one (docs/design.md, "One writer per record").
    attempt = IntegerField(default=0)
    # Placement (app/work/resources.py; README, "Scaling out"): the device this attempt runs on and the memory it
    # reserved there (counted while the row is running), why a queued job waits, the device a job
    # must run on when its creator named one, and each attempt's worker and device.
    placed_on = CharField(null=True)  # a GPU's UUID, or "<host>:cpu"
    reserved_bytes = BigIntegerField(null=True)
    wait_reason = TextField(null=True)
    requested_device = CharField(null=True)
    attempts_log = JSONField(null=True)  # [{"attempt", "worker", "device", "device_key", "reserved_bytes", "at"}]

    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE_STATUSES


class ActivationSet(Owned):
    """Where training activations come from: a synthetic generator or a file on disk."""

    name = CharField()
    kind = CharField()  # "synthetic", "file", "extracted" or "streamed" (from a model as it runs)
    d_in = IntegerField()
    n_tokens = IntegerField(null=True)  # None: an unbounded stream
    params = JSONField(default=dict)  # synthetic: generator; file: array info; extracted: the store's meta
    path = CharField(null=True)  # relative to DATA_DIR
    created_at = DateTimeField(default=utcnow)

    class Meta:
        table_name = "activation_set"

    @property
    def total_rows(self) -> int | None:
        """Every stored row, held-out ones included (None for a generated stream)."""
        if self.kind == "extracted":
            return int(self.params["n_tokens"])
        if self.kind == "file":
            return int(self.params["array"]["rows"])
        return None

    def describe(self) -> str:
        tokens = "unbounded stream" if self.n_tokens is None else f"{self.n_tokens:,} tokens"
        return f"{self.name} (d_in {self.d_in}, {tokens})"

    def stats(self):
        """What the validator knows of this source, with the L0 model's shift learned from its runs.

        Every completed run on it of an architecture the L0 model covers (at its final l1_alpha) and every auto-tune pilot
        says how far this source lies from the model's curve; the last 50 runs and 20 tunes count.
        """
        from . import l0_model
        from .validation import SourceStats

        shifts = []
        from .sae import architectures

        modelled = [a.name for a in architectures.all() if a.l0_model]
        runs = (Training.select().where((Training.source == self.id) & (Training.architecture.in_(modelled))
                                        & (Training.status == "completed") & Training.summary.is_null(False))
                .order_by(Training.id.desc()).limit(50))
        for run in runs:
            summary = run.summary or {}
            alpha = summary.get("final_l1_alpha") or run.l1_alpha
            if alpha and summary.get("fvu", 1.0) <= 0.9 and summary.get("l0_fraction") is not None:
                shifts.append(l0_model.run_shift(alpha, self.d_in, run.latent_dim, run.total_steps, run.batch_size,
                                                 summary["l0_fraction"]))
        tunes = (TuneJob.select().where((TuneJob.source == self.id) & (TuneJob.status == "completed"))
                 .order_by(TuneJob.id.desc()).limit(20))
        for tune in tunes:
            for pilot in tune.pilots or []:
                if pilot.get("fvu", 1.0) <= 0.9:
                    shifts.append(l0_model.run_shift(pilot["l1_alpha"], self.d_in, tune.latent_dim, tune.pilot_steps,
                                                     tune.batch_size, pilot["l0_fraction"]))
        shifts = [s for s in shifts if s is not None]
        params = self.params or {}
        streamed = {}
        if self.kind == "streamed":
            streamed = {"hooks": tuple(params.get("hooks") or ()), "corpus_tokens": params.get("corpus_tokens"),
                        "corpus_counted": bool(params.get("corpus_counted")),
                        "resident_bytes": int(params.get("resident_bytes") or 0)}
        return SourceStats(self.d_in, self.n_tokens, self.name, l0_offset=l0_model.source_offset(shifts),
                           runs_seen=len(shifts), l0_finding=params.get("l0_finding"), **streamed)


class Sweep(JobRecord):
    """Many SAEs trained together, each batch shared by all (app/work/sweeps.py): a base configuration
    and one or two axes of values; each member is an ordinary ``Training`` row linked here. The L0
    finder is a sweep whose mode is ``find_l0``; its ``finding`` holds the metric's curve and reading."""

    name = CharField(default="")
    source = ForeignKeyField(ActivationSet, backref="sweeps", on_delete="RESTRICT")
    base = JSONField(default=dict)  # the base configuration, under the form's field names
    axes = JSONField(default=list)  # [{"param": "target_l0", "values": [0.01, 0.02]}, ...]
    mode = CharField(default="grid")  # "grid", or "find_l0" (a ladder of target L0s read by the finder)
    finding = JSONField(null=True)  # the L0 finder's curve and recommendation, once read
    # A sweep whose members no one GPU could hold together is split into parts, each a sweep of its own
    # (its own job, placed on its own device, reading the data itself): part 1 of ``parts`` is the head
    # (``part_of`` null); the others name it. An unsplit sweep is part 1 of 1.
    part_of = IntegerField(null=True)
    part = IntegerField(default=1)
    parts = IntegerField(default=1)

    class Meta:
        table_name = "sweep"


class Training(JobRecord):
    """One SAE training run: its configuration, its state and its outcome."""

    name = CharField(default="")
    source = ForeignKeyField(ActivationSet, backref="trainings", on_delete="RESTRICT")
    # The hyper-parameters' columns are made from app.training_config.PARAMS (see
    # sync_param_columns below), so a new one is one entry there plus its migration.

    failed_step = IntegerField(null=True)
    device = CharField(null=True)
    norm_scale = DoubleField(null=True)  # c with E‖c·x‖² = d_in
    step = IntegerField(default=0)
    tokens_seen = BigIntegerField(default=0)
    summary = JSONField(null=True)  # final evaluation on held-out activations
    chart = JSONField(null=True)  # app.chart_series state: the charted metrics, bounded, extremes kept
    # The checkpoint in force: a file of the run's folder named by the attempt and step that wrote
    # it, committed here by a write conditional on that attempt (so a stale process's file never is).
    checkpoint_name = CharField(null=True)
    checkpoint_at = IntegerField(null=True)  # its step
    # The final SAE in force (sae.safetensors, frequencies.npy, cfg.json): a folder of the run's
    # folder named by the attempt that wrote it, named here only by that attempt's end (``finish``).
    # None for a run that has none, or that ended before final folders (its files lie in the run folder).
    final_name = CharField(null=True)
    # a run on a streamed source: the model's side as it runs (tokens/s, the next round's fill, passes)
    stream_stats = JSONField(null=True)
    # a member of a sweep trains in its sweep's job, on the sweep's batches, never queued alone
    sweep = ForeignKeyField(Sweep, null=True, backref="members", on_delete="SET NULL")

    class Meta:
        table_name = "training"

    @property
    def target_l0_count(self) -> float:
        return training_config.target_l0_count(self.target_l0, self.latent_dim)

    def config_dict(self) -> dict:
        """The run's configuration under the form's field names (accepted back by the API)."""
        return {"name": self.name, "source_id": self.source_id,
                **{p.name: getattr(self, p.name) for p in training_config.PARAMS}}

    def latest_metric(self):
        return self.metrics.order_by(MetricPoint.step.desc()).first()


def param_column(param: training_config.Param):
    """The stored column of one hyper-parameter (null where another architecture has no use for it)."""
    null = param.required_for is not None
    if param.type is bool:
        return BooleanField(default=param.default)
    if param.type is int:
        return IntegerField(null=null, default=None if null else param.default)
    if param.type is float:
        return DoubleField(null=null, default=None if null else param.default)
    return CharField(null=null, default=None if null else param.default)


_PARAM_COLUMNS: list[str] = []


def sync_param_columns() -> None:
    """Give ``Training`` one column per hyper-parameter of ``training_config.PARAMS``, as it is now.

    Runs at import; ``app.forms.rebuild`` runs it again for a test that changes ``PARAMS`` (a
    column a Param no longer names is dropped from the model, never from the database).
    """
    for name in _PARAM_COLUMNS:
        Training._meta.remove_field(name)
        delattr(Training, name)
    _PARAM_COLUMNS.clear()
    for param in training_config.PARAMS:
        Training._meta.add_field(param.name, param_column(param))
        _PARAM_COLUMNS.append(param.name)


sync_param_columns()


class MetricPoint(BaseModel):
    """Metrics logged at one step; means over the tokens since the previous point."""

    training = ForeignKeyField(Training, backref="metrics", on_delete="CASCADE")
    step = IntegerField()
    tokens = BigIntegerField()
    loss = DoubleField()
    mse = DoubleField()
    sparsity_loss = DoubleField()
    l1 = DoubleField()
    l0 = DoubleField()
    l0_fraction = DoubleField()
    fvu = DoubleField()
    dead = IntegerField(null=True)
    lr = DoubleField()
    l1_alpha = DoubleField()
    tokens_per_s = DoubleField()
    attempt = IntegerField(null=True)  # the claim of the run that wrote it

    class Meta:
        table_name = "metric_point"
        indexes = ((("training", "step"), True),)

    @property
    def explained_variance(self) -> float:
        return 1.0 - self.fvu


class Event(BaseModel):
    """Something a user should see on the run: a warning, an error, a milestone."""

    training = ForeignKeyField(Training, backref="events", on_delete="CASCADE")
    step = IntegerField(null=True)
    level = CharField()  # "info", "warning" or "error"
    code = CharField(default="")
    message = TextField()
    suggestion = TextField(null=True)
    created_at = DateTimeField(default=utcnow)
    attempt = IntegerField(null=True)  # the claim of the run that wrote it (null: written from the web)

    class Meta:
        table_name = "event"


class TuneJob(JobRecord):
    """An auto-tune: short pilot trainings that search l1_alpha for a target L0."""

    source = ForeignKeyField(ActivationSet, backref="tunes", on_delete="RESTRICT")
    # the run's settings it tunes for, and the pilots' learning rate and batch: the configuration's columns
    latent_dim = param_column(training_config.BY_NAME["latent_dim"])
    target_l0 = param_column(training_config.BY_NAME["target_l0"])
    learning_rate = param_column(training_config.BY_NAME["learning_rate"])
    batch_size = param_column(training_config.BY_NAME["batch_size"])
    pilot_steps = IntegerField()
    max_pilots = IntegerField(default=8)
    run_steps = IntegerField(null=True)  # the run it tunes for (steps × batch): pilots are projected to it
    run_batch = IntegerField(null=True)
    seed = param_column(training_config.BY_NAME["seed"])
    pilots = JSONField(default=list)  # [{"l1_alpha", "l0_fraction", "fvu"}], in the order run
    result_l1_alpha = DoubleField(null=True)

    class Meta:
        table_name = "tune_job"


class Extraction(JobRecord):
    """Activations captured from a transformer over a text corpus, written to a store."""

    name = CharField(default="")
    model_name = CharField()  # a Hub name, a local folder, or the bundled MiniLM's name
    layer = IntegerField()
    site = CharField()  # "resid", "mlp" or "attn"
    text = JSONField()  # app.extraction.text.TextSpec as a dict
    token_budget = IntegerField()
    context_length = IntegerField()
    batch_size = IntegerField()
    dtype = CharField()  # how rows are stored: "float16" or "float32"
    model_dtype = CharField(default="float32")  # the model's weights while it runs: float32, bfloat16, float16
    exclude_special = BooleanField(default=True)
    tokens_done = IntegerField(default=0)
    documents_done = IntegerField(default=0)
    tokens_per_s = DoubleField(null=True)
    device = CharField(null=True)
    activation_set = ForeignKeyField(ActivationSet, null=True, backref="extractions", on_delete="SET NULL")
    # the model's weight files, in bytes, as measured when it was submitted (or, for a Hub model the web
    # could not ask about, by the job's process before its claim): placement's estimate (app/work/resources.py)
    model_size_bytes = BigIntegerField(null=True)

    class Meta:
        table_name = "extraction"

    @property
    def eta_s(self) -> float | None:
        if self.status != "running" or not self.tokens_per_s:
            return None
        return max(self.token_budget - self.tokens_done, 0) / self.tokens_per_s

    @property
    def fraction_done(self) -> float:
        return min(self.tokens_done / self.token_budget, 1.0) if self.token_budget else 0.0


class ImportedSAE(Owned):
    """An SAE brought in from elsewhere in the SAELens layout, kept under DATA_DIR/imported/<id>/."""

    name = CharField()
    architecture = CharField()
    d_in = IntegerField()
    d_sae = IntegerField()
    k = IntegerField(null=True)
    cfg = JSONField(default=dict)  # its cfg.json as given
    path = CharField()  # relative to DATA_DIR
    created_at = DateTimeField(default=utcnow)

    class Meta:
        table_name = "imported_sae"


def results_on_run(job) -> bool:
    """Whether a run's feature job or downstream evaluation also writes its results on the run's
    summary: only when the run queued it itself (no creator) or the run's owner started it. Another
    user's job keeps its results on its own record, so nobody rewrites someone else's run."""
    if job.training_id is None:
        return False
    return job.created_by_id is None or job.created_by_id == job.training.created_by_id


class FeatureJob(JobRecord):
    """Per-latent statistics and top examples of one SAE (a run's or an imported one) on a source."""

    training = ForeignKeyField(Training, null=True, backref="feature_jobs", on_delete="CASCADE")
    imported = ForeignKeyField(ImportedSAE, null=True, backref="feature_jobs", on_delete="CASCADE")
    source = ForeignKeyField(ActivationSet, backref="feature_jobs", on_delete="CASCADE")
    sample_tokens = IntegerField()
    top_n = IntegerField(default=10)
    context = IntegerField(default=8)  # tokens either side of an example
    progress = DoubleField(default=0.0)  # 0..1
    summary = JSONField(null=True)  # tokens, never fired, density histogram, ground-truth recovery

    class Meta:
        table_name = "feature_job"

    @property
    def on_run(self) -> bool:
        return results_on_run(self)

    @property
    def sae_label(self) -> str:
        if self.training_id:
            return f"run #{self.training_id}" + (f" ({self.training.name})" if self.training.name else "")
        return f"imported SAE #{self.imported_id} ({self.imported.name})"


class FeatureStat(BaseModel):
    """One latent's statistics in one feature job."""

    job = ForeignKeyField(FeatureJob, backref="stats", on_delete="CASCADE")
    latent = IntegerField()
    frequency = DoubleField()
    mean_active = DoubleField()
    max_active = DoubleField()
    match_feature = IntegerField(null=True)  # synthetic sources: best ground-truth feature
    match_cosine = DoubleField(null=True)
    top_tokens = TextField(default="")  # the top examples' tokens, for search
    examples = JSONField(default=list)  # [{"row", "act", "tokens": [[text, act], ...]}]
    neighbours = JSONField(default=list)  # [[latent, cosine], ...]

    class Meta:
        table_name = "feature_stat"
        indexes = ((("job", "latent"), True),)


class Template(Owned):
    """A named set of hyperparameters that fills the training form."""

    name = CharField()
    d_in = IntegerField(null=True)  # the activation width it was made for
    config = JSONField()  # TEMPLATE_FIELDS only
    provenance = TextField(default="")
    builtin = BooleanField(default=False)
    created_at = DateTimeField(default=utcnow)
    # A sweep template's sweep, beside the base configuration above: {"mode": "grid", "axes": [...]}, or
    # {"mode": "find_l0", "axes": null} (the finder picks its ladder around the target). None for a run's.
    sweep = JSONField(null=True)

    class Meta:
        table_name = "template"

    def export(self) -> dict:
        exported = {"name": self.name, "d_in": self.d_in, "provenance": self.provenance, **self.config}
        if self.sweep is not None:
            exported["sweep"] = self.sweep
        return exported


TEMPLATE_FIELDS = training_config.TEMPLATE_FIELDS
PRESET_WIDTHS = (384, 512, 768, 1024, 2048, 2304, 4096)


def complete(config: dict) -> dict:
    """A template's config with every template field (defaults, then nulls where the architecture has no use)."""
    names = [p.name for p in training_config.PARAMS if p.template]
    full = {name: training_config.BY_NAME[name].default for name in names}
    full.update(config)
    normalized = training_config.normalize(full)
    return {name: normalized[name] for name in names}


class DownstreamEval(JobRecord):
    """What a run's SAE does to the model it was trained on: its reconstruction spliced in at the
    hook on held-out text (``app.extraction.splice``); the results land in ``summary``."""

    training = ForeignKeyField(Training, backref="downstream_evals", on_delete="CASCADE")
    token_budget = IntegerField()
    progress = DoubleField(default=0.0)  # 0..1
    summary = JSONField(null=True)
    model_size_bytes = BigIntegerField(null=True)  # the model's weights, as for Extraction: placement's estimate

    class Meta:
        table_name = "downstream_eval"

    @property
    def on_run(self) -> bool:
        return results_on_run(self)


class WorkerBeat(BaseModel):
    """Each worker's latest sign of life, written by the maintenance process beside it.

    Pages read this (never Redis) to say whether queued work will be picked up.
    """

    name = CharField(unique=True)
    host = CharField()
    pid = IntegerField()
    last_seen = DateTimeField(default=utcnow)
    queue_error = TextField(null=True)  # why Redis did not answer at the last beat (redacted)
    maintenance_error = TextField(null=True)  # the maintenance parts failing now, and why (redacted)
    maintenance_failures = IntegerField(default=0)  # how many rounds in a row the worst of them has failed
    # the device it trains on, as placement sees it (app/work/resources.py, Place)
    device_key = CharField(null=True)  # a GPU's UUID, or "<host>:cpu"
    device_label = CharField(null=True)
    device_names = TextField(null=True)  # what a job's requested_device may call it, space-separated
    memory_free_bytes = BigIntegerField(null=True)  # None on the CPU
    memory_total_bytes = BigIntegerField(null=True)

    class Meta:
        table_name = "worker_beat"


class Installation(BaseModel):
    """This installation's id, also written to ``DATA_DIR/.sae-studio-id`` by the first process: a
    worker on another machine whose DATA_DIR holds a different id (or none) is not sharing storage."""

    data_id = CharField(unique=True)
    created_at = DateTimeField(default=utcnow)

    class Meta:
        table_name = "installation"


ALL_MODELS = [User, ApiToken, UserSession, LoginThrottle, ActivationSet, Sweep, Training, MetricPoint, Event, TuneJob, Template, Extraction, ImportedSAE, FeatureJob,
              FeatureStat, WorkerBeat, DownstreamEval, Installation]

# The default source as a spec (benchmarks build it); migration 1 writes it as a row (app/migration_rows.py).
DEFAULT_SYNTHETIC = {
    "name": "Synthetic: 512 ground-truth features in d_in 256, ~5 active per token",
    "d_in": 256, "n_features": 512, "mean_active": 5.0, "seed": 0,
}

