"""Streamed sources through the API and a real worker: one forward pass feeds a sweep over layers,
each member exports as its own hook point, and a run's hook point is checked before any compute."""
from __future__ import annotations

import io
import itertools
import json
import zipfile
from pathlib import Path

from app.extraction.text import stdlib_docstrings
from flask import current_app

from app.models import ActivationSet, Event, FeatureStat, Sweep, Training
from app.work.features import create_feature_job
from conftest import QUICK_CONFIG, reload

BASE = {**QUICK_CONFIG, "architecture": "topk", "l1_alpha": None, "latent_dim": 128, "k": 8, "target_l0": 8 / 128,
        "batch_size": 128, "total_steps": 60, "lr_warmup_steps": 5, "dead_window_tokens": 2_000}


def make_source(client, model, **fields):
    return client.post("/api/sources/streamed", json={"model_name": str(model), "context_length": 48,
                                                      "buffer_tokens": 2048, **fields})


def docstring_dataset(folder) -> str:
    """A corpus of 600 stdlib docstrings saved as a Hugging Face dataset (counted to its end at once)."""
    import datasets

    datasets.Dataset.from_dict({"text": list(itertools.islice(stdlib_docstrings(), 600))}).save_to_disk(str(folder))
    return str(folder)


def test_bad_streamed_sources_are_refused_at_their_field(client, env, tiny_models):
    cases = [({"layers": "1-7"}, "layers", "3 layers"), ({"layers": "2-1"}, "layers", "backwards"),
             ({"layers": "one"}, "layers", "not a layer"), ({"layers": "0", "buffer_tokens": 10}, "buffer_tokens", ""),
             ({"layers": "0", "site": "nowhere"}, "site", "")]
    for fields, field, words in cases:
        response = make_source(client, tiny_models["gpt2"], **fields)
        assert response.status_code == 422, fields
        assert field in response.json["errors"] and words in " ".join(response.json["errors"][field]), response.json
    assert ActivationSet.select().where(ActivationSet.kind == "streamed").count() == 0


def test_a_streamed_sweep_over_two_layers_trains_from_one_pass(client, env, tiny_models, run_worker, monkeypatch,
                                                              tmp_path):
    monkeypatch.setenv("FEATURES_AFTER_TRAINING", "0")  # one member's are asked for below: the same code, half the time
    response = make_source(client, tiny_models["gpt2"], layers="0,2", site="resid", text_kind="hf",
                           dataset_name=docstring_dataset(tmp_path / "docstrings"))
    assert response.status_code == 201, response.json
    source = response.json
    assert source["kind"] == "streamed" and source["d_in"] == 32 and source["training_tokens"] is None
    details = source["details"]
    assert details["hooks"] == ["0.resid", "2.resid"] and details["corpus_counted"] and details["corpus_tokens"] > 10_000
    # the buffers are counted before any compute: two rounds of 2,048 float32 rows of 32, per layer
    assert details["resident_bytes"] >= 2 * 2048 * 32 * 4 * 2
    # a hook point the source does not stream is refused at its field, and so is one on a plain source
    wrong = client.post("/api/trainings", json={**BASE, "source_id": source["id"], "hook_point": "1.resid"})
    assert wrong.status_code == 422 and "0.resid, 2.resid" in " ".join(wrong.json["errors"]["hook_point"])
    plain = client.post("/api/trainings", json={**BASE, "source_id": 1, "hook_point": "0.resid"})
    assert plain.status_code == 422 and "no hook points" in " ".join(plain.json["errors"]["hook_point"])
    # more tokens than the corpus holds: told before the run starts
    long_run = client.post("/api/trainings", json={**BASE, "source_id": source["id"], "total_steps": 200_000,
                                                   "acknowledge_warnings": False})
    assert long_run.status_code == 422, long_run.json
    assert any(f["field"] == "total_steps" and "repeats it" in f["message"] for f in long_run.json["findings"])
    assert Training.select().count() == 0

    # a store kept while streaming: only a streamed source has one, and the form says what it will take
    plain = client.post("/api/trainings", json={**BASE, "source_id": 1, "keep_store": "float16"})
    assert plain.status_code == 422 and "no store to keep" in " ".join(plain.json["errors"]["keep_store"])
    hints = client.post("/trainings/hints", data={**BASE, "source_id": source["id"], "keep_store": "float16",
                                                  "hook_point": "2.resid"}).get_data(as_text=True)
    assert "keeps a float16 store of the 7,680 tokens it streams at 2.resid" in hints  # 60 steps × 128

    sweep = client.post("/api/sweeps", json={"name": "layers", "base": {**BASE, "source_id": source["id"],
                                                                        "keep_store": "float16"},
                                             "axes": [{"param": "hook_point", "values": ["0.resid", "2.resid"]}]})
    assert sweep.status_code == 201, sweep.json
    assert run_worker().returncode == 0
    assert Sweep.get_by_id(sweep.json["id"]).status == "completed"
    members = [reload(Training.get_by_id(m["id"])) for m in sweep.json["members"]]
    assert [m.hook_point for m in members] == ["0.resid", "2.resid"]
    for member in members:
        assert member.status == "completed", member.reason
        assert 0 < member.summary["fvu"] < 1 and member.summary["l0"] == 8
        assert member.stream_stats["model_tokens_per_s"] > 0 and member.stream_stats["sae_tokens_per_s"] > 0
        # the export says which hook point and model the SAE reads (SAELens's names)
        archive = client.get(f"/trainings/{member.id}/export/saelens.zip")
        assert archive.status_code == 200
        cfg = json.loads(zipfile.ZipFile(io.BytesIO(archive.data)).read(f"sae-studio-run-{member.id}/cfg.json"))
        meta = cfg["metadata"]
        layer = int(member.hook_point.split(".")[0])
        assert meta["hook_name"] == f"blocks.{layer}.hook_resid_post" and meta["model_name"] == str(tiny_models["gpt2"])
        assert meta["context_size"] == 48 and meta["sae_studio"]["norm_scale_folded"] == member.norm_scale
    assert members[0].summary["fvu"] != members[1].summary["fvu"]  # two layers, two SAEs
    page = client.get(f"/trainings/{members[1].id}").get_data(as_text=True)
    assert "2.resid" in page and 'id="stat-stream"' in page

    # the sweep kept one store per hook point: sources that read as extractions of the tokens it streamed
    stores = list(ActivationSet.select().where(ActivationSet.kind == "extracted").order_by(ActivationSet.id))
    assert [(s.params["layer"], s.params["site"]) for s in stores] == [(0, "resid"), (2, "resid")]
    for store, member in zip(stores, members):
        # 60 steps of 128: three rounds of 2,048, and of the fourth only what the steps read
        assert store.params["n_tokens"] == 60 * 128 and store.params["dtype"] == "float16", store.params
        assert store.params["kept_by"] == {"sweep": sweep.json["id"], "streamed_source": source["id"]}
        assert (Path(current_app.config["DATA_DIR"]) / store.path / "meta.json").exists()
        kept = [e for e in Event.select().where(Event.training == member) if e.code == "store_kept"]
        assert len(kept) == 1 and f"source #{store.id}" in kept[0].message
    assert not list((Path(current_app.config["DATA_DIR"]) / "activations").glob(".keeping-*"))  # nothing partial left
    listing = client.get("/sources/").get_data(as_text=True)
    assert f'href="/sweeps/{sweep.json["id"]}">sweep {sweep.json["id"]}</a>' in listing
    from app.work.janitor import orphans

    assert not orphans({**current_app.config, "JANITOR_MIN_AGE_S": 0})  # the janitor leaves the stores alone
    # a run on a kept store trains without the model, and a run of its own keeps one too
    on_store = client.post("/api/trainings", json={**BASE, "source_id": stores[1].id})
    alone = client.post("/api/trainings", json={**BASE, "source_id": source["id"], "hook_point": "2.resid",
                                                "keep_store": "float32", "total_steps": 20})
    assert on_store.status_code == 201 and alone.status_code == 201, (on_store.json, alone.json)

    # the deeper member's features (examples with their tokens, from the corpus's held-out head) and
    # its SAE spliced back into the model at its own layer
    features = create_feature_job(current_app.config, source=members[1].source, training=members[1],
                                  sample_tokens=4096)
    assert client.post(f"/api/trainings/{members[1].id}/downstream", json={"tokens": 2048}).status_code == 202
    assert run_worker().returncode == 0
    features = reload(features)
    assert features.status == "completed", features.reason
    assert features.summary["n_tokens"] == 4096
    examples = [e for stat in FeatureStat.select().where(FeatureStat.job == features) for e in stat.examples]
    assert examples and all(e["tokens"] for e in examples)  # each example reads as text in its context
    downstream = reload(members[1]).summary["downstream"]
    assert downstream["layer"] == 2 and downstream["site"] == "resid" and downstream["tokens"] > 0
    on_store, alone = (Training.get_by_id(r.json["id"]) for r in (on_store, alone))
    assert on_store.status == "completed" and 0 < on_store.summary["fvu"] < 1, on_store.reason
    assert on_store.source.stats().hooks is None and on_store.stream_stats is None  # no model ran for it
    assert alone.status == "completed", alone.reason
    own = ActivationSet.get(ActivationSet.name.contains(f"(kept by run {alone.id})"))
    assert own.params["dtype"] == "float32" and own.params["n_tokens"] == 2560 and own.params["layer"] == 2
    # 20 steps of 128 tokens: the first 2,560 of the sweep's tokens at that layer, in the same (corpus) order
    from app.extraction.store import open_shards

    (a, ai), (b, bi) = (open_shards(Path(current_app.config["DATA_DIR"]) / s.path) for s in (own, stores[1]))
    import numpy as np

    assert np.array_equal(np.concatenate(ai), np.concatenate(bi)[:2560])
    np.testing.assert_allclose(np.concatenate(a), np.concatenate(b)[:2560].astype(np.float32), rtol=1e-2, atol=1e-2)

    # resumed after its store was kept (as a cancelled run would be), a run does not add to it, and says so
    from app.work.streams import Keeping

    told = []
    keeping = Keeping(alone, {"2.resid": "float32"}, current_app.config, notify=lambda *event: told.append(event))

    class Stream:
        d_in = 32

        def keep(self, stores):
            raise AssertionError("nothing is kept again")

    keeping.attach(Stream())
    assert not keeping.stores and told[0][2] == "store_already_kept" and f"source #{own.id}" in told[0][3]
    # the janitor keeps a partial store while its job is queued, running or resumable, and no longer
    data = Path(current_app.config["DATA_DIR"]) / "activations"
    queued = client.post("/api/trainings", json={**BASE, "source_id": source["id"], "keep_store": "float16"}).json
    for name in (f".keeping-run-{queued['id']}-0.resid", f".keeping-run-{alone.id}-2.resid", ".keeping-run-999-0.resid"):
        (data / name).mkdir()
    left = {p.name for p in orphans({**current_app.config, "JANITOR_MIN_AGE_S": 0})}
    assert left == {f".keeping-run-{alone.id}-2.resid", ".keeping-run-999-0.resid"}, left
