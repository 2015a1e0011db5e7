"""With Redis down (or hanging), every page renders from the database, starting work says why it
can't and leaves nothing behind, and queued work proceeds once Redis is back."""
from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time

import pytest
from redis import Redis

from app.models import ActivationSet, Extraction, FeatureJob, ImportedSAE, Template, Training, TuneJob
from conftest import QUICK_CONFIG, free_port, signed_in_client, start_worker, stop_worker, wait_for, worker_logs


def start_redis(port: int, workdir) -> subprocess.Popen:
    proc = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)], stdout=subprocess.DEVNULL)
    client = Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            return proc
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


@pytest.fixture
def own_redis(tmp_path, monkeypatch):
    """A Redis of this test's own, which the test stops and starts again."""
    port = free_port()
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{port}/0")
    state = {"port": port, "proc": start_redis(port, tmp_path), "dir": tmp_path}
    yield state
    if state["proc"].poll() is None:  # the one the test started last
        state["proc"].terminate()
        state["proc"].wait(timeout=10)


@pytest.fixture
def down_app(own_redis, env):
    from app import create_app

    app = create_app({"TESTING": True, "WTF_CSRF_ENABLED": False, "SERVER_NAME": "localhost",
                      "REDIS_URL": f"redis://127.0.0.1:{own_redis['port']}/0"})
    with app.app_context():
        yield app


def fill(rule, ids: dict) -> str:
    """The rule's URL with the ids of records that exist in place of its arguments."""
    url = rule.rule
    for arg in rule.arguments:
        url = re.sub(rf"<(?:[a-z]+(?:\([^)]*\))?:)?{arg}>", str(ids.get(arg, 1)), url)
    return url


def every_get_route(app, ids: dict) -> list[str]:
    """Every GET route of the app, with ids of records that exist filled in."""
    return sorted({fill(rule, ids) for rule in app.url_map.iter_rules()
                   if "GET" in rule.methods and rule.endpoint != "static"})


def test_every_page_renders_with_redis_down_and_work_resumes_when_it_is_back(down_app, own_redis, env):
    client = signed_in_client(down_app)
    queued = client.post("/api/trainings", json=QUICK_CONFIG)
    assert queued.status_code == 201
    run = Training.get_by_id(queued.json["id"])
    done = Training.create(**{k: v for k, v in QUICK_CONFIG.items() if k not in ("acknowledge_warnings", "source_id")},
                           source=1, status="completed", summary={"l0": 5.0, "l0_fraction": 0.02, "fvu": 0.1,
                                                                   "dead": 0, "eval_tokens": 100, "dense_latents": 0,
                                                                   "never_fired": 0})
    extraction = Extraction.create(model_name="bundled:all-MiniLM-L6-v2", layer=1, site="resid",
                                   text={"kind": "stdlib"}, token_budget=2048, context_length=32, batch_size=4,
                                   dtype="float32", status="running", started_at=Training.get_by_id(done.id).created_at)
    imported = ImportedSAE.create(name="x", architecture="standard", d_in=256, d_sae=512, path="imported/none")
    feature_job = FeatureJob.create(training=done, source=1, sample_tokens=1000, status="running")
    tune = TuneJob.create(source=1, latent_dim=256, target_l0=0.02, learning_rate=1e-3, batch_size=256,
                          pilot_steps=400)

    own_redis["proc"].terminate()
    own_redis["proc"].wait(timeout=10)
    ids = {"training_id": done.id, "extraction_id": extraction.id, "job_id": feature_job.id, "latent": 0,
           "tune_id": tune.id, "template_id": Template.select().first().id, "source_id": 1, "imported_id": imported.id,
           "record_id": done.id, "kind": "templates", "token_id": 999_999}  # (revoking its own token would end
    # this client's API access: the sweep aims at a token that is not there)
    urls = every_get_route(down_app, ids) + [f"/trainings/{run.id}", f"/trainings/{run.id}/progress",
                                             "/api/trainings"]
    statuses = {url: client.get(url).status_code for url in urls}
    assert not [u for u, s in statuses.items() if s >= 500], statuses
    page = client.get(f"/trainings/{run.id}").get_data(as_text=True)
    assert "queue-banner" in page

    # starting work says why, at once, and leaves no row behind
    before = Training.select().count()
    refused = client.post("/api/trainings", json=QUICK_CONFIG)
    assert refused.status_code == 503 and "unreachable" in refused.json["errors"]["_queue"][0]
    html = client.post("/trainings", data={k: ("y" if v is True else str(v)) for k, v in QUICK_CONFIG.items()
                                           if v is not False and v is not None})
    assert html.status_code == 503 and "Nothing was created" in html.get_data(as_text=True)
    tune_refused = client.post("/tunes/", data={"source_id": 1, "latent_dim": 1024, "target_l0": 0.02,
                                                "architecture": "standard", "seed": 0})
    assert tune_refused.status_code == 503
    assert Training.select().count() == before and TuneJob.select().count() == 1

    # cancelling a queued run is a database write: it works without Redis
    cancel = client.post(f"/trainings/{run.id}/cancel")
    assert cancel.status_code == 303 and Training.get_by_id(run.id).status == "cancelled"

    # every state-changing route, given nothing or junk: a 4xx or a 503 with the reason, never a 500,
    # and no job row appears
    counts = {m: m.select().count() for m in (Training, TuneJob, Extraction, FeatureJob, ImportedSAE)}
    posted = {}
    for rule in sorted(down_app.url_map.iter_rules(), key=lambda r: ("delete" in r.rule, r.rule)):
        for method in ("POST", "DELETE"):
            if method not in rule.methods:
                continue
            url = fill(rule, ids)
            posted[f"{method} {url}"] = client.open(url, method=method, data={"x": "1"}).status_code
    assert not [u for u, s in posted.items() if s >= 500 and s != 503], posted
    assert len(posted) >= 20
    for model, before in counts.items():
        assert model.select().count() <= before, model

    # Redis back: new work starts again
    own_redis["proc"] = start_redis(own_redis["port"], own_redis["dir"])
    again = client.post("/api/trainings", json=QUICK_CONFIG)
    assert again.status_code == 201 and again.json["status"] == "queued"


def worker_on(own_redis, env):
    """A real worker process on this test's own Redis (its log in the data folder: ``worker_logs``)."""
    return start_worker({**env, "REDIS_URL": f"redis://127.0.0.1:{own_redis['port']}/0"}, name="outage")


def trains_next_job(client, proc, env) -> None:
    """A QUICK_CONFIG run queued now is trained to completion by ``proc``, which never quit on the way."""
    queued = client.post("/api/trainings", json=QUICK_CONFIG)
    assert queued.status_code == 201
    wait_for(lambda: Training.get_by_id(queued.json["id"]).status in ("completed", "failed", "interrupted")
             or proc.poll() is not None, timeout=240, message="the run to end")
    assert Training.get_by_id(queued.json["id"]).status == "completed", worker_logs(env)
    assert "unhandled exception" not in worker_logs(env)


def test_a_worker_rides_out_redis_going_away_outside_its_dequeue_then_trains(down_app, own_redis, env):
    """RQ waits for Redis only while it dequeues. A suspended worker asks Redis every second whether it
    still is, in its work loop: with Redis gone there it quit ("unhandled exception"), as a worker that
    had just started or just finished a job did. Now it waits, keeps its suspension while it cannot ask,
    and trains the next job once Redis is back."""
    from rq.suspension import suspend

    suspend(Redis(port=own_redis["port"]))
    proc = worker_on(own_redis, env)
    try:
        wait_for(lambda: "suspended, run `rq resume`" in worker_logs(env) or proc.poll() is not None, timeout=120,
                 message="the worker to see it is suspended")
        own_redis["proc"].terminate()
        own_redis["proc"].wait(timeout=10)
        wait_for(lambda: "the suspension check waits for it" in worker_logs(env) or proc.poll() is not None,
                 timeout=30, message="the worker to find Redis gone")
        assert proc.poll() is None, worker_logs(env)
        own_redis["proc"] = start_redis(own_redis["port"], own_redis["dir"])  # a new, empty one: not suspended
        trains_next_job(signed_in_client(down_app), proc, env)
    finally:
        stop_worker(proc)


def test_a_run_that_ends_while_redis_is_away_keeps_its_outcome_and_its_worker(down_app, own_redis, env):
    """Redis killed while a run trains: the run finishes on its own record (the database), the worker
    that ran it waits for Redis instead of quitting, and trains the next job once Redis is back."""
    proc = worker_on(own_redis, env)
    client = signed_in_client(down_app)
    try:
        first = client.post("/api/trainings", json={**QUICK_CONFIG, "total_steps": 1500})
        assert first.status_code == 201
        wait_for(lambda: Training.get_by_id(first.json["id"]).step > 0 or proc.poll() is not None, timeout=120,
                 message="the run to train")
        own_redis["proc"].terminate()
        own_redis["proc"].wait(timeout=10)
        assert Training.get_by_id(first.json["id"]).status == "running"  # Redis went away mid-run
        wait_for(lambda: Training.get_by_id(first.json["id"]).status not in ("queued", "running")
                 or proc.poll() is not None, timeout=240, message="the run to end")
        ended = Training.get_by_id(first.json["id"])  # its own outcome (it may stop early), not an interruption
        assert ended.status in ("completed", "stopped_early") and ended.summary, (ended.status, ended.reason)
        wait_for(lambda: "waits for it" in worker_logs(env) or proc.poll() is not None, timeout=30,
                 message="the worker to find Redis gone")
        assert proc.poll() is None, worker_logs(env)
        own_redis["proc"] = start_redis(own_redis["port"], own_redis["dir"])
        trains_next_job(client, proc, env)
    finally:
        stop_worker(proc)


def test_a_redis_that_never_answers_costs_seconds_not_a_hung_request(env, monkeypatch):
    """A port that accepts connections but never replies: the socket timeout ends the wait."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    from app import create_app

    app = create_app({"TESTING": True, "WTF_CSRF_ENABLED": False, "SERVER_NAME": "localhost",
                      "REDIS_URL": f"redis://127.0.0.1:{port}/0", "REDIS_SOCKET_TIMEOUT_S": 1.0})
    with app.app_context():
        started = time.monotonic()
        response = signed_in_client(app).post("/api/trainings", json=QUICK_CONFIG)
        elapsed = time.monotonic() - started
    listener.close()
    assert response.status_code == 503 and elapsed < 10
    assert ActivationSet.select().count() >= 1 and Training.select().count() == 0
