"""What each latent of a trained SAE does, on a sample of activations.

Pass 1 encodes the sample in chunks and keeps, per latent, the firing count, the sum and
maximum of its activation and its top-N rows (a running top-k). Pass 2 gives each top
example its context: the latent's activation on the rows around it (same document,
consecutive positions), computed for that latent alone. A TopK latent is active on a row
only when its pre-activation is among the row's k largest: pass 1 records per row the
point midway between the k-th and (k+1)-th, a cut that rounding cannot cross (short of a
near-tie). Also: decoder-direction neighbours among the latents and, for a source with
known ground-truth features, the best-matching feature per latent, MMCS and the share
recovered.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import UserError
from .export import LoadedSAE
from . import architectures
from .models import SparseAutoencoder, inference_sae

RECOVERED_COSINE = 0.9


class FeatureError(UserError, ValueError):
    """The SAE and the source do not fit together; the message is for the user."""


def to_module(loaded: LoadedSAE, device: torch.device) -> SparseAutoencoder:
    sae = inference_sae(loaded.architecture, loaded.d_in, loaded.d_sae, k=loaded.k, device=device)
    with torch.no_grad():
        for name in architectures.get(loaded.architecture).exports_as.tensor_names():
            getattr(sae, name).copy_(torch.from_numpy(np.ascontiguousarray(loaded.weights[name])))
    return sae.eval()


@dataclass
class LatentStats:
    frequency: np.ndarray  # share of sample tokens the latent fired on
    mean_active: np.ndarray  # mean activation where it fired (0 if never)
    max_active: np.ndarray
    top_rows: np.ndarray  # [d_sae, N] sample rows, strongest first; -1 where fewer than N fired
    top_acts: np.ndarray  # [d_sae, N]
    thresholds: np.ndarray | None = None  # TopK: per row, midway between its k-th and (k+1)-th pre-activation
    n_tokens: int = 0
    extra: dict = field(default_factory=dict)


def latent_stats(sae: SparseAutoencoder, x: torch.Tensor, *, top_n: int, chunk: int = 4096,
                 should_stop: Callable[[], str | None] | None = None,
                 on_progress: Callable[[float], None] | None = None) -> LatentStats:
    """Pass 1 over ``x`` (already in the SAE's input space): frequencies, means, maxima, top rows."""
    n, d_sae = x.shape[0], sae.d_sae
    device = x.device
    count = torch.zeros(d_sae, device=device, dtype=torch.float64)
    total = torch.zeros(d_sae, device=device, dtype=torch.float64)
    peak = torch.zeros(d_sae, device=device)
    top_acts = torch.full((top_n, d_sae), -1.0, device=device)
    top_rows = torch.full((top_n, d_sae), -1, device=device, dtype=torch.long)
    thresholds = torch.empty(n, device=device) if sae.row_cut else None
    with torch.no_grad():
        for start in range(0, n, chunk):
            if should_stop is not None and (reason := should_stop()):
                raise InterruptedError(reason)
            if thresholds is not None:
                pre = sae.pre_activation(x[start:start + chunk])
                # midway between the k-th and (k+1)-th pre-activation: pass 2 recomputes a
                # latent's pre-activation alone, and rounding must not move it across the cut
                top = pre.topk(min(sae.k + 1, sae.d_sae), dim=-1).values
                if sae.k < sae.d_sae:
                    cut = (top[:, sae.k - 1] + top[:, sae.k]) / 2
                else:
                    cut = torch.full_like(top[:, 0], -torch.inf)
                thresholds[start:start + len(pre)] = cut
                f = sae._topk(pre, sae.k)
            else:
                f = sae.encode(x[start:start + chunk])
            fired = f > 0
            count += fired.sum(dim=0)
            total += f.sum(dim=0, dtype=torch.float64)
            peak = torch.maximum(peak, f.max(dim=0).values)
            # the chunk's own top rows per latent, then a merge with the running top: memory
            # stays O(top_n · d_sae) beside the chunk, whatever the sample size
            local = f.masked_fill(~fired, -1.0).topk(min(top_n, len(f)), dim=0)
            both_acts = torch.cat([top_acts, local.values])
            both_rows = torch.cat([top_rows, local.indices + start])
            best = both_acts.topk(top_n, dim=0)
            top_acts = best.values
            top_rows = torch.gather(both_rows, 0, best.indices)
            if on_progress is not None:
                on_progress(min(1.0, (start + len(f)) / n))
    top_rows = torch.where(top_acts > 0, top_rows, torch.full_like(top_rows, -1))
    top_acts = top_acts.clamp(min=0)
    mean = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
    return LatentStats((count / n).float().cpu().numpy(), mean.float().cpu().numpy(), peak.cpu().numpy(),
                       top_rows.t().cpu().numpy(), top_acts.t().cpu().numpy(),
                       None if thresholds is None else thresholds.cpu().numpy(), n)


def context_rows(rows: np.ndarray, documents: np.ndarray, positions: np.ndarray, width: int) -> np.ndarray:
    """For each row, the rows ``-width..width`` around it in the same window; -1 where there is none."""
    offsets = np.arange(-width, width + 1)
    cand = rows[..., None] + offsets
    n = len(documents)
    ok = (rows[..., None] >= 0) & (cand >= 0) & (cand < n)
    safe = np.clip(cand, 0, n - 1)
    base = np.clip(rows, 0, n - 1)[..., None]
    ok &= documents[safe] == documents[base]
    ok &= positions[safe] - positions[base] == offsets
    ok &= positions[safe] >= 0
    return np.where(ok, cand, -1)


def latent_activations_at(sae: SparseAutoencoder, x: torch.Tensor, latents: np.ndarray, rows: np.ndarray,
                          thresholds: np.ndarray | None, *, max_gather: int = 32 * 2**20) -> np.ndarray:
    """``out[i, j] = activation of latent latents[i] on row rows[i, j]`` (0 where the row is -1).

    Latents go in blocks whose gathered rows hold at most ``max_gather`` values.
    """
    out = np.zeros(rows.shape, dtype=np.float32)
    block = max(1, max_gather // max(1, rows.shape[1] * x.shape[1]))
    device = x.device
    thr = None if thresholds is None else torch.from_numpy(thresholds).to(device)
    with torch.no_grad():
        for start in range(0, len(latents), block):
            lat = torch.from_numpy(latents[start:start + block]).to(device)
            idx = torch.from_numpy(rows[start:start + block]).to(device)
            valid = idx >= 0
            xs = x[idx.clamp(min=0)]  # [B, M, d_in]
            pre, act = sae.latent_activations(xs, lat)
            if thr is not None:  # TopK: a row's cut between its k-th and (k+1)-th pre-activation
                act = torch.where(pre > thr[idx.clamp(min=0)], act, torch.zeros_like(act))
            out[start:start + block] = torch.where(valid, act, torch.zeros_like(act)).cpu().numpy()
    return out


def decoder_neighbours(sae: SparseAutoencoder, n: int = 5, *, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Each latent's ``n`` nearest other latents by decoder-direction cosine: (indices, cosines)."""
    with torch.no_grad():
        w = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True).clamp(min=1e-12)
        n = min(n, sae.d_sae - 1)
        idx = np.zeros((sae.d_sae, n), dtype=np.int64)
        cos = np.zeros((sae.d_sae, n), dtype=np.float32)
        for start in range(0, sae.d_sae, block):
            sims = w[start:start + block] @ w.t()
            rows = torch.arange(start, min(start + block, sae.d_sae), device=w.device)
            sims[rows - start, rows] = -2.0
            best = sims.topk(n, dim=1)
            idx[start:start + block] = best.indices.cpu().numpy()
            cos[start:start + block] = best.values.cpu().numpy()
    return idx, cos


@dataclass
class Recovery:
    best_feature: np.ndarray  # per latent: the ground-truth feature its decoder direction matches best
    best_cosine: np.ndarray
    mmcs: float  # mean over ground-truth features of the best cosine any latent reaches
    recovered: float  # share of ground-truth features some latent matches above RECOVERED_COSINE
    n_features: int
    mcc: float | None = None  # mean |cosine| of a one-to-one (Hungarian) matching of latents to features


MCC_MAX_PAIRS = 2**24  # latents × features up to which the one-to-one matching is computed (a second or so)


def mean_correlation_coefficient(similarity: np.ndarray) -> float:
    """MCC: the mean |cosine| over the best one-to-one matching of latents (rows) to features (columns).

    Unlike MMCS, one latent cannot stand in for several features: a dictionary whose latents
    are mixtures of features scores low even if each feature has some latent near it.
    """
    from scipy.optimize import linear_sum_assignment

    magnitude = np.abs(similarity)
    rows, cols = linear_sum_assignment(magnitude, maximize=True)
    return float(magnitude[rows, cols].mean())


def ground_truth_recovery(sae: SparseAutoencoder, features: torch.Tensor, *, block: int = 2048) -> Recovery:
    """Compare decoder directions with known unit feature directions ``features [n, d_in]``."""
    with torch.no_grad():
        w = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True).clamp(min=1e-12)
        feats = features.to(w.device, w.dtype)
        feats = feats / feats.norm(dim=1, keepdim=True).clamp(min=1e-12)
        best_feature = torch.empty(sae.d_sae, dtype=torch.long, device=w.device)
        best_cosine = torch.empty(sae.d_sae, device=w.device)
        per_feature = torch.full((len(feats),), -1.0, device=w.device)
        keep = sae.d_sae * len(feats) <= MCC_MAX_PAIRS
        full = np.zeros((sae.d_sae, len(feats)), dtype=np.float32) if keep else None
        for start in range(0, sae.d_sae, block):
            sims = w[start:start + block] @ feats.t()
            if full is not None:
                full[start:start + block] = sims.float().cpu().numpy()
            values, indices = sims.max(dim=1)
            best_feature[start:start + block], best_cosine[start:start + block] = indices, values
            per_feature = torch.maximum(per_feature, sims.max(dim=0).values)
    return Recovery(best_feature.cpu().numpy(), best_cosine.cpu().numpy(), float(per_feature.mean()),
                    float((per_feature > RECOVERED_COSINE).float().mean()), len(feats),
                    mean_correlation_coefficient(full) if full is not None else None)
