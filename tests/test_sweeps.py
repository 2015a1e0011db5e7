"""Sweeps through the API and the pages, trained by a real worker: members on shared batches, each an
ordinary run; refused as a whole when any member is wrong; cancelled one member at a time; resumed
as one after the worker's process is killed."""
from __future__ import annotations

import os
import time

import pytest
from flask import current_app
from rq import Queue

from app.models import MetricPoint, Sweep, Training
from app.work.training import checkpoint_step
from conftest import QUICK_CONFIG, kill_work_horse, reload, start_worker, stop_worker, wait_for, worker_logs

BASE = {**QUICK_CONFIG, "architecture": "topk", "l1_alpha": None, "total_steps": 300, "checkpoint_every_steps": 60,
        "lr_warmup_steps": 20, "dead_window_tokens": 5_000}


@pytest.fixture
def no_feature_jobs(env, monkeypatch):
    monkeypatch.setenv("FEATURES_AFTER_TRAINING", "0")


def post_sweep(client, axes, base=None, **extra):
    return client.post("/api/sweeps", json={"name": "s", "base": base or BASE, "axes": axes, **extra})


def steps_of(run: Training) -> list[int]:
    return [p.step for p in run.metrics.order_by(MetricPoint.step)]


def test_a_sweep_is_refused_whole_with_each_error_at_its_place_and_nothing_created(client, env, redis_client):
    queue = Queue(env["QUEUE_NAME"], connection=redis_client)
    cases = [
        ([{"param": "batch_size", "values": [64, 128]}], "axes.0", "cannot be swept"),
        ([{"param": "target_l0", "values": [0.02]}], "axes", "at least two members"),
        ([{"param": "seed", "values": list(range(12))}, {"param": "latent_dim", "values": [256, 512]}], "axes",
         "the limit is 16"),
        ([{"param": "latent_dim", "values": [256, 0]}], "members.1", "latent_dim = 0: latent_dim"),
        ([{"param": "target_l0", "values": [0.02, 0.02]}], "axes.0", "repeat"),
        ("target_l0", "axes", "one or two axes"),
    ]
    for axes, key, text in cases:
        response = post_sweep(client, axes)
        assert response.status_code == 422, (axes, response.json)
        assert any(text in m for m in response.json["errors"].get(key, [])), (axes, response.json["errors"])
    assert client.post("/api/sweeps", json={"base": BASE, "axes": [], "colour": 1}).json["errors"] == {
        "colour": ["Unknown field."]}
    assert client.post("/api/sweeps", data="x").status_code == 422
    hostile = [{"base": {**BASE, "latent_dim": 10**400}, "axes": [{"param": "k", "values": [1, 2]}]},
               {"base": {**BASE, "latent_dim": 10**400}, "axes": [], "mode": "find_l0"},
               {"base": {**BASE, "target_l0": "nan", "seed": 1e308}, "mode": "find_l0"},
               {"base": BASE, "axes": [{"param": "k", "values": [10**400, 2]}]},
               {"base": BASE, "axes": [{"param": "target_l0", "values": [[1], {"a": 1}]}]},
               {"base": [1], "axes": [{"param": "seed", "values": [1, 2]}]},
               {"base": BASE, "axes": [{"param": "seed", "values": [1, 2]}], "mode": ["grid"], "name": 5},
               {"base": {**BASE, "name": ["x"]}, "axes": [{"param": "seed", "values": [1, 2]}]}]
    for body in hostile:
        response = client.post("/api/sweeps", json=body)
        assert response.status_code == 422, (body, response.status_code)
    assert Sweep.select().count() == 0 and Training.select().count() == 0 and len(queue) == 0
    # a member whose warnings were not acknowledged refuses the sweep too, at that member
    response = post_sweep(client, [{"param": "latent_dim", "values": [1024, 256]}],
                          base={**BASE, "acknowledge_warnings": False})
    assert response.status_code == 422
    assert any("acknowledge_warnings" in m for m in response.json["errors"]["members.1"])
    assert Sweep.select().count() == 0 and Training.select().count() == 0


def test_members_train_together_and_one_can_be_cancelled_alone(client, env, run_worker, no_feature_jobs):
    response = post_sweep(client, [{"param": "target_l0", "values": [0.02, 0.04, 0.08]}],
                          base={**BASE, "total_steps": 200})
    assert response.status_code == 201, response.json
    members = [Training.get_by_id(m["id"]) for m in response.json["members"]]
    assert [m.k for m in members] == [5, 10, 20]  # k follows each member's target (256 latents)
    assert all(m.sweep_id == response.json["id"] and m.status == "queued" for m in members)
    # cancelled before the sweep starts: that member alone ends; the sweep trains the others
    assert client.post(f"/api/trainings/{members[1].id}/cancel").status_code == 202
    assert run_worker().returncode == 0
    sweep = Sweep.get_by_id(response.json["id"])
    assert sweep.status == "completed", sweep.reason
    done = [reload(m) for m in members]
    assert [m.status for m in done] == ["completed", "cancelled", "completed"], [m.reason for m in done]
    for m in (done[0], done[2]):
        assert steps_of(m) == list(range(10, 201, 10))
        assert m.summary["l0"] == pytest.approx(m.k, rel=0.25)
        assert any("members of sweep" in e.message for e in m.events)
    body = client.get(f"/api/sweeps/{sweep.id}").json
    assert [r["status"] for r in body["members"]] == ["completed", "cancelled", "completed"]
    assert body["members"][0]["label"] == "target_l0 = 0.02" and body["members"][0]["final"]
    page = client.get(f"/sweeps/{sweep.id}").get_data(as_text=True)
    assert f'id="member-{members[0].id}"' in page and "hx-trigger" not in page  # ended: no polling
    assert 'id="sweep-link"' in client.get(f"/trainings/{members[0].id}").get_data(as_text=True)
    assert client.post(f"/api/sweeps/{sweep.id}/cancel").status_code == 409
    assert client.get("/api/sweeps").json["sweeps"][0]["id"] == sweep.id
    assert f"/sweeps/{sweep.id}" in client.get("/sweeps").get_data(as_text=True)


def test_a_sweep_killed_mid_way_resumes_as_one_losing_at_most_one_interval(client, env, run_worker,
                                                                             no_feature_jobs):
    response = post_sweep(client, [{"param": "target_l0", "values": [0.02, 0.05]},
                                   {"param": "architecture", "values": ["topk", "batchtopk"]}])
    assert response.status_code == 201, response.json
    sweep = Sweep.get_by_id(response.json["id"])
    members = [Training.get_by_id(m["id"]) for m in response.json["members"]]
    assert len(members) == 4
    worker = start_worker(env, name=f"sweeper-{os.getpid()}")
    try:
        wait_for(lambda: all((checkpoint_step(reload(m), current_app.config) or 0) >= 120 for m in members),
                 timeout=180, interval=0.02, message=lambda: f"checkpoints: {[reload(m).step for m in members]}\n"
                                                             f"{worker_logs(env)}")
        time.sleep(0.2)
        kill_work_horse(worker)
        wait_for(lambda: reload(sweep).status == "interrupted"
                 and all(reload(m).status == "interrupted" for m in members), timeout=60,
                 message=lambda: f"all interrupted: {[(reload(m).status, reload(m).reason) for m in members]}")
    finally:
        stop_worker(worker)
    for m in map(reload, members):
        saved = checkpoint_step(m, current_app.config)
        assert saved is not None and saved % 60 == 0 and m.step - saved < 60 + 10, (m.step, saved)
        assert f"member of sweep {sweep.id}" in m.reason
    response = client.post(f"/api/sweeps/{sweep.id}/resume")
    assert response.status_code == 202, response.json
    assert all(r["status"] == "queued" for r in response.json["members"])
    assert run_worker().returncode == 0
    assert reload(sweep).status == "completed", reload(sweep).reason
    for m in map(reload, members):
        assert m.status == "completed", m.reason
        assert steps_of(m) == list(range(10, 301, 10))  # every point once: none lost, none duplicated
        assert [e.code for e in m.events].count("resumed") == 1
    assert client.post(f"/api/sweeps/{sweep.id}/resume").status_code == 409  # nothing left to resume


def test_the_training_form_starts_a_sweep_or_says_at_the_sweep_field_why_not(client, env, redis_client):
    form = {k: "" if v is None else ("y" if v is True else str(v)) for k, v in BASE.items() if v is not False}
    response = client.post("/sweeps", data={**form, "sweep_mode": "grid", "sweep_param_1": "target_l0",
                                            "sweep_values_1": "0.02"})
    assert response.status_code == 422
    assert "at least two members" in response.get_data(as_text=True)
    response = client.post("/sweeps", data={**form, "sweep_mode": "grid", "sweep_param_1": "latent_dim",
                                            "sweep_values_1": "256, 0"})
    assert response.status_code == 422 and 'id="sweep-error-1"' in response.get_data(as_text=True)
    assert Sweep.select().count() == 0 and Training.select().count() == 0
    response = client.post("/sweeps", data={**form, "sweep_mode": "grid", "sweep_param_1": "target_l0",
                                            "sweep_values_1": "0.02, 0.04", "sweep_param_2": "seed",
                                            "sweep_values_2": "1, 2"})
    assert response.status_code == 303, response.get_data(as_text=True)[-3000:]
    sweep = Sweep.get()
    assert response.headers["Location"].endswith(f"/sweeps/{sweep.id}")
    assert sorted((m.target_l0, m.seed, m.k) for m in sweep.members) == [
        (0.02, 1, 5), (0.02, 2, 5), (0.04, 1, 10), (0.04, 2, 10)]
    assert len(Queue(env["QUEUE_NAME"], connection=redis_client)) == 1  # one job for the whole sweep
    assert "hx-trigger" in client.get(f"/sweeps/{sweep.id}").get_data(as_text=True)  # live while queued


def test_the_l0_finder_reads_a_ladder_records_it_on_the_source_and_offers_a_run_at_it(client, env, run_worker,
                                                                                     no_feature_jobs):
    response = client.post("/api/sweeps", json={"name": "finder", "mode": "find_l0",
                                                "base": {**BASE, "total_steps": 150, "checkpoint_every_steps": 2000}})
    assert response.status_code == 201, response.json
    body = response.json
    assert body["mode"] == "find_l0" and [a["param"] for a in body["axes"]] == ["target_l0", "seed"]
    ladder = body["axes"][0]["values"]
    assert len(ladder) == 5 and ladder == sorted(ladder) and len(body["members"]) == 10
    members = [Training.get_by_id(m["id"]) for m in body["members"]]
    assert {m.architecture for m in members} == {"batchtopk"}
    assert all(m.k == max(1, round(m.target_l0 * m.latent_dim)) for m in members)
    assert run_worker().returncode == 0
    sweep = Sweep.get_by_id(body["id"])
    assert sweep.status == "completed", sweep.reason
    finding = sweep.finding
    assert finding["metric"] == "consistency" and len(finding["curve"]) == 5
    assert all(0 <= p["consistency"] <= 1 and p["c_dec"] > 0 for p in finding["curve"])
    assert finding["recommended_l0"] and finding["rule"] and finding["certainty"]
    recorded = sweep.source.params["l0_finding"]
    assert recorded["sweep_id"] == sweep.id
    assert recorded["l0_fraction"] == pytest.approx(finding["recommended_l0"] / finding["latent_dim"])
    page = client.get(f"/sweeps/{sweep.id}").get_data(as_text=True)
    assert 'id="finding"' in page and 'id="finder-chart"' in page and 'id="train-at-l0"' in page
    # "Train at this L0": the form prefilled at the reading (k with it), and the source's hint names the sweep
    args = finding["train_args"]
    form = client.get(f"/trainings/new?from={args['from']}&target_l0={args['target_l0']}").get_data(as_text=True)
    assert f'value="{args["target_l0"]}"' in form
    hint = client.post("/api/trainings", json={**BASE, "target_l0": 0.15 if args["target_l0"] < 0.1 else 0.005,
                                               "k": None, "architecture": "standard", "l1_alpha": 0.003})
    assert any(f"sweep #{sweep.id}" in f["message"] for f in hint.json["findings"]), hint.json


def test_a_sweep_is_deleted_as_one_with_its_members_and_their_files(app, client, env):
    """A sweep that has ended goes with every member (rows, metrics, events, files), asked once on its
    page or by ``DELETE /api/sweeps/<id>``; an active sweep, or one whose member runs, is refused and
    nothing changes; another user may not delete it."""
    from pathlib import Path

    from app.models import Event
    from app.work.lifecycle import add_event
    from conftest import signed_in_client

    def a_sweep(status: str, member_status: str = "completed") -> tuple[Sweep, list[Training]]:
        sweep = Sweep.create(name=f"widths {status}", source=1, status=status, created_by=1)
        members = []
        for i in range(2):
            run = Training.create(source=1, name=f"member {i}", status=member_status, sweep=sweep.id, created_by=1)
            MetricPoint.create(training=run, step=10, tokens=10, loss=1.0, mse=1.0, sparsity_loss=0.0, l1=0.0, l0=5.0,
                               l0_fraction=0.02, fvu=0.5, dead=0, lr=0.001, l1_alpha=0.0, tokens_per_s=1.0)
            add_event(run.id, "info", "completed", "done")
            folder = Path(env["DATA_DIR"]) / "runs" / str(run.id)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "sae.safetensors").write_bytes(b"x")
            members.append(run)
        return sweep, members

    running, running_members = a_sweep("running", "running")
    response = client.delete(f"/api/sweeps/{running.id}")
    assert response.status_code == 409 and "cancel it first" in response.json["error"]
    refused = client.post(f"/sweeps/{running.id}/delete")
    assert refused.status_code == 409 and "cancel it first" in refused.get_data(as_text=True)
    assert Training.select().where(Training.sweep == running.id).count() == 2 and reload(running).status == "running"

    ended, members = a_sweep("completed")
    other = signed_in_client(app, "someone", is_admin=False)
    assert other.post(f"/sweeps/{ended.id}/delete").status_code == 403
    page = client.get(f"/sweeps/{ended.id}").get_data(as_text=True)
    assert f'href="/sweeps/{ended.id}/delete"' in page
    ask = client.get(f"/sweeps/{ended.id}/delete").get_data(as_text=True)
    assert "2 member runs" in ask and f"#{members[0].id}, #{members[1].id}" in ask
    done = client.post(f"/sweeps/{ended.id}/delete")
    assert done.status_code == 303 and done.headers["Location"].endswith("/sweeps")
    ids = [m.id for m in members]
    assert Sweep.get_or_none(Sweep.id == ended.id) is None
    assert not Training.select().where(Training.id.in_(ids)).exists()
    assert not MetricPoint.select().where(MetricPoint.training.in_(ids)).exists()
    assert not Event.select().where(Event.training.in_(ids)).exists()
    assert not any((Path(env["DATA_DIR"]) / "runs" / str(i)).exists() for i in ids)

    api_one, api_members = a_sweep("cancelled", "cancelled")
    assert client.delete(f"/api/sweeps/{api_one.id}").status_code == 200
    assert not Training.select().where(Training.sweep == api_one.id).exists()
    assert Training.select().where(Training.sweep == running.id).count() == 2  # the other sweep is untouched


def test_a_sweep_saved_as_a_template_starts_again_from_the_api_the_form_and_an_exported_file(client, env,
                                                                                             redis_client):
    """Issue 20 item 5: a sweep (base, axes and mode) saved as a template, from its page or the API; the
    template fills the training form's sweep fields, starts the same sweep by the API with only a source,
    and survives export and import; a template's sweep that no sweep could be is refused at import."""
    import json

    from app.models import Template

    axes = [{"param": "target_l0", "values": [0.01, 0.03]}, {"param": "seed", "values": [0, 1]}]
    first = post_sweep(client, axes, base={**BASE, "latent_dim": 512})
    assert first.status_code == 201, first.json
    sweep_id = first.json["id"]
    for body, status in (({"name": ""}, 422), ({"name": "x" * 201}, 422), ({"name": "x", "colour": 1}, 422),
                         ([1], 422), ({"name": 5}, 422)):
        assert client.post(f"/api/sweeps/{sweep_id}/template", json=body).status_code == status, body
    assert client.post("/api/sweeps/999999/template", json={"name": "x"}).status_code == 404
    assert Template.select().where(Template.sweep.is_null(False)).count() == 0

    saved = client.post(f"/api/sweeps/{sweep_id}/template", json={"name": "ladder"})
    assert saved.status_code == 201, saved.json
    template = saved.json
    assert template["sweep"] == {"mode": "grid", "axes": axes}
    assert template["config"]["latent_dim"] == 512 and template["config"]["architecture"] == "topk"
    assert template["d_in"] == 256 and f"sweep #{sweep_id}" in template["provenance"]
    listed = client.get("/api/templates?limit=200").json["templates"]
    assert [t["sweep"] for t in listed if t["id"] == template["id"]] == [template["sweep"]]

    # the API: the template's base, axes and mode, with only a source (and the warnings' acknowledgement)
    again = client.post("/api/sweeps", json={"template_id": template["id"],
                                             "base": {"source_id": 1, "acknowledge_warnings": True}})
    assert again.status_code == 201, again.json
    assert again.json["axes"] == axes and again.json["mode"] == "grid" and again.json["name"] == "ladder"
    members = list(Training.select().where(Training.sweep == again.json["id"]))
    assert sorted((m.target_l0, m.seed, m.latent_dim, m.k) for m in members) == [
        (0.01, 0, 512, 5), (0.01, 1, 512, 5), (0.03, 0, 512, 15), (0.03, 1, 512, 15)]
    # the body's own fields override the template's
    changed = client.post("/api/sweeps", json={"template_id": template["id"], "axes": [axes[0]],
                                               "base": {"source_id": 1, "latent_dim": 1024,
                                                        "acknowledge_warnings": True}})
    assert changed.status_code == 201, changed.json
    assert {m.latent_dim for m in Training.select().where(Training.sweep == changed.json["id"])} == {1024}
    for body, field in (({"template_id": 10**6, "base": {"source_id": 1}}, "template_id"),
                        ({"template_id": "1", "base": {"source_id": 1}}, "template_id"),
                        ({"template_id": True, "base": {"source_id": 1}}, "template_id"),
                        ({"template_id": template["id"], "base": [1]}, "base")):
        refused = client.post("/api/sweeps", json=body)
        assert refused.status_code == 422 and field in refused.json["errors"], (body, refused.json)

    # the form: the template's base and its sweep's fields, and a note that says how to start it
    page = client.get(f"/trainings/new?template={template['id']}").get_data(as_text=True)
    assert 'id="template-sweep-note"' in page and "Start sweep" in page
    assert '<option value="target_l0" selected>' in page and 'value="0.01, 0.03"' in page
    assert '<option value="seed" selected>' in page and 'value="0, 1"' in page
    plain = client.get("/trainings/new?template=1").get_data(as_text=True)  # a preset: no sweep
    assert 'id="template-sweep-note"' not in plain and 'name="sweep_values_1" id="sweep_values_1" value=""' in plain

    # export and import keep the sweep; a sweep no sweep could be is refused whole
    exported = client.get(f"/templates/{template['id']}/export").json
    assert exported["sweep"] == template["sweep"]
    before = Template.select().count()
    bad = {**exported, "name": "bad", "sweep": {"mode": "grid", "axes": [{"param": "batch_size", "values": [1, 2]}]}}
    for sweep_part, text in ((bad["sweep"], "cannot be swept"), ({"mode": "walk"}, "mode"),
                             ({"mode": "grid", "axes": [{"param": "target_l0", "values": [float("nan"), 0.02]}]},
                              "finite numbers"),
                             ({"mode": "find_l0", "axes": axes}, "no axes"), ("grid", "A sweep is")):
        refused = client.post("/templates/import", data={"json": json.dumps([{**exported, "name": "ok"},
                                                                             {**bad, "sweep": sweep_part}])})
        assert refused.status_code == 422 and text in refused.get_data(as_text=True), sweep_part
    assert Template.select().count() == before
    imported = client.post("/templates/import", data={"json": json.dumps([{**exported, "name": "imported ladder"},
                                                                          {**exported, "name": "no sweep", "sweep": None}])})
    assert imported.status_code == 303
    assert Template.get(Template.name == "imported ladder").sweep == template["sweep"]
    assert Template.get(Template.name == "no sweep").sweep is None

    # the sweep's page: a name is asked for; saved, the list shows the sweep
    page = client.post(f"/sweeps/{sweep_id}/template", data={"template_name": " "})
    assert page.status_code == 422 and 'id="sweep-template-error"' in page.get_data(as_text=True)
    page = client.post(f"/sweeps/{sweep_id}/template", data={"template_name": "from the page"})
    assert page.status_code == 303
    made = Template.get(Template.name == "from the page")
    assert page.headers["Location"].endswith(f"#template-{made.id}") and made.sweep == template["sweep"]
    listing = client.get("/templates/").get_data(as_text=True)
    assert "Sweep: a sweep of target_l0 over 0.01, 0.03 × seed over 0, 1" in listing


def test_an_l0_finder_saved_as_a_template_keeps_its_centre_not_its_ladder(client, env, redis_client):
    finder = client.post("/api/sweeps", json={"mode": "find_l0", "base": {**BASE, "latent_dim": 512}})
    assert finder.status_code == 201, finder.json
    template = client.post(f"/api/sweeps/{finder.json['id']}/template", json={"name": "finder"}).json
    assert template["sweep"] == {"mode": "find_l0", "axes": None}
    assert template["config"]["target_l0"] == BASE["target_l0"]  # the ladder's centre, not its first rung
    assert template["config"]["k"] == round(BASE["target_l0"] * 512)  # and k with it: the form shows one L0
    again = client.post("/api/sweeps", json={"template_id": template["id"],
                                             "base": {"source_id": 1, "acknowledge_warnings": True}})
    assert again.status_code == 201, again.json
    assert again.json["mode"] == "find_l0" and again.json["axes"] == finder.json["axes"]
    page = client.get(f"/trainings/new?template={template['id']}").get_data(as_text=True)
    assert "Find the right L0" in page and "the L0 finder" in page
