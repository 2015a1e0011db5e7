"""Activation files: what is accepted, what is refused with its reason, and nothing kept."""
from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from app.models import ActivationSet
from app.sae.files import ActivationFileError, inspect_activation_file
from conftest import signed_in_client

ROOT = Path(__file__).resolve().parent.parent


def npy_bytes(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def upload(client, name: str, payload: bytes):
    return client.post("/sources/upload", data={"name": "", "file": (io.BytesIO(payload), name)},
                       content_type="multipart/form-data")


def stored_files(env) -> list[Path]:
    data = Path(env["DATA_DIR"])
    return [p for sub in ("uploads", "sources") if (data / sub).exists() for p in (data / sub).iterdir()]


def upload_error(response) -> str:
    found = re.findall(r'<p class="error" data-field="file">([^<]*)</p>', response.get_data(as_text=True))
    assert found, "no error shown at the file field"
    return found[0]


def good_array(rows=2048, d=16, dtype=np.float32):
    return np.random.default_rng(0).normal(size=(rows, d)).astype(dtype)


def test_npy_upload_is_kept_and_listed(client, env):
    response = upload(client, "acts.npy", npy_bytes(good_array()))
    assert response.status_code == 303
    source = ActivationSet.get(ActivationSet.kind == "file")
    assert source.d_in == 16 and source.n_tokens == 2048 - 102  # 5% held out for evaluation
    assert (Path(env["DATA_DIR"]) / source.path).exists()
    assert not (Path(env["DATA_DIR"]) / "uploads").exists() or not list((Path(env["DATA_DIR"]) / "uploads").iterdir())
    assert "acts.npy" in client.get("/sources/").get_data(as_text=True)


def test_safetensors_upload(client, env, tmp_path):
    save_file({"activations": good_array(), "token_ids": np.arange(2048, dtype=np.float32).reshape(2048, 1)},
              str(tmp_path / "a.safetensors"))
    response = upload(client, "a.safetensors", (tmp_path / "a.safetensors").read_bytes())
    assert response.status_code == 303
    source = ActivationSet.get(ActivationSet.kind == "file")
    assert source.params["array"]["format"] == "safetensors" and source.d_in == 16


def test_pt_upload_is_converted(client, env, tmp_path):
    torch.save(torch.from_numpy(good_array()), tmp_path / "a.pt")
    response = upload(client, "a.pt", (tmp_path / "a.pt").read_bytes())
    assert response.status_code == 303, upload_error(response)
    source = ActivationSet.get(ActivationSet.kind == "file")
    assert source.path.endswith(".npy") and source.d_in == 16
    kept = np.load(Path(env["DATA_DIR"]) / source.path)
    assert np.array_equal(kept, good_array())


class Boom:
    """Pickling this object plants code that would create a file when unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pt_with_pickled_code_is_refused_without_running_it(client, env, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"activations": torch.zeros(2048, 4), "payload": Boom(str(marker))}, tmp_path / "evil.pt")
    response = upload(client, "evil.pt", (tmp_path / "evil.pt").read_bytes())
    assert response.status_code == 422
    assert "without executing code" in upload_error(response)
    assert not marker.exists()
    assert stored_files(env) == [] and ActivationSet.select().where(ActivationSet.kind == "file").count() == 0


def test_a_pt_file_that_is_not_torch_s_archive_is_refused_without_starting_the_converter(client, env, monkeypatch):
    """Garbage named .pt (or a zip without torch.save's data.pkl) costs no child process importing torch."""
    import zipfile

    import app.work.sources as sources

    started = []
    real_run = sources.subprocess.run
    monkeypatch.setattr(sources.subprocess, "run", lambda *a, **kw: started.append(a) or real_run(*a, **kw))
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a/weights.bin", b"\0" * 64)
    for name, payload, reason in (("garbage.pt", b"\x80\x02not a zip at all", "not the zip archive torch.save writes"),
                                  ("other.pt", archive.getvalue(), "not one torch.save wrote: it has no data.pkl")):
        response = upload(client, name, payload)
        assert response.status_code == 422
        assert reason in upload_error(response) and "Nothing was kept" in upload_error(response)
    assert started == [] and stored_files(env) == []
    buffer = io.BytesIO()
    torch.save(torch.from_numpy(good_array()), buffer)  # a real one still goes to the converter
    assert upload(client, "a.pt", buffer.getvalue()).status_code == 303 and len(started) == 1


@pytest.mark.parametrize("name,payload,reason", [
    ("one_d.npy", npy_bytes(np.zeros(5000, dtype=np.float32)), "2-D"),
    ("ints.npy", npy_bytes(np.zeros((2048, 4), dtype=np.int64)), "float"),
    ("objects.npy", npy_bytes(np.array([[{"a": 1}]] * 2048, dtype=object)), "holds Python objects, not numbers"),
    ("renamed.npy", b"token,activation\n1,0.5\n2,0.25\n", "this is a text file (it begins"),
    ("short.npy", npy_bytes(good_array(rows=100)), "at least 1,024"),
    ("nan.npy", npy_bytes(np.where(np.arange(2048)[:, None] == 1500, np.nan, good_array())), "NaN or Inf (first at row 1,500)"),
    ("inf.npy", npy_bytes(np.full((2048, 4), np.inf, dtype=np.float32)), "NaN or Inf"),
    ("garbage.npy", b"this is not numpy", "not"),
    ("acts.csv", b"1,2,3\n", "unsupported file type .csv"),
    ("garbage.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......", "not a .safetensors"),
    ("garbage.pt", b"not a zip", "without executing code"),
])
def test_bad_files_are_refused_with_the_reason_and_nothing_kept(client, env, name, payload, reason):
    response = upload(client, name, payload)
    assert response.status_code == 422
    message = upload_error(response)
    assert reason in message and "Nothing was kept" in message
    assert "pickle" not in message  # never point a user at unsafe loading
    assert stored_files(env) == []
    assert ActivationSet.select().where(ActivationSet.kind == "file").count() == 0


def test_file_over_the_size_limit_is_refused(env, redis_client):
    from app import create_app

    app = create_app({"TESTING": True, "WTF_CSRF_ENABLED": False, "MAX_UPLOAD_MB": 1})
    with app.app_context():
        response = upload(signed_in_client(app), "big.npy", npy_bytes(np.zeros((40_000, 16), dtype=np.float32)))
        assert response.status_code == 413
        assert "larger than the limit" in upload_error(response)
        assert stored_files(env) == []


def test_inspect_limits_size_before_reading(tmp_path):
    np.save(tmp_path / "a.npy", good_array())
    with pytest.raises(ActivationFileError, match="larger than the limit"):
        inspect_activation_file(tmp_path / "a.npy", min_rows=1, max_bytes=1000)


def test_safetensors_with_several_unnamed_tensors_is_refused(tmp_path):
    save_file({"a": good_array(), "b": good_array()}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ActivationFileError, match="'activations'"):
        inspect_activation_file(tmp_path / "x.safetensors", min_rows=1, max_bytes=10**9)


def test_web_process_never_imports_torch(env):
    code = ("import sys\nfrom app import create_app\napp = create_app({'TESTING': True})\n"
            "with app.app_context():\n"
            "    from app.auth import create_token, create_user, new_session\n"
            "    user, _ = create_user('viewer', 'a long password')\n"
            "    c = app.test_client()\n"
            "    with c.session_transaction() as s:\n"
            "        s['sid'] = new_session(user)\n"
            "    bearer = {'Authorization': 'Bearer ' + create_token(user, 't')[1]}\n"
            "    codes = [c.get(u, headers=bearer).status_code for u in ('/', '/trainings/new', '/sources/', "
            "'/api/trainings')]\n"
            "print(codes, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**__import__('os').environ, **env})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[200, 200, 200, 200] False"


def test_synthetic_source_form(client):
    response = client.post("/sources/synthetic", data={"d_in": 64, "n_features": 128, "mean_active": 3, "seed": 1})
    assert response.status_code == 303
    assert ActivationSet.select().where(ActivationSet.d_in == 64).count() == 1
    response = client.post("/sources/synthetic", data={"d_in": 64, "n_features": 2, "mean_active": 3, "seed": 1})
    assert response.status_code == 422
    assert 'data-field="mean_active"' in response.get_data(as_text=True)
    hard = {"d_in": 32, "n_features": 256, "mean_active": 8, "seed": 2, "structure": "hierarchical"}
    assert client.post("/sources/synthetic", data=hard).status_code == 303
    source = ActivationSet.get(ActivationSet.d_in == 32)
    assert source.params["structure"] == "hierarchical" and source.name.startswith("Synthetic (hierarchical)")
    too_dense = client.post("/sources/synthetic", data={**hard, "mean_active": 100})
    assert too_dense.status_code == 422 and "at most a quarter" in too_dense.get_data(as_text=True)
    assert client.post("/sources/synthetic", data={**hard, "structure": "fractal"}).status_code == 422
