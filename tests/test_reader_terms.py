"""Messages in the reader's terms: the API's own refusal, "dead" and "never fired" defined once,
and a queued job that says what it waits behind (from the database, with a real worker)."""
from __future__ import annotations

import html as htmllib
import re

from conftest import QUICK_CONFIG, create_run, reload, wait_for
from app.models import FeatureJob, Training

SWAPPED = {**QUICK_CONFIG, "latent_dim": 1024, "l1_alpha": 0.0003, "learning_rate": 0.0003}


def text(response) -> str:
    return htmllib.unescape(re.sub(r"<[^>]+>", "", response.get_data(as_text=True)))


def test_the_api_refusal_names_the_field_to_send_not_a_box_to_tick(client):
    body = {k: v for k, v in SWAPPED.items() if k != "acknowledge_warnings"}
    response = client.post("/api/trainings", json=body)
    assert response.status_code == 422
    [message] = response.json["errors"]["acknowledge_warnings"]
    assert '"acknowledge_warnings": true' in message and "tick" not in message.lower()
    assert client.post("/api/trainings", json={**body, "acknowledge_warnings": True}).status_code == 201
    # a wrong type keeps its own precise message
    wrong = client.post("/api/trainings", json={**body, "acknowledge_warnings": "yes"})
    assert wrong.status_code == 422 and "tick" not in " ".join(wrong.json["errors"]["acknowledge_warnings"])
    # the HTML form still speaks of its box
    form = {k: "" if v is None else ("y" if v is True else str(v)) for k, v in body.items() if v is not False}
    page = client.post("/trainings", data=form)
    assert page.status_code == 422 and "tick this box" in page.get_data(as_text=True)


def test_dead_and_never_fired_are_defined_once_and_labelled_apart(client, run_worker):
    from app.views.formatting import GLOSSARY

    run = create_run(client, architecture="matryoshka", k=8, matryoshka_prefixes="32, 64", l1_alpha=None,
                     total_steps=150, dead_window_tokens=5_000, target_l0=8 / 256)
    done = run_worker()
    assert done.returncode == 0, done.stderr[-3000:]
    run = reload(run)
    assert run.status == "completed", run.reason
    page = client.get(f"/trainings/{run.id}")
    html, words = page.get_data(as_text=True), text(page)
    for name in ("dead", "never_fired"):
        label, definition = GLOSSARY[name]
        # the term carries its definition wherever it is shown, and the definitions are spelled out
        titles = {htmllib.unescape(t) for t in re.findall(rf'data-term="{name}" title="([^"]*)"', html)}
        assert titles == {definition}
        spelled = {htmllib.unescape(t) for t in re.findall(rf'data-definition="{name}">([^<]*)<', html)}
        assert spelled == {definition}
    assert "Dead (in training)" in words and "never fired (held out)" in words
    assert f"none firing in the last {run.dead_window_tokens:,} training tokens" in words
    assert re.search(r"never fired \(held out\)\s+" + f"{run.summary['never_fired']:,}", words)
    # the feature statistics' page uses the same definition
    job = FeatureJob.get(FeatureJob.training == run.id)
    assert job.status == "completed", job.reason
    features = client.get(f"/features/{job.id}").get_data(as_text=True)
    for name in ("dead", "never_fired"):
        spelled = {htmllib.unescape(t) for t in re.findall(rf'data-definition="{name}">([^<]*)<', features)}
        assert spelled == {GLOSSARY[name][1]}


def test_a_queued_job_says_what_it_waits_behind(client, env, worker_process):
    """Feature statistics queued behind a long run say so, with the run's step; the order is the queue's."""
    first = create_run(client, total_steps=10_000_000, checkpoint_every_steps=10_000_000)
    wait_for(lambda: reload(first).status == "running" and reload(first).step > 0, timeout=180,
             message="the long run to start")
    second = create_run(client, total_steps=200)
    third = create_run(client, total_steps=200)
    page = client.get(f"/trainings/{third.id}/progress")
    assert page.status_code == 200
    html, words = page.get_data(as_text=True), " ".join(text(page).split())
    assert 'id="queue-position" data-position="2"' in html
    assert f"2nd in line, behind what the workers are running now: training #{first.id}" in words
    assert re.search(rf"training #{first.id} \(quick\), step [\d,]+ of 10,000,000", words)
    assert f"Queued before it: training #{second.id}" in words
    assert f'href="/trainings/{first.id}"' in html
    assert 'data-position="1"' in client.get(f"/trainings/{second.id}").get_data(as_text=True)
    # a run that is running or has ended says nothing of a queue
    assert 'id="queue-position"' not in client.get(f"/trainings/{first.id}").get_data(as_text=True)

    # the reported case: feature statistics queued behind a long run
    from app.work.features import create_feature_job

    job = create_feature_job(client.application.config, training=second, source=second.source)
    job_page = " ".join(text(client.get(f"/features/{job.id}")).split())
    assert f"3rd in line, behind what the workers are running now: training #{first.id}" in job_page
    assert f"Queued before it: training #{second.id} (quick); training #{third.id} (quick)." in job_page
    fragment = client.get(f"/features/{job.id}/progress").get_data(as_text=True)
    assert 'data-position="3"' in fragment

    # the long run stops; the queued work then runs in turn
    assert client.post(f"/api/trainings/{first.id}/cancel").status_code == 202
    wait_for(lambda: reload(first).status == "cancelled", timeout=180, message="the long run to stop")
    wait_for(lambda: all(not r.is_active for r in Training.select().where(Training.id.in_([second.id, third.id]))),
             timeout=400, message="the queued runs")
    assert Training.select().where(Training.status == "queued").count() == 0


def test_a_sweep_holds_one_place_in_line_and_its_members_wait_where_it_does(client):
    """A sweep is one job on the queue: a run queued after it is second, not behind each member too;
    a member's page shows its sweep's place; the Workers page links a running sweep (it answered 500)."""
    import datetime as dt

    from app.models import Sweep, utcnow

    start = utcnow() - dt.timedelta(minutes=5)
    sweep = Sweep.create(name="widths", source=1, status="queued", queued_at=start)
    members = [Training.create(source=1, name=f"member {i}", status="queued", sweep=sweep.id,
                               queued_at=start + dt.timedelta(seconds=1 + i)) for i in range(3)]
    lone = create_run(client, total_steps=200)
    words = " ".join(text(client.get(f"/trainings/{lone.id}/progress")).split())
    assert "2nd in line" in words and f"Queued before it: sweep #{sweep.id} (widths)." in words
    assert "member" not in words
    page = client.get(f"/trainings/{members[1].id}/progress").get_data(as_text=True)
    assert 'data-position="1"' in page and "next in line" in page
    sweep_page = client.get(f"/sweeps/{sweep.id}").get_data(as_text=True)
    assert 'id="queue-position" data-position="1"' in sweep_page

    Sweep.update(status="running", started_at=utcnow(), worker_name="box.cpu").where(Sweep.id == sweep.id).execute()
    Training.update(status="running").where(Training.sweep == sweep.id).execute()
    words = " ".join(text(client.get(f"/trainings/{lone.id}/progress")).split())
    assert f"next in line, behind what the workers are running now: sweep #{sweep.id} (widths)." in words
    assert f'href="/sweeps/{sweep.id}"' in client.get(f"/trainings/{lone.id}/progress").get_data(as_text=True)
    from flask import current_app

    from app.work import maintenance

    maintenance.beat({**current_app.config}, "box.cpu", None)
    workers = client.get("/api/workers")
    assert workers.status_code == 200, workers.get_data(as_text=True)[-500:]
    jobs = {j["kind"]: j for w in workers.json["workers"] for j in w["jobs"]}
    assert jobs["sweep"]["url"] == f"/sweeps/{sweep.id}"
    assert f'href="/sweeps/{sweep.id}"' in client.get("/workers/").get_data(as_text=True)
