"""Generated input at every surface a user reaches: never a 5xx, and a refused input writes nothing.

Property-based (Hypothesis), derandomized so CI runs the same cases every time. The example
counts per surface add up to 1,430 cases: training form 300, live hints and recommendations 200,
JSON API 250, query parameters 200, activation files 120, SAE zips 100, template JSON 100, extraction
form with corpora 100, extraction API 60.
"""
from __future__ import annotations

import io
import json
import struct
import zipfile

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from app.models import ActivationSet, Extraction, ImportedSAE, Template, Training, TuneJob
from app.training_config import NAMES
from conftest import QUICK_CONFIG

FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def fuzz(examples: int) -> settings:
    return settings(FUZZ, max_examples=examples)

# Values a form field may be sent: numbers in every spelling, text of every kind.
form_values = st.one_of(
    st.integers(min_value=-10**30, max_value=10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", " ", "1e400", "-1e400", "nan", "inf", "1" + "0" * 400, "0x10", "²", "١٢", "1_000", "true",
                     "null", "[]", "{}", "<script>alert(1)</script>", "'; DROP TABLE training; --", "\x00", "é" * 300]),
    st.text(max_size=60),
)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-10**40, max_value=10**40),
              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40)),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=8), children,
                                                                              max_size=3)),
    max_leaves=8)
HTML_FIELDS = sorted(set(NAMES) | {"name", "source_id", "acknowledge_warnings"})


def written() -> tuple:
    return tuple(m.select().count() for m in (Training, TuneJob, Extraction, ActivationSet, ImportedSAE, Template))


def form_data(**changes) -> dict:
    data = {k: ("y" if v is True else str(v)) for k, v in QUICK_CONFIG.items() if v is not False and v is not None}
    return {**data, **changes}


@fuzz(300)
@given(field=st.sampled_from(HTML_FIELDS), value=form_values)
def test_training_form_fields(client, field, value):  # 300 cases
    before = written()
    response = client.post("/trainings", data=form_data(**{field: value}))
    assert response.status_code < 500
    if response.status_code != 303:
        assert written() == before


@fuzz(200)
@given(field=st.sampled_from(HTML_FIELDS), value=form_values, route=st.sampled_from(["hints", "recommend"]))
def test_live_hints_and_recommendations(client, field, value, route):  # 200 cases
    before = written()
    assert client.post(f"/trainings/{route}", data=form_data(**{field: value})).status_code < 500
    assert written() == before  # GET-like helpers never write


@fuzz(250)
@given(changes=st.dictionaries(st.sampled_from(HTML_FIELDS + ["sparsity_coefficient", "l1_coefficient", "extra"]),
                               json_values, max_size=4))
def test_json_api_fields(client, changes):  # 250 cases
    before = written()
    payload = {k: v for k, v in QUICK_CONFIG.items()}
    payload.update(changes)
    response = client.post("/api/trainings", json=payload)
    assert response.status_code < 500
    if response.status_code != 201:
        assert written() == before


@fuzz(200)
@given(path=st.sampled_from(["/trainings/new", "/compare", "/", "/features/1", "/api/trainings/1/metrics",
                             "/templates/", "/sources/"]),
       params=st.dictionaries(st.sampled_from(["template", "from", "source_id", "ids", "page", "sort", "order", "q",
                                               "since", "l1_alpha"]), form_values, max_size=3))
def test_query_parameters(client, path, params):  # 200 cases
    before = written()
    assert client.get(path, query_string=params).status_code < 500
    assert written() == before


def npy_like(body: bytes) -> bytes:
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body


upload_bytes = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=200).map(npy_like),
    st.builds(lambda h, tail: struct.pack("<Q", len(h)) + h + tail, st.text(max_size=120).map(str.encode),
              st.binary(max_size=64)),
    st.builds(lambda obj: struct.pack("<Q", len(json.dumps(obj))) + json.dumps(obj).encode() + b"\0" * 64,
              json_values),
)


@fuzz(120)
@given(data=upload_bytes, suffix=st.sampled_from([".npy", ".safetensors", ".npy", ".safetensors", ".pt"]))
def test_activation_file_parsers(client, data, suffix):  # 120 cases
    before = written()
    response = client.post("/sources/upload", data={"file": (io.BytesIO(data), f"x{suffix}")},
                           content_type="multipart/form-data")
    assert response.status_code < 500
    if response.status_code != 303:
        assert written() == before


def zip_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, body in members.items():
            zf.writestr(name, body)
    return buf.getvalue()


@fuzz(100)
@given(members=st.dictionaries(st.sampled_from(["cfg.json", "sae_weights.safetensors", "sparsity.safetensors",
                                                "a/cfg.json", "x.txt"]),
                               st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode())),
                               max_size=3),
       raw=st.booleans())
def test_sae_zip_imports(client, members, raw):  # 100 cases
    before = written()
    data = bytes(json.dumps(list(members)).encode()) if raw else zip_of(members)
    response = client.post("/imports/", data={"file": (io.BytesIO(data), "sae.zip"), "source_id": "1",
                                              "sample_tokens": "1000"}, content_type="multipart/form-data")
    assert response.status_code < 500
    if response.status_code != 303:
        assert written() == before


@fuzz(100)
@given(payload=json_values)
def test_template_json_imports(client, payload):  # 100 cases
    before = written()
    response = client.post("/templates/import", data={"file": (io.BytesIO(json.dumps(payload).encode()), "t.json")},
                           content_type="multipart/form-data")
    assert response.status_code < 500
    if response.status_code >= 400:
        assert written() == before


@fuzz(100)
@given(body=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)),
       suffix=st.sampled_from([".txt", ".jsonl", ".csv", ".parquet"]),
       fields=st.dictionaries(st.sampled_from(["model_name", "layer", "context_length", "token_budget", "batch_size",
                                               "text_column", "dataset_name", "site", "dtype"]), form_values,
                              max_size=2))
def test_extraction_form_and_corpora(client, body, suffix, fields):  # 100 cases
    before = written()
    data = {"model_name": "bundled:all-MiniLM-L6-v2", "layer": "1", "site": "resid", "text_kind": "file",
            "text_column": "text", "token_budget": "2048", "context_length": "32", "batch_size": "4",
            "dtype": "float32", "model_dtype": "float32", **fields, "text_file": (io.BytesIO(body), f"c{suffix}")}
    response = client.post("/extractions/", data=data, content_type="multipart/form-data")
    assert response.status_code < 500
    if response.status_code != 303:
        assert written() == before


@fuzz(60)
@given(payload=st.dictionaries(st.sampled_from(["model_name", "layer", "site", "text_kind", "dataset_name",
                                                "token_budget", "context_length", "batch_size", "dtype", "x"]),
                               json_values, max_size=4))
def test_extraction_api(client, payload):  # 60 cases
    before = written()
    response = client.post("/api/extractions", json=payload)
    assert response.status_code < 500
    if response.status_code != 201:
        assert written() == before


def test_the_generated_values_reach_the_parsers(client):
    """A sanity check on the harness: a good upload through the same route is accepted."""
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(0).normal(size=(2048, 8)).astype(np.float32))
    response = client.post("/sources/upload", data={"file": (io.BytesIO(buf.getvalue()), "ok.npy")},
                           content_type="multipart/form-data")
    assert response.status_code == 303
