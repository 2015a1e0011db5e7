"""The Workers page and GET /api/workers (admins): each worker's host, device, memory, current job,
last beat and state, from the database; a run's page shows where each of its attempts ran."""
from __future__ import annotations

import datetime as dt

from flask import current_app

import fake_gpus
from app.models import Training, WorkerBeat, utcnow
from app.work import maintenance
from conftest import signed_in_client


def test_workers_page_and_api_show_where_everything_runs(app, client, tmp_path, monkeypatch):
    bin_dir, table = fake_gpus.install(tmp_path / "fake")
    fake_gpus.write_table(table, [70, 60, 9.5, 40])
    monkeypatch.setenv("PATH", fake_gpus.path_with(bin_dir))
    settings = {**current_app.config, "SAE_DEVICE": "auto"}
    for gpu in (2, 3):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", str(gpu))
        maintenance.beat(settings, f"box.gpu{gpu}", None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    maintenance.beat(settings, "gone.gpu1", None)
    WorkerBeat.update(last_seen=utcnow() - dt.timedelta(minutes=10)).where(WorkerBeat.name == "gone.gpu1").execute()
    run = Training.create(source=1, name="busy one", status="running", worker_name="box.gpu2", attempt=1,
                          placed_on=fake_gpus.uuid(2), reserved_bytes=3 * 2**30, started_at=utcnow(),
                          heartbeat_at=utcnow())

    listed = {w["name"]: w for w in client.get("/api/workers").json["workers"]}
    assert set(listed) == {"box.gpu2", "box.gpu3", "gone.gpu1"}
    busy = listed["box.gpu2"]
    assert busy["state"] == "busy" and busy["device"].startswith("GPU 2 (NVIDIA H100 80GB HBM3) on ")
    assert busy["memory_free_bytes"] == int(9.5 * 1024) * 2**20 and busy["memory_total_bytes"] == 80 * 2**30
    assert busy["reserved_bytes"] == 3 * 2**30 and busy["device_key"] == fake_gpus.uuid(2)
    assert busy["jobs"] == [{"kind": "training", "id": run.id, "name": "busy one", "url": f"/trainings/{run.id}",
                             "reserved_bytes": 3 * 2**30}]
    assert busy["last_beat"].endswith("Z") and busy["last_beat_age_s"] < 60
    assert listed["box.gpu3"]["state"] == "idle" and listed["box.gpu3"]["jobs"] == []
    assert listed["gone.gpu1"]["state"] == "stale"

    page = client.get("/workers/").get_data(as_text=True)
    assert 'data-name="box.gpu2" data-state="busy"' in page and f'href="/trainings/{run.id}"' in page
    assert "9.5 GiB / 80 GiB" in page and 'data-name="gone.gpu1" data-state="stale"' in page
    assert 'id="nav-workers"' in page

    user = signed_in_client(app, "someone", is_admin=False)
    assert user.get("/workers/").status_code == 403 and user.get("/api/workers").status_code == 403
    assert 'id="nav-workers"' not in user.get("/").get_data(as_text=True)


def test_a_run_page_shows_the_devices_of_each_attempt(app, client):
    run = Training.create(source=1, name="moved", status="completed", worker_name="b.gpu1", attempt=2,
                          device="cuda", requested_device=None, attempts_log=[
                              {"attempt": 1, "worker": "a.gpu0", "device": "GPU 0 (H100) on a", "at": "x"},
                              {"attempt": 2, "worker": "b.gpu1", "device": "GPU 1 (H200) on b", "at": "y"}])
    page = client.get(f"/trainings/{run.id}").get_data(as_text=True)
    assert ("Ran on: attempt 1 on GPU 0 (H100) on a (worker a.gpu0); attempt 2 on GPU 1 (H200) on b "
            "(worker b.gpu1).") in " ".join(page.split())
    api = client.get(f"/api/trainings/{run.id}").json
    assert [(a["attempt"], a["worker"]) for a in api["attempts"]] == [(1, "a.gpu0"), (2, "b.gpu1")]
