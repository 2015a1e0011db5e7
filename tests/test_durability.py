"""Durable work against real processes: killed work-horses and workers, warm shutdowns, stale
heartbeats, a locked database, two workers on one queue, lost jobs."""
from __future__ import annotations

import datetime as dt
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from flask import current_app
from safetensors.torch import load_file

from app.models import Event, MetricPoint, Training, TuneJob, utcnow
from app.work import lifecycle
from app.work.training import checkpoint_step, sae_folder
from conftest import (BACKEND, QUICK_CONFIG, create_run, kill_work_horse, reload, start_worker, stop_worker, worker_logs,
                      wait_for)

METRIC_COLUMNS = ("step", "tokens", "loss", "mse", "sparsity_loss", "l1", "l0", "l0_fraction", "fvu", "dead", "lr",
                  "l1_alpha")  # everything but the wall-clock throughput


def series(run: Training) -> list[tuple]:
    return [tuple(getattr(p, c) for c in METRIC_COLUMNS) for p in run.metrics.order_by(MetricPoint.step)]


def weights(env, run: Training) -> dict:
    return load_file(str(sae_folder(reload(run), current_app.config) / "sae.safetensors"))


# A run long enough to be killed mid-way, with checkpoints every 60 steps.
DURABLE = {"total_steps": 600, "log_every": 10, "checkpoint_every_steps": 60, "lr_warmup_steps": 20,
           "l1_warmup_steps": 40, "steer_l1_alpha": True, "dead_window_tokens": 5_000}


@pytest.fixture
def no_feature_jobs(env, monkeypatch):
    monkeypatch.setenv("FEATURES_AFTER_TRAINING", "0")


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(client, env, run_worker, no_feature_jobs):
    """The same seed trained straight, and killed with SIGKILL mid-way then resumed, ends with
    bit-identical weights on the CPU, the same metric series, and the same held-out L0 and FVU."""
    straight = create_run(client, name="straight", **DURABLE)
    assert run_worker().returncode == 0
    straight = reload(straight)
    assert straight.status == "completed", straight.reason

    killed = create_run(client, name="killed", **DURABLE)
    worker = start_worker(env)
    try:
        # past a few checkpoints; the kill then lands somewhere in the next interval
        wait_for(lambda: (checkpoint_step(reload(killed), current_app.config) or 0) >= 180, timeout=120, interval=0.02,
                 message="the run to pass a checkpoint")
        time.sleep(0.3)
        kill_work_horse(worker)
        killed = wait_for(lambda: (r := reload(killed)).status == "interrupted" and r, timeout=30,
                          message="the killed run to be marked interrupted")
    finally:
        stop_worker(worker)
    assert "killed (signal 9)" in killed.reason
    saved = checkpoint_step(killed, current_app.config)
    assert saved is not None and saved % 60 == 0 and killed.step - saved < 60 + 10  # at most one interval lost
    response = client.post(f"/api/trainings/{killed.id}/resume")
    assert response.status_code == 202 and response.json["status"] == "queued", response.json
    assert response.json["checkpoint_step"] == saved
    assert run_worker().returncode == 0
    killed = reload(killed)
    assert killed.status == "completed", killed.reason

    a, b = weights(env, straight), weights(env, killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the weights differ"
    assert series(killed) == series(straight)  # every point once: none lost, none duplicated
    for key in ("l0", "fvu", "l0_fraction", "dead"):
        assert killed.summary[key] == straight.summary[key]
    codes = [e.code for e in killed.events.order_by(Event.id)]
    assert "interrupted" in codes and "resume" in codes and "resumed" in codes and codes[-1] == "completed"
    resumed = Event.get(Event.training == killed, Event.code == "resumed")
    assert resumed.step == saved


def test_sigterm_to_the_worker_checkpoints_and_leaves_the_run_resumable(client, env, no_feature_jobs):
    run = create_run(client, **{**DURABLE, "total_steps": 100_000, "checkpoint_every_steps": 100_000})
    worker = start_worker(env)
    wait_for(lambda: reload(run).step >= 50, timeout=120, message="the run to train")
    worker.send_signal(signal.SIGTERM)  # RQ's warm shutdown
    worker.wait(timeout=60)  # the worker exits promptly instead of finishing the run
    run = reload(run)
    assert run.status == "interrupted", run.reason
    assert "shut down" in run.reason and "Resume" in run.reason
    stopped_at = run.step
    assert checkpoint_step(run, current_app.config) == stopped_at  # nothing was lost: it saved where it stopped
    assert client.post(f"/api/trainings/{run.id}/resume").status_code == 202
    worker = start_worker(env)
    try:
        wait_for(lambda: reload(run).step >= stopped_at + 100, timeout=120, message="the resumed run to train on")
        client.post(f"/api/trainings/{run.id}/cancel")
        run = wait_for(lambda: (r := reload(run)).status == "cancelled" and r, timeout=60, message="cancelled")
    finally:
        stop_worker(worker)
    assert Event.get(Event.training == run, Event.code == "resumed").step == stopped_at
    steps = [p.step for p in run.metrics.order_by(MetricPoint.step)]
    assert steps == list(range(10, steps[-1] + 1, 10))  # one series: no gap, no duplicate at the seam


def test_killing_the_worker_process_ends_its_run_interrupted(client, env, no_feature_jobs):
    """Not just the work-horse: the whole worker dies. The horse follows (and checkpoints)."""
    run = create_run(client, **{**DURABLE, "total_steps": 100_000})
    worker = start_worker(env)
    try:
        wait_for(lambda: reload(run).step > 20, timeout=120, message="the run to train")
        os.kill(worker.pid, signal.SIGKILL)
        run = wait_for(lambda: (r := reload(run)).status == "interrupted" and r, timeout=30,
                       message="the orphaned run to stop")
    finally:
        stop_worker(worker)
    assert "shut down" in run.reason or "heartbeats" in run.reason
    api = client.get(f"/api/trainings/{run.id}").json
    assert api["status"] == "interrupted" and api["checkpoint_step"] is not None


def test_a_stale_heartbeat_is_swept_to_interrupted_at_start_up_and_by_the_sweeper(client, env, run_worker):
    """Whatever RQ left behind (here: nothing at all), a job whose heartbeat stopped is not running."""
    old = utcnow() - dt.timedelta(seconds=60)
    run = create_run(client)
    tune = TuneJob.create(source=1, latent_dim=256, target_l0=0.02, learning_rate=1e-3, batch_size=256,
                          pilot_steps=400)
    for record in (run, tune):
        type(record).update(status="running", started_at=old, heartbeat_at=old, worker_name="gone.1").where(
            type(record).id == record.id).execute()
    fresh = create_run(client)
    Training.update(status="running", started_at=utcnow(), heartbeat_at=utcnow()).where(
        Training.id == fresh.id).execute()
    # the page does not change it: GETs never write
    assert client.get(f"/trainings/{run.id}").status_code == 200 and reload(run).status == "running"
    run_worker()  # a worker sweeps once on start-up
    run, tune = reload(run), TuneJob.get_by_id(tune.id)
    assert run.status == "interrupted" and "heartbeats" in run.reason and "gone.1" in run.reason
    assert tune.status == "interrupted"
    assert reload(fresh).status == "running"  # a live heartbeat is left alone
    assert Event.get(Event.training == run, Event.code == "interrupted")
    # and the sweeper of a running worker catches it once it goes stale
    Training.update(heartbeat_at=old).where(Training.id == fresh.id).execute()
    assert [r.id for r in lifecycle.sweep_stale(current_app.config)] == [fresh.id]


def test_a_locked_database_delays_a_run_but_never_fails_it(client, env, no_feature_jobs):
    """Another writer holds the write lock for 4 s mid-run: on SQLite longer than the worker's busy
    timeout (1 s here, SQLITE_BUSY_TIMEOUT_MS), so its writes fail and are retried; on PostgreSQL an
    exclusive lock on the tables the run writes to, which its writes wait on."""
    from playhouse.db_url import connect

    run = create_run(client, **DURABLE)  # its writes block within 10 steps of the lock: it cannot finish under it
    worker = start_worker({**env, "SQLITE_BUSY_TIMEOUT_MS": "1000"})
    try:
        wait_for(lambda: reload(run).step >= 30, timeout=120, message="the run to train")
        other = connect(env["DATABASE_URL"], **({"pragmas": {"busy_timeout": 30_000}} if BACKEND == "sqlite" else {}))
        other.connect()
        if BACKEND == "sqlite":
            other.execute_sql("BEGIN IMMEDIATE")
        else:
            other.execute_sql("BEGIN")
            other.execute_sql("LOCK TABLE metric_point, training, event IN ACCESS EXCLUSIVE MODE")
        held_from = reload(run).step if BACKEND == "sqlite" else None  # reads go on under SQLite's write lock
        time.sleep(4)
        if BACKEND == "sqlite":
            assert reload(run).step == held_from  # its metric writes waited: the step on the row stood still
        other.execute_sql("COMMIT")
        other.close()
        assert reload(run).status == "running"  # it waited out the lock, and did not finish meanwhile
        run = wait_for(lambda: (r := reload(run)).status in ("completed", "failed") and r, timeout=300,
                       message="the run to end")
    finally:
        stop_worker(worker)
    assert run.status == "completed", run.reason
    assert [p.step for p in run.metrics.order_by(MetricPoint.step)] == list(range(10, DURABLE["total_steps"] + 1, 10))
    if BACKEND == "sqlite":  # the writes failed at the busy timeout and were tried again: the first one the
        # run tried under the lock is its metrics or, when the lock fell just before a multiple of 60, the
        # checkpoint's record (the run takes about 5 ms a step here, so the step read above is no guide)
        assert re.search(r"database busy during (metrics|checkpoint at step \d+) ", worker_logs(env, tail=10**6))


def test_two_workers_share_one_queue_while_the_web_writes(client, env, no_feature_jobs):
    """Two trainings run at once, one on each worker, while the web process writes too: both
    complete and every metric row is there exactly once."""
    runs = [create_run(client, name=f"parallel-{i}", **{**DURABLE, "total_steps": 800, "seed": i}) for i in range(2)]
    # two workers on a two-core machine: one torch thread each, as a box with more workers than cores
    # would be set up (two threads each, plus this process, oversubscribe the cores many times over)
    workers = [start_worker({**env, "OMP_NUM_THREADS": "1"}, name=f"w{i}-{os.getpid()}") for i in range(2)]
    stop_writing = threading.Event()
    written = []

    def web_writes() -> None:
        while not stop_writing.is_set():
            response = client.post("/api/trainings", json={**QUICK_CONFIG, "name": "side", "total_steps": 10,
                                                           "lr_warmup_steps": 0, "l1_warmup_steps": 0})
            written.append(response.status_code)
            lifecycle.request_cancel(Training.get_by_id(response.json["id"]))
            time.sleep(0.05)

    writer = threading.Thread(target=web_writes)
    try:
        def state() -> str:
            rows = [(r.id, r.status, r.worker_name, r.step, r.reason) for r in map(reload, runs)]
            return f"both running: {rows}, workers' exit codes {[w.poll() for w in workers]}\n{worker_logs(env)}"

        wait_for(lambda: all(reload(r).status == "running" for r in runs), timeout=120, message=state)
        assert len({reload(r).worker_name for r in runs}) == 2  # one on each worker, at the same time
        writer.start()
        done = wait_for(lambda: all(reload(r).status not in ("queued", "running") for r in runs)
                        and [reload(r) for r in runs], timeout=300, message="both to end")
    finally:
        stop_writing.set()
        if writer.is_alive():
            writer.join()
        for w in workers:
            stop_worker(w)
    for run in done:
        assert run.status == "completed", run.reason
        steps = [p.step for p in run.metrics.order_by(MetricPoint.step)]
        assert steps == list(range(10, 801, 10))
    assert written and set(written) == {201}


def test_a_job_redis_lost_is_queued_again(client, env, redis_client, run_worker, no_feature_jobs):
    run = create_run(client, total_steps=50)
    redis_client.flushdb()  # Redis restarted without its data
    Training.update(created_at=utcnow() - dt.timedelta(minutes=5)).where(Training.id == run.id).execute()
    assert [r.id for r in lifecycle.requeue_lost(current_app.config)] == [run.id]
    assert lifecycle.requeue_lost(current_app.config) == []  # once: its job is there now
    assert run_worker().returncode == 0
    assert reload(run).status == "completed"


def test_a_cancelled_run_resumes_from_its_page_at_a_new_learning_rate(client, env, worker_process, run_worker,
                                                                      no_feature_jobs):
    run = create_run(client, **{**DURABLE, "total_steps": 100_000})
    wait_for(lambda: reload(run).step >= 30, timeout=120, message="the run to train")
    client.post(f"/trainings/{run.id}/cancel")
    run = wait_for(lambda: (r := reload(run)).status == "cancelled" and r, timeout=60, message="cancelled")
    page = client.get(f"/trainings/{run.id}").get_data(as_text=True)
    assert f"Resume from step {run.step:,}" in page
    for bad in ("abc", "5", "nan"):  # refused at the field; nothing changes
        response = client.post(f"/trainings/{run.id}/resume", data={"learning_rate": bad})
        assert response.status_code == 422 and 'id="resume-error"' in response.get_data(as_text=True)
        assert reload(run).status == "cancelled" and reload(run).learning_rate == 0.001
    assert client.post(f"/trainings/{run.id}/resume", data={"learning_rate": "0.0005"}).status_code == 303
    resumed = reload(run)
    assert resumed.status in ("queued", "running") and resumed.learning_rate == 0.0005
    note = Event.get(Event.training == run, Event.code == "resume").message
    assert f"step {run.step:,}" in note and "learning rate 0.0005 (was 0.001)" in note
    again = client.post(f"/api/trainings/{run.id}/resume")
    assert again.status_code == 409  # already queued or running: not twice


def test_a_stop_asked_for_as_a_job_starts_reaches_its_work_horse():
    """SIGTERM can land while the worker forks a horse for a new job: before the fork (the horse
    inherits the request) or after it but before the horse's pid is known (the worker passes it on as
    soon as it is). Either way the job stops at its next step instead of running to its end while the
    worker waits (teardowns of tests that resumed a long run waited 30 s for it, then killed it)."""
    import subprocess
    import sys

    from rq import Worker

    from app.work.worker import StudioWorker

    inherited = subprocess.run(
        [sys.executable, "-c", "from app.work import lifecycle; from app.work.worker import StudioWorker\n"
                               "w = StudioWorker.__new__(StudioWorker); w._stop_requested = True\n"
                               "w.setup_work_horse_signals(); print(lifecycle.SHUTDOWN.is_set())"],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=120)
    assert inherited.stdout.strip() == "True", inherited.stderr[-2000:]

    horse = subprocess.Popen(["sleep", "60"])
    worker = StudioWorker.__new__(StudioWorker)
    worker._stop_requested = False

    def fork_then_signal(self, job, queue_):  # the fork, with SIGTERM landing before the pid is recorded
        self._stop_requested = True
        self._horse_pid = horse.pid

    original = Worker.fork_work_horse
    Worker.fork_work_horse = fork_then_signal
    try:
        worker.fork_work_horse(None, None)
    finally:
        Worker.fork_work_horse = original
    assert horse.wait(timeout=10) == -signal.SIGTERM


def test_a_stop_asked_for_while_the_worker_checks_a_job_it_took_is_noted_not_swallowed(env, redis_client,
                                                                                       monkeypatch):
    """A warm shutdown that lands after the worker took a job off the queue but before it forked the job's
    horse (while it checks that the job is SAE Studio's own and fits the device): RQ raised StopRequested
    there, the checks' ``except Exception`` swallowed it, and the job was forked
    without the stop and ran to its end while the worker waited (a test's teardown waited 30 s, then
    killed it), or dropped. Now the stop is noted: the checks finish, and the worker stops once the hand-over
    is done."""
    from rq import Queue

    from app.config import load_settings
    from app.work import worker as worker_module

    settings = load_settings()
    studio = worker_module.make_worker(settings, name=f"stop-test-{os.getpid()}")
    studio.register_birth()
    queue = Queue(env["QUEUE_NAME"], connection=studio.connection, serializer=studio.serializer)
    function = next(iter(worker_module.lifecycle.job_functions()))
    job = queue.enqueue(function, 1)
    signalled, put_back = [], []
    real_refusal = worker_module._refusal

    def refusal_with_a_stop_landing(*args, **kwargs):
        if not signalled:
            signalled.append(True)
            os.kill(os.getpid(), signal.SIGTERM)  # delivered here, in the worker's own check
        return real_refusal(*args, **kwargs)

    monkeypatch.setattr(worker_module, "_refusal", refusal_with_a_stop_landing)
    monkeypatch.setattr(worker_module.StudioWorker, "_put_back", lambda self, j, q: put_back.append(j.id) or True)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        studio._install_signal_handlers()
        studio.execute_job(job, queue)  # raised StopRequested out of here, or refused the job
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        studio.register_death()
    assert signalled and studio._stop_requested, "the stop was not noted"
    assert put_back == [job.id], "the worker did not finish checking the job it took"
    # before the fix it went down the refusal path: an execution prepared and the job neither run nor failed
    assert not studio.executions and job.get_status(refresh=True) == "queued"
