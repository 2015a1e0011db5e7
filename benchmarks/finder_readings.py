"""Ways to read the L0 finder's ladder, on ladders trained as the app's finder trains them.

    python benchmarks/finder_readings.py default5          # the app's default synthetic source
    python benchmarks/finder_readings.py hier16 flat40     # the finder benchmark's other sources
    python benchmarks/finder_readings.py hier16 --steps 4800 --save /tmp/ladders   # a longer budget; keep the decoders
    python benchmarks/finder_readings.py hier16b --steps 4800     # ladders the readings were not chosen on
    python benchmarks/finder_readings.py ortho8 flat5

Each source's ladder is what "Find the right L0" trains: BatchTopK at the training form's own settings
(learning rate, warm-up, batch), two init seeds per rung, all members on the same batches
(``train_many``). Every rung's pair of SAEs is then read four ways:

- ``consistency``: the app's reading, the mean |cosine| over the one-to-one matching of the two
  seeds' decoder rows (``l0_finder.seed_consistency``);
- ``weighted``: the same matching, each pair weighted by how often its two latents fire on held-out
  tokens (the mean of their frequencies), so that latents neither seed uses count for little;
- ``alive``: the same matching over the pairs whose latents both fire at all;
- ``reproduced``: how many matched pairs have |cosine| ≥ 0.9, i.e. how many latents both seeds learned
  (a count, so the surplus latents neither seed uses add nothing whatever their number).

and each curve through ``recommend_l0`` (the peak, refined by the parabola). Printed per rung: the
held-out L0, FVU, MCC of each seed to the true features, and the four readings.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(1, str(Path(__file__).resolve().parent))

from app.sae import features, l0_finder  # noqa: E402
from app.sae.metrics import evaluate  # noqa: E402
from app.sae.sources import HierarchicalSource, SyntheticSource  # noqa: E402
from app.sae.trainer import Member, TrainConfig, train_many  # noqa: E402
from app.training_config import PARAMS  # noqa: E402
from l0_finder import true_l0  # noqa: E402  (benchmarks/l0_finder.py: the finder benchmark's own)

CPU = torch.device("cpu")
# name: (source, latent_dim, rungs, steps); default5 is the app's default source with the app's own ladder
SOURCES = {
    "default5": (lambda: SyntheticSource(256, 512, 5.0, 0), 1024, None, 2000),
    "hier16": (lambda: HierarchicalSource(256, 2048, 16.0, seed=0), 1024, [4, 7, 14, 26, 48], 1200),
    "flat40": (lambda: SyntheticSource(384, 1024, 40.0, seed=0), 1024, [12, 22, 39, 71, 128], 1200),
    # three ladders no reading was chosen on: hier16's generator with another seed (another dictionary and
    # hierarchy), the finder benchmark's paper-like ortho8 (as many latents as features) and its flat5
    "hier16b": (lambda: HierarchicalSource(256, 2048, 16.0, seed=1), 1024, [4, 7, 14, 26, 48], 1200),
    "ortho8": (lambda: HierarchicalSource(256, 128, 8.0, seed=0), 128, [2, 3, 5, 7, 10, 16, 24], 4000),
    "flat5": (lambda: SyntheticSource(128, 512, 5.0, seed=0), 512, [2, 3, 5, 8, 13, 20], 2000),
}


def readings(W_a: torch.Tensor, W_b: torch.Tensor, freq_a: np.ndarray, freq_b: np.ndarray) -> dict:
    from scipy.optimize import linear_sum_assignment

    a = W_a / W_a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = W_b / W_b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sims = (a @ b.t()).abs().numpy()
    rows, cols = linear_sum_assignment(sims, maximize=True)
    cos = sims[rows, cols]
    weight = (freq_a[rows] + freq_b[cols]) / 2
    alive = (freq_a[rows] > 0) & (freq_b[cols] > 0)
    return {"consistency": float(cos.mean()), "weighted": float((cos * weight).sum() / max(weight.sum(), 1e-12)),
            "alive": float(cos[alive].mean()) if alive.any() else 0.0, "reproduced": float((cos >= 0.9).sum())}


def run(name: str, save: Path | None = None, steps: int | None = None) -> None:
    build, latents, rungs, usual = SOURCES[name]
    steps = steps or usual
    source = build()
    form = {p.name: p.default for p in PARAMS}
    core = {p.name for p in PARAMS if p.core}
    rungs = rungs or l0_finder.ladder(form["target_l0"] * latents, 5, latent_dim=latents)
    cfgs = [TrainConfig(**{**{k: v for k, v in form.items() if k in core}, "architecture": "batchtopk", "k": k,
                           "latent_dim": latents, "total_steps": steps, "target_l0": k / latents, "seed": seed})
            for k in rungs for seed in range(2)]
    ended: dict[int, tuple] = {}
    started = time.perf_counter()
    train_many(source, [Member(cfg, on_end=lambda r, sae, i=i: ended.__setitem__(i, (r, sae.eval())))
                        for i, cfg in enumerate(cfgs)], data_seed=0)
    truth = true_l0(source)
    lr = form["learning_rate"]
    print(f"{name}: d_in {source.d_in}, {source.n_features:,} features, true L0 {truth:.1f}; batchtopk, {latents:,} "
          f"latents, {steps:,} steps × {form['batch_size']} at learning rate {lr:g}; trained in "
          f"{time.perf_counter() - started:.0f} s")
    points: dict[str, list] = {"consistency": [], "weighted": [], "alive": [], "reproduced": []}
    kept: list[dict] = []
    print("| k | L0 | FVU | MCC seed 0 / 1 | consistency | weighted | alive | reproduced |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for j, k in enumerate(rungs):
        (ra, sa), (rb, sb) = ended[2 * j], ended[2 * j + 1]
        x = source.eval_rows(8192, device=CPU) * ra.norm_scale
        with torch.no_grad():
            fa, fb = (np.asarray(evaluate(s, x)["frequencies"]) for s in (sa, sb))
        values = readings(sa.W_dec.detach(), sb.W_dec.detach(), fa, fb)
        l0 = (ra.eval["l0"] + rb.eval["l0"]) / 2
        for metric, value in values.items():
            points[metric].append((l0, value))
        mcc = [features.ground_truth_recovery(s, source.features).mcc for s in (sa, sb)]
        kept.append({"k": k, "l0": l0, "fvu": ra.eval["fvu"], "mcc": mcc, "freq": (fa, fb),
                     "W_dec": (sa.W_dec.detach().clone(), sb.W_dec.detach().clone())})
        print(f"| {k} | {l0:.2f} | {ra.eval['fvu']:.4f} | {mcc[0]:.3f} / {mcc[1]:.3f} | {values['consistency']:.4f} | "
              f"{values['weighted']:.4f} | {values['alive']:.4f} | {values['reproduced']:.0f} |", flush=True)
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
        torch.save({"source": name, "true_l0": truth, "steps": steps, "rungs": kept}, save / f"{name}-{steps}.pt")
    for metric, pts in points.items():
        rec = l0_finder.recommend_l0(pts, metric="consistency")
        print(f"  {metric}: reads {rec.estimate:.1f} ({rec.estimate / truth - 1:+.0%}), edge {rec.at_edge}, "
              f"flat {rec.shallow}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="+", choices=sorted(SOURCES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, help="steps per SAE instead of the source's usual (a longer budget)")
    parser.add_argument("--save", type=Path, help="a folder: each source's decoders and frequencies, per rung")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.sources:
        run(name, args.save, args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
