"""The default L0-finder sweep's training, timed: what "Find the right L0" on the untouched training form
trains on the default synthetic source (BatchTopK, the form's width and steps, a five-rung ladder
around its 2% target, two seeds per rung, all members on shared batches), then the finder's reading.

Usage: python benchmarks/finder_wallclock.py
Times the trainer's side and the reading (the job adds its database writes, which are small beside it),
and prints the curve with each rung's MCC against the source's true features.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.models import DEFAULT_SYNTHETIC  # noqa: E402
from app.sae import architectures, features, l0_finder  # noqa: E402
from app.sae.sources import HierarchicalSource, SyntheticSource  # noqa: E402
from app.sae.trainer import Member, TrainConfig, train_many  # noqa: E402
from app.training_config import PARAMS  # noqa: E402
from app.work.finder import FINDER_RUNGS, FINDER_SEEDS  # noqa: E402


def main() -> None:
    spec = DEFAULT_SYNTHETIC
    kind = HierarchicalSource if spec.get("structure") == "hierarchical" else SyntheticSource
    source = kind(spec["d_in"], spec["n_features"], spec["mean_active"], spec["seed"])
    form = {p.name: p.default for p in PARAMS}
    latents, target = form["latent_dim"], form["target_l0"]
    rungs = l0_finder.ladder(target * latents, FINDER_RUNGS, latent_dim=latents)
    arch = architectures.for_l0_finder().name
    core = {p.name for p in PARAMS if p.core}
    cfgs = [TrainConfig(**{**{k: v for k, v in form.items() if k in core}, "architecture": arch, "k": k,
                           "target_l0": k / latents, "seed": seed})
            for k in rungs for seed in range(FINDER_SEEDS)]
    print(f"{spec['name']}: {len(cfgs)} members ({arch}, {latents:,} latents, {form['total_steps']:,} steps × "
          f"{form['batch_size']}), rungs k = {rungs}, {torch.get_num_threads()} threads")
    decoders, results = {}, {}
    start = time.perf_counter()
    train_many(source, [Member(cfg, on_end=lambda r, sae, i=i: (decoders.__setitem__(i, sae.W_dec.detach().clone()),
                                                              results.__setitem__(i, (r, features.ground_truth_recovery(
                                                                  sae, source.features).mcc))))
                        for i, cfg in enumerate(cfgs)], data_seed=form["seed"])
    trained = time.perf_counter() - start
    points = []
    for j, k in enumerate(rungs):
        a, b = 2 * j, 2 * j + 1
        consistency = l0_finder.seed_consistency(decoders[a], decoders[b])
        l0 = (results[a][0].eval["l0"] + results[b][0].eval["l0"]) / 2
        points.append((l0, consistency))
        print(f"  k {k:4d}: held-out L0 {l0:7.2f}, consistency {consistency:.3f}, MCC {results[a][1]:.3f} / "
              f"{results[b][1]:.3f}")
    rec = l0_finder.recommend_l0(points, metric="consistency")
    total = time.perf_counter() - start
    print(f"  reading: L0 ≈ {rec.estimate:.1f} (bracket {rec.bracket[0]:.0f}–{rec.bracket[1]:.0f}); "
          f"{rec.certainty}")
    print(f"  trained in {trained:.0f} s; with the reading {total:.0f} s ({total / 60:.1f} min)")


if __name__ == "__main__":
    main()
