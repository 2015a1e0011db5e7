"""Activation sources behind one interface.

A source knows its width ``d_in`` and how many distinct training tokens it holds
(``None`` for an unbounded stream), yields shuffled batches of raw activations, and hands
out a fixed sample (for the normalization estimate) and a held-out evaluation set.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .files import ArrayInfo, holdout_rows, open_array


class ActivationSource:
    """Interface. ``batches`` yields raw float32 tensors of shape [batch_size, d_in]."""

    d_in: int
    n_tokens: int | None

    def batches(self, batch_size: int, *, seed: int, device: torch.device, start: int = 0) -> Iterator[torch.Tensor]:
        """The batches of a run seeded ``seed``, from its ``start``-th on: batch n is the same
        whether the iteration began at 0 or at n, so a resumed run reads on where it stopped."""
        raise NotImplementedError

    def sample(self, n: int, *, device: torch.device) -> torch.Tensor:
        """Up to ``n`` training rows, the same ones every call (for the normalization)."""
        raise NotImplementedError

    def eval_rows(self, n: int, *, device: torch.device) -> torch.Tensor:
        """Up to ``n`` rows never used for training."""
        raise NotImplementedError


def feature_seed(seed: int) -> int:
    """The seed of a synthetic source's true directions: never one a run's seed can be.

    An SAE draws its initial decoder with ``torch.randn`` from its run's seed; had the source
    drawn its directions the same way from the same number, the SAE would start on the answer
    (a run of seed 0 on the seed-0 source scored MMCS 1.0 before training). Run seeds lie in
    [0, 2³¹); torch's CPU generator keeps 32 bits of a seed, so the source's lies in [2³¹, 2³²).
    """
    return 2**31 + (seed * 2654435761) % 2**31


def combine(coeff: torch.Tensor, index: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Row n of the result is Σ_s coeff[n, s] · features[index[n, s]].

    With few features per slot (up to 64 features for each of a row's slots) the coefficients are
    scattered into a dense block of rows × features and multiplied by the directions, a block of rows
    at a time: about three times faster than gathering the rows × slots × d_in directions first
    (512 features, 15 slots, d_in 256: 16 against 49 ms for 4,096 rows, 218 against 643 ms for 50,000
    on one CPU thread), with the same sums up to float rounding. With many more features than slots
    the gather does less work, and is kept."""
    n, slots = index.shape
    n_features = features.shape[0]
    if n_features > 64 * slots:
        return torch.einsum("ns,nsd->nd", coeff, features[index])
    out = torch.empty(n, features.shape[1], device=features.device, dtype=features.dtype)
    rows = max(1, 2**22 // n_features)  # a dense block of at most 4M coefficients
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        block = torch.zeros(stop - start, n_features, device=features.device, dtype=coeff.dtype)
        block.scatter_add_(1, index[start:stop], coeff[start:stop])
        torch.matmul(block, features, out=out[start:stop])
    return out


class SyntheticSource(ActivationSource):
    """Activations built from known ground-truth features, for tests and the default run.

    ``n_features`` unit directions in ``d_in`` (random, fixed by ``seed``); each token
    activates on average ``mean_active`` of them, chosen uniformly, each with an
    exponentially distributed non-negative coefficient (mean 1). The token is the
    coefficient-weighted sum of its active directions.
    """

    n_tokens = None

    def __init__(self, d_in: int, n_features: int, mean_active: float, seed: int = 0) -> None:
        if d_in < 1 or n_features < 1:
            raise ValueError("d_in and n_features must be positive")
        if not 0 < mean_active <= n_features:
            raise ValueError("mean_active must lie in (0, n_features]")
        self.d_in, self.n_features, self.mean_active, self.seed = d_in, n_features, mean_active, seed
        g = torch.Generator().manual_seed(feature_seed(seed))
        directions = torch.randn(n_features, d_in, generator=g)
        self.features = directions / directions.norm(dim=1, keepdim=True)
        self.slots = min(n_features, max(4, math.ceil(3 * mean_active)))
        if mean_active > self.slots:
            raise ValueError("mean_active is too close to n_features for this generator")

    def _generate(self, n: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
        # Each token gets ``slots`` uniformly drawn candidate features, each kept with
        # probability mean_active / slots: the active count is Binomial (≈ Poisson) with
        # the requested mean, and the work is O(n · slots · d_in) with no host sync.
        features = self.features.to(device)
        index = torch.randint(self.n_features, (n, self.slots), generator=g, device=device)
        keep = torch.rand(n, self.slots, generator=g, device=device) < self.mean_active / self.slots
        coeff = torch.empty(n, self.slots, device=device).exponential_(1.0, generator=g) * keep
        return combine(coeff, index, features)

    def _generator(self, seed: int, device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(seed)

    def batches(self, batch_size, *, seed, device, start=0):
        # Each batch has its own seed, so batch n is drawn without replaying batches 0..n-1.
        g = torch.Generator(device=device)
        n = start
        while True:
            g.manual_seed(hash((self.seed, seed, n)) % 2**63)
            yield self._generate(batch_size, g, device)
            n += 1

    def sample(self, n, *, device):
        return self._generate(n, self._generator(self.seed + 17, device), device)

    def eval_rows(self, n, *, device):
        return self._generate(n, self._generator(self.seed + 29, device), device)


class HierarchicalSource(SyntheticSource):
    """A harder ground truth: hierarchy, correlated firing and Zipfian frequencies.

    Our own generator after the recipe of SynthSAEBench (which ``sae_lens.synthetic`` also
    implements); it draws only on torch, so the app needs no SAELens.

    - **Zipfian frequencies:** feature i's marginal firing probability is proportional to
      ``rank^(−zipf_exponent)`` over a random ranking, scaled so that ``mean_active`` features
      fire per token on average (before the hierarchy prunes).
    - **Hierarchy:** ``n_roots`` trees of depth 2, ``branching`` children per node. A child
      can fire only when its parent fires (its conditional probability is its marginal over its
      parent's, so parents are the more frequent); half the parents' children are mutually
      exclusive (at most one fires). The other features are independent.
    - **Correlation:** firing is decided by a Gaussian copula with a low-rank correlation
      (rank ``rank``, each feature loading ``correlation`` on it), so some features fire together.
    - **Magnitudes:** folded normal, mean about 1 (|N(1, 0.5²)|).

    Directions are random unit vectors, ``n_features`` of them in ``d_in`` (superposition when
    there are more features than dimensions).
    """

    def __init__(self, d_in: int, n_features: int, mean_active: float, seed: int = 0, *, n_roots: int | None = None,
                 branching: int = 3, zipf_exponent: float = 0.5, rank: int = 16, correlation: float = 0.5) -> None:
        if d_in < 1 or n_features < 4:
            raise ValueError("d_in must be positive and n_features at least 4")
        if not 0 < mean_active <= n_features / 4:
            raise ValueError("mean_active must lie in (0, n_features / 4]")
        self.d_in, self.n_features, self.mean_active, self.seed = d_in, n_features, mean_active, seed
        g = torch.Generator().manual_seed(feature_seed(seed))
        directions = torch.randn(n_features, d_in, generator=g)
        self.features = directions / directions.norm(dim=1, keepdim=True)
        n_roots = n_roots if n_roots is not None else max(1, n_features // 32)
        # trees first: roots, then their children, then grandchildren; the rest independent
        parent = torch.full((n_features,), -1, dtype=torch.long)
        level_of = torch.zeros(n_features, dtype=torch.long)
        exclusive = torch.zeros(n_features, dtype=torch.bool)  # a parent whose children exclude each other
        nodes, nxt = list(range(min(n_roots, n_features))), min(n_roots, n_features)
        for depth in (1, 2):
            children = []
            for node in nodes:
                for _ in range(branching):
                    if nxt >= n_features:
                        break
                    parent[nxt], level_of[nxt] = node, depth
                    children.append(nxt)
                    nxt += 1
                exclusive[node] = bool(torch.rand((), generator=g) < 0.5)
            nodes = children
        self.parent, self.level_of, self.exclusive = parent, level_of, exclusive
        # Zipfian marginals over a random ranking; the larger ones go to the upper levels, so a
        # parent is always more frequent than its children
        values = (torch.arange(n_features, dtype=torch.float64) + 1).pow(-zipf_exponent)
        values = values * mean_active / values.sum()
        order = torch.argsort(level_of * n_features + torch.randperm(n_features, generator=g))
        marginal = torch.empty(n_features, dtype=torch.float64)
        marginal[order] = values
        self.marginal = marginal.clamp(max=0.9).float()
        conditional = self.marginal.clone()
        has_parent = parent >= 0
        conditional[has_parent] = (self.marginal[has_parent] / self.marginal[parent[has_parent]]).clamp(max=1.0)
        self.conditional = conditional
        self.cutoff = torch.distributions.Normal(0.0, 1.0).icdf(conditional.double().clamp(1e-12, 1 - 1e-12)).float()
        loadings = torch.randn(n_features, rank, generator=g)
        self.loadings = correlation * loadings / loadings.norm(dim=1, keepdim=True)
        self.noise_scale = math.sqrt(1 - correlation ** 2)
        self.levels = [torch.nonzero(level_of == d).flatten() for d in (0, 1, 2)]

    def firing(self, n: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
        """Which features fire on each of ``n`` tokens: a boolean [n, n_features]."""
        loadings, cutoff = self.loadings.to(device), self.cutoff.to(device)
        shared = torch.randn(n, loadings.shape[1], generator=g, device=device)
        z = shared @ loadings.t() + self.noise_scale * torch.randn(n, self.n_features, generator=g, device=device)
        fire = z < cutoff
        parent, exclusive = self.parent.to(device), self.exclusive.to(device)
        for level in self.levels[1:]:
            if level.numel() == 0:
                continue
            level = level.to(device)
            p = parent[level]
            on = fire[:, level] & fire[:, p]
            # a mutually exclusive parent keeps only its firing child with the lowest z
            score = torch.where(on, z[:, level], torch.full_like(z[:, level], float("inf")))
            best = torch.full((n, self.n_features), float("inf"), device=device)
            best.scatter_reduce_(1, p.expand(n, -1), score, reduce="amin")
            keep = ~exclusive[p] | (score <= best.gather(1, p.expand(n, -1)))
            fire[:, level] = on & keep
        return fire

    def _generate(self, n: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
        fire = self.firing(n, g, device)
        magnitude = (1.0 + 0.5 * torch.randn(n, self.n_features, generator=g, device=device)).abs()
        return (fire * magnitude) @ self.features.to(device)


class ShardedArraySource(ActivationSource):
    """Rows of one or more 2-D float arrays on disk (rows = tokens), read memory-mapped.

    The arrays are one row space in order; its last rows (``holdout_rows``) are kept out of
    training for evaluation, and a store too small to spare any is evaluated on a fixed
    sample of its training rows. Batches are drawn without replacement from a fresh
    permutation of all training rows each epoch, so every batch mixes rows of every shard;
    a batch's rows are read in ascending order, shard by shard, so the page cache sees
    forward scans. Only the batch (and the permutation, 8 bytes a row) is held in memory.
    """

    def __init__(self, parts: list[np.ndarray]) -> None:
        if not parts:
            raise ValueError("no activation arrays")
        widths = {int(p.shape[1]) for p in parts}
        if len(widths) != 1:
            raise ValueError(f"the arrays differ in width: {sorted(widths)}")
        self.parts = parts
        self.d_in = widths.pop()
        self.starts = np.cumsum([0] + [int(p.shape[0]) for p in parts])
        self.rows = int(self.starts[-1])
        self.holdout = holdout_rows(self.rows)
        self.n_tokens = self.rows - self.holdout

    def _rows(self, index: np.ndarray, device: torch.device) -> torch.Tensor:
        index = np.sort(index)
        out = np.empty((len(index), self.d_in), dtype=np.float32)
        part_of = np.searchsorted(self.starts, index, side="right") - 1
        bounds = np.searchsorted(part_of, np.arange(len(self.parts) + 1))
        for part, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            if hi > lo:
                out[lo:hi] = self.parts[part][index[lo:hi] - self.starts[part]]
        rows = torch.from_numpy(out)
        if device.type == "cuda":
            rows = rows.pin_memory()
        return rows.to(device, non_blocking=True)

    def batches(self, batch_size, *, seed, device, start=0):
        if batch_size > self.n_tokens:
            raise ValueError(f"batch size {batch_size} exceeds the {self.n_tokens} training rows")
        per_epoch = self.n_tokens // batch_size
        epoch, offset = divmod(start, per_epoch)
        while True:
            # Each epoch's permutation comes from (seed, epoch): a resumed run finds its place.
            order = np.random.default_rng([seed, epoch]).permutation(self.n_tokens)
            for b in range(offset, per_epoch):
                yield self._rows(order[b * batch_size:(b + 1) * batch_size], device)
            epoch, offset = epoch + 1, 0

    def sample(self, n, *, device):
        g = np.random.default_rng(12345)
        index = g.choice(self.n_tokens, size=min(n, self.n_tokens), replace=False)
        return self._rows(index, device)

    def eval_rows(self, n, *, device):
        if self.holdout == 0:
            return self.sample(n, device=device)
        start = self.rows - self.holdout
        return self._rows(np.arange(start, start + min(n, self.holdout)), device)

    def head(self, n: int, *, device: torch.device, chunk: int = 16384) -> torch.Tensor:
        """The first ``n`` rows in stored order (whole context windows, for feature examples)."""
        n = min(n, self.rows)
        return torch.cat([self._rows(np.arange(s, min(s + chunk, n)), device) for s in range(0, n, chunk)])


class ArraySource(ShardedArraySource):
    """One uploaded array file (``.npy`` or ``.safetensors``)."""

    def __init__(self, path: Path | str, info: ArrayInfo) -> None:
        self.path, self.info = Path(path), info
        super().__init__([open_array(self.path, info)])


class StoreSource(ShardedArraySource):
    """An extracted activation store (``app.extraction.store``): all its shards as one row space."""

    def __init__(self, folder: Path | str) -> None:
        from ..extraction.store import open_shards, read_meta

        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        acts, self.index = open_shards(self.folder, self.meta)
        super().__init__(acts)

    def head_index(self, n: int) -> np.ndarray:
        """Token id, document and position of the first ``n`` rows, reading only the shards needed."""
        parts, have = [], 0
        for part in self.index:
            if have >= n:
                break
            parts.append(np.asarray(part[:n - have]))
            have += len(parts[-1])
        return np.concatenate(parts)


def normalization_scale(sample: torch.Tensor) -> float:
    """The scalar ``c`` with ``E‖c·x‖² = d_in`` on ``sample`` (docs/design.md)."""
    mean_sq = sample.double().pow(2).sum(dim=1).mean().item()
    if not math.isfinite(mean_sq) or mean_sq <= 0:
        raise ValueError("the activations have zero or non-finite norm; cannot normalize")
    return math.sqrt(sample.shape[1] / mean_sq)
