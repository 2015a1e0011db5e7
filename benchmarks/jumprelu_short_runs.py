"""JumpReLU on short runs: held-out L0 and FVU before and after the fix, side by side.

The setup is the app's default run on its default source: ``SyntheticSource(256, 512, 5)``
(512 ground-truth features in d_in 256, about 5 active per token), 512 latents, target L0 2%
(10.24 latents), batch 512, learning rate 1e-3 with 100 warm-up steps and the trainer's linear
decay over the last fifth, ``l0_coefficient`` 10, bandwidth 0.05. ``--hierarchical`` swaps in the
harder ``HierarchicalSource(256, 2048, 16)``.

Variants (set on the model class, so the runs go through the real trainer):

- ``old``: the thresholds at 3× the learning rate (the module's setting before the fix);
- ``new``: the module as it is now;
- ``lr6``: the thresholds at 6× (a measured alternative, not chosen: less margin);
- ``coef100``: the old setting with ``l0_coefficient`` 100 (a measured alternative, not chosen:
  it changes the user's setting rather than the module's default behaviour).

    python benchmarks/jumprelu_short_runs.py                         # 1,500 and 6,000 steps, seeds 0 and 1
    python benchmarks/jumprelu_short_runs.py --steps 1500 --variants old new --seeds 0
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.sae.models import JumpReLUSAE  # noqa: E402
from app.sae.sources import HierarchicalSource, SyntheticSource  # noqa: E402
from app.sae.trainer import TrainConfig, train  # noqa: E402

NEW = {name: getattr(JumpReLUSAE, name) for name in ("threshold_lr_scale",)}
VARIANTS = {
    "old": ({"threshold_lr_scale": 3.0}, {}),
    "new": (NEW, {}),
    "lr6": ({"threshold_lr_scale": 6.0}, {}),
    "coef100": ({"threshold_lr_scale": 3.0}, {"l0_coefficient": 100.0}),
}


def run(variant: str, steps: int, seed: int, hierarchical: bool) -> dict:
    attrs, changes = VARIANTS[variant]
    saved = {name: getattr(JumpReLUSAE, name) for name in attrs}
    source = HierarchicalSource(256, 2048, 16.0, 0) if hierarchical else SyntheticSource(256, 512, 5.0, 0)
    cfg = TrainConfig(**{**dict(architecture="jumprelu", latent_dim=512, batch_size=512, total_steps=steps,
                                learning_rate=1e-3, lr_warmup_steps=100, l1_warmup_steps=200, target_l0=0.02,
                                l0_coefficient=10.0, jumprelu_bandwidth=0.05, seed=seed,
                                log_every=max(1, steps // 10), precision="float32", device="cpu"), **changes})
    trained = []
    try:
        for name, value in attrs.items():
            setattr(JumpReLUSAE, name, value)
        start = time.perf_counter()
        result, _ = train(source, cfg, on_log=lambda p: trained.append(p.l0_fraction))
    finally:
        for name, value in saved.items():
            setattr(JumpReLUSAE, name, value)
    return {"l0": 100 * result.eval["l0_fraction"], "fvu": result.eval["fvu"], "dead": result.eval["dead"],
            "train_l0": 100 * trained[-1], "s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1500, 6000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", default=["old", "new"], choices=list(VARIANTS))
    parser.add_argument("--hierarchical", action="store_true", help="the harder HierarchicalSource(256, 2048, 16)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"source: {'HierarchicalSource(256, 2048, 16)' if args.hierarchical else 'SyntheticSource(256, 512, 5)'}; "
          "512 latents, target L0 2.00%, batch 512; held-out L0 on 8,192 eval tokens (±10% is 1.80-2.20%)")
    header = " | ".join(f"{v + ' L0%':>10} {'FVU':>6} {'dead':>4}" for v in args.variants)
    print(f"{'steps':>6} {'seed':>4} | {header}")
    for steps in args.steps:
        for seed in args.seeds:
            cells = []
            for variant in args.variants:
                r = run(variant, steps, seed, args.hierarchical)
                flag = " " if abs(r["l0"] / 2.0 - 1) <= 0.10 else "!"
                cells.append(f"{r['l0']:9.2f}{flag} {r['fvu']:6.3f} {r['dead'] if r['dead'] is not None else '-':>4}")
            print(f"{steps:>6} {seed:>4} | " + " | ".join(cells), flush=True)
    print("! = outside ±10% of the target")


if __name__ == "__main__":
    main()
