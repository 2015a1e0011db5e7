"""Candidate changes to our standard, BatchTopK and Matryoshka SAEs, each beside the unchanged
architecture, on either ground-truth generator (issue 24, items 2 and 3).

Every variant trains on the same batches, at the same budget and learning rate, as
``benchmarks/architectures.py`` trains the unchanged one; the variant is swapped in for the
run only (a subclass's method), so a variant that helps here still has to become a change
to the architecture's module, and pass the architecture table on both generators, before it
is a default.

Variants:

- ``batchtopk/floor``: each token keeps its own top k/2 first; the other k/2 per token on
  average are chosen batch-wide among the rest (a per-token floor against the batch-wide cut
  handing most latents to the high-norm tokens). At inference a token keeps its top k/2 and
  every other latent above the learned cut of the batch-wide part (not a JumpReLU either).
- ``batchtopk/floor-jumprelu``: trained as ``floor``, used as BatchTopK is (a JumpReLU whose
  threshold is the learned cut of the batch-wide part), so it would still export as one.
- ``batchtopk/scaled``: the batch-wide cut ranks each token's activations divided by that
  token's activation norm, so a token's share of the k·batch latents does not grow with its
  norm. At inference a latent fires when its activation over the token's activation norm
  passes the learned cut (this is no longer a JumpReLU: it could not export as one).
- ``topk/base``: plain TopK, for reference.
- ``matryoshka/topk``: Matryoshka with per-token TopK selection instead of BatchTopK.
- ``standard/fixed``: no steering: the penalty stays at the one the steered run ended at
  (SAELens's standard SAE, which cannot steer, gets that penalty in the architecture table).
- ``standard/noclip`` (not in the default list): steered, without gradient clipping. Our loss
  averages the MSE over d_in, so gradient norms stay far below the clip of 1 and the run is
  bit-identical to the clipped one (SAELens sums over d_in and clips at 1 as well, so there it
  binds).
- ``standard/nowarmup``: steered, without the penalty's warm-up.

    python benchmarks/architecture_variants.py --generator saelens --samples 500000
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from app.sae.architectures import get as architecture  # noqa: E402
from app.sae.sources import HierarchicalSource, normalization_scale  # noqa: E402
from app.sae.trainer import TrainConfig, train  # noqa: E402
from app.validation import recommended_l1_alpha  # noqa: E402
from architectures import measure  # noqa: E402

CPU = torch.device("cpu")
VARIANTS = ("topk/base", "batchtopk/base", "batchtopk/floor", "batchtopk/floor-jumprelu", "batchtopk/scaled", "matryoshka/base", "matryoshka/topk",
            "standard/base", "standard/fixed", "standard/nowarmup")


def floor_select(self, pre):
    acts = torch.relu(pre)
    floor = max(1, self.k // 2)
    own_values, own_index = acts.topk(floor, dim=1)
    own = torch.zeros_like(acts).scatter_(1, own_index, own_values)
    rest = (acts - own).flatten()
    values, index = rest.topk(min((self.k - floor) * acts.shape[0], rest.numel()), sorted=False)
    self._last_cut = values.min()
    return own + torch.zeros_like(rest).scatter_(0, index, values).view_as(acts)


def floor_activate(self, pre):
    if self.training:
        return self.batch_topk(pre)
    acts = torch.relu(pre)
    own_values, own_index = acts.topk(max(1, self.k // 2), dim=1)
    own = torch.zeros_like(acts).scatter_(1, own_index, own_values)
    return torch.maximum(own, acts * (acts > self.threshold[0]))


def scaled_select(self, pre):
    acts = torch.relu(pre)
    score = (acts / acts.norm(dim=1, keepdim=True).clamp(min=1e-6)).flatten()
    _, index = score.topk(min(self.k * acts.shape[0], score.numel()), sorted=False)
    keep = torch.zeros_like(score, dtype=torch.bool).scatter_(0, index, True).view_as(acts)
    self._last_cut = score.view_as(acts).masked_fill(~keep, float("inf")).min()
    return acts * keep


def scaled_activate(self, pre):
    if self.training:
        return self.batch_topk(pre)
    acts = torch.relu(pre)
    return acts * (acts / acts.norm(dim=1, keepdim=True).clamp(min=1e-6) > self.threshold[0])


@torch.no_grad()
def cut_threshold(self, f):
    cut = self._last_cut
    self.threshold.copy_(torch.where(self.threshold_seen,
                                     (1 - self.threshold_rate) * self.threshold + self.threshold_rate * cut,
                                     cut.expand_as(self.threshold)))
    self.threshold_seen.fill_(True)


def topk_select(self, pre):
    acts = torch.relu(pre)
    values, index = acts.topk(self.k, dim=1)
    return torch.zeros_like(acts).scatter_(1, index, values)


def topk_activate(self, pre):
    return self.batch_topk(pre)


PATCHES = {
    "batchtopk/floor": ("batchtopk", {"batch_topk": floor_select, "activate": floor_activate,
                                      "update_threshold": cut_threshold}),
    "batchtopk/floor-jumprelu": ("batchtopk", {"batch_topk": floor_select, "update_threshold": cut_threshold}),
    "batchtopk/scaled": ("batchtopk", {"batch_topk": scaled_select, "activate": scaled_activate,
                                       "update_threshold": cut_threshold}),
    "matryoshka/topk": ("matryoshka", {"batch_topk": topk_select, "activate": topk_activate}),
}


def run(variant: str, source, args, x_eval, fixed_alpha: float | None) -> dict:
    from app.sae.control import L0Controller

    arch, how = variant.split("/")
    steps = args.samples // args.batch
    target = args.k / args.latents
    cfg = TrainConfig(architecture=arch, latent_dim=args.latents, batch_size=args.batch, total_steps=steps,
                      learning_rate=args.lr, lr_warmup_steps=steps // 20,
                      l1_warmup_steps=0 if how == "nowarmup" else steps // 20,
                      target_l0=target, k=args.k if arch != "standard" else None,
                      l1_alpha=(fixed_alpha if how == "fixed" else recommended_l1_alpha(args.d_in, args.latents, target))
                      if arch == "standard" else None,
                      matryoshka_prefixes="" if arch == "matryoshka" else None,
                      grad_clip=float("inf") if how == "noclip" else 1.0,
                      precision="float32", log_every=50, device="cpu")
    steer = (L0Controller(target=target, alpha=cfg.l1_alpha, start_step=cfg.l1_warmup_steps)
             if arch == "standard" and how != "fixed" else None)
    cls = architecture(arch).model_class()
    saved = {}
    for name, fn in PATCHES.get(variant, (None, {}))[1].items():
        saved[name] = cls.__dict__.get(name)
        setattr(cls, name, fn)
    try:
        _, sae = train(source, cfg, l1_alpha_control=steer)
        row = measure(sae.eval(), source, x_eval)
    finally:
        for name, fn in saved.items():
            if fn is None:
                delattr(cls, name)
            else:
                setattr(cls, name, fn)
    if steer is not None:
        row["final_l1_alpha"] = steer.alpha
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generator", choices=("ours", "saelens"), default="ours")
    parser.add_argument("--only", default=",".join(VARIANTS))
    parser.add_argument("--features", type=int, default=2048)
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--latents", type=int, default=2048)
    parser.add_argument("--k", type=int, default=None)
    parser.add_argument("--samples", type=int, default=500_000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--out", default=None,
                        help="results file (default: results/architecture_variants_<generator>_<samples>.json)")
    parser.add_argument("--table", action="store_true",
                        help="write results/architecture_variants.md from every results file and stop")
    args = parser.parse_args()
    if args.table:
        text = table(sorted((ROOT / "benchmarks" / "results").glob("architecture_variants_*.json")))
        (ROOT / "benchmarks" / "results" / "architecture_variants.md").write_text(text)
        print(text)
        return 0
    torch.set_num_threads(1)
    if args.generator == "ours":
        source = HierarchicalSource(args.d_in, args.features, 16.0, seed=0)
        described = f"HierarchicalSource(d_in={args.d_in}, n_features={args.features}, mean_active=16)"
        args.k = args.k or 16
    else:
        from synthsaebench import SynthSAEBenchSource

        source = SynthSAEBenchSource(args.d_in, args.features, rows=max(args.samples, 1_500_000))
        described = f"{source.description}; true L0 {source.true_l0:.1f}"
        args.k = args.k or round(source.true_l0)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"architecture_variants_{args.generator}_{args.samples}.json")
    scale = normalization_scale(source.sample(8192, device=CPU))
    x_eval = source.eval_rows(16_384, device=CPU) * scale
    results = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    results["setup"] = {"source": described, "latents": args.latents, "k_or_target": args.k,
                        "samples": args.samples, "batch": args.batch, "learning_rate": args.lr,
                        "note": f"AuxK window {TrainConfig.__dataclass_fields__['aux_window_tokens'].default:,} tokens"}
    for variant in args.only.split(","):
        fixed = results["runs"].get("standard/base", {}).get("final_l1_alpha")
        if variant == "standard/fixed" and fixed is None:
            print("standard/fixed needs standard/base first", file=sys.stderr)
            continue
        started = time.perf_counter()
        row = run(variant, source, args, x_eval, fixed)
        row["seconds"] = round(time.perf_counter() - started, 1)
        results["runs"][variant] = row
        print(f"{variant:<20} L0 {row['l0']:6.2f}  FVU {row['fvu']:.4f}  MCC {row['mcc']:.3f}  "
              f"MMCS {row['mmcs']:.3f}  never fired {row['never_fired']:5d}  {row['seconds']:.0f} s", flush=True)
        out.write_text(json.dumps(results, indent=2))
    return 0


def table(paths) -> str:
    """Every results file as one Markdown table per file, each variant beside its architecture's base."""
    out = ["# Architecture variants (benchmarks/architecture_variants.py)", ""]
    for path in paths:
        results = json.loads(Path(path).read_text())
        setup = results["setup"]
        out += [f"## {setup['source']}", "",
                f"{setup['latents']:,} latents; {setup['samples']:,} training samples in batches of {setup['batch']} "
                f"at learning rate {setup['learning_rate']}; k or target L0 {setup['k_or_target']}; held-out: "
                "16,384 samples; one CPU thread." + (f" {setup['note']}." if setup.get("note") else ""), "",
                "| variant | L0 | FVU | MCC | MMCS | never fired |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        runs = results["runs"]
        for name in [v for v in VARIANTS if v in runs] + sorted(set(runs) - set(VARIANTS)):
            row = runs[name]
            out.append(f"| {name} | {row['l0']:.2f} | {row['fvu']:.3f} | {row['mcc']:.3f} | {row['mmcs']:.3f} | "
                       f"{row['never_fired']:,} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
