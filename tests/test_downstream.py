"""What an SAE does to the model: the splice itself, and the job through a real worker."""
from __future__ import annotations

import io
import json
import zipfile

import pytest
import torch

from app.extraction.capture_names import BUNDLED_MINILM
from app.extraction.splice import downstream_eval, load_for_eval
from app.extraction.text import stdlib_docstrings
from app.models import DownstreamEval, Extraction, Training
from app.sae.models import StandardSAE
from conftest import QUICK_CONFIG

CPU = torch.device("cpu")


def identity_sae(d: int, scale: float = 1.0) -> StandardSAE:
    """relu(x) − relu(−x) = x: 2·d latents that reconstruct any input exactly (times ``scale``)."""
    sae = StandardSAE(d, 2 * d)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0) * scale)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def evaluate(model_path, sae, **kw):
    tokenizer, model, causal = load_for_eval(str(model_path), CPU)
    args = dict(norm_scale=0.7, layer=1, site="resid", docs=stdlib_docstrings(), token_budget=1500, context_length=64,
                batch_size=8, exclude_special=True, device=CPU)
    return downstream_eval(model, tokenizer, causal, sae, **{**args, **kw})


def test_an_identity_sae_keeps_everything_and_a_zero_sae_nothing(tiny_models):
    same = evaluate(tiny_models["gpt2"], identity_sae(32))
    assert same["causal"] and same["score_name"] == "CE-loss score"
    assert same["ce_spliced"] == pytest.approx(same["ce_clean"], abs=1e-6)
    assert same["ce_loss_score"] == pytest.approx(1.0, abs=1e-4) and same["kl_score"] == pytest.approx(1.0, abs=1e-4)
    assert same["kl_spliced"] == pytest.approx(0.0, abs=1e-7) and same["kl_ablated"] > 0
    assert same["l2_ratio"] == pytest.approx(1.0) and same["cosine"] == pytest.approx(1.0)
    assert same["relative_reconstruction_bias"] == pytest.approx(1.0) and same["fvu"] == pytest.approx(0.0, abs=1e-9)
    gone = evaluate(tiny_models["gpt2"], identity_sae(32, scale=0.0))
    assert gone["ce_spliced"] == pytest.approx(gone["ce_ablated"], abs=1e-6)
    assert gone["ce_loss_score"] == pytest.approx(0.0, abs=1e-4) and gone["kl_score"] == pytest.approx(0.0, abs=1e-4)
    half = evaluate(tiny_models["gpt2"], identity_sae(32, scale=0.5))
    assert half["l2_ratio"] == pytest.approx(0.5) and half["relative_reconstruction_bias"] == pytest.approx(0.5)
    assert half["ce_clean"] <= half["ce_spliced"] <= half["ce_ablated"]
    # the same text, the same tokens scored, whatever the SAE
    assert same["scored_tokens"] == gone["scored_tokens"] == half["scored_tokens"] > 1000


def test_an_encoder_is_judged_by_its_final_hidden_states():
    result = evaluate(BUNDLED_MINILM, identity_sae(384), layer=3, token_budget=600)
    assert not result["causal"] and result["score_name"] == "hidden-state fidelity"
    assert result["fidelity_score"] == pytest.approx(1.0, abs=1e-4) and result["damage_ablated"] > 0
    shrunk = evaluate(BUNDLED_MINILM, identity_sae(384, scale=0.5), layer=3, token_budget=600)
    assert 0 < shrunk["fidelity_score"] < 1


def test_a_run_on_an_extraction_is_evaluated_on_held_out_text_after_it_finishes(client, env, trained_gpt2, run_worker):
    response = client.post("/api/extractions", json={"model_name": str(trained_gpt2), "layer": 1,
                                                     "token_budget": 6000, "context_length": 64})
    assert response.status_code == 201, response.json
    assert run_worker().returncode == 0
    extraction = Extraction.get_by_id(response.json["id"])
    assert extraction.status == "completed", extraction.reason
    source = extraction.activation_set
    run = client.post("/api/trainings", json={**QUICK_CONFIG, "source_id": source.id, "architecture": "topk", "k": 8,
                                              "l1_alpha": None, "latent_dim": 256, "batch_size": 128,
                                              "total_steps": 400, "target_l0": 8 / 256})
    assert run.status_code == 201, run.json
    done = run_worker()  # the run, then the jobs it queued: feature statistics and the downstream evaluation
    assert done.returncode == 0, done.stderr[-3000:]
    run = Training.get_by_id(run.json["id"])
    job = DownstreamEval.get(DownstreamEval.training == run.id)
    assert job.status == "completed", job.reason
    result = run.summary["downstream"]
    assert result == job.summary
    assert result["held_out_after"] == extraction.documents_done and result["documents"] > 0  # never training text
    assert result["tokens"] >= 8192 and result["causal"]
    assert result["ce_clean"] <= result["ce_spliced"] <= result["ce_ablated"]
    assert 0 < result["ce_loss_score"] <= 1 and 0 < result["kl_score"] <= 1
    assert 0 < result["cosine"] <= 1 and 0 < result["l2_ratio"]
    assert "CE-loss score" in run.summary["verdict"]["downstream"]
    page = client.get(f"/trainings/{run.id}").get_data(as_text=True)
    assert 'id="downstream-table"' in page and f"{result['ce_loss_score']:.3g}" in page
    assert 'id="verdict-downstream"' in page
    body = client.get(f"/api/trainings/{run.id}").json
    assert body["summary"]["downstream"]["ce_loss_score"] == result["ce_loss_score"]
    assert client.get(f"/api/downstream/{job.id}").json["result"]["kl_score"] == result["kl_score"]
    exported = zipfile.ZipFile(io.BytesIO(client.get(f"/trainings/{run.id}/export/saelens.zip").data))
    cfg = json.loads(exported.read(f"sae-studio-run-{run.id}/cfg.json"))
    assert cfg["metadata"]["sae_studio"]["downstream"]["ce_loss_score"] == result["ce_loss_score"]
    # again, by hand, through the API
    again = client.post(f"/api/trainings/{run.id}/downstream", json={"tokens": 512})
    assert again.status_code == 202 and again.json["token_budget"] == 512
    bad = client.post(f"/api/trainings/{run.id}/downstream", json={"tokens": "many"})
    assert bad.status_code == 422 and "tokens" in bad.json["errors"]
    other = client.post("/api/trainings", json=QUICK_CONFIG).json["id"]
    assert run_worker().returncode == 0  # the synthetic run, and the evaluation queued by hand
    assert DownstreamEval.get_by_id(again.json["id"]).status == "completed"
    compare = client.get(f"/compare?ids={run.id}&ids={other}").get_data(as_text=True)
    assert "Downstream score (on the model)" in compare and "CE-loss score" in compare
    frontier = compare[compare.index('id="model-frontier"'):]
    assert f"#{run.id}: L0" in frontier and f"#{other}: L0" not in frontier  # only evaluated runs are placed


def test_a_run_on_a_synthetic_source_says_why_it_cannot_be_evaluated(client, env, run_worker):
    run = client.post("/api/trainings", json=QUICK_CONFIG)
    assert run_worker().returncode == 0
    refused = client.post(f"/api/trainings/{run.json['id']}/downstream")
    assert refused.status_code == 409 and "needs a run trained on an extraction" in refused.json["error"]
    page = client.get(f"/trainings/{run.json['id']}").get_data(as_text=True)
    assert 'id="downstream-why-not"' in page and 'id="evaluate-downstream"' not in page
    assert DownstreamEval.select().count() == 0


def test_the_comparison_shows_an_encoders_evaluation_which_has_no_kl_score(client):
    """MiniLM's evaluation (hidden-state fidelity) has no KL score: the comparison of such a run
    with any other renders, with its score, and no KL row (it answered 500 before)."""
    encoder = client.post("/api/trainings", json=QUICK_CONFIG).json["id"]
    other = client.post("/api/trainings", json=QUICK_CONFIG).json["id"]
    result = {"score": 0.912, "score_name": "hidden-state fidelity", "fidelity_score": 0.912, "l2_ratio": 0.97,
              "cosine": 0.95, "headline": "Spliced into the encoder, it avoids 91% of the damage."}
    Training.update(summary={"l0_fraction": 0.02, "fvu": 0.2, "downstream": result}).where(
        Training.id == encoder).execute()
    response = client.get(f"/compare?ids={encoder}&ids={other}")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert "0.912" in html and "hidden-state fidelity" in html and "KL score" not in html
