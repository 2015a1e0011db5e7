"""Deleting runs, sources, extractions, imported SAEs and templates, from the pages and the API;
and the janitor that removes what nothing owns."""
from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np
from flask import current_app

from app.models import ActivationSet, Event, FeatureJob, ImportedSAE, MetricPoint, Template, Training
from app.work import janitor
from app.work.training import sae_folder
from conftest import create_run


def upload(client, env) -> ActivationSet:
    rows = np.random.default_rng(0).normal(size=(4096, 32)).astype(np.float32)
    buf = io.BytesIO()
    np.save(buf, rows)
    response = client.post("/sources/upload", data={"file": (io.BytesIO(buf.getvalue()), "acts.npy")},
                           content_type="multipart/form-data")
    assert response.status_code == 303
    return ActivationSet.select().order_by(ActivationSet.id.desc()).get()


def test_delete_a_finished_run_asks_once_and_removes_its_rows_and_files(client, env, run_worker, monkeypatch):
    monkeypatch.setenv("FEATURES_AFTER_TRAINING", "1")
    run = create_run(client)
    run_worker()
    run = Training.get_by_id(run.id)
    assert run.status == "completed" and FeatureJob.select().where(FeatureJob.training == run.id).count() == 1
    folder = Path(env["DATA_DIR"]) / "runs" / str(run.id)
    assert sae_folder(run, current_app.config).parent == folder and run.final_name.startswith("final-a1-")
    ask = client.get(f"/trainings/{run.id}/delete").get_data(as_text=True)
    assert "20 metric points" in ask and "feature-statistics job" in ask and 'id="confirm-delete"' in ask
    assert Training.get_or_none(Training.id == run.id) is not None  # asking changes nothing
    assert client.post(f"/trainings/{run.id}/delete").status_code == 303
    assert Training.get_or_none(Training.id == run.id) is None
    assert MetricPoint.select().where(MetricPoint.training == run.id).count() == 0
    assert Event.select().where(Event.training == run.id).count() == 0
    assert FeatureJob.select().count() == 0 and not folder.exists()
    assert client.get(f"/trainings/{run.id}").status_code == 404


def test_a_running_run_and_a_used_source_are_refused_naming_why(client, env):
    source = upload(client, env)
    run = create_run(client, source_id=source.id, latent_dim=64)
    Training.update(status="running").where(Training.id == run.id).execute()
    refused = client.delete(f"/api/trainings/{run.id}")
    assert refused.status_code == 409 and "cancel it first" in refused.json["error"]
    refused = client.post(f"/sources/{source.id}/delete")
    assert refused.status_code == 409 and f"#{run.id}" in refused.get_data(as_text=True)
    assert (Path(env["DATA_DIR"]) / source.path).exists()
    page = client.get(f"/sources/{source.id}/delete").get_data(as_text=True)
    assert 'id="delete-refused"' in page and 'id="confirm-delete"' not in page
    Training.update(status="cancelled").where(Training.id == run.id).execute()
    assert client.delete(f"/api/trainings/{run.id}").status_code == 200
    gone = client.delete(f"/api/sources/{source.id}")
    assert gone.status_code == 200 and ActivationSet.get_or_none(ActivationSet.id == source.id) is None
    assert not (Path(env["DATA_DIR"]) / source.path).exists()


def test_a_queued_run_deleted_before_a_worker_takes_it_does_nothing(client, env, run_worker):
    run = create_run(client)
    assert client.delete(f"/api/trainings/{run.id}").status_code == 200
    done = run_worker()
    assert done.returncode == 0 and Training.select().count() == 0
    assert not (Path(env["DATA_DIR"]) / "runs" / str(run.id)).exists()


def test_templates_and_imported_saes_delete_through_the_api(client, env):
    template = Template.select().first()
    assert client.delete(f"/api/templates/{template.id}").status_code == 200
    assert Template.get_or_none(Template.id == template.id) is None
    folder = Path(env["DATA_DIR"]) / "imported" / "abc"
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text("{}")
    sae = ImportedSAE.create(name="x", architecture="standard", d_in=256, d_sae=512, path="imported/abc")
    assert client.delete(f"/api/imports/{sae.id}").status_code == 200 and not folder.exists()
    assert client.delete("/api/imports/999").status_code == 404


def test_the_janitor_removes_only_old_files_that_nothing_owns(client, env):
    source = upload(client, env)
    data = Path(env["DATA_DIR"])
    orphan_partial = data / "activations" / ".partial-77"
    orphan_partial.mkdir(parents=True)
    (orphan_partial / "shard.npy").write_bytes(b"x")
    orphan_run = data / "runs" / "999"
    orphan_run.mkdir(parents=True)
    half_written = data / "runs" / "1" / "checkpoint.pt.tmp"
    half_written.parent.mkdir(parents=True)
    half_written.write_bytes(b"x")
    # checkpoints: the one the row names stays; one no row names (its writer lost its claim, or was
    # killed before it committed it) goes
    in_force, uncommitted = (data / "runs" / "1" / f"checkpoint-a{a}-s60-0123abcd.pt" for a in (2, 1))
    for path in (in_force, uncommitted):
        path.write_bytes(b"x")
    young = data / "uploads" / "in-flight.npy"
    young.parent.mkdir(parents=True, exist_ok=True)
    young.write_bytes(b"x")
    old = time.time() - 7200
    for path in (orphan_partial, orphan_run, half_written, in_force, uncommitted, data / source.path):
        os.utime(path, (old, old))
    run = create_run(client)  # run #1 exists: its folder stays, its stray .tmp goes
    Training.update(checkpoint_name=in_force.name, checkpoint_at=60).where(Training.id == run.id).execute()
    removed = set(janitor.clean(current_app.config))
    assert removed == {"activations/.partial-77", "runs/999", "runs/1/checkpoint.pt.tmp",
                       f"runs/1/{uncommitted.name}"}
    assert (data / source.path).exists() and young.exists() and in_force.exists()


def test_the_janitor_removes_final_folders_the_row_does_not_name_never_the_named_one(client, env):
    """A run's final SAE lies in a folder of the attempt that saved it, named on the row by that
    attempt's end. Old folders no row names go (a process killed between saving and its end, or
    whose end was refused), and so do the old layout's files beside a named folder; the named
    folder stays, and so do the files of a run from before final folders (nothing named)."""
    data = Path(env["DATA_DIR"])
    named_run, old_run = create_run(client), create_run(client)
    named, unnamed, young = (data / "runs" / str(named_run.id) / f"final-a{a}-0123abc{a}" for a in (2, 1, 3))
    legacy_beside = data / "runs" / str(named_run.id) / "sae.safetensors"
    legacy_alone = [data / "runs" / str(old_run.id) / name
                    for name in ("sae.safetensors", "frequencies.npy", "cfg.json")]
    for folder in (named, unnamed, young):
        folder.mkdir(parents=True)
        (folder / "sae.safetensors").write_bytes(b"x")
    legacy_alone[0].parent.mkdir(parents=True)
    for path in (legacy_beside, *legacy_alone):
        path.write_bytes(b"x")
    old = time.time() - 7200
    for path in (named, unnamed, legacy_beside, *legacy_alone):
        os.utime(path, (old, old))
    Training.update(status="completed", final_name=named.name).where(Training.id == named_run.id).execute()
    Training.update(status="completed").where(Training.id == old_run.id).execute()
    removed = set(janitor.clean(current_app.config))
    assert removed == {f"runs/{named_run.id}/{unnamed.name}", f"runs/{named_run.id}/sae.safetensors"}
    assert named.is_dir() and young.is_dir() and all(path.exists() for path in legacy_alone)
    assert sae_folder(Training.get_by_id(named_run.id), current_app.config) == named
    assert sae_folder(Training.get_by_id(old_run.id), current_app.config) == legacy_alone[0].parent
