"""A second ground truth, not ours: SAELens's synthetic generator (``sae_lens.synthetic``, the
code behind SynthSAEBench) behind our activation-source interface.

Our ``HierarchicalSource`` was written by this project, and the architecture defaults were
tuned on it. A default that only helps on the generator it was tuned on is tuning, not a
better method, so ``benchmarks/architectures.py --generator saelens`` runs the same table on
this one. Nothing here is ours but the adapter: the feature directions, firing
probabilities, hierarchy, correlation and magnitudes all come from SAELens's
``SyntheticModel``, configured as a small SynthSAEBench:

- 2,048 features in d_in 256 (superposition), a bias of norm 1 on every sample;
- Zipfian firing probabilities (exponent 0.5, from 0.4 down to 0.002);
- a forest of 32 trees of depth 2, branching 4, half of the parents' children mutually
  exclusive, firing probabilities compensated for the gating;
- a low-rank (rank 16) correlation between firings, scale 0.1;
- magnitudes |N(1, 0.5²)| (ReLU of a normal, as SAELens draws them).

The generator draws from torch's global RNG, so the stream is made once per configuration
(seeded per chunk) and kept as a memory-mapped file; every trainer then reads the same rows
in the same order, and a second process reuses the file.
"""
from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.sae.sources import ActivationSource, feature_seed  # noqa: E402

CHUNK = 8192


def model_config(d_in: int, n_features: int, seed: int):
    from sae_lens.synthetic import (HierarchyConfig, SyntheticModelConfig,
                                    ZipfianFiringProbabilityConfig)
    from sae_lens.synthetic.synthetic_model import LowRankCorrelationConfig

    return SyntheticModelConfig(
        num_features=n_features, hidden_dim=d_in,
        firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.4, min_prob=0.002),
        hierarchy=HierarchyConfig(total_root_nodes=max(1, n_features // 64), branching_factor=4, max_depth=2,
                                  mutually_exclusive_portion=0.5, compensate_probabilities=True),
        correlation=LowRankCorrelationConfig(rank=16, correlation_scale=0.1, seed=seed + 1),
        std_firing_magnitudes=0.5, mean_firing_magnitudes=1.0, bias=1.0, seed=seed)


class SynthSAEBenchSource(ActivationSource):
    """``rows`` training samples of SAELens's generator, then held-out and normalization rows,
    drawn once and read back in a fixed order. ``true_l0`` is the mean number of features that
    fire per held-out sample; ``features`` the generator's unit feature directions."""

    n_tokens = None  # read as a stream; a run that asks for more rows than were drawn wraps

    def __init__(self, d_in: int = 256, n_features: int = 2048, *, rows: int, seed: int = 0,
                 cache: Path | None = None) -> None:
        from sae_lens.synthetic import SyntheticModel

        self.d_in, self.n_features, self.seed = d_in, n_features, seed
        # the generator seeds torch's global RNG with its seed while it draws the directions;
        # a run's SAE draws its decoder from the run's seed, so the two must never coincide
        cfg = model_config(d_in, n_features, feature_seed(seed))
        self.model = SyntheticModel(cfg)
        vectors = self.model.feature_dict.feature_vectors.detach().float()
        self.features = vectors / vectors.norm(dim=1, keepdim=True).clamp(min=1e-12)
        self.rows = -(-rows // CHUNK) * CHUNK
        self.description = (f"sae_lens.synthetic SyntheticModel (a small SynthSAEBench: {n_features:,} features in "
                            f"d_in {d_in}, Zipfian, 32-tree hierarchy, rank-16 correlation, seed {seed})")
        key = hashlib.sha256(json.dumps([cfg.to_dict(), self.rows, 2], sort_keys=True, default=str).encode())
        folder = Path(cache or Path(tempfile.gettempdir()) / "sae-studio-synthsaebench")
        folder.mkdir(parents=True, exist_ok=True)
        self._train = self._stream(folder / f"train-{key.hexdigest()[:16]}.f32", self.rows, 0)
        self._eval, counts = self._draw(16_384, 10**6 + 1)
        self.true_l0 = float(counts.float().mean())
        self._norm, _ = self._draw(8192, 10**6 + 2)

    def _draw(self, n: int, salt: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(self.seed * 10**7 + salt)
        hidden, feats = self.model.sample_with_features(n)
        return hidden.float(), (feats > 0).sum(dim=1)

    def _stream(self, path: Path, rows: int, salt: int) -> np.memmap:
        done = path.with_suffix(".done")
        if not done.exists():
            out = np.lib.format.open_memmap(path.with_suffix(".tmp.npy"), mode="w+", dtype=np.float32,
                                            shape=(rows, self.d_in))
            for i, start in enumerate(range(0, rows, CHUNK)):
                out[start:start + CHUNK] = self._draw(CHUNK, salt + i)[0].numpy()
            out.flush()
            del out
            path.with_suffix(".tmp.npy").replace(path)
            done.touch()
        return np.load(path, mmap_mode="r")

    def batches(self, batch_size, *, seed, device, start=0):
        n = start
        per_pass = self.rows // batch_size
        while True:
            at = (n % per_pass) * batch_size
            yield torch.from_numpy(np.ascontiguousarray(self._train[at:at + batch_size])).to(device)
            n += 1

    def sample(self, n, *, device):
        return self._norm[:n].to(device)

    def eval_rows(self, n, *, device):
        return self._eval[:n].to(device)
