"""Sweep l1_alpha over the whole L0 curve and fit the model the validator predicts L0 with.

Usage:
    python benchmarks/calibrate_l1_alpha.py sweep --plan fit [--shard 0/2]
    python benchmarks/calibrate_l1_alpha.py sweep --plan heldout [--shard 1/2]
    python benchmarks/calibrate_l1_alpha.py fit

``sweep`` trains every config of a plan (one CPU thread per process; shards split a plan
between processes) and appends one row per run to ``benchmarks/results/l1_alpha_<plan>.csv``;
a config already in the file is skipped, so a sweep that is stopped carries on where it was.
``fit`` fits ``app.l0_model`` on the fit plan's rows, scores it on the held-out plan's rows
(sources, widths and lengths the fit never saw), and writes ``app/calibration.json`` (the
coefficients, the error per source and what the fit was measured on),
``benchmarks/results/l1_alpha_heldout.md`` and ``benchmarks/results/l1_alpha_curve.svg``.

The plans cover the dense regime (l1_alpha down to 2e-5, where half the latents fire), the
dead one (0.1), widths d_in 64 to 1,024, expansions 4× to 32× and run lengths 300 to 3,000
steps, so the model learns how L0 climbs toward dense and that longer runs end sparser.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from app.sae.files import inspect_activation_file  # noqa: E402
from app.sae.sources import ArraySource, HierarchicalSource, SyntheticSource  # noqa: E402
from app.sae.trainer import TrainConfig, train  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CACHE = Path("/tmp/sae-calibration-cache")
BATCH = 256
WIDE = [2e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1]
NARROW = [3e-5, 3e-4, 1e-3, 3e-3, 1e-2, 0.05]
HELD = [5e-5, 5e-4, 2e-3, 6e-3, 0.02]

# (source key, expansions, l1_alphas, run lengths in steps[, batch size; BATCH if left out])
PLANS = {
    "fit": [
        ("syn64", [4, 8, 16, 32], WIDE, [300, 1000, 3000]),
        ("syn128", [4, 8, 16, 32], WIDE, [400, 1500]),
        ("syn256", [4, 8, 16], NARROW, [400, 1500]),
        ("hierarchical", [4, 8], NARROW, [400, 1500]),
        ("minilm3", [4, 8], NARROW, [500]),
        ("minilm3", [4], NARROW, [1500]),
        ("syn512", [4, 8], NARROW, [500]),
        ("syn512", [4], NARROW, [1500]),
        ("syn1024", [4], NARROW, [500]),
    ],
    # The same sources at batch 1,024 (what the recommendations give on a CPU): the model's batch term.
    "fit_batch": [
        ("syn64", [8], WIDE, [300, 1000], 1024),
        ("syn128", [4], NARROW, [400, 1500], 1024),
        ("syn256", [4], NARROW, [1500], 1024),
    ],
    # Sources, widths and lengths the fit never sees.
    "heldout": [
        ("syn96", [4, 16], HELD, [2000]),
        ("syn192", [8, 16, 32], HELD + [1e-4], [1000]),
        ("minilm5", [4, 8], HELD, [800]),
        ("syn768", [4], HELD, [600]),
    ],
}


def source(key: str):
    """The activation source a plan names: synthetic ones are generated, MiniLM's are extracted once and cached."""
    synthetic = {"syn64": (64, 128, 2, 11), "syn96": (96, 192, 3, 17), "syn128": (128, 256, 3, 1),
                 "syn192": (192, 512, 6, 19), "syn256": (256, 512, 5, 0), "syn512": (512, 1024, 12, 2),
                 "syn768": (768, 2048, 16, 23), "syn1024": (1024, 2048, 24, 3)}
    if key in synthetic:
        d_in, n_features, active, seed = synthetic[key]
        return (f"synthetic d_in {d_in}, {n_features} features, {active} active",
                SyntheticSource(d_in, n_features, active, seed=seed))
    if key == "hierarchical":  # the built-in hard source
        return "hierarchical d_in 256, 2048 features, 16 active", HierarchicalSource(256, 2048, 16.0, 0)
    layer = int(key.removeprefix("minilm"))
    path = CACHE / f"minilm_layer{layer}.npy"
    if not path.exists():
        from minilm_acts import minilm_activations

        CACHE.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.npy")  # two shards may extract at once: the last rename wins
        np.save(partial, minilm_activations(150_000, layer=layer))
        os.replace(partial, path)
    info = inspect_activation_file(path, min_rows=1024, max_bytes=2**34)
    return f"MiniLM-L6 layer {layer} residual, stdlib docstrings", ArraySource(path, info)


def configs(plan: str):
    for key, expansions, alphas, lengths, *batch in PLANS[plan]:
        for expansion in expansions:
            for steps in lengths:
                for alpha in alphas:
                    yield key, expansion, steps, alpha, (batch[0] if batch else BATCH)


def cost(cfg) -> float:
    key, expansion, steps, _, batch = cfg
    d_in = {"hierarchical": 256}.get(key) or (384 if key.startswith("minilm") else int(key.removeprefix("syn")))
    return d_in * d_in * expansion * steps * batch


def read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as fh:
        return [{**r, "d_in": int(r["d_in"]), "latent_dim": int(r["latent_dim"]), "l1_alpha": float(r["l1_alpha"]),
                 "steps": int(r["steps"]), "batch_size": int(r["batch_size"]), "l0_fraction": float(r["l0_fraction"]),
                 "fvu": float(r["fvu"]), "dead_fraction": float(r["dead_fraction"])} for r in csv.DictReader(fh)]


FIELDS = ["key", "source", "d_in", "latent_dim", "l1_alpha", "steps", "batch_size", "l0_fraction", "fvu",
          "dead_fraction", "seconds"]


def sweep(plan: str, shard: int, shards: int) -> None:
    torch.set_num_threads(1)
    path = RESULTS / f"l1_alpha_{plan}.part{shard}.csv"
    done = {(r["key"], r["latent_dim"] // r["d_in"], r["steps"], r["l1_alpha"], r["batch_size"]) for r in read(path)}
    todo = sorted(configs(plan), key=cost)[shard::shards]
    sources: dict = {}
    for key, expansion, steps, alpha, batch in todo:
        if (key, expansion, steps, alpha, batch) in done:
            continue
        if key not in sources:
            sources[key] = source(key)
        name, src = sources[key]
        cfg = TrainConfig(architecture="standard", latent_dim=src.d_in * expansion, l1_alpha=alpha, batch_size=batch,
                          total_steps=steps, lr_warmup_steps=max(10, steps // 20),
                          l1_warmup_steps=max(10, steps // 20), log_every=100, device="cpu", seed=0)
        t = time.time()
        result, _ = train(src, cfg)
        row = {"key": key, "source": name, "d_in": src.d_in, "latent_dim": cfg.latent_dim, "l1_alpha": alpha,
               "steps": steps, "batch_size": batch, "l0_fraction": result.eval["l0_fraction"],
               "fvu": result.eval["fvu"], "dead_fraction": result.eval["never_fired"] / cfg.latent_dim,
               "seconds": round(time.time() - t, 1)}
        new = not path.exists()
        with path.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(row)
        print(f"{key:12s} {expansion:2d}x {steps:5d}×{batch} l1_alpha={alpha:<7g} L0={row['l0_fraction']:.4f} "
              f"FVU={row['fvu']:.3f} ({row['seconds']:.0f}s)", flush=True)


def rows_of(plan: str) -> list[dict]:
    return [r for part in sorted(RESULTS.glob(f"l1_alpha_{plan}.part*.csv")) for r in read(part)]


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sweep")
    s.add_argument("--plan", choices=sorted(PLANS), required=True)
    s.add_argument("--shard", default="0/1", help="i/n: this process runs every n-th config from the i-th")
    sub.add_parser("fit")
    args = parser.parse_args()
    if args.command == "sweep":
        i, n = (int(x) for x in args.shard.split("/"))
        sweep(args.plan, i, n)
    else:
        from calibration_report import report

        report(rows_of("fit") + rows_of("fit_batch"), rows_of("heldout"))


if __name__ == "__main__":
    main()
