"""BatchTopK, JumpReLU and Matryoshka BatchTopK: their maths, their targets, the harder ground truth."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from app.sae.features import ground_truth_recovery, mean_correlation_coefficient
from app.sae.models import BatchTopKSAE, JumpReLUSAE, MatryoshkaSAE, build_sae
from app.sae.sources import HierarchicalSource, SyntheticSource
from app.sae.trainer import Checkpointing, TrainConfig, train
from app.sae.architectures.matryoshka import level_sizes as matryoshka_levels, parse_prefixes

CPU = torch.device("cpu")


def test_batchtopk_keeps_k_per_token_on_average_and_thresholds_at_inference():
    torch.manual_seed(0)
    sae = BatchTopKSAE(16, 64, k=4)
    x = torch.randn(32, 16)
    parts, x_hat, f = sae.loss(x)
    assert int((f > 0).sum()) == 4 * 32  # k·batch over the whole batch...
    per_token = (f > 0).sum(dim=1)
    assert per_token.min() < per_token.max()  # ...not k for every token
    pre = sae.pre_activation(x)
    cut = f[f > 0].min()
    # the first batch sets the threshold to its cut; every kept value is at or above it
    torch.testing.assert_close(sae.threshold, torch.full((64,), float(cut.detach())))
    assert ((torch.relu(pre) >= cut) == (f > 0)).all()
    f2 = sae.batch_topk(sae.pre_activation(x * 2))
    cut2 = float(f2[f2 > 0].min())
    sae.loss(x * 2)  # then an exponential moving average at rate 0.01
    assert float(sae.threshold[0]) == pytest.approx(0.99 * float(cut) + 0.01 * cut2, rel=1e-5)
    sae.eval()
    with torch.no_grad():
        inference = sae.encode(x)
    expected = pre * (pre > sae.threshold)
    torch.testing.assert_close(inference, expected.detach())


def test_matryoshka_loss_is_the_sum_of_every_nested_level():
    torch.manual_seed(1)
    sae = MatryoshkaSAE(8, 32, k=3, levels=(4, 12, 32))
    x = torch.randn(20, 8)
    parts, x_hat, f = sae.loss(x)
    expected = []
    for size in (4, 12, 32):
        recon = f[:, :size] @ sae.W_dec[:size] + sae.b_dec
        expected.append((x - recon).pow(2).sum(dim=-1).mean() / 8)
    torch.testing.assert_close(parts.mse, expected[-1])
    torch.testing.assert_close(parts.total, sum(expected) + parts.sparsity)
    torch.testing.assert_close(x_hat, f @ sae.W_dec + sae.b_dec)
    assert matryoshka_levels("", 1024) == (64, 128, 256, 512, 1024)
    assert matryoshka_levels("100, 300", 1024) == (100, 300, 1024)
    with pytest.raises(ValueError, match="increasing"):
        parse_prefixes("300, 100")
    with pytest.raises(ValueError, match="whole number"):
        parse_prefixes("1e3")


def test_jumprelu_straight_through_gradients_follow_the_rectangle_kernel():
    sae = JumpReLUSAE(2, 3, target_l0=1.0, l0_coefficient=2.0, bandwidth=0.5)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2, 3))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.W_dec.copy_(torch.eye(3, 2))
        sae.threshold.copy_(torch.tensor([1.0, 1.0, 1.0]))
    # pre-activations: latent 0 at 1.1 (fires, inside the kernel), latent 1 at 2.0 (fires, outside), 2 at 0
    x = torch.tensor([[1.1, 2.0]])
    parts, _, f = sae.loss(x)
    assert f.tolist() == [[pytest.approx(1.1), 2.0, 0.0]]
    sae.zero_grad()
    parts.sparsity.backward()
    # mean L0 = 2, target 1: d/dθ_0 of 2·(L0/1 − 1)² = 4·(2 − 1) · (−K/ε) = −4 · 2 = −8; others outside the kernel
    torch.testing.assert_close(sae.threshold.grad, torch.tensor([-8.0, 0.0, 0.0]))
    assert sae.W_enc.grad is None or float(sae.W_enc.grad.abs().sum()) == 0.0  # the penalty reaches θ only
    sae.zero_grad()
    parts, _, f = sae.loss(x)
    parts.mse.backward()
    # mse = ((x − x̂)²).sum/2 with x̂ = (1.1, 2.0): zero error, so the reconstruction's θ-gradient is 0 too
    torch.testing.assert_close(sae.threshold.grad, torch.zeros(3))


def test_jumprelu_thresholds_start_at_the_target_quantile():
    torch.manual_seed(2)
    sae = JumpReLUSAE(16, 200, target_l0=10)
    x = torch.randn(4000, 16)
    sae.calibrate_thresholds(x)
    with torch.no_grad():
        l0 = (sae.encode(x) > 0).sum(dim=1).float().mean()
    assert float(l0) == pytest.approx(10, rel=0.05)


def small_config(architecture: str, **changes) -> TrainConfig:
    k = 10 if architecture in ("topk", "batchtopk", "matryoshka", "matryoshka_topk") else None
    base = dict(architecture=architecture, latent_dim=512, batch_size=256, total_steps=1500, learning_rate=1e-3,
                lr_warmup_steps=50, l1_warmup_steps=100, target_l0=10 / 512, k=k, log_every=100,
                l0_coefficient=10.0 if architecture == "jumprelu" else None,
                jumprelu_bandwidth=0.05 if architecture == "jumprelu" else None,
                matryoshka_prefixes="" if architecture.startswith("matryoshka") else None, precision="float32",
                device="cpu")
    return TrainConfig(**{**base, **changes})


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["batchtopk", "jumprelu", "matryoshka"])
def test_trained_to_the_target_l0_without_tuning(architecture):
    """Held-out L0 (thresholds, no batch) within ±10% of the target, and most of the variance explained.

    Measured here: FVU 0.27 (BatchTopK), 0.14 (JumpReLU), 0.23 (Matryoshka) against TopK's 0.10
    on the same config; the mean's FVU is 1."""
    result, sae = train(SyntheticSource(64, 256, 4, 0), small_config(architecture))
    assert result.eval["l0"] == pytest.approx(10, rel=0.10)
    assert result.eval["fvu"] < 0.4
    assert not sae.training  # evaluated as it will be used


@pytest.mark.parametrize("d_in, n_features, batch_size", [(256, 512, 128), (128, 256, 256)])
def test_jumprelu_lands_on_its_target_in_a_short_run(d_in, n_features, batch_size):
    """1,500 steps, held-out L0 within ±10% of the target (issue 24, item 4).

    The first setup is the default source (``SyntheticSource(256, 512, 5)``) at 256 latents and
    batch 128, the second a smaller one: with the thresholds at 3× the learning rate they ended
    at 1.30× and 0.88× the target (seed 1: 1.28×, 0.85×; 0.73× on the default run's 512 latents
    and batch 512, too slow for a test); at 10× at 0.98-0.99× (benchmarks/results/jumprelu_short_runs.txt)."""
    cfg = small_config("jumprelu", latent_dim=256, batch_size=batch_size, target_l0=5 / 256, lr_warmup_steps=100,
                       l1_warmup_steps=200, log_every=500, eval_tokens=4096, norm_sample_tokens=4096)
    result, _ = train(SyntheticSource(d_in, n_features, 5.0, 0), cfg)
    assert result.eval["l0"] == pytest.approx(5, rel=0.10)
    assert result.eval["fvu"] < 0.5


@pytest.mark.parametrize("architecture", ["batchtopk", "jumprelu", "matryoshka", "matryoshka_topk"])
def test_a_resumed_run_matches_an_uninterrupted_one(architecture):
    source = SyntheticSource(32, 64, 3, 0)
    cfg = small_config(architecture, latent_dim=128, batch_size=64, total_steps=60, log_every=10,
                       checkpoint_every_steps=20, target_l0=4 / 128, k=4 if architecture != "jumprelu" else None)
    _, straight = train(source, cfg)
    saved = []
    stop_at = iter(range(1000))
    train(source, cfg, checkpointing=Checkpointing(lambda s: saved.append(torch.load(_roundtrip(s), weights_only=False)),
                                                   every_steps=20, every_s=1e9),
          should_stop=lambda: "stop" if next(stop_at) == 35 else None)
    assert saved[-1]["step"] == 35
    _, resumed = train(source, cfg, resume=saved[-1])
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0)


def _roundtrip(state: dict):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_hierarchical_source_keeps_its_structure():
    source = HierarchicalSource(64, 512, 12, seed=3)
    g = torch.Generator().manual_seed(0)
    fire = source.firing(20_000, g, CPU)
    children = torch.nonzero(source.parent >= 0).flatten()
    assert children.numel() > 0
    assert not (fire[:, children] & ~fire[:, source.parent[children]]).any()  # a child never fires alone
    for node in torch.nonzero(source.exclusive).flatten()[:20]:
        kids = torch.nonzero(source.parent == node).flatten()
        assert (fire[:, kids].sum(dim=1) <= 1).all()  # mutually exclusive children
    frequency = fire.float().mean(dim=0)
    top, bottom = frequency.sort(descending=True).values[[0, -1]]
    assert top > 50 * max(float(bottom), 1e-5)  # Zipfian: frequencies span orders of magnitude
    assert 6 < float(fire.sum(dim=1).float().mean()) <= 12
    independent = torch.nonzero((source.parent < 0) & (source.level_of == 0)).flatten()[:200]
    corr = np.corrcoef(fire[:, independent].float().numpy().T)
    assert np.nanmax(np.abs(corr - np.eye(len(independent)))) > 0.05  # correlated firing
    x = source._generate(100, torch.Generator().manual_seed(1), CPU)
    assert x.shape == (100, 64) and torch.isfinite(x).all()


def test_mcc_is_a_one_to_one_matching():
    # two latents on the same feature: MMCS calls both features found, MCC does not
    similarity = np.array([[1.0, 0.2], [0.99, 0.1]])
    assert mean_correlation_coefficient(similarity) == pytest.approx((0.2 + 0.99) / 2)
    features = torch.eye(4)
    sae = build_sae("topk", 4, 4, k=1)
    with torch.no_grad():
        sae.W_dec.copy_(torch.eye(4)[[2, 0, 3, 1]] * -3)  # a permutation, sign and scale do not matter
    recovery = ground_truth_recovery(sae, features)
    assert recovery.mcc == pytest.approx(1.0)


def test_the_api_takes_each_architecture_and_names_a_bad_setting_at_its_field(client):
    from conftest import QUICK_CONFIG

    body = {**QUICK_CONFIG, "architecture": "jumprelu", "l1_alpha": None, "k": None}
    for key in ("l0_coefficient", "jumprelu_bandwidth", "matryoshka_prefixes"):
        body.pop(key, None)
    created = client.post("/api/trainings", json=body)
    assert created.status_code == 201, created.json
    config = client.get(f"/api/trainings/{created.json['id']}").json["config"]
    assert config["l0_coefficient"] == 10.0 and config["jumprelu_bandwidth"] == 0.05 and config["k"] is None
    matryoshka = {**QUICK_CONFIG, "architecture": "matryoshka", "l1_alpha": None, "k": 8, "latent_dim": 256}
    for prefixes, message in (("64, 32", "increasing"), ("128, 256", "smaller than latent_dim"),
                              ("8, 64", "at least 2·k"), ("a lot", "whole number")):
        refused = client.post("/api/trainings", json={**matryoshka, "matryoshka_prefixes": prefixes})
        assert refused.status_code == 422 and message in " ".join(refused.json["errors"]["matryoshka_prefixes"])
    assert client.post("/api/trainings", json={**matryoshka, "matryoshka_prefixes": "32, 128"}).status_code == 201
    no_k = client.post("/api/trainings", json={**matryoshka, "k": None})
    assert no_k.status_code == 422 and "k is required" in no_k.json["errors"]["k"][0]


def test_matryoshka_topk_keeps_k_per_token_and_each_prefix_reconstructs_alone():
    """Exactly k latents per token in training and at inference (it is a TopK SAE once trained), and
    the nested loss makes the first level (1/16 of the latents) reconstruct on its own: the same
    first 32 latents of a plain TopK SAE, trained on the same batches, explain less (this source has
    no hierarchy for the first level to catch, so the gap is modest: FVU 0.79 against 0.94)."""
    from app.sae.architectures import get

    source = SyntheticSource(64, 256, 4, 0)
    cfg = small_config("matryoshka_topk", total_steps=400, k=8, target_l0=8 / 512)
    result, sae = train(source, cfg)
    plain_result, plain = train(source, small_config("topk", total_steps=400, k=8, target_l0=8 / 512))
    assert result.eval["l0"] == 8 and result.eval["fvu"] < 1.5 * plain_result.eval["fvu"]
    x = source.eval_rows(4096, device=CPU) * result.norm_scale

    def first_level_fvu(model):
        with torch.no_grad():
            f = model.encode(x)
            f[:, 32:] = 0
            return float((x - model.decode(f)).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum())

    assert sae.levels == (32, 64, 128, 256, 512)
    assert first_level_fvu(sae) < 0.9 * first_level_fvu(plain)  # measured: 0.79 against 0.94
    loaded = get("matryoshka_topk").inference_model(64, 512, k=8)
    loaded.load_state_dict({name: value for name, value in sae.state_dict().items()})
    torch.testing.assert_close(loaded(x)[1], sae(x)[1])
    assert type(loaded).__name__ == "TopKSAE"


def test_auxk_has_its_own_window_and_the_dead_count_keeps_the_dead_latent_window():
    """AuxK works on latents silent for ``aux_window_tokens`` (default 5,000) long before the dead-latent
    window has passed (the dead count still waits for it); a run stored before the setting existed
    (None) keeps AuxK on the dead-latent window, as it trained."""
    from app.sae.trainer import aux_window, dead_window

    source = SyntheticSource(32, 64, 3, 0)
    points = {}
    for window in (2_000, None):
        cfg = small_config("topk", latent_dim=512, batch_size=256, total_steps=120, k=4, target_l0=4 / 512,
                           log_every=10, dead_window_tokens=200_000, aux_window_tokens=window)
        logged = []
        train(source, cfg, on_log=lambda p: logged.append(p))
        points[window] = [p for p in logged if p.tokens < dead_window(cfg)]  # before the dead count is known
    assert dead_window(cfg) == 120 * 256 // 2 and aux_window(cfg) == dead_window(cfg)
    assert len(points[None]) == 5 and all(p.dead is None for p in points[2_000] + points[None])
    assert any(p.sparsity_loss > 0 for p in points[2_000])  # AuxK at work on latents silent for 2,000 tokens
    assert all(p.sparsity_loss == 0 for p in points[None])  # not before the dead-latent window
    assert TrainConfig.__dataclass_fields__["aux_window_tokens"].default == 5_000
