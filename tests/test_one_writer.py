"""One writer per run, whatever the processes do.

Every claim of a record takes the next attempt number (a fencing token), and every write a
job makes is conditional on its attempt still being the row's. These tests stop a real
work-horse with SIGSTOP until it has been swept (and, with two workers, until another worker
has resumed the run), wake it, and check that it writes nothing more: no metric point, no
event, no checkpoint, no status. A Hypothesis state machine then drives claims, heartbeats,
sweeps, resumes, cancels and late writes in any order against the real database. A training's
final SAE is fenced too: a stale attempt that saves its weights after another attempt ended the
run leaves the live attempt's SAE, as every reader finds it, as it was.
"""
from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
from pathlib import Path

import pytest
from flask import current_app
from hypothesis import HealthCheck, settings as hsettings, strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, multiple, rule, run_state_machine_as_test

from app.models import Event, MetricPoint, Training, utcnow
from app.work import lifecycle
from app.work.training import CHECKPOINT_NAME, MetricWriter, checkpoint_step, resume_training, save_checkpoint
from conftest import BACKEND, create_run, reload, start_worker, stop_worker, wait_for

LONG = {"total_steps": 1_000_000, "log_every": 10, "checkpoint_every_steps": 50, "lr_warmup_steps": 20,
        "l1_warmup_steps": 40, "steer_l1_alpha": True, "dead_window_tokens": 5_000}
STALE_LOG = "is no longer the record's current one"


@pytest.fixture
def no_feature_jobs(env, monkeypatch):
    monkeypatch.setenv("FEATURES_AFTER_TRAINING", "0")


def work_horse(worker) -> int:
    """The pid of the worker's work-horse (its other child is the maintenance process)."""
    def find():
        pids = subprocess.run(["pgrep", "-P", str(worker.pid)], capture_output=True, text=True).stdout.split()
        horses = [int(p) for p in pids if b"maintenance" not in Path(f"/proc/{p}/cmdline").read_bytes()]
        return horses[0] if horses else None
    return wait_for(find, timeout=30, message="the work-horse")


def worker_log(env, name: str) -> str:
    return (Path(env["DATA_DIR"]) / f"worker-{name}.log").read_text(errors="replace")


def checkpoint_files(env, run) -> set[str]:
    folder = Path(env["DATA_DIR"]) / "runs" / str(run.id)
    return {p.name for p in folder.glob("checkpoint*")}


def snapshot(run) -> dict:
    run = reload(run)
    return {"status": run.status, "reason": run.reason, "step": run.step, "attempt": run.attempt,
            "checkpoint": (run.checkpoint_name, run.checkpoint_at), "finished_at": run.finished_at,
            "events": [(e.id, e.code, e.attempt) for e in run.events.order_by(Event.id)],
            "points": run.metrics.count()}


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def test_a_horse_swept_while_stopped_writes_nothing_when_it_wakes(client, env, no_feature_jobs):
    """One worker: the horse is stopped until the sweeper marks its run interrupted. Woken, it
    stops at its next write and leaves the row, the events, the points and the checkpoint as
    the sweep left them; Resume then continues from that checkpoint."""
    run = create_run(client, **LONG)
    worker = start_worker(env, name="solo")
    try:
        wait_for(lambda: (checkpoint_step(reload(run), current_app.config) or 0) >= 100, timeout=120,
                 message="the run to pass two checkpoints")
        horse = work_horse(worker)
        os.kill(horse, signal.SIGSTOP)
        try:
            wait_for(lambda: reload(run).status == "interrupted", timeout=60, message="the sweep")
            swept = snapshot(run)
            files = checkpoint_files(env, run)
        finally:
            os.kill(horse, signal.SIGCONT)
        wait_for(lambda: STALE_LOG in worker_log(env, "solo"), timeout=60, message="the woken horse to give up")
        wait_for(lambda: process_gone(horse), timeout=60, message="the woken horse to exit")
        assert snapshot(run) == swept  # not a point, an event, a checkpoint or a status more
        # no checkpoint file more; a half-written one the stop caught (``.tmp``) may have been removed
        assert checkpoint_files(env, run) == files or (checkpoint_files(env, run) < files and all(
            name.endswith(".tmp") for name in files - checkpoint_files(env, run)))
        saved = swept["checkpoint"][1]
        assert f"checkpoint at step {saved:,} is kept" in swept["reason"]  # and the reason still says so
        assert swept["events"][-1][1:] == ("interrupted", 1)

        assert client.post(f"/api/trainings/{run.id}/resume").status_code == 202
        wait_for(lambda: reload(run).step >= saved + 60, timeout=120, message="the resumed run to train on")
        assert Event.get(Event.training == run.id, Event.code == "resumed").step == saved
        client.post(f"/api/trainings/{run.id}/cancel")
        wait_for(lambda: reload(run).status == "cancelled", timeout=60, message="the cancel")
    finally:
        stop_worker(worker)
    run = reload(run)
    assert run.attempt == 2
    steps = [p.step for p in run.metrics.order_by(MetricPoint.step)]
    assert steps == list(range(10, steps[-1] + 1, 10))  # one series: no gap, no duplicate at the seam


def test_two_workers_a_stopped_horse_cannot_write_over_the_one_that_resumed_its_run(client, env, no_feature_jobs):
    """The issue's scenario: worker A's horse is stopped past the stale limit, the run is swept,
    resumed, and claimed by worker B; then A's horse wakes. Only B writes from then on: one
    'cancelled' event, and the row's step, the checkpoint in force and the events agree."""
    run = create_run(client, **LONG)
    a = start_worker(env, name="a")
    b = None
    try:
        wait_for(lambda: (checkpoint_step(reload(run), current_app.config) or 0) >= 50, timeout=120,
                 message="the run to pass a checkpoint")
        horse = work_horse(a)
        os.kill(horse, signal.SIGSTOP)
        try:
            wait_for(lambda: reload(run).status == "interrupted", timeout=60, message="the sweep")
            swept = snapshot(run)
            assert client.post(f"/api/trainings/{run.id}/resume").status_code == 202
            b = start_worker(env, name="b")
            wait_for(lambda: (r := reload(run)).status == "running" and r.attempt == 2
                     and r.step >= swept["checkpoint"][1] + 20, timeout=120, message="worker B to resume the run")
        finally:
            os.kill(horse, signal.SIGCONT)
        wait_for(lambda: STALE_LOG in worker_log(env, "a"), timeout=60, message="A's horse to give up")
        wait_for(lambda: process_gone(horse), timeout=60, message="A's horse to exit")
        assert reload(run).worker_name == "b"
        client.post(f"/api/trainings/{run.id}/cancel")
        run = wait_for(lambda: (r := reload(run)).status == "cancelled" and r, timeout=60, message="the cancel")
    finally:
        for worker in (a, b):
            if worker is not None:
                stop_worker(worker)
    events = list(run.events.order_by(Event.id))
    assert [e.code for e in events].count("cancelled") == 1
    interrupted = next(e for e in events if e.code == "interrupted")
    assert all(e.attempt in (2, None) for e in events if e.id > interrupted.id)  # nothing from attempt 1 after it
    # the row, the checkpoint in force and the last event agree on where the run stopped
    assert run.checkpoint_at == run.step == events[-1].step
    assert CHECKPOINT_NAME.fullmatch(run.checkpoint_name).group(1) == "2"
    assert checkpoint_files(env, run) == {run.checkpoint_name}
    points = list(run.metrics.order_by(MetricPoint.step))
    assert [p.step for p in points] == list(range(10, points[-1].step + 1, 10))
    assert all(p.attempt == 2 for p in points if p.step > swept["checkpoint"][1])


# --- the state machine ------------------------------------------------------------------

class Writers(RuleBasedStateMachine):
    """Workers claim, beat, flush points and events, checkpoint and end one run; a sweeper marks
    it interrupted; a user resumes and cancels it. Late writes from any earlier claim can land
    at any moment. The model predicts which writes are accepted: only the current attempt's,
    while the run is running (or, after it ended the run itself, in the status it set)."""

    processes = Bundle("processes")

    def __init__(self, client, settings):
        super().__init__()
        self.settings = settings
        self.run = create_run(client, name="machine")
        self.attempt, self.status = 0, "queued"
        self.step, self.checkpoint = 0, None  # (name, step) the row should name
        self.events: dict[int | None, int] = {}  # attempt -> accepted events
        self.last_writer = 0  # the highest attempt that has had a write accepted
        self.point_writers: set[int] = set()  # the attempts whose metric points were accepted
        self.ended_by = None  # the process whose end the row shows now
        self.final = None  # the final folder the row should name

    def row(self) -> Training:
        return reload(self.run)

    def accepts(self, p) -> bool:
        """A write of ``p`` lands while it holds the current attempt and the row is running; once it
        ended the row itself, only while the row still shows that end (no resume or cancel since)."""
        if p.attempt != self.attempt:
            return False
        if lifecycle.ended_as(p) is None:
            return self.status == "running"
        return self.ended_by is p

    def written(self, p, accepted: bool, expected: bool) -> None:
        assert accepted == expected, (p.attempt, self.attempt, self.status)
        if accepted:
            assert p.attempt >= self.last_writer  # never an earlier claim after a later one
            self.last_writer = p.attempt

    @rule(target=processes)
    def claim(self):
        copy = self.row()
        if self.status != "queued":
            assert not lifecycle.claim(copy)
            return multiple()
        assert lifecycle.claim(copy)
        assert not lifecycle.claim(self.row())  # a second worker that read the row too loses
        self.attempt += 1
        self.status = "running"
        return copy

    @rule(p=processes)
    def heartbeat(self, p):
        expected = self.accepts(p)
        try:
            lifecycle.fenced_update(p, what="heartbeat", heartbeat_at=utcnow())
            accepted = True
        except lifecycle.Superseded:
            accepted = False
        self.written(p, accepted, expected)

    @rule(p=processes, steps=st.integers(1, 3))
    def flush(self, p, steps):
        expected = self.accepts(p)
        writer = MetricWriter(p)
        start = self.row().step
        for i in range(1, steps + 1):
            writer.rows.append({"training": p.id, "step": start + 10 * i, "tokens": 100 * (start + 10 * i),
                                "loss": 1.0, "mse": 1.0, "sparsity_loss": 0.0, "l1": 0.0, "l0": 1.0,
                                "l0_fraction": 0.01, "fvu": 0.5, "dead": 0, "lr": 1e-3, "l1_alpha": 1e-3,
                                "tokens_per_s": 1.0})
        writer.events.append({"training": p.id, "level": "info", "code": "tick", "message": "tick",
                              "step": start + 10 * steps, "suggestion": None, "created_at": utcnow()})
        try:
            writer.flush()
            accepted = True
        except lifecycle.Superseded:
            accepted = False
        self.written(p, accepted, expected)
        if accepted:
            self.events[p.attempt] = self.events.get(p.attempt, 0) + 1
            self.step = start + 10 * steps
            self.point_writers.add(p.attempt)

    @rule(p=processes)
    def checkpoint(self, p):
        expected = self.accepts(p)
        step = self.row().step
        try:
            save_checkpoint({"step": step, "tokens": 100 * step}, p, self.settings)
            accepted = True
        except lifecycle.Superseded:
            accepted = False
        self.written(p, accepted, expected)
        if accepted:
            assert CHECKPOINT_NAME.fullmatch(p.checkpoint_name).group(1, 2) == (str(p.attempt), str(step))
            self.checkpoint = (p.checkpoint_name, step)

    @rule(p=processes, status=st.sampled_from(["completed", "cancelled", "failed"]))
    def end(self, p, status):
        # a record is ended once, by the attempt that holds it while it runs
        expected = lifecycle.ended_as(p) is None and p.attempt == self.attempt and self.status == "running"
        accepted = lifecycle.finish(p, status, reason="ended" if status != "completed" else None,
                                    event={"level": "info", "code": status, "message": status, "step": None,
                                           "suggestion": None})
        self.written(p, accepted, expected)
        if accepted:
            self.status, self.ended_by = status, p
            self.events[p.attempt] = self.events.get(p.attempt, 0) + 1

    @rule(p=processes, status=st.sampled_from(["completed", "cancelled", "failed"]))
    def end_with_final_files(self, p, status):
        """The end of a training (``RunSession._conclude``): its final files saved in a folder of its
        attempt's own, named on the row by the end itself, removed again when that end is refused."""
        import types

        import torch

        from app.work.training import _save_sae, settle_final

        expected = lifecycle.ended_as(p) is None and p.attempt == self.attempt and self.status == "running"
        sae = torch.nn.Linear(4, 2)
        sae.d_in = 4
        result = types.SimpleNamespace(eval={"frequencies": [0.5, 0.25]}, norm_scale=1.0, steps=self.row().step)
        final = _save_sae(sae, p, result, self.settings)
        accepted = settle_final(p, self.settings, final, lifecycle.finish(
            p, status, final_name=final, reason="ended" if status != "completed" else None,
            event={"level": "info", "code": status, "message": status, "step": None, "suggestion": None}))
        self.written(p, accepted, expected)
        if accepted:
            self.status, self.ended_by, self.final = status, p, final
            self.events[p.attempt] = self.events.get(p.attempt, 0) + 1

    @rule()
    def silence_then_sweep(self):
        """The running process stops beating (stopped, or its machine is gone) past the stale limit."""
        old = utcnow() - dt.timedelta(seconds=3600)
        Training.update(heartbeat_at=old).where(Training.id == self.run.id).execute()
        swept = self.run.id in {r.id for r in lifecycle.sweep_stale(self.settings) if isinstance(r, Training)}
        assert swept == (self.status == "running")
        if swept:
            self.status = "interrupted"
            self.events[self.attempt] = self.events.get(self.attempt, 0) + 1

    @rule()
    def resume(self):
        resumable = self.status == "interrupted" or (self.status in ("failed", "cancelled") and self.checkpoint)
        try:
            resume_training(self.row(), self.settings)
            resumed = True
        except Exception as exc:  # noqa: BLE001 - NotResumable, asserted below
            assert type(exc).__name__ == "NotResumable", exc
            resumed = False
        assert resumed == bool(resumable)
        if resumed:
            self.status, self.ended_by = "queued", None
            self.events[None] = self.events.get(None, 0) + 1

    @rule()
    def cancel(self):
        lifecycle.request_cancel(self.row())
        if self.status == "queued":
            self.status, self.ended_by = "cancelled", None
            self.events[None] = self.events.get(None, 0) + 1

    @invariant()
    def the_row_the_checkpoint_and_the_events_agree(self):
        row = self.row()
        assert (row.attempt, row.status) == (self.attempt, self.status)
        assert row.step == self.step
        assert (row.checkpoint_name, row.checkpoint_at) == (self.checkpoint or (None, None))
        files = {p.name for p in (Path(self.settings["DATA_DIR"]) / "runs" / str(row.id)).glob("checkpoint*")}
        assert files == ({self.checkpoint[0]} if self.checkpoint else set())
        # the final folder the row names is the one on disk: a refused end left none of its own
        finals = {p.name for p in (Path(self.settings["DATA_DIR"]) / "runs" / str(row.id)).glob("final-a*")}
        assert row.final_name == self.final and finals == ({self.final} if self.final else set())
        counted: dict[int | None, int] = {}
        for event in row.events:
            counted[event.attempt] = counted.get(event.attempt, 0) + 1
        assert counted == {k: v for k, v in self.events.items() if v}
        assert {p.attempt for p in row.metrics} <= self.point_writers


def test_the_state_machine_never_accepts_two_writers(client, env):
    settings = current_app.config

    class Machine(Writers):
        def __init__(self):
            super().__init__(client, settings)

    run_state_machine_as_test(Machine, settings=hsettings(
        max_examples=60, stateful_step_count=20, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]))


def test_a_database_from_before_attempts_is_upgraded_and_its_checkpoints_still_resume(client, env):
    """Migration 15 adds the attempt columns to a database that has runs; a run interrupted before
    it, with its checkpoint in the old place (checkpoint.pt beside checkpoint.json), still resumes."""
    import json

    from playhouse.migrate import SchemaMigrator, migrate as run_migrations

    from app.db import MIGRATIONS, SchemaVersion, database, migrate

    run = create_run(client)
    lifecycle.add_event(run.id, "info", "before", "an event from before the upgrade")
    MetricPoint.create(training=run.id, step=10, tokens=2560, loss=1.0, mse=1.0, sparsity_loss=0.0, l1=0.0, l0=5.0,
                       l0_fraction=0.02, fvu=0.5, dead=0, lr=1e-3, l1_alpha=3e-3, tokens_per_s=1.0)
    db = database.obj
    drops = [("training", "attempt"), ("training", "checkpoint_name"), ("training", "checkpoint_at"),
             ("tune_job", "attempt"), ("extraction", "attempt"), ("feature_job", "attempt"),
             ("downstream_eval", "attempt"), ("metric_point", "attempt"), ("event", "attempt")]
    migrator = SchemaMigrator.from_database(db)
    for table, column in drops:
        run_migrations(migrator.drop_column(table, column))
    SchemaVersion.update(version=[m.__name__ for m in MIGRATIONS].index("_migration_15_fencing")).execute()
    assert migrate() == len(MIGRATIONS)
    for table, column in drops:
        assert column in {c.name for c in db.get_columns(table)}, (table, column)
    # nothing that hangs off a run is lost on the way (SQLite rebuilt tables, cascading deletes)
    assert Event.select().where(Event.training == run.id).count() == 1
    assert MetricPoint.select().where(MetricPoint.training == run.id).count() == 1
    assert reload(run).attempt == 0

    folder = Path(env["DATA_DIR"]) / "runs" / str(run.id)
    folder.mkdir(parents=True)
    (folder / "checkpoint.pt").write_bytes(b"old")
    (folder / "checkpoint.json").write_text(json.dumps({"step": 120, "tokens": 30_720}))
    Training.update(status="interrupted", step=125).where(Training.id == run.id).execute()
    run = reload(run)
    assert run.attempt == 0 and checkpoint_step(run, current_app.config) == 120
    assert client.post(f"/api/trainings/{run.id}/resume").json["checkpoint_step"] == 120
    run = reload(run)
    assert lifecycle.claim(run) and run.attempt == 1
    save_checkpoint({"step": 180, "tokens": 46_080}, run, current_app.config)  # the first new-style one
    assert checkpoint_files(env, run) == {run.checkpoint_name}  # the old files went with it
    assert checkpoint_step(reload(run), current_app.config) == 180


def test_a_stale_attempt_cannot_replace_the_live_attempts_final_weights(client, env, monkeypatch):
    """The gap that was left: attempt 1 passed its fenced check and was frozen just before it saved
    its final files; meanwhile it was swept, resumed at another learning rate, and attempt 2
    completed the run. Woken, attempt 1 saves its weights and its end is refused: the run's SAE,
    as every reader finds it (export, features, downstream), is still attempt 2's, the row is as
    attempt 2 left it, and attempt 1's files are gone. (Before final folders attempt 1 wrote over
    ``runs/<id>/sae.safetensors`` and the export read its weights.)"""
    from app.work import training
    from app.work.exports import run_sae_files

    settings = {**current_app.config, "FEATURES_AFTER_TRAINING": False}
    run = create_run(client, name="frozen before its final files")
    real_save = training._save_sae
    live = {}

    def save_after_a_freeze(sae, p, result, settings_):
        if p.attempt == 1:  # frozen here, past its fenced check: another worker takes the run over
            live["stale"] = {k: v.detach().clone() for k, v in sae.state_dict().items()}
            assert lifecycle.mark_interrupted(reload(run), "Interrupted: its worker stopped beating.", settings)
            resume_training(reload(run), settings, learning_rate=3 * run.learning_rate, enqueue=False)
            p2 = reload(run)
            assert lifecycle.claim(p2) and p2.attempt == 2
            assert training._train(p2, settings, lifecycle.StopCheck(p2)) == "completed"
            live["row"], live["export"] = snapshot(run), run_sae_files(reload(run), settings)
        return real_save(sae, p, result, settings_)

    monkeypatch.setattr(training, "_save_sae", save_after_a_freeze)
    p1 = reload(run)
    assert lifecycle.claim(p1) and p1.attempt == 1
    assert training._train(p1, settings, lifecycle.StopCheck(p1)) == "superseded"
    assert live["row"]["status"] == "completed" and live["row"]["attempt"] == 2
    assert run_sae_files(reload(run), settings) == live["export"]  # the export reads attempt 2's SAE still
    assert snapshot(run) == live["row"]  # not a status, an event or a point from attempt 1

    import torch
    from safetensors.torch import load_file

    from app.work.training import FINAL_NAME, sae_folder

    run = reload(run)
    assert FINAL_NAME.fullmatch(run.final_name).group(1) == "2"
    weights = load_file(str(sae_folder(run, settings) / "sae.safetensors"))
    assert weights.keys() == live["stale"].keys()
    assert not all(torch.equal(weights[k], live["stale"][k]) for k in weights)  # the two attempts' SAEs differ
    folder = Path(env["DATA_DIR"]) / "runs" / str(run.id)
    assert {p.name for p in folder.iterdir()} == {run.final_name}  # attempt 1 removed its own folder
    assert run.summary["checkpoint"] == f"runs/{run.id}/{run.final_name}/sae.safetensors"


def test_a_run_from_before_final_folders_still_exports_and_its_features_load(client, env):
    """A run that ended before final folders has its files directly in ``runs/<id>/`` and no name
    on its row: its page, its export, its feature statistics and the janitor treat them as its SAE."""
    from app.models import FeatureJob, FeatureStat
    from app.work import janitor, training
    from app.work.exports import run_sae_files
    from app.work.features import _features
    from app.work.training import FINAL_FILES, sae_folder

    settings = {**current_app.config, "FEATURES_AFTER_TRAINING": False}
    run = create_run(client, name="old layout")
    p = reload(run)
    assert lifecycle.claim(p)
    assert training._train(p, settings, lifecycle.StopCheck(p)) == "completed"
    run = reload(run)
    exported = run_sae_files(run, settings)
    folder = Path(env["DATA_DIR"]) / "runs" / str(run.id)
    for name in FINAL_FILES:  # the layout of before: the files in the run folder, no name on the row
        (folder / run.final_name / name).rename(folder / name)
    (folder / run.final_name).rmdir()
    Training.update(final_name=None).where(Training.id == run.id).execute()
    run = reload(run)

    assert sae_folder(run, settings) == folder
    assert run_sae_files(run, settings) == exported
    response = client.get(f"/trainings/{run.id}/export/saelens.zip")
    assert response.status_code == 200 and response.mimetype == "application/zip"
    assert 'id="export-saelens"' in client.get(f"/trainings/{run.id}").get_data(as_text=True)
    old = (dt.datetime.now() - dt.timedelta(hours=3)).timestamp()
    for name in FINAL_FILES:
        os.utime(folder / name, (old, old))
    assert not any(path.startswith(f"runs/{run.id}/") for path in janitor.clean(current_app.config))
    assert all((folder / name).exists() for name in FINAL_FILES)

    assert client.post(f"/trainings/{run.id}/features", data={"sample_tokens": "2000"}).status_code == 303
    job = FeatureJob.get(FeatureJob.training == run.id)
    assert lifecycle.claim(job)
    assert _features(job, settings, lifecycle.StopCheck(job)) == "completed"
    assert FeatureStat.select().where(FeatureStat.job == job.id).count() == run.latent_dim


@pytest.mark.skipif(BACKEND != "postgresql", reason="on SQLite the busy timeout bounds the wait")
def test_a_row_its_job_holds_locked_is_swept_next_round_not_waited_on(client, env):
    """A job frozen inside its own write transaction holds its row. The sweeper gives up on that
    row after a short lock timeout (so the rest of maintenance goes on) and sweeps it later."""
    import time

    from playhouse.db_url import connect

    run = create_run(client)
    p = reload(run)
    assert lifecycle.claim(p)
    Training.update(heartbeat_at=utcnow() - dt.timedelta(seconds=3600)).where(Training.id == run.id).execute()
    frozen = connect(env["DATABASE_URL"])
    frozen.connect()
    frozen.execute_sql("BEGIN")
    frozen.execute_sql("SELECT id FROM training WHERE id = %s FOR UPDATE", (run.id,))
    try:
        started = time.monotonic()
        assert run.id not in {r.id for r in lifecycle.sweep_stale(current_app.config) if isinstance(r, Training)}
        assert time.monotonic() - started < 30  # it did not wait for the frozen transaction
        assert reload(run).status == "running"
    finally:
        frozen.execute_sql("COMMIT")
        frozen.close()
    assert run.id in {r.id for r in lifecycle.sweep_stale(current_app.config) if isinstance(r, Training)}
    assert reload(run).status == "interrupted"


def test_a_job_that_beats_between_the_sweepers_read_and_its_write_stays_running(client, env, monkeypatch):
    """The sweeper reads a silent heartbeat, then the job beats, then the sweeper writes: the heartbeat
    is read again in the same UPDATE, so the job keeps its run (no interrupted row, reason or event)."""
    settings = current_app.config
    old = utcnow() - dt.timedelta(seconds=10 * settings["HEARTBEAT_STALE_S"])
    run = Training.create(source=1, name="beats late", status="running", attempt=3, worker_name="w",
                          started_at=old, heartbeat_at=old)
    real_retry = lifecycle.retry_write

    def beat_after_the_scan(write, *, what="write", **kwargs):
        result = real_retry(write, what=what, **kwargs)
        if what == "stale-job scan" and result:  # the job's own heartbeat lands now, between read and write
            Training.update(heartbeat_at=utcnow()).where(Training.id == run.id).execute()
        return result

    monkeypatch.setattr(lifecycle, "retry_write", beat_after_the_scan)
    assert lifecycle.sweep_stale(settings) == []
    kept = reload(run)
    assert (kept.status, kept.reason, kept.attempt) == ("running", run.reason, 3)
    assert not Event.select().where(Event.training == run.id).exists()

    # and once it really is silent, the next round ends it
    monkeypatch.setattr(lifecycle, "retry_write", real_retry)
    Training.update(heartbeat_at=old).where(Training.id == run.id).execute()
    assert [r.id for r in lifecycle.sweep_stale(settings)] == [run.id]
    assert reload(run).status == "interrupted"
