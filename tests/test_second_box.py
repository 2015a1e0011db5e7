"""A second box joins the queue: two workers that share only the database, Redis and DATA_DIR (each
its own name, working directory, HOME, TMPDIR, PATH and GPU). One is killed outright mid-run (the
worker and its work-horse, SIGKILL); the other sweeps the run, and after a Resume through the API
finishes it from the checkpoint. A worker whose DATA_DIR is not the shared one refuses to start."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from flask import current_app

import fake_gpus
from app.models import Installation, MetricPoint, Training
from app.work.training import checkpoint_step
from conftest import ROOT, create_run, reload, stop_worker, wait_for, worker_env

RUN = {"total_steps": 300, "log_every": 10, "checkpoint_every_steps": 50, "lr_warmup_steps": 20,
       "l1_warmup_steps": 40, "dead_window_tokens": 5_000}


def box(env: dict, tmp_path: Path, name: str, gpu: int) -> tuple[dict, Path]:
    """A machine of its own: its working directory, home, temp folder and a fake nvidia-smi of its own."""
    home = tmp_path / f"box-{name}"
    for sub in ("cwd", "home", "tmp"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    bin_dir, table = fake_gpus.install(home / "gpus")
    fake_gpus.write_table(table, [80, 80], name=f"fake GPU of {name}")
    environ = {**worker_env(env), "HOME": str(home / "home"), "TMPDIR": str(home / "tmp"), "SAE_DEVICE": "auto",
               "CUDA_VISIBLE_DEVICES": str(gpu), "PATH": fake_gpus.path_with(bin_dir),
               "FEATURES_AFTER_TRAINING": "0"}
    return environ, home / "cwd"


def start(environ: dict, cwd: Path, name: str, *extra: str) -> subprocess.Popen:
    log = open(cwd / "worker.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, str(ROOT / "worker.py"), "--name", name, *extra], cwd=cwd, env=environ,
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return proc


def children(pid: int) -> list[int]:
    return [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]


def test_the_other_box_resumes_a_run_whose_worker_was_killed(client, env, tmp_path, monkeypatch):
    monkeypatch.setenv("FEATURES_AFTER_TRAINING", "0")
    env_a, cwd_a = box(env, tmp_path, "a", 0)
    env_b, cwd_b = box(env, tmp_path, "b", 1)
    run = create_run(client, name="moves", **RUN)
    first = start(env_a, cwd_a, "boxa.gpu0")
    second = None
    try:
        wait_for(lambda: (checkpoint_step(reload(run), current_app.config) or 0) >= 100, timeout=300, interval=0.05,
                 message="the run to pass a checkpoint on box a")
        assert reload(run).worker_name == "boxa.gpu0"
        second = start(env_b, cwd_b, "boxb.gpu1")  # joins the queue; the run is box a's
        # box a dies outright: stop the worker so it cannot record anything, then kill its horse and itself
        os.kill(first.pid, signal.SIGSTOP)
        for pid in children(first.pid):
            os.kill(pid, signal.SIGKILL)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        swept = wait_for(lambda: (r := reload(run)).status == "interrupted" and r, timeout=120,
                         message="box b's maintenance to sweep the silent run")
        assert "boxa.gpu0" in swept.reason and "stopped sending heartbeats" in swept.reason
        saved = checkpoint_step(swept, current_app.config)
        assert saved is not None and saved >= 100
        response = client.post(f"/api/trainings/{run.id}/resume")
        assert response.status_code == 202 and response.json["checkpoint_step"] == saved
        done = wait_for(lambda: (r := reload(run)).status not in ("queued", "running", "interrupted") and r,
                        timeout=300, message="box b to finish the run")
    finally:
        for proc in (first, second):
            if proc is not None:
                if proc.poll() is None and proc is first:
                    os.kill(proc.pid, signal.SIGCONT)
                stop_worker(proc)
    assert done.status == "completed", done.reason
    assert done.worker_name == "boxb.gpu1"
    assert [p.step for p in done.metrics.order_by(MetricPoint.step)] == list(range(10, 301, 10))  # once each
    attempts = client.get(f"/api/trainings/{run.id}").json["attempts"]
    assert [(a["attempt"], a["worker"]) for a in attempts] == [(1, "boxa.gpu0"), (2, "boxb.gpu1")]
    assert attempts[0]["device"].startswith("GPU 0 (fake GPU of a)") and attempts[1]["device"].startswith(
        "GPU 1 (fake GPU of b)")
    page = " ".join(client.get(f"/trainings/{run.id}").get_data(as_text=True).split())
    assert "attempt 1 on GPU 0 (fake GPU of a)" in page and "attempt 2 on GPU 1 (fake GPU of b)" in page
    # both boxes found the same shared DATA_DIR: one id, in the marker and in the database
    assert (Path(env["DATA_DIR"]) / ".sae-studio-id").read_text().strip() == Installation.get().data_id


def test_a_worker_whose_data_dir_is_not_the_shared_one_refuses_to_start(client, env, tmp_path):
    environ, cwd = box(env, tmp_path, "c", 0)
    ok = subprocess.run([sys.executable, str(ROOT / "worker.py"), "--burst"], cwd=cwd, env=environ,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    shared_id = (Path(env["DATA_DIR"]) / ".sae-studio-id").read_text().strip()
    assert Installation.get().data_id == shared_id and len(shared_id) == 32

    local = tmp_path / "local-disk"  # a folder where the shared mount was meant to be
    local.mkdir()
    refused = subprocess.run([sys.executable, str(ROOT / "worker.py"), "--burst"], cwd=cwd,
                             env={**environ, "DATA_DIR": str(local)}, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert "Refusing to start: DATA_DIR has no .sae-studio-id marker" in refused.stderr
    assert "this DATA_DIR is not the shared one" in refused.stderr and "Scaling out" in refused.stderr
    assert not (local / ".sae-studio-id").exists()  # nothing written there

    (local / ".sae-studio-id").write_text("0123456789abcdef0123456789abcdef\n")  # another installation's folder
    refused = subprocess.run([sys.executable, str(ROOT / "worker.py"), "--burst"], cwd=cwd,
                             env={**environ, "DATA_DIR": str(local)}, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "marker holds id 01234567… but this database's installation is" in refused.stderr
    assert Training.select().count() == 0


def test_a_further_box_runs_its_workers_only_with_the_supervisor(client, env, tmp_path, monkeypatch):
    """What the README tells a second box to run: `scripts/supervise.py --workers-only` starts a pinned
    worker per GPU on the shared database, queue and DATA_DIR, and they take the queue's work."""
    from app.models import WorkerBeat
    from test_gpus import HOST
    from test_supervisor import descendants

    monkeypatch.setenv("FEATURES_AFTER_TRAINING", "0")
    environ, cwd = box(env, tmp_path, "d", 0)
    environ.pop("CUDA_VISIBLE_DEVICES")
    environ.update({"SUPERVISOR_BACKOFF_S": "0.2", "SUPERVISOR_STOP_GRACE_S": "30", "PY": sys.executable})
    out = open(cwd / "supervisor.out", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "supervise.py"), "--workers-only"], cwd=cwd,
                            env=environ, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    out.close()
    try:
        names = {f"{HOST}.gpu0", f"{HOST}.gpu1"}
        beats = wait_for(lambda: (b := {w.name: w for w in WorkerBeat.select()}) and set(b) >= names and b,
                         timeout=120, message="both workers' beats")
        assert beats[f"{HOST}.gpu1"].device_label.startswith("GPU 1 (fake GPU of d)")
        run = create_run(client, name="on the further box", total_steps=30)
        done = wait_for(lambda: (r := reload(run)).status not in ("queued", "running") and r, timeout=300,
                        message="the run to end")
        assert done.status == "completed" and done.worker_name in names
        text = (cwd / "supervisor.out").read_text()
        assert "SAE Studio workers are running:" in text
        assert (Path(env["DATA_DIR"]) / "logs" / HOST / f"worker-{HOST}.gpu0.log").exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        assert not descendants(proc.pid)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
