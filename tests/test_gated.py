"""The Gated SAE end to end: its maths, the form and API, the validator, recommended settings,
runtime rules, verdict, resume and the migration that seeds its presets on an older database.
(Export to SAELens and reading it back: tests/test_features.py, parametrized over architectures.)"""
from __future__ import annotations

import pytest
import torch

from app.sae import architectures
from app.sae.models import build_sae
from app.sae.sources import SyntheticSource
from app.sae.trainer import Checkpointing, TrainConfig, train

GATED = architectures.get("gated")


def test_encode_is_the_gate_times_the_magnitude_and_the_loss_has_its_three_terms():
    torch.manual_seed(0)
    sae = build_sae("gated", 8, 24)
    with torch.no_grad():
        sae.b_gate.uniform_(-0.3, 0.1)
        sae.b_mag.uniform_(-0.1, 0.1)
        sae.r_mag.uniform_(-0.5, 0.5)
        sae.b_dec.uniform_(-0.2, 0.2)
    assert not hasattr(sae, "b_enc") or sae.b_enc is None
    x = torch.randn(50, 8)
    centred = (x - sae.b_dec) @ sae.W_enc
    gate = centred + sae.b_gate
    magnitude = torch.relu(centred * sae.r_mag.exp() + sae.b_mag)
    f = sae.encode(x)
    torch.testing.assert_close(f, (gate > 0).float() * magnitude)
    assert 0 < (f > 0).float().mean() < 1
    parts, x_hat, f2 = sae.loss(x, l1_alpha=0.5)
    torch.testing.assert_close(f2, f)
    mse = (x - x_hat).pow(2).sum(-1).mean() / 8
    l1 = (torch.relu(gate) * sae.W_dec.norm(dim=1)).sum(-1).mean()
    aux = (x - (torch.relu(gate) @ sae.W_dec + sae.b_dec)).pow(2).sum(-1).mean() / 8
    torch.testing.assert_close(parts.mse, mse)
    torch.testing.assert_close(parts.l1, l1)
    torch.testing.assert_close(parts.total, mse + 0.5 * l1 + aux)
    # the auxiliary reconstruction reaches the decoder too (what ties its scale to the gate's: see the
    # module's docstring), and the gate's weights
    sae.zero_grad()
    (parts.total - parts.mse - 0.5 * parts.l1).backward()
    assert sae.W_dec.grad.abs().max() > 0 and sae.b_dec.grad.abs().max() > 0
    assert sae.W_enc.grad.abs().max() > 0 and sae.b_gate.grad.abs().max() > 0
    # one latent at a time (feature contexts) equals the full encoding
    lat = torch.arange(24)
    rows = x[torch.randint(0, 50, (24, 5))]
    _, acts = sae.latent_activations(rows, lat)
    full = sae.encode(rows.reshape(-1, 8)).reshape(24, 5, 24)
    torch.testing.assert_close(acts, full[torch.arange(24), :, torch.arange(24)])


def _config(**changes) -> TrainConfig:
    base = dict(architecture="gated", latent_dim=256, l1_alpha=0.03, learning_rate=1e-3, batch_size=128,
                total_steps=600, lr_warmup_steps=20, l1_warmup_steps=50, target_l0=0.04, log_every=20,
                dead_window_tokens=20_000, precision="float32", device="cpu")
    return TrainConfig(**{**base, **changes})


@pytest.mark.slow
def test_a_stronger_penalty_gives_a_sparser_gated_sae():
    source = SyntheticSource(32, 128, 3, 0)
    weak, _ = train(source, _config(l1_alpha=0.003))
    strong, sae = train(source, _config(l1_alpha=0.1))
    assert strong.eval["l0"] < 0.6 * weak.eval["l0"]
    assert strong.eval["fvu"] < 0.5  # and it still reconstructs


def test_a_resumed_gated_run_matches_an_uninterrupted_one():
    source = SyntheticSource(32, 64, 3, 0)
    cfg = _config(latent_dim=128, batch_size=64, total_steps=60, log_every=10, checkpoint_every_steps=20)
    _, straight = train(source, cfg)
    saved = []
    stop_at = iter(range(1000))
    train(source, cfg, checkpointing=Checkpointing(saved.append, every_steps=20, every_s=1e9),
          should_stop=lambda: "stop" if next(stop_at) == 35 else None)
    _, resumed = train(source, cfg, resume=saved[-1])
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0)


def test_the_core_refuses_a_gated_run_without_its_penalty():
    with pytest.raises(ValueError, match="l1_alpha .* required for a Gated SAE"):
        _config(l1_alpha=None).check()


def test_the_form_offers_it_and_the_api_takes_it_with_its_penalty(client):
    from conftest import QUICK_CONFIG

    page = client.get("/trainings/new").get_data(as_text=True)
    assert 'value="gated"' in page and GATED.label in page
    body = {**QUICK_CONFIG, "architecture": "gated", "l1_alpha": 0.03, "k": None, "steer_l1_alpha": True}
    created = client.post("/api/trainings", json=body)
    assert created.status_code == 201, created.json
    config = client.get(f"/api/trainings/{created.json['id']}").json["config"]
    assert config["architecture"] == "gated" and config["l1_alpha"] == 0.03 and config["k"] is None
    assert config["steer_l1_alpha"] is True and config["dead_latent_remedy"] == "none"
    refused = client.post("/api/trainings", json={**body, "l1_alpha": None})
    assert refused.status_code == 422 and "Gated SAE" in refused.json["errors"]["l1_alpha"][0]
    detail = client.get(f"/trainings/{created.json['id']}").get_data(as_text=True)
    assert "on the gate&#39;s pre-activations" in detail or "on the gate's pre-activations" in detail


def test_validator_memory_and_recommended_settings():
    from app.validation import SourceStats, memory_estimate_bytes, recommend_settings, validate_config

    source = SourceStats(d_in=64, n_tokens=None)
    cfg = {"architecture": "gated", "latent_dim": 512, "l1_alpha": 0.03, "k": None, "learning_rate": 1e-3,
           "batch_size": 256, "total_steps": 2000, "lr_warmup_steps": 100, "l1_warmup_steps": 100,
           "target_l0": 0.02, "steer_l1_alpha": False, "dead_window_tokens": 50_000}
    findings = validate_config(cfg, source)
    assert any(f.field == "steer_l1_alpha" and f.level == "info" for f in findings)
    assert not any(f.field == "l1_alpha" for f in findings)  # the L0 model makes no claim about it
    assert not [f for f in validate_config({**cfg, "steer_l1_alpha": True}, source) if f.level != "info"]
    assert memory_estimate_bytes(64, 512, 256, "gated") > memory_estimate_bytes(64, 512, 256, "standard")
    settings = recommend_settings(source, latent_dim=512, target_l0=0.02, architecture="gated", on_gpu=False)
    assert settings["steer_l1_alpha"][0] is True and 0 < settings["l1_alpha"][0] <= 0.1
    # steering starts at the standard SAE's value for the same run, near where it ends (not 0.03 for all)
    standard = recommend_settings(source, latent_dim=512, target_l0=0.02, architecture="standard", on_gpu=False)
    assert settings["l1_alpha"][0] == pytest.approx(standard["l1_alpha"][0], rel=0.05)
    assert "k" not in settings


def test_runtime_rules_and_verdict_treat_it_as_penalty_set():
    from types import SimpleNamespace

    from app.quality import RunSpec, RuntimeMonitor, verdict

    spec = RunSpec(architecture="gated", latent_dim=1000, target_l0=0.02, warmup_steps=10, early_stop_step=100,
                   d_in=64, total_steps=2000)
    assert spec.known() is None  # the L0 model is not fitted on it: advice scales by the ratio
    monitor = RuntimeMonitor(spec)
    codes = []
    for step in range(20, 220, 20):
        point = SimpleNamespace(step=step, loss=1.0, mse=0.1, l0=400.0, l0_fraction=0.4, fvu=0.05, dead=0,
                                l1_alpha=0.003)
        codes += [f.code for f in monitor.observe(point)]
    assert "dense" in codes and "early_stop" in codes and monitor.stop.stop == "stopped_early"
    assert "l1_alpha" in monitor.stop.suggestion
    summary = {"l0": 400.0, "l0_fraction": 0.4, "fvu": 0.05, "dead": 0}
    v = verdict(summary, architecture="gated", latent_dim=1000, target_l0=0.02, l1_alpha=0.003)
    assert v["grade"] == "red" and v["advice"].startswith("Increase l1_alpha from 0.003")
    assert v["suggested_l1_alpha"] > 0.003


def test_migration_20_gives_an_older_database_its_gated_presets(app):
    from app.db import MIGRATIONS, SchemaVersion, migrate
    from app.models import Template, complete

    fresh = {t.name: (t.config, t.provenance) for t in Template.select().where(Template.name.contains("· Gated ·"))}
    assert len(fresh) == 7
    Template.delete().where(Template.name.contains("· Gated ·")).execute()
    SchemaVersion.update(version=[m.__name__ for m in MIGRATIONS].index("_migration_20_gated_presets")).execute()
    assert migrate() == len(MIGRATIONS)
    migrated = {t.name: (t.config, t.provenance) for t in Template.select().where(Template.name.contains("· Gated ·"))}
    assert migrated == fresh  # the migration's literal data is what the module seeds on a fresh database
    # migration 30 moved every preset's start from migration 20's 0.03 to its run's standard value
    assert sorted({config["l1_alpha"] for config, _ in migrated.values()}) == [
        0.00074, 0.00089, 0.00093, 0.0022, 0.0024, 0.0028, 0.003]
    for config, _ in migrated.values():
        assert complete(config) == config


def test_resampling_revives_a_shut_gate_and_starts_its_gate_and_magnitude_again():
    """A latent whose gate never opens gets no gradient from any of the three terms (the Heaviside
    gate, and ReLU(π_gate) in the penalty and the auxiliary reconstruction): only resampling brings it
    back. Its W_enc, W_dec, b_gate, b_mag and r_mag start again; the live latents are left alone."""
    from app.sae.models import resample_dead_latents

    torch.manual_seed(0)
    sae = build_sae("gated", 16, 64)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    x = torch.randn(512, 16) * 3
    with torch.no_grad():
        sae.b_gate[:20] = -100.0  # latents 0..19 can never open
        sae.b_mag[:20], sae.r_mag[:20] = 0.5, 0.3
    parts, _, _ = sae.loss(x, l1_alpha=0.01)
    parts.total.backward()
    assert (sae.W_enc.grad[:, :20] == 0).all() and (sae.b_gate.grad[:20] == 0).all()  # no way back by gradient
    optimizer.step()
    assert (sae.encode(x)[:, :20] == 0).all()
    live = {name: getattr(sae, name).detach().clone() for name in ("b_gate", "b_mag", "r_mag")}
    live_enc = sae.W_enc[:, 20:].clone()
    dead = torch.arange(64) < 20
    assert resample_dead_latents(sae, optimizer, x, dead) == 20
    assert ((sae.encode(x)[:, :20] > 0).sum(dim=0) > 0).all()  # every resampled latent fires again
    for name in ("b_gate", "b_mag", "r_mag"):
        assert (getattr(sae, name)[:20] == 0).all(), name
        assert torch.equal(getattr(sae, name)[20:], live[name][20:]), name
        assert (optimizer.state[getattr(sae, name)]["exp_avg"][:20] == 0).all(), name
    assert torch.equal(sae.W_enc[:, 20:], live_enc)


def test_the_form_offers_the_dead_latent_remedy_for_it():
    from app.training_config import BY_NAME, normalize

    assert "Gated" in BY_NAME["dead_latent_remedy"].label
    assert normalize({"architecture": "gated", "dead_latent_remedy": "resample"})["dead_latent_remedy"] == "resample"
