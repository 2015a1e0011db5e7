"""The API lists what the pages list (sources, extractions, templates, imported SAEs), a page at a
time; the metrics come a page at a time; and another user's job on your run keeps its results on
its own record. Real app, database, Redis and worker processes."""
from __future__ import annotations

import io
from urllib.parse import parse_qs, urlsplit

import pytest

from app.extraction.capture_names import BUNDLED_MINILM
from app.models import (ActivationSet, DownstreamEval, Extraction, FeatureJob, ImportedSAE, MetricPoint, Template,
                        Training)
from conftest import QUICK_CONFIG, finished_run, signed_in_client
from planted import reader_weights, saelens_zip

BAD_NUMBERS = ["-1", "0", "abc", "1e3", "1.5", " 5", "9" * 400, "²", ""]


def follow(client, url: str, key: str) -> list[dict]:
    """Every item of a paged list, following ``next`` to the end."""
    items, seen = [], 0
    while url:
        parts = urlsplit(url)
        body = client.get(parts.path, query_string=parts.query).json
        items += body[key]
        url = body["next"]
        seen += 1
        assert seen < 1000, "the pages never end"
    return items


def assert_422(response, name):
    assert response.status_code == 422, (response.status_code, response.get_data(as_text=True)[:500])
    assert name in response.json["errors"], response.json
    assert all(isinstance(m, str) and m for m in response.json["errors"][name])


# --- sources, extractions, templates, imports ---------------------------------------------------

def test_sources_extractions_templates_and_imports_are_listed_with_what_a_script_needs(app, env):
    alice = signed_in_client(app, "alice", is_admin=False)
    bob = signed_in_client(app, "bob", is_admin=False)

    # sources: the two built-in synthetic ones, newest first; the id is what a training takes
    sources = bob.get("/api/sources").json
    assert sources["next"] is None
    assert [s["id"] for s in sources["sources"]] == [s.id for s in ActivationSet.select().order_by(
        ActivationSet.id.desc())]
    first = sources["sources"][-1]
    assert first["kind"] == "synthetic" and first["d_in"] == 256 and first["training_tokens"] is None
    assert first["details"]["n_features"] == 512 and first["created_by"] is None and first["created_at"].endswith("Z")
    assert first["new_training_url"].endswith(f"/trainings/new?source_id={first['id']}")
    started = alice.post("/api/trainings", json={**QUICK_CONFIG, "source_id": first["id"]})
    assert started.status_code == 201, started.json
    assert [s["id"] for s in bob.get("/api/sources?kind=synthetic&d_in=256").json["sources"]] == \
        [s["id"] for s in sources["sources"]]
    assert bob.get("/api/sources?kind=file").json["sources"] == []

    # extractions: alice's, seen by bob with her name
    made = alice.post("/api/extractions", json={"model_name": BUNDLED_MINILM,
                                                "layer": 1, "token_budget": 5000})
    assert made.status_code == 201, made.json
    listed = bob.get("/api/extractions").json
    assert [e["id"] for e in listed["extractions"]] == [made.json["id"]] and listed["next"] is None
    row = listed["extractions"][0]
    assert row["created_by"] == "alice" and row["status"] == "queued" and row["layer"] == 1
    assert row["token_budget"] == 5000 and row["source_id"] is None and row["created_at"].endswith("Z")
    assert bob.get("/api/extractions?status=completed").json["extractions"] == []

    # templates: every one, a page at a time, and a template's config starts a training as is
    templates = follow(bob, "/api/templates?limit=7", "templates")
    assert [t["id"] for t in templates] == [t.id for t in Template.select().order_by(Template.id.desc())]
    assert len(templates) > 7 and len({t["id"] for t in templates}) == len(templates)
    topk = next(t for t in templates if t["architecture"] == "topk" and t["d_in"] == 384)
    assert topk["builtin"] and topk["config"]["k"] == 32 and topk["created_by"] is None
    assert {t["d_in"] for t in bob.get("/api/templates?d_in=384").json["templates"]} == {384}
    run = alice.post("/api/trainings", json={**topk["training"], "name": "from a template", "source_id": first["id"],
                                             "acknowledge_warnings": True})
    assert run.status_code == 201, run.json
    assert Training.get_by_id(run.json["id"]).k == 32

    # imported SAEs: alice's, with the feature job that browses it
    zipped = saelens_zip(256, 8, reader_weights(256, 8))
    imported = alice.post("/imports/", data={"file": (io.BytesIO(zipped), "reader.zip"), "name": "reader",
                                             "source_id": str(first["id"]), "sample_tokens": "2000"},
                          content_type="multipart/form-data")
    assert imported.status_code == 303, imported.get_data(as_text=True)[-800:]
    listed = bob.get("/api/imports").json
    assert listed["next"] is None and len(listed["imports"]) == 1
    sae = listed["imports"][0]
    assert sae["id"] == ImportedSAE.get().id and sae["name"] == "reader" and sae["created_by"] == "alice"
    assert (sae["architecture"], sae["d_in"], sae["d_sae"]) == ("standard", 256, 8)
    assert [j["id"] for j in sae["feature_jobs"]] == [FeatureJob.get().id]
    assert bob.get("/api/imports?d_in=512").json["imports"] == []

    # the runs list is paged the same way, and so is every list
    runs = follow(bob, "/api/trainings?limit=1", "trainings")
    assert [r["id"] for r in runs] == [run.json["id"], started.json["id"]]
    assert {r["created_by"] for r in runs} == {"alice"}
    assert bob.get("/api/trainings?status=completed").json["trainings"] == []


def test_list_links_are_built_under_external_url(app, env):
    app.config["EXTERNAL_URL"] = "https://sae.example.org"
    client = signed_in_client(app, "carol", is_admin=False)
    body = client.get("/api/templates?limit=2&d_in=384", headers={"Host": "localhost"}).json
    assert body["next"].startswith("https://sae.example.org/api/templates?")
    query = parse_qs(urlsplit(body["next"]).query)
    assert query == {"limit": ["2"], "d_in": ["384"], "before_id": [str(body["templates"][-1]["id"])]}
    assert body["templates"][0]["new_training_url"].startswith("https://sae.example.org/trainings/new?template=")


@pytest.mark.parametrize("path", ["/api/sources", "/api/extractions", "/api/templates", "/api/imports",
                                  "/api/trainings"])
def test_bad_paging_is_refused_with_the_reason(app, env, path):
    client = signed_in_client(app, "dave", is_admin=False)
    for value in [*BAD_NUMBERS, "1001"]:
        assert_422(client.get(path, query_string={"limit": value}), "limit")
    for value in BAD_NUMBERS:
        assert_422(client.get(path, query_string={"before_id": value}), "before_id")
    assert_422(client.get(f"{path}?limit=5&limit=6"), "limit")
    assert_422(client.get(f"{path}?limt=5"), "limt")
    assert client.get(path, query_string={"limit": "1000", "before_id": str(2**63 - 1)}).status_code == 200
    client.environ_base.pop("HTTP_AUTHORIZATION")
    assert client.get(path).status_code == 401


def test_bad_filters_are_refused(app, env):
    client = signed_in_client(app, "erin", is_admin=False)
    assert_422(client.get("/api/sources?kind=csv"), "kind")
    assert_422(client.get("/api/sources", query_string={"d_in": "9" * 400}), "d_in")
    assert_422(client.get("/api/extractions?status=done"), "status")
    assert_422(client.get("/api/templates?d_in=-384"), "d_in")
    assert_422(client.get("/api/trainings?status=RUNNING"), "status")


# --- metrics, a page at a time -----------------------------------------------------------------

def planted_metrics(run: Training, steps) -> None:
    rows = [{"training": run.id, "step": s, "tokens": s * 256, "loss": 1.0, "mse": 0.5, "sparsity_loss": 0.5,
             "l1": 100.0, "l0": 5.0, "l0_fraction": 0.02, "fvu": 0.1, "dead": None, "lr": 1e-3, "l1_alpha": 0.003,
             "tokens_per_s": 1e4} for s in steps]
    for start in range(0, len(rows), 500):
        MetricPoint.insert_many(rows[start:start + 500]).execute()


def test_metrics_come_a_page_at_a_time_from_a_step_and_can_be_thinned(app, env):
    client = signed_in_client(app, "frank", is_admin=False)
    run = Training.get_by_id(client.post("/api/trainings", json=QUICK_CONFIG).json["id"])
    steps = list(range(10, 25_001, 10))  # 2,500 points
    planted_metrics(run, steps)
    url = f"/api/trainings/{run.id}/metrics"

    first = client.get(url).json
    assert len(first["points"]) == 1000 and first["limit"] == 1000 and first["every"] is None
    assert first["points"][-1]["step"] == 10_000 and first["next_since_step"] == 10_000
    assert parse_qs(urlsplit(first["next"]).query) == {"since_step": ["10000"], "limit": ["1000"]}
    assert [p["step"] for p in follow(client, url, "points")] == steps
    assert [p["step"] for p in follow(client, f"{url}?limit=333", "points")] == steps
    whole = client.get(f"{url}?limit=10000").json
    assert len(whole["points"]) == 2500 and whole["next"] is None and whole["next_since_step"] is None

    assert [p["step"] for p in client.get(f"{url}?since_step=24980").json["points"]] == [24_990, 25_000]
    assert [p["step"] for p in client.get(f"{url}?since=24990").json["points"]] == [25_000]  # the older name
    assert client.get(f"{url}?since_step=25000").json == {
        "id": run.id, "latent_dim": 256, "since_step": 25_000, "limit": 1000, "every": None, "points": [],
        "next_since_step": None, "next": None}

    # every=n: the first point of each n-step interval, the same whatever the page size
    thinned = [p["step"] for p in client.get(f"{url}?every=1000&limit=10000").json["points"]]
    assert thinned == [10] + list(range(1000, 25_001, 1000))
    assert [p["step"] for p in follow(client, f"{url}?every=1000&limit=4", "points")] == thinned
    spaced = [p["step"] for p in follow(client, f"{url}?every=250&limit=7&since_step=1000", "points")]
    assert spaced == [1010] + list(range(1250, 25_001, 250))
    assert [p["step"] for p in follow(client, f"{url}?every=1&limit=900", "points")] == steps
    assert [p["step"] for p in client.get(f"{url}?every={2**63 - 1}").json["points"]] == [10]


def test_bad_metrics_parameters_are_refused_with_the_reason(app, env):
    client = signed_in_client(app, "gina", is_admin=False)
    run = Training.get_by_id(client.post("/api/trainings", json=QUICK_CONFIG).json["id"])
    planted_metrics(run, [10, 20])
    url = f"/api/trainings/{run.id}/metrics"
    for value in BAD_NUMBERS:
        if value != "0":  # step 0 is a fine place to start
            assert_422(client.get(url, query_string={"since_step": value}), "since_step")
        assert_422(client.get(url, query_string={"limit": value}), "limit")
        assert_422(client.get(url, query_string={"every": value}), "every")
    assert_422(client.get(url, query_string={"limit": "10001"}), "limit")
    assert_422(client.get(url, query_string={"since_step": str(2**63)}), "since_step")
    assert_422(client.get(f"{url}?since=5&since_step=6"), "since")
    assert_422(client.get(f"{url}?page=2"), "page")
    assert client.get(f"{url}?since=10&since_step=10").json["points"][0]["step"] == 20
    assert client.get(f"/api/trainings/{run.id + 1}/metrics?limit=abc").status_code == 404


# --- another user's jobs on your run -----------------------------------------------------------


def test_another_users_feature_job_keeps_its_recovery_on_its_own_record(app, env, run_worker):
    env["FEATURES_AFTER_TRAINING"] = "0"  # nothing queued by the run itself: only the users' jobs
    alice = signed_in_client(app, "alice", is_admin=False)
    bob = signed_in_client(app, "bob", is_admin=False)
    run = finished_run(alice, run_worker)
    before = run.summary
    assert "ground_truth" not in before and FeatureJob.select().count() == 0

    started = bob.post(f"/trainings/{run.id}/features", data={"sample_tokens": "4000"})
    assert started.status_code == 303, started.get_data(as_text=True)[-800:]
    assert run_worker().returncode == 0
    job = FeatureJob.get()
    assert job.status == "completed", job.reason
    gt = job.summary["ground_truth"]
    assert 0 < gt["mmcs"] <= 1 and gt["n_features"] == 512
    assert Training.get_by_id(run.id).summary == before  # alice's run is as she left it
    assert job.created_by_id == bob.user.id and not job.on_run

    # shown per job, with who ran it, on the run's page, the job's page and the API
    page = alice.get(f"/trainings/{run.id}").get_data(as_text=True)
    others = page[page.index('id="others-features"'):]
    assert f'id="feature-job-{job.id}"' in others and "<strong>bob</strong>" in others
    assert f"MMCS {gt['mmcs']:.3f}" in others and 'id="run-recovery"' not in page
    listing = alice.get(f"/features/{job.id}").get_data(as_text=True)
    assert "started by bob" in listing and "kept on this job, not on the run" in listing
    body = alice.get(f"/api/trainings/{run.id}").json
    assert "ground_truth" not in body["summary"]
    assert body["feature_jobs"] == [alice.get(f"/api/features/{job.id}").json]
    shown = body["feature_jobs"][0]
    assert shown["created_by"] == "bob" and shown["on_run"] is False and shown["result"]["ground_truth"] == gt

    # the owner's own job still writes the run's recovery
    assert alice.post(f"/trainings/{run.id}/features", data={"sample_tokens": "4000"}).status_code == 303
    assert run_worker().returncode == 0
    own = FeatureJob.select().order_by(FeatureJob.id.desc()).first()
    assert own.status == "completed" and own.on_run
    assert Training.get_by_id(run.id).summary == {**before, "ground_truth": own.summary["ground_truth"]}
    page = alice.get(f"/trainings/{run.id}").get_data(as_text=True)
    assert 'id="run-recovery"' in page and f'id="feature-job-{job.id}"' in page


def test_another_users_downstream_evaluation_keeps_its_result_on_its_own_record(app, env, trained_gpt2,
                                                                                 run_worker):
    env["FEATURES_AFTER_TRAINING"] = "0"  # no evaluation queued by the run itself
    alice = signed_in_client(app, "alice", is_admin=False)
    bob = signed_in_client(app, "bob", is_admin=False)
    made = alice.post("/api/extractions", json={"model_name": str(trained_gpt2), "layer": 1, "token_budget": 6000,
                                                "context_length": 64})
    assert made.status_code == 201, made.json
    assert run_worker().returncode == 0
    source = Extraction.get_by_id(made.json["id"]).activation_set
    assert source is not None
    run = finished_run(alice, run_worker, source_id=source.id, architecture="topk", k=8, l1_alpha=None,
                       batch_size=128, total_steps=200, target_l0=8 / 256)
    before = run.summary
    assert "downstream" not in before and DownstreamEval.select().count() == 0

    started = bob.post(f"/api/trainings/{run.id}/downstream", json={"tokens": 512})
    assert started.status_code == 202, started.json
    assert run_worker().returncode == 0
    job = DownstreamEval.get_by_id(started.json["id"])
    assert job.status == "completed", job.reason
    assert job.summary["tokens"] >= 512 and job.summary["headline"]
    assert Training.get_by_id(run.id).summary == before  # neither the result nor the verdict's line
    assert started.json["created_by"] == "bob" and started.json["on_run"] is False

    page = alice.get(f"/trainings/{run.id}").get_data(as_text=True)
    others = page[page.index('id="others-downstream"'):]
    assert f'id="downstream-job-{job.id}"' in others and "<strong>bob</strong>" in others
    assert job.summary["headline"][:40] in others
    assert 'id="downstream-table"' not in page and 'id="verdict-downstream"' not in page
    body = alice.get(f"/api/trainings/{run.id}").json
    assert "downstream" not in body["summary"]
    assert body["downstream_evals"] == [alice.get(f"/api/downstream/{job.id}").json]
    assert body["downstream_evals"][0]["created_by"] == "bob" and body["downstream_evals"][0]["result"] == job.summary

    # the owner's own evaluation is the run's
    own = alice.post(f"/api/trainings/{run.id}/downstream", json={"tokens": 256})
    assert own.status_code == 202 and own.json["on_run"] is True
    assert run_worker().returncode == 0
    own = DownstreamEval.get_by_id(own.json["id"])
    assert own.status == "completed", own.reason
    summary = Training.get_by_id(run.id).summary
    assert summary["downstream"] == own.summary and summary["verdict"]["downstream"] == own.summary["headline"]
    page = alice.get(f"/trainings/{run.id}").get_data(as_text=True)
    assert 'id="downstream-table"' in page and f'id="downstream-job-{job.id}"' in page
