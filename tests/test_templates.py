"""Templates: presets, create → use → export → import, and refused imports."""
from __future__ import annotations

import io
import json
import re

import pytest

from app.models import PRESET_WIDTHS, Template
from app.validation import recommended_l1_alpha
from conftest import QUICK_CONFIG


def form(**changes) -> dict:
    data = {**QUICK_CONFIG, **changes}
    return {k: str(v) for k, v in data.items() if v is not None and not isinstance(v, bool)}


def test_presets_are_seeded_for_common_widths_with_provenance(client):
    presets = list(Template.select().where(Template.builtin == True))  # noqa: E712
    assert sorted({t.d_in for t in presets}) == sorted(PRESET_WIDTHS)
    assert {t.config["architecture"] for t in presets} == {"standard", "topk", "batchtopk", "jumprelu", "matryoshka",
                                                           "matryoshka_topk", "gated"}
    for t in presets:
        assert t.provenance
        if t.config["architecture"] == "standard":
            assert 1e-5 < t.config["l1_alpha"] <= 0.1 and t.config["steer_l1_alpha"] is True
            assert t.config["l1_alpha"] == pytest.approx(recommended_l1_alpha(
                t.d_in, t.config["latent_dim"], t.config["target_l0"], t.config["total_steps"]), rel=0.05)
    html = client.get("/templates/").get_data(as_text=True)
    assert "d_in 768 · standard" in html and "from the L0 model for 30,000 steps" in html


def test_create_use_export_import_round_trip(client):
    html = client.post("/templates/from-form", data=form(template_name="my sweet spot", l1_alpha=0.0042,
                                                        latent_dim=2048)).get_data(as_text=True)
    assert "Saved as template" in html
    t = Template.get(Template.name == "my sweet spot")
    assert t.config["l1_alpha"] == 0.0042 and t.config["latent_dim"] == 2048 and t.d_in == 256
    page = client.get(f"/trainings/new?template={t.id}").get_data(as_text=True)
    assert 'value="0.0042"' in page and 'value="2048"' in page and "my sweet spot" in page
    exported = client.get(f"/templates/{t.id}/export")
    assert exported.headers["Content-Disposition"].startswith("attachment")
    body = exported.get_json()
    t.delete_instance()
    response = client.post("/templates/import", data={"file": (io.BytesIO(json.dumps(body).encode()), "t.json")},
                           content_type="multipart/form-data")
    assert response.status_code == 303
    again = Template.get(Template.name == "my sweet spot")
    assert again.export() == body


def test_import_accepts_aliases(client):
    item = {"name": "aliased", "architecture": "standard", "latent_dim": 1024, "sparsity_coefficient": 0.005,
            "learning_rate": 0.001, "batch_size": 512, "total_steps": 1000, "lr_warmup_steps": 50,
            "l1_warmup_steps": 50, "target_l0": 0.02}
    response = client.post("/templates/import", data={"file": (io.BytesIO(json.dumps([item]).encode()), "t.json")},
                           content_type="multipart/form-data")
    assert response.status_code == 303
    assert Template.get(Template.name == "aliased").config["l1_alpha"] == 0.005


def test_bad_imports_are_refused_whole_with_reasons(client):
    good = {"name": "fine", "architecture": "standard", "latent_dim": 1024, "l1_alpha": 0.003, "learning_rate": 0.001,
            "batch_size": 512, "total_steps": 1000, "lr_warmup_steps": 50, "l1_warmup_steps": 50, "target_l0": 0.02}
    before = Template.select().count()
    for bad, reason in (({**good, "name": "null", "l1_alpha": None}, "sparsity penalty"),
                        ({**good, "name": "high", "l1_alpha": 0.5}, "at most 0.1"),
                        ({**good, "name": "missing", "l1_alpha": ...}, "sparsity penalty")):
        bad = {k: v for k, v in bad.items() if v is not ...}
        payload = json.dumps([good, bad]).encode()
        response = client.post("/templates/import", data={"file": (io.BytesIO(payload), "t.json")},
                               content_type="multipart/form-data")
        assert response.status_code == 422
        errors = re.search(r'id="import-errors">(.*?)</div>', response.get_data(as_text=True), re.S).group(1)
        assert "Template 2" in errors and reason in errors and "Nothing was imported" in errors
        assert Template.select().count() == before  # not even the good one
    response = client.post("/templates/import", data={"file": (io.BytesIO(b"{nope"), "t.json")},
                           content_type="multipart/form-data")
    assert response.status_code == 422 and "Not valid JSON" in response.get_data(as_text=True)


def test_edit_duplicate_delete(client):
    t = Template.select().first()
    data = {"name": "edited", "d_in": "768", "provenance": "mine", **{k: str(v) for k, v in t.config.items() if v is not None}}
    assert client.post(f"/templates/{t.id}/edit", data={**data, "l1_alpha": "0.7"}).status_code == 422
    assert client.post(f"/templates/{t.id}/edit", data=data).status_code == 303
    edited = Template.get_by_id(t.id)
    assert edited.name == "edited" and edited.builtin is False
    client.post(f"/templates/{t.id}/duplicate")
    assert Template.select().where(Template.name == "edited (copy)").count() == 1
    client.post(f"/templates/{t.id}/delete")
    assert Template.get_or_none(Template.id == t.id) is None
    assert client.get("/templates/9999/edit").status_code == 404
