"""The maintenance loop beside every worker survives its own rounds (a failing part never stops
the others, and one that keeps failing is shown to admins), and the worker runs nothing of a
job but SAE Studio's own functions: no foreign callbacks, webhooks or dependencies."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flask import current_app

from app.models import Extraction, Training, WorkerBeat
from app.work import janitor, lifecycle, maintenance
from conftest import QUICK_CONFIG, ROOT, signed_in_client, start_worker, stop_worker, wait_for, worker_env


def a_run(**fields) -> Training:
    config = {k: v for k, v in QUICK_CONFIG.items() if k not in ("acknowledge_warnings", "source_id")}
    return Training.create(**config, source=1, status="completed", **fields)


def extractions_without_a_local_path() -> None:
    """An extraction over the standard library's docstrings and one over a Hub dataset: no path."""
    common = {"model_name": "bundled:all-MiniLM-L6-v2", "layer": 1, "site": "resid", "token_budget": 2048,
              "context_length": 32, "batch_size": 4, "dtype": "float32", "status": "completed"}
    Extraction.create(text={"kind": "stdlib", "path": None, "dataset": None}, **common)
    Extraction.create(text={"kind": "hf", "path": None, "dataset": "org/corpus", "split": "train"}, **common)


def orphans(data: Path, run: Training) -> list[Path]:
    """An orphaned run folder and a half-written checkpoint in a live run's folder, both old."""
    orphan_run = data / "runs" / "999"
    orphan_run.mkdir(parents=True)
    (orphan_run / "checkpoint.pt").write_bytes(b"x")
    half_written = data / "runs" / str(run.id) / "checkpoint.pt.tmp"
    half_written.parent.mkdir(parents=True, exist_ok=True)
    half_written.write_bytes(b"x")
    old = time.time() - 7200
    for path in (orphan_run, half_written):
        os.utime(path, (old, old))
    return [orphan_run, half_written]


def test_a_maintenance_round_removes_orphans_when_extractions_have_no_local_path(app, env):
    """Before the fix, Path(None) made every round fail: the orphans stayed for good."""
    extractions_without_a_local_path()
    run = a_run()
    data = Path(env["DATA_DIR"])
    found = orphans(data, run)
    proc = start_worker({**env, "JANITOR_INTERVAL_S": "0.5"}, name="janitor-test")
    try:
        wait_for(lambda: not any(p.exists() for p in found), timeout=90, message="the janitor to remove the orphans")
        beat = wait_for(lambda: WorkerBeat.get_or_none(WorkerBeat.name == "janitor-test"), timeout=30,
                        message="the worker's beat")
    finally:
        stop_worker(proc)
    assert (data / "runs" / str(run.id)).is_dir()  # the live run's folder stays
    assert beat.maintenance_failures == 0 and beat.maintenance_error is None
    log = (data / "worker-janitor-test.log").read_text()
    assert "failed" not in log, log


def test_a_busy_database_inside_a_round_leaves_the_round_able_to_close(app, env):
    """A write retried while the database was busy reconnects; the round's ``connection_context`` around
    it still closes cleanly (it raised IndexError, and every round under a lock failed as a whole)."""
    from peewee import OperationalError

    from app.db import database

    tries = []

    def busy_once():
        tries.append(1)
        if len(tries) == 1:
            raise OperationalError("database is locked")
        return Training.select().count()

    database.close()
    with database.connection_context():
        lifecycle.retry_write(busy_once, what="test write")
        with database.connection_context():  # nested blocks keep their order too
            lifecycle.retry_write(busy_once, what="test write")
    assert len(tries) == 3 and database.is_closed()


def test_a_failing_part_does_not_stop_the_others(app, env, monkeypatch):
    extractions_without_a_local_path()
    data = Path(env["DATA_DIR"])
    found = orphans(data, a_run())

    def broken_sweep(settings):
        raise RuntimeError("the sweep broke")

    monkeypatch.setattr(lifecycle, "sweep_stale", broken_sweep)
    failures = maintenance.Failures()
    report = maintenance.run_once(current_app.config, "w1", janitor=True, failures=failures)
    assert not any(p.exists() for p in found)  # the janitor still ran
    assert sorted(report["cleaned"]) == sorted(str(p.relative_to(data)) for p in found)
    beat = WorkerBeat.get(WorkerBeat.name == "w1")  # and the beat was still written, saying what failed
    assert beat.maintenance_failures == 1 and "sweep: RuntimeError: the sweep broke" in beat.maintenance_error


def test_one_folder_the_janitor_cannot_scan_does_not_stop_it_cleaning_the_others(app, env, monkeypatch):
    data = Path(env["DATA_DIR"])
    found = orphans(data, a_run())
    scans = janitor._scans

    def with_a_broken_folder(settings):
        def broken():
            raise OSError("unreadable")
        return [("activations", broken)] + scans(settings)

    (data / "activations").mkdir(parents=True)
    monkeypatch.setattr(janitor, "_scans", with_a_broken_folder)
    with pytest.raises(janitor.JanitorError, match="scanning activations/: OSError: unreadable"):
        janitor.clean(current_app.config)
    assert not any(p.exists() for p in found)


def test_a_part_that_keeps_failing_is_shown_to_admins_until_it_works_again(app, env, monkeypatch):
    admin = signed_in_client(app, "admin")
    user = signed_in_client(app, "user", is_admin=False)
    data_dir = env["DATA_DIR"]

    def broken_clean(settings):
        raise PermissionError(f"cannot remove {data_dir}/runs/7/checkpoint.pt")

    monkeypatch.setattr(janitor, "clean", broken_clean)
    failures = maintenance.Failures()
    for round_ in range(1, 4):
        maintenance.run_once(current_app.config, "w1", janitor=True, failures=failures)
        page = admin.get("/").get_data(as_text=True)
        assert ('id="maintenance-banner"' in page) == (round_ >= 3), round_  # MAINTENANCE_FAILURES_SHOWN
    assert "janitor: PermissionError: cannot remove DATA_DIR/runs/7/checkpoint.pt (3 in a row)" in page
    assert data_dir not in page  # no server path
    assert 'id="maintenance-banner"' not in user.get("/").get_data(as_text=True)  # not a user's to fix

    maintenance.run_once(current_app.config, "w1", janitor=False, failures=failures)  # the janitor did not run:
    assert 'id="maintenance-banner"' in admin.get("/").get_data(as_text=True)  # still failing, as far as we know
    monkeypatch.undo()
    maintenance.run_once(current_app.config, "w1", janitor=True, failures=failures)
    assert 'id="maintenance-banner"' not in admin.get("/").get_data(as_text=True)
    beat = WorkerBeat.get(WorkerBeat.name == "w1")
    assert beat.maintenance_failures == 0 and beat.maintenance_error is None


# --- the worker's allow-list ---------------------------------------------------------------

def hostile_worker(env: dict, marker: Path) -> subprocess.CompletedProcess:
    """A real worker, in burst mode, that could import the hostile callback if it ever tried."""
    child_env = {**worker_env(env), "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
                 "CALLBACK_MARKER": str(marker)}
    return subprocess.run([sys.executable, str(ROOT / "worker.py"), "--burst"], cwd=ROOT, env=child_env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("kind", ["on_success", "on_failure", "on_stopped"])
def test_a_job_with_a_foreign_callback_is_refused_and_the_callback_never_runs(env, redis_client, tmp_path, kind):
    from rq import Callback, Queue

    from app.work.queue import SERIALIZER

    marker = tmp_path / "callback-ran"
    queue = Queue(env["QUEUE_NAME"], connection=redis_client, serializer=SERIALIZER)
    # an allowed function (a run that is not there: it returns at once, successfully) with a foreign callback
    job = queue.enqueue("app.work.training.run_training", 999_999, **{kind: Callback("hostile_callbacks.mark")})
    done = hostile_worker(env, marker)
    job.refresh()
    assert not marker.exists(), done.stderr
    assert job.get_status() == "failed"
    reason = job.latest_result().exc_string
    assert f"Refused: the job's {kind} callback 'hostile_callbacks.mark' is not one of SAE Studio's" in reason
    logged = done.stdout + done.stderr
    assert f"job {job.id} refused: Refused: the job's {kind} callback" in logged  # the worker's log says why


def test_a_job_depending_on_a_foreign_job_is_refused(env, redis_client, tmp_path):
    from rq import Queue
    from rq.job import Dependency

    from app.work.queue import SERIALIZER

    touched = tmp_path / "touched"
    queue = Queue(env["QUEUE_NAME"], connection=redis_client, serializer=SERIALIZER)
    foreign = queue.enqueue("pathlib.Path.touch", str(touched))
    dependent = queue.enqueue("app.work.training.run_training", 999_999,
                              depends_on=Dependency(jobs=[foreign], allow_failure=True))
    done = hostile_worker(env, tmp_path / "unused")
    foreign.refresh()
    dependent.refresh()
    assert not touched.exists() and foreign.get_status() == "failed"
    assert dependent.get_status() == "failed", (dependent.get_status(), done.stderr)
    reason = dependent.latest_result().exc_string
    assert f"Refused: the job depends on job '{foreign.id}', which is refused: 'pathlib.Path.touch'" in reason


def test_our_own_jobs_still_run(client, env, redis_client, tmp_path):
    """The allow-list lets the app's own jobs through: a queued run completes."""
    from conftest import create_run

    run = create_run(client, total_steps=20, log_every=10)
    done = hostile_worker(env, tmp_path / "unused")
    assert Training.get_by_id(run.id).status == "completed", done.stderr
    assert "refused" not in done.stdout + done.stderr
