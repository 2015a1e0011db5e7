"""Do the recommended settings land on the target L0? And auto-tune's answer?

For each source — the two built-in synthetic ones, the MiniLM extraction the app makes by
default (layer 3), and sources the L0 model never saw (a synthetic source of another width
and sparsity, MiniLM layer 5) — this takes the form's "Recommended settings" for a target
and trains the full run they describe, three ways:

- ``recommended``: exactly what the button fills in (the model's l1_alpha for that run
  length, steering on);
- ``model only``: the same, steering off (the L0 model's prediction on its own);
- ``auto-tune``: the answer of an auto-tune (pilots of a quarter of the run at its batch,
  each carried to the run's length by the L0 model), steering off.

Usage: python benchmarks/recommendations.py [--target 0.02] [--only WORD ...] [--modes MODE ...]
(``--modes`` re-measures only those columns of the sources already in the results.)
Writes benchmarks/results/recommendations.{json,md}. One CPU thread.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from app import l0_model  # noqa: E402
from app.sae.sources import HierarchicalSource, SyntheticSource  # noqa: E402
from app.sae.trainer import TrainConfig, train  # noqa: E402
from app.sae.tune import tune_l1_alpha  # noqa: E402
from app.validation import SourceStats, recommend_settings, recommended_l1_alpha  # noqa: E402
from app.work.tune import PILOT_LEARNING_RATE, pilot_plan  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
LANDS = 1.5  # within this factor of the target


def sources():
    from calibrate_l1_alpha import source as sweep_source

    yield "default synthetic (built in)", "fit", SyntheticSource(256, 512, 5.0, 0)
    yield "hierarchical (built in)", "fit", HierarchicalSource(256, 2048, 16.0, 0)
    yield "MiniLM layer 3 (the default extraction)", "fit", sweep_source("minilm3")[1]
    yield "synthetic d_in 192, 6 active (held out)", "held out", SyntheticSource(192, 512, 6, seed=19)
    yield "MiniLM layer 5 (held out)", "held out", sweep_source("minilm5")[1]


def run(src, settings: dict, latent_dim: int, target: float, *, l1_alpha: float, steer: bool) -> dict:
    from app.sae.control import L0Controller

    cfg = TrainConfig(architecture="standard", latent_dim=latent_dim, l1_alpha=l1_alpha, target_l0=target,
                      learning_rate=settings["learning_rate"], batch_size=settings["batch_size"],
                      total_steps=settings["total_steps"], lr_warmup_steps=settings["lr_warmup_steps"],
                      l1_warmup_steps=settings["l1_warmup_steps"], log_every=20, device="cpu", seed=0)
    controller = L0Controller(target=target, alpha=l1_alpha, start_step=cfg.l1_warmup_steps) if steer else None
    t = time.time()
    result, _ = train(src, cfg, l1_alpha_control=controller)
    l0 = result.eval["l0_fraction"]
    return {"l1_alpha": l1_alpha, "final_l1_alpha": result.last.l1_alpha, "l0_fraction": l0, "fvu": result.eval["fvu"],
            "ratio": l0 / target, "lands": 1 / LANDS <= l0 / target <= LANDS, "seconds": round(time.time() - t)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", type=float, default=0.02)
    parser.add_argument("--only", nargs="*", default=None, help="source names containing these words")
    parser.add_argument("--modes", nargs="*", default=["recommended", "model_only", "auto_tune"])
    parser.add_argument("--results", default="recommendations.json",
                        help="the JSON file in benchmarks/results to read and update (two processes: two files)")
    parser.add_argument("--table", nargs="*", default=None,
                        help="write the table from these JSON files in benchmarks/results; train nothing")
    args = parser.parse_args()
    if args.table is not None:
        write_table([r for f in args.table for r in json.loads((RESULTS / f).read_text())])
        return
    torch.set_num_threads(1)
    path = RESULTS / args.results
    rows = json.loads(path.read_text()) if path.exists() else []

    def save(row: dict) -> None:
        nonlocal rows
        rows = [r for r in rows if (r["source"], r["target"]) != (row["source"], row["target"])] + [row]
        path.write_text(json.dumps(rows, indent=2) + "\n")

    for name, role, src in sources():
        if args.only and not any(w in name for w in args.only):
            continue
        latent = 4 * src.d_in
        stats = SourceStats(src.d_in, src.n_tokens, name)
        settings = {k: v for k, (v, _) in recommend_settings(stats, latent_dim=latent, target_l0=args.target,
                                                             architecture="standard", on_gpu=False).items()}
        old = next((r for r in rows if (r["source"], r["target"]) == (name, args.target)), {})
        row = {**old, "source": name, "role": role, "d_in": src.d_in, "latent_dim": latent, "target": args.target,
               "batch_size": settings["batch_size"], "total_steps": settings["total_steps"]}
        if "recommended" in args.modes:
            row["recommended"] = run(src, settings, latent, args.target, l1_alpha=settings["l1_alpha"], steer=True)
            print(name, "recommended", row["recommended"], flush=True)
            save(row)
        alpha = recommended_l1_alpha(src.d_in, latent, args.target, settings["total_steps"], settings["batch_size"])
        if "model_only" in args.modes:
            row["model_only"] = run(src, settings, latent, args.target, l1_alpha=alpha, steer=False)
            print(name, "model only", row["model_only"], flush=True)
            save(row)

        pilot = pilot_plan(settings["total_steps"], settings["batch_size"])

        def project(a: float, pilot_l0: float) -> float:
            return pilot_l0 * l0_model.progress_ratio(a, src.d_in, latent, pilot,
                                                      (settings["total_steps"], settings["batch_size"]))

        if "auto_tune" in args.modes:
            best, pilots, outcome = tune_l1_alpha(src, latent_dim=latent, target=args.target, start=alpha,
                                                  learning_rate=PILOT_LEARNING_RATE, batch_size=pilot[1],
                                                  pilot_steps=pilot[0], project=project, device="cpu")
            row["auto_tune"] = {**run(src, settings, latent, args.target, l1_alpha=best.l1_alpha, steer=False),
                                "pilots": len(pilots), "pilot": list(pilot), "outcome": outcome}
            print(name, "auto-tune", row["auto_tune"], flush=True)
            save(row)
    write_table(rows)


def write_table(rows: list[dict]) -> None:
    lines = ["# Recommended settings and auto-tune: where the full run ends", "",
             f"Each run is the full length the recommendation gives; 'lands' is within {LANDS}× of the target.", "",
             "| source | role | latents | steps × batch | recommended (steering on) | model only (steering off) "
             "| auto-tune's answer (steering off) |", "| --- | --- | ---: | --- | --- | --- | --- |"]

    def cell(r: dict | None) -> str:
        if r is None:
            return "not measured"
        return (f"L0 {100 * r['l0_fraction']:.2f}% ({r['ratio']:.2f}×, {'lands' if r['lands'] else 'misses'}), "
                f"l1_alpha {r['l1_alpha']:.2g}" + (f"→{r['final_l1_alpha']:.2g}"
                                                   if not math.isclose(r["final_l1_alpha"], r["l1_alpha"]) else ""))
    for r in rows:
        lines.append(f"| {r['source']} | {r['role']} | {r['latent_dim']:,} | {r['total_steps']:,} × {r['batch_size']} "
                     f"| {cell(r.get('recommended'))} | {cell(r.get('model_only'))} | {cell(r.get('auto_tune'))} |")
    (RESULTS / "recommendations.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
