"""Limits that hold before anything reads a body, names that cannot walk out of the model and
dataset roots, and the inputs that used to answer 5xx: each is refused with a clear reason, at
its field where it has one, and nothing is written or read beyond the limit."""
from __future__ import annotations

import io
import json
import re

import pytest

from app.models import ActivationSet, Extraction, Template, Training, TuneJob
from conftest import QUICK_CONFIG, create_run, sign_in

MB = 2**20


class CountingBody(io.RawIOBase):
    """A request body of ``size`` bytes that is made as it is read and counts what was read."""

    def __init__(self, size: int, head: bytes = b"") -> None:
        self.size, self.head, self.consumed = size, head, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.size - self.consumed)
        if n <= 0:
            return 0
        start = self.consumed
        chunk = (self.head[start:start + n] if start < len(self.head) else b"")
        chunk += b"a" * (n - len(chunk))
        buffer[:n] = chunk
        self.consumed += n
        return n


@pytest.fixture
def csrf_app(env):
    """The app as it is served: CSRF protection on (its hook reads the form of every POST)."""
    from app import create_app

    app = create_app({"TESTING": True, "SERVER_NAME": "localhost"})
    with app.app_context():
        yield app


def csrf_token(client) -> str:
    html = client.get("/templates/").get_data(as_text=True)
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def signed_in(app):
    from app.auth import create_user

    user, _ = create_user("limits", "correct horse battery", is_admin=True)
    client = app.test_client()
    sign_in(client, user)
    client.environ_base.pop("HTTP_AUTHORIZATION")  # the pages: cookie and CSRF token only
    return client


def post_stream(client, url, body: CountingBody, *, chunked: bool = False, headers: dict | None = None,
                content_type: str = "application/x-www-form-urlencoded"):
    """POST ``body`` as a stream: with its Content-Length, or chunked (no Content-Length; a WSGI
    server that de-chunks says so with ``wsgi.input_terminated``, as gunicorn does)."""
    from flask.testing import EnvironBuilder
    from werkzeug.wrappers import Request

    environ = EnvironBuilder(client.application, url, method="POST", content_type=content_type,
                             headers=headers or {}).get_environ()
    environ["wsgi.input"] = body
    if chunked:
        environ.pop("CONTENT_LENGTH", None)
        environ["wsgi.input_terminated"] = True
    else:
        environ["CONTENT_LENGTH"] = str(body.size)
    return client.open(Request(environ))


# --- 1. body limits, before anything reads the body ---------------------------------------

MULTIPART = "multipart/form-data; boundary=xyz"
FILE_PART = b'--xyz\r\nContent-Disposition: form-data; name="f"; filename="f.bin"\r\n\r\n'
BODIES = [  # a form (its fields are capped by Werkzeug on their own) and a file part (no cap of its own)
    pytest.param(False, "application/x-www-form-urlencoded", id="form-with-length"),
    pytest.param(False, MULTIPART, id="file-with-length"),
    pytest.param(True, "application/x-www-form-urlencoded", id="form-chunked"),
    pytest.param(True, MULTIPART, id="file-chunked"),
]


def body_for(content_type: str, fields: bytes) -> CountingBody:
    if content_type == MULTIPART:
        return CountingBody(20 * MB, FILE_PART)
    return CountingBody(20 * MB, fields)


def assert_not_read(body: CountingBody, chunked: bool) -> None:
    """Refused on its Content-Length before a byte is read; chunked, read no further than the limit."""
    assert body.consumed == 0 if not chunked else body.consumed <= MB + 64 * 1024, body.consumed


@pytest.mark.parametrize("chunked, content_type", BODIES)
def test_an_anonymous_oversize_sign_in_is_refused_without_reading_it(csrf_app, chunked, content_type):
    body = body_for(content_type, b"username=ada&password=")
    response = post_stream(csrf_app.test_client(), "/login", body, chunked=chunked, content_type=content_type)
    assert response.status_code == 413 and "larger than the limit of 1.0 MB" in response.get_data(as_text=True)
    assert_not_read(body, chunked)


@pytest.mark.parametrize("chunked, content_type", BODIES)
def test_a_signed_in_oversize_body_on_the_hints_route_is_refused(csrf_app, chunked, content_type):
    client = signed_in(csrf_app)
    token = csrf_token(client)
    body = body_for(content_type, f"csrf_token={token}&name=".encode())
    response = post_stream(client, "/trainings/hints", body, chunked=chunked, headers={"X-CSRFToken": token},
                           content_type=content_type)
    assert response.status_code == 413
    assert_not_read(body, chunked)


def template_file(n: int) -> bytes:
    one = {"architecture": "standard", "latent_dim": 1024, "l1_alpha": 0.005, "learning_rate": 0.001,
           "batch_size": 512, "total_steps": 1000, "lr_warmup_steps": 50, "l1_warmup_steps": 50, "target_l0": 0.02}
    return json.dumps([{"name": f"t{i}", **one} for i in range(n)]).encode()


def test_a_template_import_over_one_megabyte_creates_nothing(csrf_app):
    client = signed_in(csrf_app)
    token = csrf_token(client)
    payload = template_file(12_000)  # 2.46 MB, as in the issue
    assert 2 * MB < len(payload) < 4 * MB
    before = Template.select().count()
    response = client.post("/templates/import", data={"csrf_token": token, "file": (io.BytesIO(payload), "t.json")},
                           content_type="multipart/form-data")
    assert response.status_code == 413 and "file is larger than the limit of 1.0 MB" in response.get_data(as_text=True)
    assert Template.select().count() == before
    anonymous = csrf_app.test_client().post("/templates/import", data={"file": (io.BytesIO(payload), "t.json")},
                                            content_type="multipart/form-data")
    assert anonymous.status_code == 413 and Template.select().count() == before
    small = client.post("/templates/import", data={"csrf_token": token, "file": (io.BytesIO(template_file(2)),
                                                                                  "t.json")},
                        content_type="multipart/form-data")
    assert small.status_code == 303 and Template.select().count() == before + 2  # under the limit: imported


def test_an_oversize_body_on_a_route_without_a_file_is_a_413_not_a_500(client):
    big = {"x": "y" * (2 * MB)}
    before = ActivationSet.select().count()
    for url in ("/sources/synthetic", "/extractions/1/cancel", "/features/1/cancel", "/trainings/hints"):
        response = client.post(url, data=big)
        assert response.status_code == 413, url
        assert "request is larger than the limit of 1.0 MB" in response.get_data(as_text=True), url
    assert ActivationSet.select().count() == before
