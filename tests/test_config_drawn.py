"""The form, the run's page, the API and the templates are drawn from ``training_config.PARAMS``.

Two made-up hyper-parameters are added to the list for the length of a test, with no other
edit: ``forms.rebuild()`` (the hook that remakes the form classes' fields and the ``Training``
model's columns from the list as it is now) is called before the app, and so its database
tables, are made, and again after the list is put back. A real parameter comes with a
migration adding its column (docs/design.md, "Configuration: adding a hyper-parameter"); here
the test adds the columns to its database the way such a migration does (``add_column_if_missing``
with the model's field).
"""
from __future__ import annotations

import io
import json
import re

import pytest

from app import forms, training_config
from app.models import Template, Training
from app.training_config import Param
from conftest import QUICK_CONFIG, create_run

MADE_UP = (
    Param("ema_decay", float, 0.25, "Weight averaging decay (made up)", min=0, max=1,
          help="A made-up setting: every architecture would use it.", api_optional=True, template=True, core=False,
          group="optimization"),
    Param("threshold_init", float, 0.125, "Initial threshold (made up)", min=0, max=10, min_exclusive=True,
          required_for=("jumprelu",), api_optional=True, template=True, core=False, group="sparsity",
          required_message="The initial threshold is required for a JumpReLU SAE."),
)


@pytest.fixture
def made_up(env):
    saved = training_config.PARAMS, training_config.BY_NAME
    training_config.PARAMS = saved[0] + MADE_UP
    training_config.BY_NAME = {p.name: p for p in training_config.PARAMS}
    forms.rebuild()
    try:
        yield
    finally:
        training_config.PARAMS, training_config.BY_NAME = saved
        forms.rebuild()


@pytest.fixture
def app(made_up, env):
    """conftest's app, made once the list holds the made-up parameters, with their columns added as a
    migration would add them."""
    from app import create_app
    from app.db import add_column_if_missing, database

    flask_app = create_app({"TESTING": True, "WTF_CSRF_ENABLED": False, "SERVER_NAME": "localhost"})
    with flask_app.app_context():
        for param in MADE_UP:
            add_column_if_missing(database.obj, Training._meta.table_name, param.name, Training._meta.fields[param.name])
        yield flask_app


def form_data(**changes) -> dict:
    data = {**QUICK_CONFIG, **changes}
    return {k: "" if v is None else ("y" if v is True else str(v)) for k, v in data.items() if v is not False}


def fieldset(html: str, legend: str) -> str:
    """The HTML of the form's fieldset with this legend."""
    return re.search(rf"<legend>{re.escape(legend)}</legend>(.*?)</fieldset>", html, re.S).group(1)


def test_a_new_param_is_in_the_form_in_its_group_with_its_hint(client):
    html = client.get("/trainings/new").get_data(as_text=True)
    optimization = fieldset(html, "Optimization")
    assert 'id="field-ema_decay"' in optimization and "Weight averaging decay (made up)" in optimization
    assert re.search(r'<input[^>]*id="ema_decay"[^>]*>', optimization).group(0).count('step="any"') == 1
    assert 'value="0.25"' in optimization and "every architecture would use it" in optimization
    sparsity = fieldset(html, "Sparsity")
    threshold = re.search(r'<div class="field" id="field-threshold_init">(.*?)<div id="findings-threshold_init"',
                          sparsity, re.S).group(1)
    assert '<p class="help hint">Used by JumpReLU only.</p>' in threshold
    # PARAMS order within the group: after the existing sparsity fields
    assert sparsity.index('id="field-dead_latent_remedy"') < sparsity.index('id="field-threshold_init"')


def test_a_new_param_is_checked_stored_and_shown_on_the_run_s_page(client):
    response = client.post("/trainings", data=form_data(ema_decay=1.5))
    assert response.status_code == 422
    errors = re.findall(r'<p class="error" data-field="ema_decay">([^<]*)</p>', response.get_data(as_text=True))
    assert errors == ["Must be at least 0 and at most 1 (got 1.5)."]
    response = client.post("/trainings", data=form_data(architecture="jumprelu", l1_alpha=None, threshold_init=""))
    assert response.status_code == 422
    assert "The initial threshold is required for a JumpReLU SAE." in response.get_data(as_text=True)

    assert client.post("/trainings", data=form_data(ema_decay=0.5)).status_code == 303
    run = Training.get()
    assert run.ema_decay == 0.5 and run.threshold_init is None  # a standard SAE has no use for it
    page = client.get(f"/trainings/{run.id}").get_data(as_text=True)
    panel = re.search(r'<dl class="config-grid">(.*?)</dl>', page, re.S).group(1)
    assert "<dt>Weight averaging decay (made up)</dt><dd>0.5</dd>" in panel
    assert "Initial threshold" not in panel  # not used by the run's architecture


def test_a_new_param_goes_through_the_api(client):
    run = create_run(client)  # left out: its default
    assert client.get(f"/api/trainings/{run.id}").json["config"]["ema_decay"] == 0.25
    run = create_run(client, ema_decay=0.75, architecture="jumprelu", l1_alpha=None, threshold_init=0.5)
    config = client.get(f"/api/trainings/{run.id}").json["config"]
    assert config["ema_decay"] == 0.75 and config["threshold_init"] == 0.5
    page = client.get(f"/trainings/{run.id}").get_data(as_text=True)
    assert "<dt>Initial threshold (made up)</dt><dd>0.5</dd>" in page
    refused = client.post("/api/trainings", json={**QUICK_CONFIG, "ema_decay": 2})
    assert refused.status_code == 422 and refused.json["errors"]["ema_decay"] == ["Must be at least 0 and at most 1 (got 2)."]
    refused = client.post("/api/trainings", json={**QUICK_CONFIG, "ema_decay": None})
    assert refused.status_code == 422 and refused.json["errors"]["ema_decay"] == ["Must not be null."]


def test_a_new_param_is_in_a_template_s_export_and_comes_back_on_import(client):
    data = {**form_data(ema_decay=0.625), "template_name": "with the made-up setting"}
    assert "Saved as template" in client.post("/templates/from-form", data=data).get_data(as_text=True)
    template = Template.get(Template.name == "with the made-up setting")
    exported = json.loads(client.get(f"/templates/{template.id}/export").get_data(as_text=True))
    assert exported["ema_decay"] == 0.625 and exported["threshold_init"] is None
    exported["name"] = "imported back"
    response = client.post("/templates/import", content_type="multipart/form-data",
                           data={"file": (io.BytesIO(json.dumps(exported).encode()), "t.json")})
    assert response.status_code == 303, response.get_data(as_text=True)
    assert Template.get(Template.name == "imported back").config["ema_decay"] == 0.625
    exported["ema_decay"] = "much"
    response = client.post("/templates/import", content_type="multipart/form-data",
                           data={"file": (io.BytesIO(json.dumps(exported).encode()), "t.json")})
    assert response.status_code == 422 and "ema_decay" in response.get_data(as_text=True)
    html = client.get(f"/trainings/new?template={template.id}").get_data(as_text=True)
    assert re.search(r'<input[^>]*id="ema_decay"[^>]*value="0.625"', html)


def test_the_list_is_back_afterwards():
    """The hook rebuilt the form and the model from the real list once the test above was over."""
    assert "ema_decay" not in training_config.BY_NAME
    assert not hasattr(forms.TrainingForm, "ema_decay") and not hasattr(forms.TemplateForm, "ema_decay")
    assert "ema_decay" not in Training._meta.fields and not hasattr(Training, "ema_decay")
