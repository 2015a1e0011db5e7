"""Trainings through the real queue: a real Redis, real worker processes, a real SQLite file."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from app.models import ActivationSet, Event, MetricPoint
from conftest import create_run, kill_work_horse, reload, wait_for


def test_training_runs_to_completed_through_the_queue(client, env, run_worker):
    run = create_run(client)
    done = run_worker(fork=False)  # `python worker.py`, as make run starts it: what it imports is asserted below
    assert done.returncode == 0, done.stderr
    run = reload(run)
    assert run.status == "completed", (run.reason, done.stderr[-2000:])
    assert run.step == 200 and run.tokens_seen == 200 * 256 and run.device == "cpu"
    assert run.started_at <= run.finished_at and run.norm_scale > 0
    steps = [p.step for p in run.metrics.order_by(MetricPoint.step)]
    assert steps == list(range(10, 201, 10))
    summary = run.summary
    assert 0 < summary["l0"] < 256 and summary["l0_fraction"] == summary["l0"] / 256 and 0 <= summary["fvu"] < 1
    assert (Path(env["DATA_DIR"]) / summary["checkpoint"]).exists()
    codes = [e.code for e in run.events.order_by(Event.id)]
    # The worker's re-check comes first: this deliberately small SAE is not overcomplete.
    assert codes[0] == "preflight" and codes[-1] == "completed"
    assert codes[codes.index("started") - 1] == "preflight"
    body = client.get(f"/api/trainings/{run.id}").json
    assert body["status"] == "completed" and body["quality_grade"] in ("green", "yellow", "red")
    # a CPU worker imports torch once, in its parent, for all its work-horses: the feature job that the
    # run queued needed only what training had not imported
    imported = [line.split("imported ", 1)[1].split(" once for every work-horse")[0].split(", ")
                for line in done.stdout.splitlines() if "once for every work-horse" in line]
    assert len(imported) == 2 and "torch" in imported[0] and "torch" not in imported[1], imported
    assert "torch._dynamo" in imported[0]  # what torch.optim imports with a run's first optimizer
    assert imported[1] == ["scipy.optimize"], imported  # no transformers: the source is synthetic


def test_topk_training_runs_through_the_queue(client, run_worker):
    run = create_run(client, architecture="topk", k=8, l1_alpha=None)
    assert run_worker().returncode == 0
    run = reload(run)
    assert run.status == "completed", run.reason
    assert run.summary["l0"] <= 8.0 and run.summary["l0"] > 7.0


def test_training_that_raises_ends_failed_with_the_reason(client, env, run_worker):
    rows = np.random.default_rng(0).normal(size=(4096, 32)).astype(np.float32)
    path = Path(env["DATA_DIR"]) / "acts.npy"
    np.save(path, rows)
    import io
    up = client.post("/sources/upload", data={"file": (io.BytesIO(path.read_bytes()), "acts.npy")},
                     content_type="multipart/form-data")
    assert up.status_code == 303
    source = ActivationSet.get(ActivationSet.kind == "file")
    (Path(env["DATA_DIR"]) / source.path).unlink()  # the file vanishes before the job starts
    run = create_run(client, source_id=source.id)
    run_worker()
    run = reload(run)
    assert run.status == "failed"
    assert "FileNotFoundError" in run.reason and "missing" in run.reason
    assert run.finished_at is not None and run.failed_step == 0
    assert Event.get(Event.training == run, Event.level == "error").message == run.reason
    html = client.get(f"/trainings/{run.id}").get_data(as_text=True)
    assert "FileNotFoundError" in html and 'id="reason"' in html


def test_uploaded_source_trains(client, env, run_worker):
    rows = np.random.default_rng(0).normal(size=(4096, 32)).astype(np.float32)
    import io
    from safetensors.numpy import save
    client.post("/sources/upload", data={"file": (io.BytesIO(save({"x": rows})), "acts.safetensors")},
                content_type="multipart/form-data")
    source = ActivationSet.get(ActivationSet.kind == "file")
    run = create_run(client, source_id=source.id, latent_dim=128, total_steps=50, log_every=10)
    run_worker()
    run = reload(run)
    assert run.status == "completed", run.reason
    assert run.summary["eval_tokens"] == 4096 - source.n_tokens  # held-out rows


def test_cancel_a_running_training(client, worker_process):
    run = create_run(client, total_steps=100_000, log_every=10)
    wait_for(lambda: reload(run).step > 0, message="the run to log its first metrics")
    response = client.post(f"/trainings/{run.id}/cancel", headers={"HX-Request": "true"})
    assert response.status_code == 200 and "Stopping" in response.get_data(as_text=True)
    run = wait_for(lambda: (r := reload(run)).status == "cancelled" and r, timeout=60, message="cancelled")
    assert run.reason == "Cancelled by the user." and 0 < run.step < 100_000
    assert run.summary and run.summary["checkpoint"]  # what was trained is kept
    # The worker stays healthy and takes the next job.
    second = create_run(client)
    wait_for(lambda: reload(second).status == "completed", message="the next run to complete")


def test_cancel_a_queued_training(client, env, redis_client, run_worker):
    run = create_run(client)
    response = client.post(f"/api/trainings/{run.id}/cancel")
    assert response.status_code == 202 and response.json["status"] == "cancelled"
    run_worker()
    run = reload(run)
    assert run.status == "cancelled" and run.started_at is None and run.metrics.count() == 0


def test_work_horse_killed_mid_run_is_shown_as_interrupted(client, worker_process):
    run = create_run(client, total_steps=100_000)
    wait_for(lambda: reload(run).step > 0, message="the run to start")
    kill_work_horse(worker_process)
    # the worker notices at once; nothing has to open the page for it
    run = wait_for(lambda: (r := reload(run)).status == "interrupted" and r, timeout=30, message="interrupted")
    assert "killed (signal 9)" in run.reason and "Resume" in run.reason and run.failed_step is not None
    assert Event.get(Event.training == run, Event.code == "interrupted")
    html = client.get(f"/trainings/{run.id}").get_data(as_text=True)
    assert 'id="resume"' in html


def test_progress_fragment_polls_while_active_and_stops_when_done(client, run_worker):
    run = create_run(client)
    queued = client.get(f"/trainings/{run.id}/progress").get_data(as_text=True)
    assert 'hx-trigger="every 2s"' in queued and "waiting for a worker" in queued
    assert "L0 not measured yet" in queued and "Cancel training" in queued
    run_worker()
    done = client.get(f"/trainings/{run.id}/progress").get_data(as_text=True)
    assert "hx-trigger" not in done and "hx-get" not in done
    assert "Cancel training" not in done
    summary = reload(run).summary
    assert f"L0 = {summary['l0']:,.0f} of 256 latents ({100 * summary['l0_fraction']:.1f}%)" in done
    assert "target 2.0% (5 latents)" in done
    assert "Step 200 of 200" in done and 'class="badge big grade-' in done
    assert "<svg" in done and "<path" in done  # the chart has drawn lines
    assert "Training completed." in done


def test_list_page_shows_runs_with_status_and_grade(client, run_worker):
    create_run(client, name="alpha-run")
    run_worker()
    html = client.get("/").get_data(as_text=True)
    assert "alpha-run" in html and "completed" in html and "badge grade-" in html
