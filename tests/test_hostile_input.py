"""Sign-in, tokens, and the probes a hostile or careless client sends: each gets a 4xx (or is
refused at its field) and nothing is written."""
from __future__ import annotations

import io
import json
import re
import struct
import zipfile

import pytest

from app.auth import create_token, create_user
from app.models import ActivationSet, ApiToken, Template, Training
from conftest import QUICK_CONFIG, create_run, signed_in_client


def counts() -> tuple:
    return (Training.select().count(), ActivationSet.select().count(), Template.select().count())


def any_kind(rule: str) -> str:
    """A rule's ``<any(a, b, ...):kind>`` filled with its first choice."""
    return re.sub(r"<any\(([a-z_]+)[^)]*\):kind>", r"\1", rule)


def test_every_route_needs_a_signed_in_user(app):
    anonymous = app.test_client()
    assert anonymous.get("/health").status_code == 200
    assert anonymous.get("/login").status_code == 200
    page = anonymous.get("/trainings/new")
    assert page.status_code == 302 and "/login" in page.headers["Location"]
    assert anonymous.get("/api/trainings").status_code == 401
    assert anonymous.post("/api/trainings", json=QUICK_CONFIG).status_code == 401
    assert anonymous.post("/trainings/1/cancel").status_code == 401
    for rule in app.url_map.iter_rules():
        if rule.endpoint in ("static", "auth.login", "auth.health"):
            continue
        url = any_kind(rule.rule.replace("<int:", "<"))
        for arg in rule.arguments:
            url = url.replace(f"<{arg}>", "1")
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            status = anonymous.open(url, method=method).status_code
            assert status in (302, 401), (method, url, status)


def test_sign_in_with_the_password_and_only_with_it(app):
    user, password = create_user("ada", "a long enough password")
    c = app.test_client()
    assert c.post("/login", data={"username": "ada", "password": "wrong password!"}).status_code == 401
    assert c.get("/").status_code == 302
    signed = c.post("/login?next=/sources/", data={"username": "ada", "password": "a long enough password"})
    assert signed.status_code == 303 and signed.headers["Location"].endswith("/sources/")
    assert c.get("/").status_code == 200
    assert c.post("/login?next=//evil.example/x", data={"username": "ada", "password": "a long enough password"}
                  ).headers["Location"] == "/"  # never sent off the site
    c.post("/logout")
    assert c.get("/").status_code == 302


def test_an_api_token_works_until_it_is_revoked(app, client):
    run = create_run(client)
    token, plain = create_token(client.user, "script")
    bearer = {"Authorization": f"Bearer {plain}"}
    other = app.test_client()
    assert other.get(f"/api/trainings/{run.id}", headers=bearer).status_code == 200
    assert client.post(f"/account/tokens/{token.id}/revoke").status_code == 303
    assert other.get(f"/api/trainings/{run.id}", headers=bearer).status_code == 401
    assert ApiToken.get_by_id(token.id).revoked_at is not None
    page = client.post("/account/tokens", data={"name": "ci"}).get_data(as_text=True)
    assert 'id="new-token"' in page and "sae_" in page


def test_the_api_ignores_the_session_cookie(app, client):
    """A cross-site form riding on the cookie reaches nothing: the API wants a bearer token."""
    run = create_run(client)
    cookie_only = client.environ_base.pop("HTTP_AUTHORIZATION")
    assert client.post(f"/api/trainings/{run.id}/cancel").status_code == 401
    assert Training.get_by_id(run.id).status == "queued" and not Training.get_by_id(run.id).cancel_requested
    client.environ_base["HTTP_AUTHORIZATION"] = cookie_only


def test_a_foreign_origin_changes_nothing(client):
    run = create_run(client)
    response = client.post(f"/trainings/{run.id}/cancel", headers={"Origin": "https://evil.example"})
    assert response.status_code == 403 and Training.get_by_id(run.id).status == "queued"
    assert client.post(f"/trainings/{run.id}/cancel", headers={"Origin": "http://localhost"}).status_code == 303


def test_an_unknown_host_is_refused(client):
    assert client.get("/", headers={"Host": "rebind.evil.example"}).status_code == 400


def test_only_the_creator_or_an_admin_may_change_a_run(app, client):
    run = create_run(client)
    viewer = signed_in_client(app, "viewer", is_admin=False)
    assert viewer.get(f"/trainings/{run.id}").status_code == 200  # one team: everyone sees everything
    assert viewer.post(f"/trainings/{run.id}/cancel").status_code == 403
    assert viewer.post(f"/api/trainings/{run.id}/cancel").status_code == 403
    assert viewer.delete(f"/api/trainings/{run.id}").status_code == 403
    assert Training.get_by_id(run.id).status == "queued"
    assert viewer.get("/users/").status_code == 403
    assert client.post(f"/trainings/{run.id}/cancel").status_code == 303  # its creator may
    assert Training.get_by_id(run.id).created_by_id == client.user.id


@pytest.mark.parametrize("url", [
    "/trainings/new?template=%C2%B2", "/trainings/new?from=" + "9" * 23, "/trainings/" + "9" * 23,
    "/trainings/" + "9" * 23 + "/progress", "/compare?ids=" + "9" * 23 + "&ids=1", "/api/trainings/" + "9" * 40,
    "/features/" + "9" * 30, "/trainings/new?source_id=" + "9" * 30, "/api/trainings/1/metrics?since=" + "9" * 30,
])
def test_huge_and_odd_ids_are_a_4xx(client, url):
    before = counts()
    assert client.get(url).status_code < 500
    assert counts() == before


@pytest.mark.parametrize("field", ["latent_dim", "total_steps", "batch_size", "l1_alpha", "target_l0"])
def test_huge_numbers_on_the_hints_route_are_a_4xx(client, field):
    data = {k: ("y" if v is True else str(v)) for k, v in QUICK_CONFIG.items() if v is not False and v is not None}
    for value in ("1" + "0" * 400, "1e400", "-1e400", "nan"):
        assert client.post("/trainings/hints", data={**data, field: value}).status_code < 500
        assert client.post("/trainings/recommend", data={**data, field: value}).status_code < 500
        assert client.post("/api/trainings", json={**QUICK_CONFIG, field: 10**400}).status_code == 422


def test_deeply_nested_json_is_refused(client):
    before = counts()
    nested = "[" * 100_000 + "]" * 100_000
    response = client.post("/api/trainings", data=nested, content_type="application/json")
    assert 400 <= response.status_code < 500
    upload = client.post("/templates/import", data={"file": (io.BytesIO(nested.encode()), "t.json")},
                         content_type="multipart/form-data")
    assert 400 <= upload.status_code < 500
    assert counts() == before


def test_bodies_have_limits_that_fit_their_route(client):
    huge = json.dumps({**QUICK_CONFIG, "name": "x" * 2_000_000})
    response = client.post("/api/trainings", data=huge, content_type="application/json")
    assert response.status_code == 413 and "request is larger" in response.json["error"]
    page = client.post("/templates/import", data={"file": (io.BytesIO(b"[" + b" " * 2_000_000 + b"]"), "t.json")},
                       content_type="multipart/form-data")
    assert page.status_code == 413 and "file is larger" in page.get_data(as_text=True)


def safetensors_with_header(header) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * 64


@pytest.mark.parametrize("header", [
    [1, 2, 3],
    {"x": {"dtype": "F32", "shape": [32, 4]}},
    {"x": {"dtype": "F32", "shape": [32, 4], "data_offsets": [-8, 504]}},
    {"x": {"dtype": "F32", "shape": [32, 4], "data_offsets": [0, 10**30]}},
    {"x": {"dtype": "F32", "shape": "wide", "data_offsets": [0, 512]}},
    {"x": "not a tensor"},
])
def test_malformed_safetensors_headers_are_refused_at_the_file_field(client, header):
    before = counts()
    response = client.post("/sources/upload", data={"file": (io.BytesIO(safetensors_with_header(header)),
                                                              "x.safetensors")}, content_type="multipart/form-data")
    assert response.status_code == 422 and 'data-field="file"' in response.get_data(as_text=True)
    assert counts() == before


def test_a_zip_with_a_bad_crc_or_a_bomb_is_refused(client):
    good = io.BytesIO()
    with zipfile.ZipFile(good, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("cfg.json", "{}" + " " * 100)
        zf.writestr("sae_weights.safetensors", b"\0" * 5_000_000)  # inflates ~1000:1
    data = bytearray(good.getvalue())
    for name, payload in (("bomb.zip", bytes(data)),):
        response = client.post("/imports/", data={"file": (io.BytesIO(payload), name), "source_id": "1",
                                                  "sample_tokens": "1000"}, content_type="multipart/form-data")
        assert response.status_code == 422 and "Refused" in response.get_data(as_text=True)
    crc = io.BytesIO()
    with zipfile.ZipFile(crc, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("cfg.json", '{"d_in": 4}')
        zf.writestr("sae_weights.safetensors", b"abcdefgh")
    broken = crc.getvalue().replace(b"abcdefgh", b"abcdefgX")
    response = client.post("/imports/", data={"file": (io.BytesIO(broken), "crc.zip"), "source_id": "1",
                                              "sample_tokens": "1000"}, content_type="multipart/form-data")
    assert response.status_code == 422 and "Refused" in response.get_data(as_text=True)


def test_scripts_and_styles_are_linked_by_their_content_and_kept_until_it_changes(client):
    """A page links style.css, htmx and app.js under their content's hash, which may be cached for a year;
    the same file under no hash, another hash, or a path outside the folder is not kept (or not served)."""
    import hashlib
    import re

    from app.config import ROOT

    html = client.get("/").get_data(as_text=True)
    linked = dict(re.findall(r'(?:href|src)="/static/([\w./-]+)\?v=([0-9a-f]{12})"', html))
    assert set(linked) == {"style.css", "vendor/htmx.min.js", "app.js"}
    for name, v in linked.items():
        assert v == hashlib.sha256((ROOT / "static" / name).read_bytes()).hexdigest()[:12]
        kept = client.get(f"/static/{name}?v={v}")
        assert kept.status_code == 200 and kept.cache_control.max_age == 365 * 24 * 3600
        for url in (f"/static/{name}", f"/static/{name}?v=000000000000"):
            response = client.get(url)
            assert response.status_code == 200 and response.cache_control.max_age is None, url
            assert response.cache_control.no_cache, url
    assert client.get("/static/../app/config.py?v=000000000000").status_code == 404


def test_pages_carry_security_headers(client):
    response = client.get("/")
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "same-origin"


def test_a_text_file_without_blank_lines_is_read_in_bounded_pieces(tmp_path):
    from app.extraction.text import MAX_DOCUMENT_CHARS, TextSpec, documents

    path = tmp_path / "one-line.txt"
    path.write_text("word " * (MAX_DOCUMENT_CHARS // 2))  # 2.5 MB on a single line
    pieces = list(documents(TextSpec("file", path=str(path))))
    assert len(pieces) == 3 and max(map(len, pieces)) <= MAX_DOCUMENT_CHARS
    assert "".join(pieces) == path.read_text()


def test_an_auto_tune_that_cannot_fit_is_refused_at_its_field(client):
    big = client.post("/sources/synthetic", data={"d_in": "16384", "n_features": "1000", "mean_active": "5",
                                                  "seed": "0"})
    assert big.status_code == 303
    source = ActivationSet.select().order_by(ActivationSet.id.desc()).get()
    response = client.post("/tunes/", data=form_data_for_tune(source.id, latent_dim=1_048_576))
    assert response.status_code == 422 and "needs about" in response.get_data(as_text=True)
    from app.models import TuneJob

    assert TuneJob.select().count() == 0


def form_data_for_tune(source_id: int, **changes) -> dict:
    data = {k: ("y" if v is True else str(v)) for k, v in QUICK_CONFIG.items() if v is not False and v is not None}
    return {**data, "source_id": str(source_id), **{k: str(v) for k, v in changes.items()}}


def test_a_model_over_the_size_limit_is_refused_before_any_download(env, tiny_models, monkeypatch):
    monkeypatch.setenv("MAX_MODEL_GB", "0.000001")  # about 1 KB: every real model is over it
    from app import create_app

    app = create_app({"TESTING": True, "WTF_CSRF_ENABLED": False, "SERVER_NAME": "localhost"})
    with app.app_context():
        client = signed_in_client(app)
        response = client.post("/extractions/", data={"model_name": str(tiny_models["gpt2"]), "layer": "0",
                                                      "site": "resid", "text_kind": "stdlib", "token_budget": "2048",
                                                      "context_length": "32", "batch_size": "4", "dtype": "float32",
                                                      "model_dtype": "float32"})
        assert response.status_code == 422 and "over this app&#39;s limit" in response.get_data(as_text=True)
        from app.models import Extraction

        assert Extraction.select().count() == 0


def test_reasons_never_show_credentials_or_server_paths(client, env):
    from app.work import lifecycle

    run = create_run(client)
    Training.update(status="running").where(Training.id == run.id).execute()
    lifecycle.fail(run, f"ConnectionError: redis://:hunter2secret@10.0.0.5:6379/0 refused; "
                        f"file {env['DATA_DIR']}/runs/{run.id}/sae.safetensors")
    reason = client.get(f"/api/trainings/{run.id}").json["reason"]
    assert "hunter2secret" not in reason and "redis://:***@" in reason
    assert env["DATA_DIR"] not in reason and f"DATA_DIR/runs/{run.id}" in reason


def test_api_links_use_the_configured_external_url(env, monkeypatch):
    monkeypatch.setenv("EXTERNAL_URL", "https://sae.example.org")
    from app import create_app

    app = create_app({"TESTING": True, "WTF_CSRF_ENABLED": False, "SERVER_NAME": "localhost"})
    with app.app_context():
        client = signed_in_client(app)
        body = client.post("/api/trainings", json=QUICK_CONFIG).json
        assert body["url"] == f"https://sae.example.org/trainings/{body['id']}"
        assert app.config["SESSION_COOKIE_SECURE"] is True  # behind TLS the session cookie is Secure


def test_a_cross_site_post_to_any_state_changing_route_changes_nothing(app, client):
    run = create_run(client)
    before = counts()
    statuses = {}
    for rule in app.url_map.iter_rules():
        for method in rule.methods & {"POST", "DELETE"}:
            url = any_kind(rule.rule)
            for arg in rule.arguments:
                url = url.replace(f"<int:{arg}>", str(run.id)).replace(f"<{arg}>", str(run.id))
            headers = {"Origin": "https://evil.example"}
            if url.startswith("/api/"):  # a browser on another site has the cookie, never the token
                response = app.test_client().open(url, method=method, headers=headers, data={"x": "1"})
            else:
                response = client.open(url, method=method, headers=headers, data={"x": "1"})
            statuses[f"{method} {url}"] = response.status_code
    assert all(s in (401, 403) for s in statuses.values()), statuses
    assert len(statuses) >= 25 and counts() == before
    assert Training.get_by_id(run.id).status == "queued"


def test_the_worker_runs_only_the_apps_own_jobs(env, run_worker, tmp_path):
    from rq import Queue

    from app.work.queue import SERIALIZER, connection

    marker = tmp_path / "pwned"
    queue = Queue(env["QUEUE_NAME"], connection=connection(env | {"REDIS_URL": env["REDIS_URL"]}), serializer=SERIALIZER)
    job = queue.enqueue("pathlib.Path.touch", str(marker))
    run_worker()
    job.refresh()
    assert not marker.exists() and job.get_status() == "failed"
    assert "not a SAE Studio job function" in job.latest_result().exc_string
