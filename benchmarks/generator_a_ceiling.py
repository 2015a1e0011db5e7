"""Where TopK's MCC on generator A (our HierarchicalSource) is lost, and what more training buys.

    python benchmarks/generator_a_ceiling.py                   # both budgets: about an hour on one CPU core
    python benchmarks/generator_a_ceiling.py --samples 1500000

1. **Where the MCC is lost.** Our TopK SAE at the setting of ``benchmarks/architectures.py`` (2,048
   latents, k 16, batch 512, learning rate 0.002, AuxK at the form's defaults), trained on each budget
   in ``--samples``; its one-to-one matching to the true features (the MCC's) broken down by where a
   feature sits: roots of the trees, their children, grandchildren, and the features outside any tree.
2. **What the objective prefers.** The true dictionary itself as the decoder (frozen), with TopK's
   encoder trained on the same budget and schedule to reconstruct through it: the reconstruction error
   of the right answer, side by side with the learned SAE's. Where the learned SAE's error is well
   above it, training has not converged on the answer; where the two meet, more training buys little.
3. **The hierarchy's tightness.** Each level's mean firing probability given its parent.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.sae.architectures import topk  # noqa: E402
from app.sae.metrics import evaluate  # noqa: E402
from app.sae.sources import HierarchicalSource, normalization_scale  # noqa: E402
from app.sae.trainer import TrainConfig, train  # noqa: E402

CPU = torch.device("cpu")
K, LATENTS, BATCH, LR = 16, 2048, 512, 2e-3


def groups(source: HierarchicalSource) -> dict[str, np.ndarray]:
    """Boolean masks over the true features: tree roots, children, grandchildren, features in no tree."""
    level, parent = source.level_of.numpy(), source.parent.numpy()
    in_tree = parent >= 0
    in_tree[parent[parent >= 0]] = True
    return {"roots": (level == 0) & in_tree, "children": level == 1, "grandchildren": level == 2,
            "outside trees": ~in_tree}


def matched_cosines(W_dec: torch.Tensor, features: torch.Tensor) -> np.ndarray:
    """Each true feature's |cosine| to the latent the MCC's one-to-one matching gives it."""
    from scipy.optimize import linear_sum_assignment

    w = W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sims = (w @ features.t()).abs().numpy()
    rows, cols = linear_sum_assignment(sims, maximize=True)
    per = np.zeros(features.shape[0])
    per[cols] = sims[rows, cols]
    return per


def learned(source, samples: int) -> tuple[dict, torch.Tensor]:
    steps = samples // BATCH
    cfg = TrainConfig(architecture="topk", latent_dim=LATENTS, batch_size=BATCH, total_steps=steps, learning_rate=LR,
                      lr_warmup_steps=steps // 20, k=K, target_l0=K / LATENTS, precision="float32",
                      log_every=max(1, steps // 10), device="cpu")
    result, sae = train(source, cfg)
    return result.eval, sae.W_dec.detach().clone()


def oracle(source, samples: int, scale: float, x_eval: torch.Tensor) -> dict:
    """The true features as a frozen decoder; TopK's encoder (started at their transpose) and biases
    trained on ``samples`` to reconstruct through it, with the learned SAE's schedule."""
    model = topk.ARCH.model_class()(source.d_in, LATENTS, k=K, sparse=False)
    with torch.no_grad():
        model.W_dec.copy_(source.features)
        model.W_enc.copy_(source.features.t())
        model.b_enc.zero_()
        model.b_dec.zero_()
    optimizer = torch.optim.Adam([model.W_enc, model.b_enc, model.b_dec], lr=LR)
    steps = samples // BATCH
    warmup, decay_start = steps // 20, steps - steps // 5
    for step, batch in enumerate(source.batches(BATCH, seed=0, device=CPU)):
        if step >= steps:
            break
        factor = (step + 1) / warmup if step < warmup else min(1.0, (steps - step) / (steps - decay_start))
        for group in optimizer.param_groups:
            group["lr"] = LR * factor
        parts, _, _ = model.loss(batch * scale)
        optimizer.zero_grad()
        parts.mse.backward()
        optimizer.step()
    with torch.no_grad():
        return evaluate(model.eval(), x_eval)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", default="1500000,6000000", help="training budgets, comma-separated")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "generator_a_ceiling.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    source = HierarchicalSource(256, 2048, 16.0, seed=0)
    scale = normalization_scale(source.sample(8192, device=CPU))
    x_eval = source.eval_rows(16_384, device=CPU) * scale
    masks = groups(source)
    level = source.level_of
    tightness = {name: round(float(source.conditional[level == d].mean()), 3)
                 for name, d in (("children", 1), ("grandchildren", 2))}
    firing = source.firing(20_000, torch.Generator().manual_seed(12345), CPU)
    out = {"source": "HierarchicalSource(d_in=256, n_features=2048, mean_active=16, seed=0)",
           "true_l0": round(float(firing.sum(dim=1).float().mean()), 2),
           "features": {name: int(mask.sum()) for name, mask in masks.items()},
           "mean_firing_probability_given_parent": tightness, "runs": []}
    print(f"{out['source']}: true L0 {out['true_l0']}; features {out['features']}; "
          f"P(fires | parent fires): {tightness}", flush=True)
    for samples in (int(s) for s in args.samples.split(",")):
        started = time.perf_counter()
        metrics, W_dec = learned(source, samples)
        per = matched_cosines(W_dec, source.features)
        row = {"samples": samples, "learned_fvu": round(metrics["fvu"], 4), "learned_l0": round(metrics["l0"], 2),
               "mcc": round(float(per.mean()), 3),
               "mcc_by_group": {name: round(float(per[mask].mean()), 3) for name, mask in masks.items()}}
        truth = oracle(source, samples, scale, x_eval)
        row.update({"true_dictionary_fvu": round(truth["fvu"], 4), "true_dictionary_l0": round(truth["l0"], 2),
                    "seconds": round(time.perf_counter() - started)})
        out["runs"].append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
