"""The HTML training form: every error at its field, nothing created or enqueued on error."""
from __future__ import annotations

import re

import pytest
from rq import Queue

from app.models import Training
from bounds import BOUNDS, bound_id
from conftest import QUICK_CONFIG, signed_in_client


def form_data(**changes) -> dict:
    """The fields as a browser posts them: an unticked checkbox is simply absent."""
    data = {**QUICK_CONFIG, **changes}
    return {k: "" if v is None else ("y" if v is True else str(v)) for k, v in data.items() if v is not False}


def field_errors(html: str, field: str) -> list[str]:
    return re.findall(rf'<p class="error" data-field="{field}">([^<]*)</p>', html)


def queue_length(env, redis_client) -> int:
    return len(Queue(env["QUEUE_NAME"], connection=redis_client))


def assert_nothing_created(env, redis_client):
    assert Training.select().count() == 0
    assert queue_length(env, redis_client) == 0


@pytest.mark.parametrize("case", BOUNDS, ids=bound_id)
def test_field_bounds(client, env, redis_client, case):
    field, value, accepted, changes = case
    response = client.post("/trainings", data=form_data(**{**changes, field: value}))
    if accepted:
        assert response.status_code == 303, field_errors(response.get_data(as_text=True), field)
        assert Training.select().count() == 1
        assert queue_length(env, redis_client) == 1
    else:
        assert response.status_code == 422
        html = response.get_data(as_text=True)
        assert field_errors(html, field), f"no error shown at {field}"
        assert "Nothing was started" in html
        assert_nothing_created(env, redis_client)


def test_missing_l1_alpha_is_refused_at_its_field(client, env, redis_client):
    response = client.post("/trainings", data=form_data(l1_alpha=None))
    assert response.status_code == 422
    [message] = field_errors(response.get_data(as_text=True), "l1_alpha")
    assert "sparsity penalty" in message and "required" in message
    assert_nothing_created(env, redis_client)


@pytest.mark.parametrize("value", ["abc", "1e-3.5", "nan", "inf"])
def test_non_numeric_l1_alpha_is_refused(client, env, redis_client, value):
    response = client.post("/trainings", data=form_data(l1_alpha=value))
    assert response.status_code == 422
    assert field_errors(response.get_data(as_text=True), "l1_alpha")
    assert_nothing_created(env, redis_client)


def test_several_errors_each_at_its_own_field(client, env, redis_client):
    response = client.post("/trainings", data=form_data(l1_alpha=0.5, learning_rate="fast", batch_size=3))
    html = response.get_data(as_text=True)
    assert response.status_code == 422
    for field in ("l1_alpha", "learning_rate", "batch_size"):
        assert field_errors(html, field), field
    assert not field_errors(html, "latent_dim")
    # The user's input is kept in the re-rendered form.
    assert 'value="fast"' in html


def test_topk_needs_k_but_not_l1_alpha(client, env, redis_client):
    response = client.post("/trainings", data=form_data(architecture="topk", k=None))
    assert response.status_code == 422
    assert field_errors(response.get_data(as_text=True), "k")
    response = client.post("/trainings", data=form_data(architecture="topk", k=8, l1_alpha=None))
    assert response.status_code == 303
    run = Training.get()
    assert run.k == 8 and run.l1_alpha is None


def test_valid_form_creates_a_queued_run_and_shows_it(client, env, redis_client):
    response = client.post("/trainings", data=form_data())
    assert response.status_code == 303
    run = Training.get()
    assert response.headers["Location"].endswith(f"/trainings/{run.id}")
    assert run.status == "queued" and run.l1_alpha == 0.003 and run.learning_rate == 0.001
    assert run.rq_job_id
    job_ids = Queue(env["QUEUE_NAME"], connection=redis_client).job_ids
    assert job_ids == [run.rq_job_id]
    page = client.get(f"/trainings/{run.id}").get_data(as_text=True)
    assert "Sparsity penalty (l1_alpha)" in page and "Learning rate" in page


def test_form_labels_keep_l1_alpha_and_learning_rate_apart(client):
    html = client.get("/trainings/new").get_data(as_text=True)
    assert "Sparsity penalty (l1_alpha)" in html
    assert "Learning rate (optimizer step size)" in html
    assert 'value="0.003"' in html  # the default penalty is filled in, never left empty


def test_form_hints_show_target_count(client):
    html = client.post("/trainings/hints", data=form_data(latent_dim=8192, target_l0=0.05)).get_data(as_text=True)
    assert "410 active latents" in html


def test_new_run_prefilled_from_an_old_one(client):
    client.post("/trainings", data=form_data(l1_alpha=0.007, name="first"))
    html = client.get("/trainings/new?from=1").get_data(as_text=True)
    assert 'value="0.007"' in html and "Pre-filled from run #1" in html


def test_unknown_run_is_404(client):
    assert client.get("/trainings/999").status_code == 404
    assert client.get("/trainings/999/progress").status_code == 404
    assert client.post("/trainings/999/cancel").status_code == 404


def test_csrf_is_enforced_on_the_html_form(env, redis_client):
    from app import create_app

    app = create_app({"TESTING": True})
    with app.app_context():
        response = signed_in_client(app).post("/trainings", data=form_data())
        assert response.status_code == 400
        assert Training.select().count() == 0


def test_unticked_checkbox_turns_early_stop_off(client):
    assert client.post("/trainings", data=form_data(early_stop=False, steer_l1_alpha=True)).status_code == 303
    run = Training.get()
    assert run.early_stop is False and run.steer_l1_alpha is True
