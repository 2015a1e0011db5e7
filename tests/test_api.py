"""The JSON API: the form's validation, aliases, and the run's state."""
from __future__ import annotations

import pytest
from rq import Queue

from app.models import Event, MetricPoint, Training
from bounds import BOUNDS, bound_id
from conftest import QUICK_CONFIG


def post(client, **changes):
    body = {**QUICK_CONFIG, **changes}
    body = {k: v for k, v in body.items() if v is not ...}
    return client.post("/api/trainings", json=body)


def assert_refused(response, field, env, redis_client):
    assert response.status_code == 422, response.json
    assert field in response.json["errors"], response.json
    assert all(isinstance(m, str) and m for m in response.json["errors"][field])
    assert Training.select().count() == 0
    assert len(Queue(env["QUEUE_NAME"], connection=redis_client)) == 0


@pytest.mark.parametrize("case", BOUNDS, ids=bound_id)
def test_field_bounds(client, env, redis_client, case):
    field, value, accepted, changes = case
    response = post(client, **{**changes, field: value})
    if accepted:
        assert response.status_code == 201, response.json
    else:
        assert_refused(response, field, env, redis_client)


@pytest.mark.parametrize("field", ["l1_alpha", "learning_rate", "latent_dim", "batch_size", "total_steps", "target_l0"])
def test_null_missing_and_non_numeric_name_the_field(client, env, redis_client, field):
    assert_refused(post(client, **{field: None}), field, env, redis_client)
    assert_refused(post(client, **{field: ...}), field, env, redis_client)
    assert_refused(post(client, **{field: "lots"}), field, env, redis_client)
    assert_refused(post(client, **{field: True}), field, env, redis_client)


def test_null_l1_alpha_message_explains_the_penalty(client, env, redis_client):
    response = post(client, l1_alpha=None)
    assert_refused(response, "l1_alpha", env, redis_client)
    assert "sparsity penalty" in response.json["errors"]["l1_alpha"][0]


@pytest.mark.parametrize("alias", ["sparsity_coefficient", "l1_coefficient"])
def test_aliases_map_to_l1_alpha(client, alias):
    response = post(client, l1_alpha=..., **{alias: 0.004})
    assert response.status_code == 201, response.json
    assert Training.get_by_id(response.json["id"]).l1_alpha == 0.004


@pytest.mark.parametrize("alias", ["sparsity_coefficient", "l1_coefficient"])
def test_null_or_out_of_range_alias_is_refused_as_l1_alpha(client, env, redis_client, alias):
    assert_refused(post(client, l1_alpha=..., **{alias: None}), "l1_alpha", env, redis_client)
    assert_refused(post(client, l1_alpha=..., **{alias: 0.5}), "l1_alpha", env, redis_client)


def test_conflicting_alias_is_refused(client, env, redis_client):
    assert_refused(post(client, l1_alpha=0.003, sparsity_coefficient=0.01), "l1_alpha", env, redis_client)


def test_agreeing_alias_is_accepted(client):
    assert post(client, l1_alpha=0.003, l1_coefficient=0.003).status_code == 201


def test_unknown_field_is_refused(client, env, redis_client):
    assert_refused(post(client, sparsity_coef=0.003), "sparsity_coef", env, redis_client)


def test_body_must_be_a_json_object(client):
    assert client.post("/api/trainings", data="l1_alpha=0.003").status_code == 422
    assert client.post("/api/trainings", json=[1, 2]).status_code == 422


def test_integral_floats_are_accepted_for_integer_fields(client):
    assert post(client, total_steps=300.0).status_code == 201
    assert post(client, total_steps=300.5).status_code == 422


def test_unknown_source_is_refused(client, env, redis_client):
    assert_refused(post(client, source_id=42), "source_id", env, redis_client)


def test_created_run_is_queued_and_described(client, env, redis_client):
    response = post(client)
    assert response.status_code == 201
    run_id = response.json["id"]
    body = client.get(f"/api/trainings/{run_id}").json
    assert body["status"] == "queued" and body["step"] == 0 and body["total_steps"] == 200
    assert body["config"]["l1_alpha"] == 0.003 and body["config"]["learning_rate"] == 0.001
    assert body["quality_grade"] is None and body["latest_metrics"] is None
    assert Queue(env["QUEUE_NAME"], connection=redis_client).job_ids == [Training.get_by_id(run_id).rq_job_id]


def test_config_round_trips_through_the_api(client):
    first = client.get(f"/api/trainings/{post(client).json['id']}").json["config"]
    second = post(client, **first)
    assert second.status_code == 201
    assert client.get(f"/api/trainings/{second.json['id']}").json["config"] == first


def test_run_state_metrics_and_events(client):
    run = Training.get_by_id(post(client).json["id"])
    for step, frac in ((10, 0.5), (20, 0.03)):
        MetricPoint.create(training=run, step=step, tokens=step * 256, loss=1.0, mse=0.5, sparsity_loss=0.5, l1=100,
                           l0=frac * 256, l0_fraction=frac, fvu=0.1, dead=None, lr=1e-3, l1_alpha=0.003,
                           tokens_per_s=1e4)
    Event.create(training=run, step=20, level="warning", code="dense", message="dense", suggestion="raise it")
    body = client.get(f"/api/trainings/{run.id}").json
    assert body["latest_metrics"]["step"] == 20 and body["quality_grade"] == "green"
    assert body["events"] == [{"step": 20, "level": "warning", "code": "dense", "message": "dense",
                               "suggestion": "raise it"}]
    series = client.get(f"/api/trainings/{run.id}/metrics").json["points"]
    assert [p["step"] for p in series] == [10, 20] and series[0]["l0_fraction"] == 0.5
    assert [p["step"] for p in client.get(f"/api/trainings/{run.id}/metrics?since=10").json["points"]] == [20]


def test_unknown_run_is_404_json(client):
    for url in ("/api/trainings/7", "/api/trainings/7/metrics"):
        response = client.get(url)
        assert response.status_code == 404 and "error" in response.json
    assert client.post("/api/trainings/7/cancel").status_code == 404


def test_cancel_of_an_ended_run_is_a_conflict(client):
    run = Training.get_by_id(post(client).json["id"])
    Training.update(status="completed").where(Training.id == run.id).execute()
    assert client.post(f"/api/trainings/{run.id}/cancel").status_code == 409


def test_quality_settings_default_when_left_out(client):
    body = {k: v for k, v in QUICK_CONFIG.items()
            if k not in ("early_stop", "early_stop_step", "early_stop_l0", "plateau_window", "dead_latent_remedy",
                         "steer_l1_alpha", "log_every", "dead_window_tokens", "name")}
    response = client.post("/api/trainings", json=body)
    assert response.status_code == 201, response.json
    run = Training.get_by_id(response.json["id"])
    assert run.early_stop is True and run.early_stop_step == 1000 and run.early_stop_l0 == 0.2
    assert run.steer_l1_alpha is False and run.dead_latent_remedy == "none" and run.log_every == 20


def test_booleans_must_be_json_booleans(client, env, redis_client):
    assert_refused(post(client, early_stop="yes"), "early_stop", env, redis_client)
    response = post(client, early_stop=False, steer_l1_alpha=True)
    assert response.status_code == 201
    run = Training.get_by_id(response.json["id"])
    assert run.early_stop is False and run.steer_l1_alpha is True


def test_unknown_dead_latent_remedy_is_refused(client, env, redis_client):
    assert_refused(post(client, dead_latent_remedy="resurrect"), "dead_latent_remedy", env, redis_client)
