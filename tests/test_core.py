"""The ML core on its own: models, metrics, schedules, sources and the trainer."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from app.sae.metrics import DeadLatentTracker, evaluate, fvu, l0_per_token
from app.sae.models import StandardSAE, TopKSAE, build_sae
from app.sae.sources import ActivationSource, ArraySource, SyntheticSource, normalization_scale
from app.sae.files import inspect_activation_file
from app.sae.trainer import NonFiniteLoss, TrainConfig, dead_window, l1_alpha_at, lr_factor, train

# The review's two outcome tests, at a size that trains in well under a minute on 2 cores.
OUTCOME_SOURCE = dict(d_in=256, n_features=512, mean_active=5, seed=0)
OUTCOME_CONFIG = dict(latent_dim=1024, batch_size=512, total_steps=1000, lr_warmup_steps=50,
                      l1_warmup_steps=100, log_every=100, device="cpu")


@pytest.mark.slow
def test_default_penalty_gives_sparse_features():
    result, _ = train(SyntheticSource(**OUTCOME_SOURCE), TrainConfig(l1_alpha=0.003, **OUTCOME_CONFIG))
    assert result.status == "completed"
    assert result.eval["l0_fraction"] < 0.10, result.eval
    assert result.eval["fvu"] < 0.2, result.eval


@pytest.mark.slow
def test_zero_penalty_gives_dense_features():
    result, _ = train(SyntheticSource(**OUTCOME_SOURCE), TrainConfig(l1_alpha=0.0, **OUTCOME_CONFIG))
    assert result.eval["l0_fraction"] > 0.30, result.eval


def test_missing_penalty_is_never_defaulted():
    with pytest.raises(ValueError, match="l1_alpha"):
        TrainConfig(latent_dim=64, l1_alpha=None).check()
    with pytest.raises(ValueError, match="l1_alpha"):
        TrainConfig(latent_dim=64, l1_alpha=float("nan")).check()


def test_standard_loss_matches_the_design_formula():
    torch.manual_seed(0)
    sae = StandardSAE(8, 32)
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
        sae.b_dec.normal_()
    x = torch.randn(5, 8)
    parts, x_hat, f = sae.loss(x, l1_alpha=0.01)
    f_ref = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    x_hat_ref = f_ref @ sae.W_dec + sae.b_dec
    mse_ref = ((x - x_hat_ref) ** 2).sum(1).mean() / 8
    l1_ref = (f_ref * sae.W_dec.norm(dim=1)).sum(1).mean()
    assert torch.allclose(parts.mse, mse_ref) and torch.allclose(parts.l1, l1_ref)
    assert torch.allclose(parts.total, mse_ref + 0.01 * l1_ref)


def test_topk_keeps_exactly_k_latents():
    sae = TopKSAE(16, 128, k=7)
    f = sae.encode(torch.randn(64, 16) * 5)
    assert (l0_per_token(f) <= 7).all() and l0_per_token(f).float().mean() > 6.5
    assert (f >= 0).all()


def test_topk_aux_loss_only_with_dead_latents():
    sae = TopKSAE(16, 64, k=4)
    x = torch.randn(32, 16)
    none_dead, _, _ = sae.loss(x, dead_mask=torch.zeros(64, dtype=torch.bool))
    some_dead, _, _ = sae.loss(x, dead_mask=torch.arange(64) >= 32)
    assert none_dead.sparsity.item() == 0.0
    assert some_dead.sparsity.item() > 0.0


def test_fvu_and_l0_match_brute_force():
    g = torch.Generator().manual_seed(1)
    x, x_hat = torch.randn(100, 6, generator=g), torch.randn(100, 6, generator=g)
    xn, xhn = x.double().numpy(), x_hat.double().numpy()
    expected = ((xn - xhn) ** 2).sum() / ((xn - xn.mean(0)) ** 2).sum()
    assert math.isclose(fvu(x, x_hat).item(), expected, rel_tol=1e-5)
    f = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0], [3.0, 0.0, 0.1]])
    assert l0_per_token(f).tolist() == [2.0, 0.0, 2.0]


def test_dead_latents_unknown_until_a_window_is_seen():
    tracker = DeadLatentTracker(3, window_tokens=10, device="cpu")
    tracker.update(torch.tensor([[1.0, 0, 0]] * 4))
    assert not tracker.known
    tracker.update(torch.tensor([[0.0, 1.0, 0]] * 6))
    assert tracker.known
    assert tracker.dead_mask().tolist() == [False, False, True]  # latent 0 fired 6 tokens ago
    tracker.update(torch.tensor([[0.0, 1.0, 0]] * 4))
    assert tracker.dead_mask().tolist() == [True, False, True]  # latent 0 silent for 10 tokens


def test_evaluate_reports_l0_and_fvu():
    sae = StandardSAE(8, 16)
    x = torch.randn(300, 8)
    out = evaluate(sae, x, batch_size=64)
    x_hat, f = sae(x)
    assert math.isclose(out["l0"], l0_per_token(f).mean().item(), rel_tol=1e-6)
    assert math.isclose(out["fvu"], fvu(x, x_hat).item(), rel_tol=1e-4)
    assert out["l0_fraction"] == pytest.approx(out["l0"] / 16)


def test_normalization_scale_gives_mean_squared_norm_d_in():
    x = torch.randn(4000, 32) * 7 + 3
    c = normalization_scale(x)
    assert (c * x).pow(2).sum(1).mean().item() == pytest.approx(32, rel=1e-6)


def test_schedules():
    cfg = TrainConfig(latent_dim=8, l1_alpha=0.01, total_steps=100, lr_warmup_steps=10, l1_warmup_steps=20,
                      lr_decay_fraction=0.2)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == 1.0 and lr_factor(50, cfg) == 1.0
    assert lr_factor(80, cfg) == 1.0 and lr_factor(90, cfg) == pytest.approx(0.5) and lr_factor(99, cfg) > 0
    assert l1_alpha_at(0, cfg, 0.01) == pytest.approx(0.0005)
    assert l1_alpha_at(19, cfg, 0.01) == pytest.approx(0.01) and l1_alpha_at(60, cfg, 0.01) == 0.01


def test_synthetic_source_has_the_requested_density():
    src = SyntheticSource(d_in=32, n_features=100, mean_active=4, seed=3)
    x = next(src.batches(4096, seed=0, device=torch.device("cpu")))
    # Each active feature adds a unit direction with mean-1 coefficient: E‖x‖² ≈ mean_active·E[c²] = 4·2.
    assert x.shape == (4096, 32)
    assert x.pow(2).sum(1).mean().item() == pytest.approx(8, rel=0.15)
    assert torch.equal(src.eval_rows(16, device=torch.device("cpu")), src.eval_rows(16, device=torch.device("cpu")))


def test_a_run_shorter_than_the_dead_latent_window_still_counts_its_dead_latents():
    """45 steps of 64 tokens never see a window of 200,000: the count is made over half the run instead."""
    src = SyntheticSource(d_in=16, n_features=32, mean_active=3)
    cfg = TrainConfig(latent_dim=64, l1_alpha=0.01, batch_size=64, total_steps=45, lr_warmup_steps=5,
                      l1_warmup_steps=5, log_every=10, dead_window_tokens=200_000, device="cpu")
    assert dead_window(cfg) == 45 * 64 // 2
    points, starts = [], []
    train(src, cfg, on_log=points.append, on_start=starts.append)
    assert starts[0]["dead_window"] == 1440
    assert points[0].dead is None and points[-1].dead is not None
    long = TrainConfig(**{**vars(cfg), "total_steps": 10_000})
    assert dead_window(long) == 200_000  # a run that fills the window keeps it


def test_trainer_logs_stops_and_is_seeded():
    src = SyntheticSource(d_in=16, n_features=32, mean_active=3)
    cfg = TrainConfig(latent_dim=64, l1_alpha=0.01, batch_size=64, total_steps=45, lr_warmup_steps=5,
                      l1_warmup_steps=5, log_every=10, dead_window_tokens=1000, device="cpu")
    points = []
    result, _ = train(src, cfg, on_log=points.append)
    assert [p.step for p in points] == [10, 20, 30, 40, 45]
    assert points[0].dead is None and points[-1].dead is not None  # window of 1,000 tokens seen by step 16
    assert result.status == "completed" and result.steps == 45 and result.tokens == 45 * 64
    again = []
    train(src, cfg, on_log=again.append)
    assert [p.loss for p in again] == [p.loss for p in points]

    calls = iter(range(1000))
    stopped, _ = train(src, cfg, should_stop=lambda: "stop" if next(calls) == 12 else None)
    assert stopped.status == "stopped" and stopped.steps == 12 and stopped.reason == "stop"


class ExplodingSource(ActivationSource):
    d_in, n_tokens = 8, None

    def batches(self, batch_size, *, seed, device, start=0):
        step = 0
        while True:
            step += 1
            yield torch.full((batch_size, 8), float("nan")) if step > 15 else torch.randn(batch_size, 8)

    def sample(self, n, *, device):
        return torch.randn(n, 8)

    eval_rows = sample


def test_non_finite_loss_stops_with_the_step_and_last_good_point():
    cfg = TrainConfig(latent_dim=16, l1_alpha=0.01, batch_size=32, total_steps=100, log_every=10, device="cpu")
    with pytest.raises(NonFiniteLoss) as info:
        train(ExplodingSource(), cfg)
    assert info.value.step == 20 and info.value.last.step == 10


def test_array_source_reads_each_training_row_once_per_epoch(tmp_path):
    rows = np.arange(2000 * 4, dtype=np.float32).reshape(2000, 4)
    np.save(tmp_path / "a.npy", rows)
    info = inspect_activation_file(tmp_path / "a.npy", min_rows=100, max_bytes=10**9)
    src = ArraySource(tmp_path / "a.npy", info)
    assert src.n_tokens == 1900 and src.holdout == 100
    batches = src.batches(100, seed=0, device=torch.device("cpu"))
    seen = torch.cat([next(batches) for _ in range(19)])[:, 0] / 4
    assert sorted(seen.long().tolist()) == list(range(1900))
    held = src.eval_rows(1000, device=torch.device("cpu"))[:, 0] / 4
    assert held.long().tolist() == list(range(1900, 2000))


def test_build_sae_refuses_unknown_architecture():
    with pytest.raises(ValueError):
        build_sae("temporal", 4, 8)  # a SAELens architecture this app does not train
    with pytest.raises(ValueError):
        build_sae("topk", 4, 8)


# Target 2% of 1,024 latents on the outcome source is reached with l1_alpha ≈ 0.002.
STEER_CONFIG = dict(latent_dim=1024, batch_size=256, total_steps=3000, lr_warmup_steps=20, l1_warmup_steps=100,
                    log_every=20, device="cpu")


@pytest.mark.slow
@pytest.mark.parametrize("start", [0.0002, 0.02], ids=["10x-too-low", "10x-too-high"])
def test_controller_steers_l1_alpha_to_the_target(start):
    from app.sae.control import L0Controller

    controller = L0Controller(target=0.02, alpha=start, start_step=100)
    alphas = []
    result, _ = train(SyntheticSource(**OUTCOME_SOURCE), TrainConfig(l1_alpha=start, **STEER_CONFIG),
                      l1_alpha_control=controller, on_log=lambda p: alphas.append(p.l1_alpha))
    assert result.eval["l0_fraction"] == pytest.approx(0.02, rel=0.10), result.eval
    assert all(1e-5 < a <= 0.1 for a in alphas)
    assert 0.0005 < alphas[-1] < 0.008  # it found the penalty rather than drifting to a bound


def test_controller_holds_inside_the_deadband_and_respects_bounds():
    from app.sae.control import L0Controller

    class P:
        def __init__(self, step, l0_fraction):
            self.step, self.l0_fraction = step, l0_fraction

    c = L0Controller(target=0.02, alpha=0.003, start_step=100)
    assert c(P(50, 0.5)) == 0.003  # still in warm-up
    assert c(P(120, 0.0201)) == 0.003  # within the deadband
    c = L0Controller(target=0.02, alpha=0.09, start_step=0)
    assert max(c(P(i, 0.9)) for i in range(200)) == 0.1
    c = L0Controller(target=0.02, alpha=2e-5, start_step=0)
    assert min(c(P(i, 1e-4)) for i in range(200)) == pytest.approx(1.1e-5)


def test_resampling_revives_dead_latents_and_leaves_live_ones_alone():
    from app.sae.models import resample_dead_latents

    torch.manual_seed(0)
    sae = StandardSAE(16, 64)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    x = torch.randn(512, 16) * 3
    with torch.no_grad():
        sae.b_enc[:20] = -100.0  # latents 0..19 can never fire
    parts, _, _ = sae.loss(x, l1_alpha=0.01)
    parts.total.backward()
    optimizer.step()
    _, f = sae(x)
    assert (f[:, :20] == 0).all()
    live_before = sae.W_enc[:, 20:].clone()
    dead = torch.arange(64) < 20
    assert resample_dead_latents(sae, optimizer, x, dead) == 20
    _, f = sae(x)
    assert ((f[:, :20] > 0).sum(dim=0) > 0).all()  # every resampled latent fires again
    assert torch.equal(sae.W_enc[:, 20:], live_before)
    state = optimizer.state[sae.W_enc]
    assert (state["exp_avg"][:, :20] == 0).all() and (state["exp_avg"][:, 20:] != 0).any()
    assert resample_dead_latents(sae, optimizer, x, torch.zeros(64, dtype=torch.bool)) == 0


@pytest.mark.slow
def test_trainer_resamples_when_latents_die():
    # A learning rate 10× too high with the strongest penalty kills hundreds of latents.
    src = SyntheticSource(**OUTCOME_SOURCE)
    cfg = dict(latent_dim=1024, l1_alpha=0.1, learning_rate=0.01, batch_size=256, total_steps=600,
               lr_warmup_steps=10, l1_warmup_steps=50, log_every=50, dead_window_tokens=25_600, device="cpu")
    plain_dead, remedied_dead = {}, {}
    plain, _ = train(src, TrainConfig(**cfg), on_log=lambda p: plain_dead.__setitem__(p.step, p.dead))
    remedied, _ = train(src, TrainConfig(dead_latent_remedy="resample", **cfg),
                        on_log=lambda p: remedied_dead.__setitem__(p.step, p.dead))
    assert plain.eval["dead"] > 100 and plain.eval["resampled_latents"] == 0
    assert remedied.eval["resampled_latents"] > 50
    # While resampling runs (up to 80% of training) the dead series drops back after each resample.
    gaps = [plain_dead[s] - remedied_dead[s] for s in plain_dead if s <= 480 and plain_dead[s] is not None]
    assert max(gaps) >= 30, (plain_dead, remedied_dead)


def test_adam_is_fused_where_the_device_has_the_kernel_and_plain_elsewhere():
    from app.sae.trainer import adam

    on_cpu = adam([{"params": [torch.zeros(4, requires_grad=True)]}], 1e-3)
    assert on_cpu.param_groups[0]["fused"] is True
    elsewhere = adam([{"params": [torch.zeros(4, requires_grad=True, device="meta")]}], 1e-3)  # no kernel there
    assert not elsewhere.param_groups[0]["fused"]
