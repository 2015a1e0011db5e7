"""Auto-tune: the search rule, and the whole thing through the real worker."""
from __future__ import annotations

import math

import pytest

from app.models import TuneJob
from app.sae.tune import ELASTICITY, Pilot, next_alpha
from conftest import QUICK_CONFIG


def test_one_sided_steps_follow_the_elasticity_and_are_capped():
    assert next_alpha([Pilot(0.001, 0.08, 0.1)], 0.02) == pytest.approx(0.001 * 4 ** (1 / ELASTICITY))
    assert next_alpha([Pilot(0.001, 0.9, 0.1)], 0.02) == pytest.approx(0.01)  # at most tenfold
    assert next_alpha([Pilot(0.05, 0.001, 0.5)], 0.02) == pytest.approx(0.005)
    assert next_alpha([Pilot(0.09, 0.9, 0.1)], 0.02) == 0.1  # never beyond the valid range


def test_bracketed_guess_interpolates_and_stays_inside():
    pilots = [Pilot(0.001, 0.08, 0.05), Pilot(0.01, 0.005, 0.2)]
    guess = next_alpha(pilots, 0.02)
    # On the log–log line through both pilots, 0.02 sits exactly halfway.
    assert math.isclose(guess, math.sqrt(0.001 * 0.01), rel_tol=1e-9)
    skewed = next_alpha([Pilot(0.001, 0.021, 0.05), Pilot(0.01, 0.001, 0.2)], 0.02)
    assert 0.001 < skewed < 0.01 and math.log(skewed / 0.001) >= 0.1 * math.log(10) - 1e-12


def form(**changes) -> dict:
    data = {**QUICK_CONFIG, "latent_dim": 1024, **changes}
    return {k: str(v) for k, v in data.items() if v is not None and not isinstance(v, bool)}


def assert_the_form_takes_the_result(tune: TuneJob) -> None:
    """"Use l1_alpha = X" fills the form with X (three figures): for the run the tune aimed at, on its source
    as the validator now knows it (the pilots' shift learned), the form warns about nothing at l1_alpha."""
    from app.validation import validate_config

    value = float(f"{tune.result_l1_alpha:.3g}")
    cfg = {**QUICK_CONFIG, "latent_dim": tune.latent_dim, "target_l0": tune.target_l0, "total_steps": tune.run_steps,
           "batch_size": tune.run_batch, "l1_alpha": value}
    warned = [f for f in validate_config(cfg, tune.source.stats()) if f.field == "l1_alpha" and f.level != "info"]
    assert not warned, (value, [f.message for f in warned])


def test_auto_tune_reaches_the_band_through_the_worker(client, run_worker):
    response = client.post("/tunes/", data=form(target_l0=0.02))
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert 'hx-trigger="every 2s"' in html and "Cancel auto-tune" in html
    tune = TuneJob.get()
    done = run_worker()
    assert done.returncode == 0, done.stderr[-2000:]
    tune = TuneJob.get_by_id(tune.id)
    assert tune.status == "completed", tune.reason
    assert 1 <= len(tune.pilots) <= 8
    last = tune.pilots[-1]
    assert abs(last["projected"] / 0.02 - 1) <= 0.2 and tune.result_l1_alpha == last["l1_alpha"]
    assert_the_form_takes_the_result(tune)
    html = client.get(f"/tunes/{tune.id}").get_data(as_text=True)
    assert "hx-trigger" not in html and 'id="use-tuned"' in html
    assert html.count("<tr>") == len(tune.pilots) + 1  # every pilot is listed


def test_auto_tune_aims_the_run_not_its_pilots(client, run_worker):
    """For a 3,000-step run the pilots (400 steps) must end denser than the target: the run keeps falling."""
    client.post("/tunes/", data=form(target_l0=0.02, total_steps=3000, lr_warmup_steps=100, l1_warmup_steps=150))
    done = run_worker()
    assert done.returncode == 0, done.stderr[-2000:]
    tune = TuneJob.get()
    assert tune.status == "completed" and tune.run_steps == 3000, tune.reason
    last = tune.pilots[-1]
    assert last["projected"] < last["l0_fraction"]
    assert abs(last["projected"] / 0.02 - 1) <= 0.2 and tune.result_l1_alpha == last["l1_alpha"]
    assert_the_form_takes_the_result(tune)
    html = client.get(f"/tunes/{tune.id}").get_data(as_text=True)
    assert "Expected after 3,000 steps" in html and "projected to a run of 3,000 steps" in html


def test_auto_tune_refuses_topk_and_bad_fields(client):
    response = client.post("/tunes/", data=form(architecture="topk", k=8))
    assert response.status_code == 422 and "only a standard SAE" in response.get_data(as_text=True)
    response = client.post("/tunes/", data=form(latent_dim=3))
    assert response.status_code == 422 and 'data-field="latent_dim"' in response.get_data(as_text=True)
    assert TuneJob.select().count() == 0


def test_cancel_a_queued_auto_tune(client, run_worker):
    client.post("/tunes/", data=form())
    tune = TuneJob.get()
    html = client.post(f"/tunes/{tune.id}/cancel").get_data(as_text=True)
    assert "cancelled" in html
    run_worker()
    tune = TuneJob.get_by_id(tune.id)
    assert tune.status == "cancelled" and tune.pilots == []
    assert client.get("/tunes/999").status_code == 404


def test_collapsed_pilots_count_as_too_sparse_and_the_edge_ends_the_search(monkeypatch):
    import app.sae.tune as tune_module

    collapsed = Pilot(0.05, 0.15, 1.0)  # L0 looks dense but nothing is reconstructed
    assert next_alpha([collapsed], 0.02) == pytest.approx(0.005)
    assert next_alpha([Pilot(0.001, 0.5, 0.05), collapsed], 0.02) < 0.05

    class Dense:
        """A plant that stays dense whatever the penalty: the search must give up at the bound."""

        status, reason = "completed", None
        eval = {"l0_fraction": 0.5, "fvu": 0.05}

    monkeypatch.setattr(tune_module, "train", lambda source, cfg, should_stop=None: (Dense(), None))
    best, pilots, outcome = tune_module.tune_l1_alpha(object(), latent_dim=64, target=0.02, start=0.03, device="cpu")
    assert outcome == "edge" and [p.l1_alpha for p in pilots] == [0.03, 0.1]
