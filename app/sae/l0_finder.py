"""Finding the right L0 from a ladder of SAEs, after "Sparse but Wrong" (Chanin & Garriga-Alonso,
arXiv 2508.16560, "Sparse but Wrong: Incorrect L0 Leads to Incorrect Features in Sparse Autoencoders").

The paper's claim, in short: a BatchTopK SAE whose L0 (the mean number of latents firing per token)
differs from the true number of features active per token learns wrong latents. Too low an L0 and
each latent absorbs ("hedges") a share of the frequent, correlated features it cannot afford its
own latent for; too high and the SAE finds degenerate mixtures. Either way the decoder rows stop
being the clean, nearly orthogonal feature directions and start to share components with each other.
So a quantity that measures how much the decoder rows overlap is lowest near the right L0, and the
recipe is: train a ladder of SAEs (same data, same width) at several L0s, compute that quantity for
each, and read the right L0 off where it is smallest.

What this module computes (written from the paper and the authors' released code,
github.com/chanind/sparse-but-wrong-paper, not copied from either):

``decoder_cosine(W_dec)`` — **c_dec**, the decoder pairwise cosine similarity. With d̂_i the
unit-norm decoder row of latent i (``W_dec`` is [latent_dim, d_in]) and h = latent_dim::

    c_dec = (2 / (h (h − 1))) · Σ_{i<j} |d̂_i · d̂_j|

the mean absolute cosine over all distinct pairs of decoder rows. It needs only the weights.
Hedging adds a common component to many rows, which raises it; so does the mixing above the
right L0. Lower is better.

``nth_decoder_projection(W_dec, acts, n)`` — **s_n^dec**, the n-th decoder projection. For a
sample of N (normalized) training activations x, project each onto every unit decoder row:
p_{t,i} = (x_t − b_dec) · d̂_i, giving N·h numbers. Sort them from largest down;
s_n^dec is the one at 0-based position n·N, i.e. the value that on average n projections per
token exceed. n must be larger than the true L0 (the paper reads it well above, up to about half
the width; the authors' LLM demo used n ≈ 0.37·h); :func:`default_n` picks h // 3. The same n must
be used on every rung. Lower is better: a correct dictionary projects strongly onto the few
features present in a token and weakly onto the rest, so past the n-th largest the projections are
small; hedged or mixed rows pick up each other's directions and the tail rises.

``recommend_l0(points)`` — the paper reads the right L0 as the L0 at the minimum of the metric
over the ladder. We do the same (the lowest rung), then refine it between rungs: a parabola through
the lowest rung and its two neighbours, in log L0, gives its vertex, which always lies between the
midpoints of the lowest rung and its neighbours. When the lowest value is on the first or last rung
the minimum may lie outside the ladder: the result says so and which way to extend it.

``seed_consistency(W_dec_a, W_dec_b)`` — **cross-seed consistency**, our ground-truth-free
alternative (not from the paper). Train two SAEs per rung that differ only in their initialisation
seed (same data, same data order, same k). With â_i, b̂_j their unit decoder rows, take the
|cosine| matrix |â_i · b̂_j| and the best one-to-one (Hungarian) matching of rows of one to rows of
the other; the consistency is the mean |cosine| over the matched pairs (the MCC of
``app.sae.features.mean_correlation_coefficient``, with the second SAE standing in for the
ground truth). 1 for identical or permuted decoders, about √(2/(π·d_in)) plus a little for
independent random ones. The hypothesis: at the right L0 both seeds converge on the same (true)
features, so consistency peaks there; too low an L0 leaves many equally good mixtures, too high
degenerate ones, and the seeds pick different ones. **Higher is better** (a peak, not a minimum).

``recommend_l0(points, metric=...)`` reads the peak instead of the minimum for a metric where
higher is better (``metric="consistency"``, see ``HIGHER_IS_BETTER``), with the same refinement,
bracket and edge flags as for the minimum.

``ladder(centre_or_bounds, n)`` — geometric target-L0 rungs (latent counts k, integers) for the finder.

How well it works here (benchmarks/results/l0_finder.md): on a toy source like the paper's (few,
nearly orthogonal, correlated features; as many latents as features) c_dec's minimum landed one
rung above the true L0. On our superposed sources (more features than dimensions) with SAEs
trained for only ~1M tokens, neither metric had its minimum near the true L0: they kept falling
(or rose and fell) with k, and the recommendation sat on the top rung, flagged ``at_edge``. Cross-seed
consistency (measured once, two sources, under load) did peak at the rung nearest the true L0 on
both (flat5: rung 6 for 5, refined to 7, +40%; hier16: 14 for 14.5, −4%), at twice the training
cost. Treat any recommendation as a hint to be checked, never as a setting applied without a look.

This module imports only torch and numpy: the web process and the trainer may both use it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch

PAPER = "Chanin & Garriga-Alonso 2025, arXiv 2508.16560"
METRICS = {
    "c_dec": "decoder pairwise cosine similarity (c_dec)",
    "s_n_dec": "n-th decoder projection (s_n^dec)",
    "consistency": "cross-seed consistency (MCC between the decoders of two seeds)",
}
HIGHER_IS_BETTER = frozenset({"consistency"})  # metrics read at their peak rather than their minimum
CONSISTENCY_MAX_PAIRS = 2**24  # latent_dim_a × latent_dim_b up to which seed_consistency runs (a second or so)


def _unit_rows(W_dec: torch.Tensor) -> torch.Tensor:
    w = W_dec.detach().to(torch.float32)
    if w.dim() != 2 or w.shape[0] < 2:
        raise ValueError(f"W_dec must be [latent_dim >= 2, d_in], got shape {tuple(w.shape)}")
    return w / w.norm(dim=1, keepdim=True).clamp(min=1e-12)


@torch.no_grad()
def decoder_cosine(W_dec: torch.Tensor, *, block: int = 2048) -> float:
    """c_dec: the mean |cosine| over all distinct pairs of decoder rows (``W_dec`` [latent_dim, d_in]).

    Computed in blocks of ``block`` rows, so a 64k-latent decoder needs no 64k × 64k matrix.
    Rows of zero norm count as cosine 0 with everything.
    """
    w = _unit_rows(W_dec)
    h = w.shape[0]
    total = torch.zeros((), dtype=torch.float64, device=w.device)
    for start in range(0, h, block):
        part = w[start:start + block]
        sims = (part @ w.t()).abs()
        # drop each row's cosine with itself (the diagonal of this block)
        idx = torch.arange(part.shape[0], device=w.device)
        sims[idx, start + idx] = 0.0
        total += sims.sum(dtype=torch.float64)
    return float(total / (h * (h - 1)))


def default_n(latent_dim: int) -> int:
    """The n of s_n^dec used when none is given: a third of the width (at least 1)."""
    return max(1, latent_dim // 3)


@torch.no_grad()
def nth_decoder_projection(W_dec: torch.Tensor, acts: torch.Tensor, n: int | None = None, *,
                           b_dec: torch.Tensor | None = None) -> float:
    """s_n^dec of one SAE on a sample of its (normalized) training activations ``acts`` [N, d_in].

    The (n·N)-th largest (0-based) of the N·latent_dim projections of ``acts − b_dec`` onto the unit
    decoder rows: the value that, on average, n projections per token exceed. ``n`` defaults to
    :func:`default_n`; it must satisfy 1 <= n < latent_dim. Memory: N × latent_dim floats.
    """
    w = _unit_rows(W_dec)
    h = w.shape[0]
    n = default_n(h) if n is None else int(n)
    if not 1 <= n < h:
        raise ValueError(f"n must lie in [1, latent_dim), got {n} for latent_dim {h}")
    x = acts.detach().to(w.device, torch.float32)
    if x.dim() != 2 or x.shape[1] != w.shape[1] or x.shape[0] < 1:
        raise ValueError(f"acts must be [N >= 1, {w.shape[1]}], got shape {tuple(x.shape)}")
    if b_dec is not None:
        x = x - b_dec.detach().to(w.device, torch.float32)
    proj = (x @ w.t()).flatten()
    # 0-based position n·N from the top is the (total − n·N)-th smallest (1-based)
    k_smallest = proj.numel() - n * x.shape[0]
    return float(proj.kthvalue(k_smallest).values)


@torch.no_grad()
def seed_consistency(W_dec_a: torch.Tensor, W_dec_b: torch.Tensor, *, block: int = 2048) -> float:
    """Cross-seed consistency: the MCC between two decoders (``[latent_dim, d_in]`` each, same d_in).

    The mean |cosine| over the best one-to-one (Hungarian) matching of the unit decoder rows of
    ``W_dec_a`` to those of ``W_dec_b``; 1.0 when one is a permutation (with any signs and scales)
    of the other. Widths may differ (the matching then covers the narrower). Up to
    ``CONSISTENCY_MAX_PAIRS`` row pairs (needs scipy, imported when called); wider decoders are matched
    greedily instead (each row's best partner, ``_best_match_consistency``).
    """
    from .features import mean_correlation_coefficient

    a, b = _unit_rows(W_dec_a), _unit_rows(W_dec_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"decoders must share d_in, got {a.shape[1]} and {b.shape[1]}")
    if a.shape[0] * b.shape[0] > CONSISTENCY_MAX_PAIRS:
        return _best_match_consistency(a, b, block=block)
    b = b.to(a.device)
    sims = np.empty((a.shape[0], b.shape[0]), dtype=np.float32)
    for start in range(0, a.shape[0], block):
        sims[start:start + block] = (a[start:start + block] @ b.t()).abs().cpu().numpy()
    return mean_correlation_coefficient(sims)


@torch.no_grad()
def _best_match_consistency(a: torch.Tensor, b: torch.Tensor, *, block: int = 2048) -> float:
    """For decoders too wide for the one-to-one matching: each row's best |cosine| in the other decoder,
    averaged over both decoders' rows (1.0 for a permuted copy, as the matching; a little higher than
    the matching on unrelated decoders, since two rows may pick the same partner). Blocked: no
    latent_dim × latent_dim matrix is held."""
    b = b.to(a.device)

    def mean_best(x: torch.Tensor, y: torch.Tensor) -> float:
        best = torch.cat([(x[i:i + block] @ y.t()).abs().amax(dim=1) for i in range(0, x.shape[0], block)])
        return float(best.mean())

    return 0.5 * (mean_best(a, b) + mean_best(b, a))


def sae_metrics(sae, acts: torch.Tensor | None = None, *, n: int | None = None) -> dict:
    """Both metrics of a trained SAE (anything with ``W_dec`` and optionally ``b_dec``).

    ``acts`` must be normalized as the SAE saw them in training; without it only c_dec is given.
    """
    out = {"c_dec": decoder_cosine(sae.W_dec)}
    if acts is not None:
        out["s_n_dec"] = nth_decoder_projection(sae.W_dec, acts, n, b_dec=getattr(sae, "b_dec", None))
    return out


@dataclass(frozen=True)
class Recommendation:
    """What :func:`recommend_l0` found on a ladder."""

    l0: int  # the recommended L0 (k for TopK/BatchTopK), rounded from ``estimate``
    estimate: float  # the refined minimum (or the edge rung's L0)
    rung: float  # the ladder L0 with the lowest metric
    rule: str  # how it was chosen, one sentence for the UI
    certainty: str  # how far to trust it, one sentence for the UI
    bracket: tuple[float, float]  # the right L0 most likely lies between these ladder L0s
    at_edge: str | None = None  # "low" or "high" when the lowest rung is the first or last: extend the ladder
    shallow: bool = False  # the minimum stands out by less than ``shallow_below`` of the curve's range
    points: list[tuple[float, float]] = field(default_factory=list)  # the ladder, sorted, as used


def _fmt(v: float) -> str:
    return f"{v:.0f}" if abs(v - round(v)) < 1e-9 else f"{v:.3g}"


def recommend_l0(points: Iterable[Sequence[float]], *, metric: str = "c_dec", refine: bool = True,
                 shallow_below: float = 0.05, higher_is_better: bool | None = None) -> Recommendation:
    """Read the right L0 off a ladder ``[(l0, metric_value), ...]`` (any order).

    The rule (the paper's, for c_dec and s_n^dec): the rung with the lowest metric. For a metric
    where higher is better (``higher_is_better``; by default true exactly for the metrics in
    ``HIGHER_IS_BETTER``, i.e. ``"consistency"``) the rung with the highest value instead. With
    ``refine`` and an interior extremum, the estimate is the vertex of the parabola through that
    rung and its two neighbours in log L0, which lies between the midpoints (in log L0) of the
    extremum and its neighbours. Points whose value is not finite are ignored; L0s must be positive
    and distinct. ``metric`` names the metric in the sentences (a key of ``METRICS`` or any text).
    ``points`` in the result keep the values as given.
    """
    higher = (metric in HIGHER_IS_BETTER) if higher_is_better is None else bool(higher_is_better)
    best, source = ("highest", "our cross-seed rule, not the paper's") if higher else ("lowest", PAPER)
    pts = []
    for item in points:
        l0, value = float(item[0]), float(item[1])
        if not (math.isfinite(l0) and l0 > 0):
            raise ValueError(f"ladder L0s must be positive and finite, got {item[0]!r}")
        if math.isfinite(value):
            pts.append((l0, value))
    pts.sort()
    if not pts:
        raise ValueError("recommend_l0 needs at least one rung with a finite metric value")
    if len({p[0] for p in pts}) != len(pts):
        raise ValueError("ladder L0s must be distinct")
    name = METRICS.get(metric, metric)
    l0s = np.array([p[0] for p in pts])
    vals = np.array([p[1] for p in pts])
    if higher:  # read the peak as the minimum of the negated curve
        vals = -vals
    i = int(np.argmin(vals))
    rung = float(l0s[i])
    span = float(vals.max() - vals.min())
    rule = f"The L0 with the {best} {name} across the ladder ({source})"

    if len(pts) == 1:
        return Recommendation(round(rung), rung, rung, rule + "; only one rung, so nothing to compare.",
                              "Uncertain: a single SAE says nothing about where the best L0 is; "
                              "train at least three L0s.",
                              (rung, rung), None, True, pts)

    neighbours = [vals[j] for j in (i - 1, i + 1) if 0 <= j < len(pts)]
    shallow = bool(span <= 0 or (min(neighbours) - vals[i]) < shallow_below * span)

    if i == 0 or i == len(pts) - 1:
        edge = "low" if i == 0 else "high"
        other = float(l0s[1] if i == 0 else l0s[-2])
        direction = "below" if edge == "low" else "above"
        certainty = (f"The {best} {name} is on the {'first' if edge == 'low' else 'last'} rung (L0 {_fmt(rung)}): "
                     f"the right L0 may lie {direction} the ladder. Extend it {direction} {_fmt(rung)} before "
                     f"trusting this.")
        return Recommendation(max(1, round(rung)), rung, rung, rule + ".", certainty,
                              (float(min(rung, other)), float(max(rung, other))), edge, shallow, pts)

    lo, hi = float(l0s[i - 1]), float(l0s[i + 1])
    estimate = rung
    if refine:
        x = np.log(l0s[i - 1:i + 2])
        y = vals[i - 1:i + 2]
        # vertex of the parabola through the three points (x0, y0), (x1, y1), (x2, y2)
        num = (x[1] - x[0]) ** 2 * (y[1] - y[2]) - (x[1] - x[2]) ** 2 * (y[1] - y[0])
        den = (x[1] - x[0]) * (y[1] - y[2]) - (x[1] - x[2]) * (y[1] - y[0])
        if den != 0 and math.isfinite(num / den):
            vx = x[1] - 0.5 * num / den
            vx = min(max(vx, 0.5 * (x[0] + x[1])), 0.5 * (x[1] + x[2]))  # stays between the midpoints
            estimate = float(math.exp(vx))
        rule += ", refined by a parabola through it and its two neighbouring rungs (in log L0)."
    else:
        rule += "."
    extremum = "peak" if higher else "minimum"
    certainty = (f"The {extremum} is inside the ladder: the right L0 most likely lies between the neighbouring "
                 f"rungs {_fmt(lo)} and {_fmt(hi)}.")
    if shallow:
        certainty += (f" The curve is flat there (the {extremum} beats its neighbours by under "
                      f"{shallow_below:.0%} of the curve's range): treat this as rough.")
    return Recommendation(max(1, round(estimate)), estimate, rung, rule, certainty, (lo, hi), None, shallow, pts)


def ladder(centre_or_bounds: float | Sequence[float], n: int = 7, *, spread: float = 4.0,
           latent_dim: int | None = None) -> list[int]:
    """Geometric target-L0 rungs (integer latent counts k) for the finder, strictly increasing.

    ``centre_or_bounds``: a number c gives rungs from c / spread to c · spread with c in the middle
    (for odd n); a pair (lo, hi) gives rungs from lo to hi. ``n`` is the number of rungs asked for
    (at least 2). Rungs are rounded to integers, at least 1; where rounding makes two equal the later
    one is moved up by one. With ``latent_dim`` rungs above latent_dim // 2 are dropped (an L0 of half
    the width is no longer sparse), so fewer than n may come back; never fewer than one.
    """
    if n < 2:
        raise ValueError("a ladder needs at least 2 rungs")
    if isinstance(centre_or_bounds, (int, float)):
        c = float(centre_or_bounds)
        if not (math.isfinite(c) and c > 0) or not spread > 1:
            raise ValueError("the centre must be positive and finite, and spread greater than 1")
        lo, hi = c / spread, c * spread
    else:
        lo, hi = (float(v) for v in centre_or_bounds)
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
            raise ValueError(f"bounds must satisfy 0 < lo < hi, got {centre_or_bounds!r}")
    lo = max(lo, 1.0)
    hi = max(hi, lo)
    raw = np.exp(np.linspace(math.log(lo), math.log(hi), n))
    rungs: list[int] = []
    for value in raw:
        k = max(1, int(round(value)))
        if rungs and k <= rungs[-1]:
            k = rungs[-1] + 1
        rungs.append(k)
    if latent_dim is not None:
        cap = max(1, latent_dim // 2)
        rungs = [k for k in rungs if k <= cap] or [min(rungs[0], cap)]
    return rungs
