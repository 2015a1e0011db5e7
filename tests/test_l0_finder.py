"""The L0 finder (app/sae/l0_finder.py): the "Sparse but Wrong" decoder metrics, the ladder and the
reading of the right L0 off it. Tiny hand-built decoders only; no training."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from app.sae.l0_finder import (decoder_cosine, default_n, ladder, nth_decoder_projection, recommend_l0,
                               sae_metrics, seed_consistency)


def orthonormal(h: int, d: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, h, generator=torch.Generator().manual_seed(seed)))
    return q.t().contiguous()  # [h, d], orthonormal rows


def hedged(w: torch.Tensor, share: float) -> torch.Tensor:
    """Every row but the first takes ``share`` of row 0: what too low an L0 does to a decoder."""
    out = w.clone()
    out[1:] = out[1:] + share * w[0]
    return out


def sparse_acts(features: torch.Tensor, n: int, active: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h = features.shape[0]
    coef = torch.zeros(n, h)
    for t in range(n):
        idx = torch.randperm(h, generator=g)[:active]
        coef[t, idx] = 1.0 + torch.rand(active, generator=g)
    return coef @ features


# --- c_dec ---------------------------------------------------------------------------------------

def test_c_dec_is_zero_for_orthogonal_rows_and_one_for_parallel_rows():
    assert decoder_cosine(orthonormal(8, 16)) == pytest.approx(0.0, abs=1e-6)
    same = torch.ones(5, 3)
    same[2] *= -4.0  # sign and scale do not matter: |cosine| of unit rows
    assert decoder_cosine(same) == pytest.approx(1.0, abs=1e-6)


def test_c_dec_rises_with_hedging_so_the_clean_decoder_wins():
    w = orthonormal(16, 32)
    values = [decoder_cosine(hedged(w, s)) for s in (0.0, 0.1, 0.3, 0.6)]
    assert values == sorted(values) and values[0] < values[-1]


def test_c_dec_matches_the_pairwise_mean_and_does_not_depend_on_the_block():
    w = torch.randn(37, 11, generator=torch.Generator().manual_seed(3))
    u = w / w.norm(dim=1, keepdim=True)
    sims = (u @ u.t()).abs()
    expected = (sims.sum() - sims.diagonal().sum()) / (37 * 36)
    for block in (1, 5, 37, 1000):
        assert decoder_cosine(w, block=block) == pytest.approx(float(expected), rel=1e-5)


def test_c_dec_ignores_row_norms():
    w = torch.randn(20, 9, generator=torch.Generator().manual_seed(4))
    scaled = w * torch.linspace(0.01, 50, 20).unsqueeze(1)
    assert decoder_cosine(scaled) == pytest.approx(decoder_cosine(w), rel=1e-5)


def test_c_dec_rejects_a_single_row():
    with pytest.raises(ValueError):
        decoder_cosine(torch.ones(1, 4))


# --- s_n^dec -------------------------------------------------------------------------------------

def test_s_n_dec_is_the_value_n_projections_per_token_exceed():
    w = torch.eye(4)
    acts = torch.tensor([[4.0, 3.0, 2.0, 1.0], [8.0, 7.0, 6.0, 5.0]])
    # the 8 projections sorted down: 8 7 6 5 4 3 2 1; position n·N (0-based)
    assert nth_decoder_projection(w, acts, 1) == 6.0
    assert nth_decoder_projection(w, acts, 2) == 4.0
    assert nth_decoder_projection(w, acts, 3) == 2.0


def test_s_n_dec_subtracts_b_dec_and_uses_unit_rows():
    w = torch.eye(3) * 5.0
    acts = torch.tensor([[3.0, 2.0, 1.0]])
    assert nth_decoder_projection(w, acts, 1) == 2.0
    assert nth_decoder_projection(w, acts, 1, b_dec=torch.tensor([0.0, 1.0, 0.0])) == 1.0


def test_s_n_dec_is_lower_for_the_true_dictionary_than_for_a_hedged_one():
    feats = orthonormal(24, 48)
    acts = sparse_acts(feats, 400, active=3)
    clean = nth_decoder_projection(feats, acts, 6)
    mixed = nth_decoder_projection(hedged(feats, 0.4), acts, 6)
    assert clean < mixed


def test_s_n_dec_checks_n_and_shapes():
    w = torch.eye(4)
    with pytest.raises(ValueError):
        nth_decoder_projection(w, torch.ones(2, 4), 4)
    with pytest.raises(ValueError):
        nth_decoder_projection(w, torch.ones(2, 4), 0)
    with pytest.raises(ValueError):
        nth_decoder_projection(w, torch.ones(2, 5), 1)
    assert default_n(4096) == 1365 and default_n(2) == 1


def test_sae_metrics_gives_c_dec_alone_without_activations():
    class Tiny:
        W_dec = orthonormal(6, 12)
        b_dec = torch.zeros(12)

    assert set(sae_metrics(Tiny())) == {"c_dec"}
    assert set(sae_metrics(Tiny(), torch.randn(10, 12), n=2)) == {"c_dec", "s_n_dec"}


# --- cross-seed consistency ---------------------------------------------------------------------

def test_consistency_of_a_decoder_with_itself_is_one():
    w = torch.randn(40, 16, generator=torch.Generator().manual_seed(5))
    assert seed_consistency(w, w) == pytest.approx(1.0, abs=1e-6)


def test_consistency_ignores_order_sign_and_scale_of_the_rows():
    w = torch.randn(40, 16, generator=torch.Generator().manual_seed(6))
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(7))
    signs = torch.where(torch.arange(40) % 3 == 0, -1.0, 1.0).unsqueeze(1)
    other = w[perm] * signs * torch.linspace(0.1, 9.0, 40).unsqueeze(1)
    assert seed_consistency(w, other) == pytest.approx(1.0, abs=1e-6)


def test_consistency_of_independent_random_decoders_is_low():
    g = torch.Generator().manual_seed(8)
    value = seed_consistency(torch.randn(256, 64, generator=g), torch.randn(256, 64, generator=g))
    assert value < 0.4  # about 0.3 at this size: the best matching of unrelated random directions


def test_consistency_falls_as_one_decoder_drifts_from_the_other():
    g = torch.Generator().manual_seed(9)
    w = orthonormal(32, 64)
    noise = torch.randn(32, 64, generator=g) / 8.0  # rows of norm about 1
    values = [seed_consistency(w, w + s * noise) for s in (0.0, 0.3, 1.0, 3.0)]
    assert values == sorted(values, reverse=True) and values[0] == pytest.approx(1.0, abs=1e-6)


def test_consistency_checks_shapes():
    with pytest.raises(ValueError):
        seed_consistency(torch.randn(8, 4), torch.randn(8, 5))
    with pytest.raises(ValueError):
        seed_consistency(torch.randn(1, 4), torch.randn(8, 4))


# --- recommend_l0 ---------------------------------------------------------------------------------

def test_recommend_picks_the_interior_minimum_and_brackets_it_by_its_neighbours():
    rec = recommend_l0([(32, 0.30), (4, 0.50), (8, 0.20), (16, 0.10), (64, 0.40)])  # any order
    assert rec.rung == 16 and rec.at_edge is None and rec.bracket == (8, 32)
    assert 8 < rec.estimate < 32
    assert "8" in rec.certainty and "32" in rec.certainty
    assert "lowest" in rec.rule


def test_recommend_refines_toward_the_lower_neighbour_of_a_symmetric_log_parabola():
    # values from (log2 L0 − log2 12)²: the true minimum sits at 12, between rungs 8 and 16
    pts = [(k, (math.log2(k) - math.log2(12)) ** 2) for k in (2, 4, 8, 16, 32)]
    rec = recommend_l0(pts)
    assert rec.estimate == pytest.approx(12.0, rel=1e-6) and rec.l0 == 12
    assert recommend_l0(pts, refine=False).l0 == rec.rung


@pytest.mark.parametrize("values,edge,rung", [((0.1, 0.2, 0.3, 0.4), "low", 2), ((0.4, 0.3, 0.2, 0.1), "high", 16)])
def test_recommend_flags_an_edge_rung_so_the_ladder_is_extended(values, edge, rung):
    rec = recommend_l0(zip((2, 4, 8, 16), values))
    assert rec.at_edge == edge and rec.rung == rung and rec.l0 == rung
    assert ("below" if edge == "low" else "above") in rec.certainty and "Extend" in rec.certainty


def test_recommend_marks_a_flat_curve_as_shallow():
    rec = recommend_l0([(2, 1.0), (4, 0.5), (8, 0.4999), (16, 0.5), (32, 1.0)])
    assert rec.shallow and "rough" in rec.certainty
    assert not recommend_l0([(2, 1.0), (4, 0.6), (8, 0.1), (16, 0.6)]).shallow


def test_recommend_skips_non_finite_values_and_rejects_bad_ladders():
    rec = recommend_l0([(2, float("nan")), (4, 0.3), (8, 0.1), (16, float("inf")), (32, 0.2)])
    assert rec.rung == 8 and [p[0] for p in rec.points] == [4, 8, 32]
    with pytest.raises(ValueError):
        recommend_l0([])
    with pytest.raises(ValueError):
        recommend_l0([(4, 0.1), (4, 0.2)])
    with pytest.raises(ValueError):
        recommend_l0([(0, 0.1), (4, 0.2)])


def test_recommend_reads_the_peak_for_consistency():
    pts = [(32, 0.70), (4, 0.60), (8, 0.85), (16, 0.90), (64, 0.50)]
    rec = recommend_l0(pts, metric="consistency")
    assert rec.rung == 16 and rec.at_edge is None and rec.bracket == (8, 32)
    assert math.sqrt(8 * 16) <= rec.estimate <= math.sqrt(16 * 32)
    assert "highest" in rec.rule and "consistency" in rec.rule and "peak" in rec.certainty
    assert rec.points == sorted(pts)  # values kept as given, not negated
    # the same ladder under a lower-is-better metric picks its minimum
    assert recommend_l0(pts, metric="c_dec").rung == 64
    assert recommend_l0(pts, metric="anything", higher_is_better=True).rung == 16


def test_recommend_refines_a_symmetric_log_parabola_peak_for_consistency():
    pts = [(k, 1.0 - (math.log2(k) - math.log2(12)) ** 2) for k in (2, 4, 8, 16, 32)]
    rec = recommend_l0(pts, metric="consistency")
    assert rec.estimate == pytest.approx(12.0, rel=1e-6) and rec.l0 == 12


@pytest.mark.parametrize("values,edge,rung", [((0.9, 0.8, 0.7, 0.6), "low", 2), ((0.6, 0.7, 0.8, 0.9), "high", 16)])
def test_recommend_flags_an_edge_peak_for_consistency(values, edge, rung):
    rec = recommend_l0(zip((2, 4, 8, 16), values), metric="consistency")
    assert rec.at_edge == edge and rec.rung == rung
    assert "highest" in rec.certainty and "Extend" in rec.certainty


def test_recommend_with_one_rung_says_it_cannot_tell():
    rec = recommend_l0([(10, 0.3)])
    assert rec.l0 == 10 and "three" in rec.certainty


ladders = st.lists(st.integers(1, 4000), min_size=3, max_size=12, unique=True)


@settings(max_examples=60, deadline=None)
@given(l0s=ladders, data=st.data())
def test_recommendation_is_always_inside_the_ladder_and_next_to_the_lowest_rung(l0s, data):
    values = data.draw(st.lists(st.floats(-1e6, 1e6), min_size=len(l0s), max_size=len(l0s)))
    rec = recommend_l0(zip(l0s, values))
    ordered = sorted(l0s)
    i = ordered.index(rec.rung)
    assert values[l0s.index(rec.rung)] == min(values)
    assert rec.bracket[0] <= rec.estimate <= rec.bracket[1]
    lo, hi = ordered[max(0, i - 1)], ordered[min(len(ordered) - 1, i + 1)]
    assert rec.bracket == (lo, hi)
    assert (rec.at_edge is not None) == (i in (0, len(ordered) - 1))
    if rec.at_edge is None:  # the refined estimate stays between the log-midpoints around the minimum
        assert math.sqrt(lo * rec.rung) * (1 - 1e-9) <= rec.estimate <= math.sqrt(hi * rec.rung) * (1 + 1e-9)


# --- ladder ---------------------------------------------------------------------------------------

def test_ladder_from_a_centre_is_geometric_around_it():
    rungs = ladder(16, 5)
    assert rungs == [4, 8, 16, 32, 64]


def test_ladder_from_bounds_hits_both_ends():
    rungs = ladder((2, 128), 7)
    assert rungs[0] == 2 and rungs[-1] == 128 and len(rungs) == 7


def test_ladder_caps_at_half_the_width():
    assert ladder((8, 1000), 6, latent_dim=256)[-1] <= 128
    assert ladder((500, 1000), 3, latent_dim=256) == [128]


@settings(max_examples=80, deadline=None)
@given(lo=st.floats(0.1, 500), factor=st.floats(1.01, 200), n=st.integers(2, 12),
       width=st.none() | st.integers(2, 65536))
def test_ladder_is_strictly_increasing_integers_and_bounded(lo, factor, n, width):
    rungs = ladder((lo, lo * factor), n, latent_dim=width)
    assert all(isinstance(k, int) and k >= 1 for k in rungs)
    assert all(a < b for a, b in zip(rungs, rungs[1:]))
    assert 1 <= len(rungs) <= n
    if width is not None:
        assert rungs[-1] <= max(1, width // 2)
    else:
        assert len(rungs) == n
        # rounding moves a rung by under one, collisions push it up by at most n
        assert rungs[-1] <= max(lo * factor, 1.0) + n


def test_ladder_rejects_nonsense():
    for bad in ((8, 4), (0, 4), (float("nan"), 3)):
        with pytest.raises(ValueError):
            ladder(bad)
    with pytest.raises(ValueError):
        ladder(16, 1)
    with pytest.raises(ValueError):
        ladder(-3)


def test_decoders_too_wide_for_the_one_to_one_matching_are_matched_greedily(monkeypatch):
    """Past CONSISTENCY_MAX_PAIRS the matching would take minutes: each row's best partner is used."""
    from app.sae import l0_finder as finder

    monkeypatch.setattr(finder, "CONSISTENCY_MAX_PAIRS", 100)
    g = torch.Generator().manual_seed(4)
    a = torch.randn(64, 32, generator=g)
    assert finder.seed_consistency(a, a[torch.randperm(64, generator=g)] * -3.0) == pytest.approx(1.0, abs=1e-5)
    unrelated = finder.seed_consistency(a, torch.randn(64, 32, generator=g))
    assert unrelated < 0.75
