"""The fast paths give the answers of the plain ones: sparse TopK against dense TopK, bfloat16
against float32."""
from __future__ import annotations

import pytest
import torch

from app.sae.metrics import SparseLatents, l0_per_token
from app.sae.models import TopKSAE
from app.sae.sources import SyntheticSource
from app.sae.trainer import TrainConfig, resolve_precision, train

# Tolerances: the two paths add the same float32 products in a different order (an index-add
# against a matmul's blocked sums), so they agree to float32 rounding, about 1e-6 relative,
# not bit for bit.
RTOL, ATOL = 1e-4, 1e-6


def pair(k: int = 8, d_in: int = 32, d_sae: int = 256, seed: int = 0) -> tuple[TopKSAE, TopKSAE]:
    g = torch.Generator().manual_seed(seed)
    dense = TopKSAE(d_in, d_sae, k=k, generator=g, sparse=False)
    sparse = TopKSAE(d_in, d_sae, k=k, sparse=True)
    with torch.no_grad():
        dense.b_enc.normal_(0, 0.1, generator=g)
        dense.b_dec.normal_(0, 0.1, generator=g)
    sparse.load_state_dict(dense.state_dict())
    return dense, sparse


@pytest.mark.parametrize("with_dead", [False, True])
def test_sparse_topk_forward_and_gradients_match_the_dense_path(with_dead):
    dense, sparse = pair()
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    dead = torch.zeros(256, dtype=torch.bool)
    dead[::3] = True
    mask = dead if with_dead else None
    parts_d, x_hat_d, f_d = dense.loss(x, dead_mask=mask)
    parts_s, x_hat_s, f_s = sparse.loss(x, dead_mask=mask)
    assert isinstance(f_s, SparseLatents)
    torch.testing.assert_close(f_s.dense(), f_d, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(x_hat_s, x_hat_d, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(l0_per_token(f_s), l0_per_token(f_d))
    for name in ("total", "mse", "sparsity", "l1"):
        torch.testing.assert_close(getattr(parts_s, name), getattr(parts_d, name), rtol=RTOL, atol=ATOL)
    if with_dead:
        assert parts_d.sparsity > 0  # the AuxK term is really there
    parts_d.total.backward()
    parts_s.total.backward()
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        gd, gs = getattr(dense, name).grad, getattr(sparse, name).grad
        assert gd.abs().max() > 0
        torch.testing.assert_close(gs, gd, rtol=RTOL, atol=1e-5, msg=f"gradient of {name}")


def test_a_short_sparse_topk_run_ends_with_the_dense_runs_weights(monkeypatch):
    from app.sae import models

    source = SyntheticSource(64, 128, 3.0, seed=0)
    cfg = dict(latent_dim=256, architecture="topk", k=8, batch_size=128, total_steps=60, lr_warmup_steps=5,
               l1_warmup_steps=5, log_every=10, dead_window_tokens=1000, device="cpu", precision="float32",
               norm_sample_tokens=1024, eval_tokens=1024)
    build = models.build_sae
    monkeypatch.setattr("app.sae.trainer.build_sae", lambda *a, **kw: build(*a, **kw, sparse_topk=True))
    sparse_result, sparse_sae = train(source, TrainConfig(**cfg))
    monkeypatch.setattr("app.sae.trainer.build_sae", lambda *a, **kw: build(*a, **kw, sparse_topk=False))
    dense_result, dense_sae = train(source, TrainConfig(**cfg))
    assert not dense_sae.sparse and sparse_sae.sparse
    # 60 Adam steps let the rounding differences grow a little; still far below any effect on the run
    for name, value in dense_sae.state_dict().items():
        torch.testing.assert_close(sparse_sae.state_dict()[name], value, rtol=1e-3, atol=1e-4, msg=name)
    assert sparse_result.eval["l0"] == pytest.approx(dense_result.eval["l0"], rel=1e-6)
    assert sparse_result.eval["fvu"] == pytest.approx(dense_result.eval["fvu"], rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_bfloat16_reaches_the_float32_outcome(architecture):
    """bf16 autocast with float32 master weights: held-out FVU within 2% and L0 within 5% of float32.

    Both runs sparse (512 latents: L0 12.6 for the standard SAE, 19.8 for TopK); measured apart by at most
    0.3% in FVU and L0 (the same held at 1,024 latents and batch 512, three times the CPU)."""
    source = SyntheticSource(256, 512, 5.0, seed=0)
    base = dict(latent_dim=512, architecture=architecture, l1_alpha=0.01 if architecture == "standard" else None,
                k=20 if architecture == "topk" else None, batch_size=256, total_steps=1000, lr_warmup_steps=50,
                l1_warmup_steps=100, log_every=100, device="cpu")
    fp32, _ = train(source, TrainConfig(**base, precision="float32"))
    bf16, _ = train(source, TrainConfig(**base, precision="bfloat16"))
    assert bf16.eval["fvu"] == pytest.approx(fp32.eval["fvu"], rel=0.02)
    assert bf16.eval["l0"] == pytest.approx(fp32.eval["l0"], rel=0.05)


def test_precision_resolves_per_device():
    cpu = torch.device("cpu")
    assert resolve_precision("float32", cpu) == "float32"
    assert resolve_precision("tf32", cpu) == "float32"  # TF32 is a CUDA thing
    assert resolve_precision("auto", cpu) in ("float32", "bfloat16")
    assert resolve_precision("bfloat16", cpu) == "bfloat16"


def test_topk_takes_the_sparse_path_only_where_the_shape_pays_for_it():
    """Unforced, a step is sparse but with AuxK on in a narrow SAE (benchmarks/topk_paths.py measured
    where each path wins), and either way the step computes the same loss."""
    from app.sae.models import build_sae

    narrow, wide = build_sae("topk", 256, 1024, k=32), build_sae("topk", 768, 16384, k=64)
    assert narrow.sparse and not narrow.sparse_with_aux  # 1,024 latents for 32 + 128 chosen
    assert wide.sparse and wide.sparse_with_aux  # 16,384 for 64 + 384
    assert build_sae("topk", 384, 4096, k=32).sparse_with_aux
    assert build_sae("topk", 256, 1024, k=32, sparse_topk=True).sparse_with_aux  # forced either way
    forced = build_sae("topk", 768, 16384, k=64, sparse_topk=False)
    assert not forced.sparse and not forced.sparse_with_aux
    x, dead = torch.randn(64, 256), torch.zeros(1024, dtype=torch.bool)
    dead[:100] = True
    plain, with_aux = narrow.loss(x)[2], narrow.loss(x, dead_mask=dead)[2]
    assert isinstance(plain, SparseLatents) and not isinstance(with_aux, SparseLatents)  # which path ran
    reference = build_sae("topk", 256, 1024, k=32, sparse_topk=True)
    reference.load_state_dict(narrow.state_dict())
    torch.testing.assert_close(narrow.loss(x, dead_mask=dead)[0].total, reference.loss(x, dead_mask=dead)[0].total)
