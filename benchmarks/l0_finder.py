"""The "Sparse but Wrong" L0 finder (app/sae/l0_finder.py) against sources whose true L0 is known.

For each synthetic source: train a ladder of BatchTopK SAEs (k = rung), compute c_dec and s_n^dec
for each, let ``recommend_l0`` read the right L0 off each metric's curve, and compare it with the
source's true L0 (measured: the mean number of features firing per token on 20,000 tokens). Then
MCC against the true features (``ground_truth_recovery``) at the recommended k and at the default
target (k = 2% of latent_dim), training those two when they are not rungs already.

Sources:
  hier16  the default hierarchical source of the app (HierarchicalSource d_in 256, 2,048 features,
          mean_active 16; the hierarchy prunes it to ~14.6 per token)
  flat5   SyntheticSource d_in 128, 512 features, 5 active per token
  flat40  SyntheticSource d_in 384, 1,024 features, 40 active per token
Follow-ups (``--only``): flat5long (flat5, 4x the steps) and ortho8 (HierarchicalSource d_in 256,
128 nearly orthogonal features, mean_active 8; 128 latents), closer to the paper's toy model.

    python benchmarks/l0_finder.py                 # all three: 32 min measured on a loaded 2-core box
    python benchmarks/l0_finder.py --only flat5 --steps 500 --json /tmp/flat5.json
    python benchmarks/l0_finder.py --only flat5,hier16 --seeds 2 --rungs 5   # cross-seed consistency

``--seeds 2`` trains a second SAE per rung that differs from the first only in its init seed (both
read the batches of data seed 0, in the same order) and adds ``consistency`` (``seed_consistency``:
MCC between the two decoders) per rung and ``recommend_l0``'s reading of its peak.

It prints the tables; benchmarks/results/l0_finder.md holds a run's figures with its commentary.
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

from app.sae.features import ground_truth_recovery  # noqa: E402
from app.sae.l0_finder import (decoder_cosine, default_n, ladder, nth_decoder_projection, recommend_l0,  # noqa: E402
                               seed_consistency)
from app.sae.sources import HierarchicalSource, SyntheticSource  # noqa: E402
from app.sae.trainer import TrainConfig, train  # noqa: E402

CPU = torch.device("cpu")

# name: (builder, latent_dim, ladder bounds, rungs, steps)
SOURCES = {
    "hier16": (lambda: HierarchicalSource(256, 2048, 16.0, seed=0), 1024, (4, 48), 6, 1200),
    "flat5": (lambda: SyntheticSource(128, 512, 5.0, seed=0), 512, (2, 20), 6, 2000),
    "flat40": (lambda: SyntheticSource(384, 1024, 40.0, seed=0), 1024, (12, 128), 6, 1200),
    # follow-ups, not in the default run: flat5 trained 4x longer; and a setting like the paper's toy
    # model (few, nearly orthogonal, correlated features; as many latents as features)
    "flat5long": (lambda: SyntheticSource(128, 512, 5.0, seed=0), 512, (2, 20), 6, 8000),
    "ortho8": (lambda: HierarchicalSource(256, 128, 8.0, seed=0), 128, (2, 24), 7, 4000),
}
DEFAULT_RUN = "hier16,flat5,flat40"


def true_l0(source) -> float:
    g = torch.Generator().manual_seed(12345)
    if isinstance(source, HierarchicalSource):
        return float(source.firing(20_000, g, CPU).sum(dim=1).float().mean())
    return float(source.mean_active)  # SyntheticSource: active count is Binomial(slots, mean/slots)


class PinnedData:
    """The source as the trainer sees it, but every run reads the batches of data seed ``data_seed``:
    the trainer's ``seed`` then changes only the initialisation (the trainer uses one seed for both)."""

    def __init__(self, source, data_seed: int = 0) -> None:
        self._source, self._data_seed = source, data_seed

    def __getattr__(self, name):
        return getattr(self._source, name)

    def batches(self, batch_size, *, seed, device, start=0):
        return self._source.batches(batch_size, seed=self._data_seed, device=device, start=start)


def train_one(source, latent_dim: int, k: int, steps: int, batch: int, lr: float, seed: int = 0):
    cfg = TrainConfig(architecture="batchtopk", latent_dim=latent_dim, batch_size=batch, total_steps=steps, k=k,
                      learning_rate=lr, lr_warmup_steps=max(1, steps // 20), precision="float32",
                      log_every=max(1, steps // 4), device="cpu", eval_tokens=4096, seed=seed)
    result, sae = train(PinnedData(source) if seed else source, cfg)
    return result, sae.eval()


def run_source(name: str, args) -> dict:
    build, latent_dim, bounds, rungs_n, steps = SOURCES[name]
    steps = args.steps or steps
    source = build()
    truth = true_l0(source)
    rungs = ladder(bounds, args.rungs or rungs_n, latent_dim=latent_dim)
    n = default_n(latent_dim)
    rows = []
    acts = None
    for k in rungs:
        started = time.perf_counter()
        result, sae = train_one(source, latent_dim, k, steps, args.batch, args.lr)
        if acts is None:
            acts = source.eval_rows(4096, device=CPU) * result.norm_scale
        row = {"k": k, "l0": result.eval.get("l0"), "fvu": result.eval.get("fvu"),
               "c_dec": decoder_cosine(sae.W_dec),
               "s_n_dec": nth_decoder_projection(sae.W_dec, acts, n, b_dec=sae.b_dec),
               "mcc": ground_truth_recovery(sae, source.features).mcc,
               "seconds": round(time.perf_counter() - started, 1)}
        if args.seeds >= 2:  # a second init seed on the same batches; seed 0 already reads data seed 0
            _, sae_b = train_one(source, latent_dim, k, steps, args.batch, args.lr, seed=1)
            row["consistency"] = seed_consistency(sae.W_dec, sae_b.W_dec)
            row["mcc_seed1"] = ground_truth_recovery(sae_b, source.features).mcc
            row["seconds"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            torch.save({"W_dec": sae.W_dec.detach().clone(), "b_dec": sae.b_dec.detach().clone(),
                        "norm_scale": result.norm_scale}, Path(args.save) / f"{name}_k{k}.pt")
        print(f"{name:<7} k {k:4d}  L0 {row['l0']:6.2f}  FVU {row['fvu']:.4f}  c_dec {row['c_dec']:.5f}  "
              f"s_n {row['s_n_dec']:.5f}  MCC {row['mcc']:.3f}"
              + (f"  consistency {row['consistency']:.4f}  MCC(seed 1) {row['mcc_seed1']:.3f}"
                 if "consistency" in row else "")
              + f"  {row['seconds']:.0f} s", flush=True)

    recs = {}
    metrics = ("c_dec", "s_n_dec", "consistency") if args.seeds >= 2 else ("c_dec", "s_n_dec")
    for metric in metrics:
        rec = recommend_l0([(r["k"], r[metric]) for r in rows], metric=metric)
        recs[metric] = {"l0": rec.l0, "estimate": rec.estimate, "rung": rec.rung, "bracket": list(rec.bracket),
                        "at_edge": rec.at_edge, "shallow": rec.shallow, "certainty": rec.certainty,
                        "error": rec.l0 / truth - 1}

    def mcc_at(k: int) -> float:
        for r in rows:
            if r["k"] == k:
                return r["mcc"]
        _, sae = train_one(source, latent_dim, k, steps, args.batch, args.lr)
        mcc = ground_truth_recovery(sae, source.features).mcc
        rows_extra.append({"k": k, "mcc": mcc})
        return mcc

    rows_extra: list = []
    default_k = max(1, round(0.02 * latent_dim))
    out = {"source": name, "d_in": source.d_in, "n_features": source.n_features, "latent_dim": latent_dim,
           "true_l0": truth, "steps": steps, "batch": args.batch, "lr": args.lr, "n": n, "ladder": rows,
           "recommended": recs, "default_k": default_k, "seeds": args.seeds}
    out["mcc_default"] = mcc_at(default_k)
    for metric in metrics:
        out["recommended"][metric]["mcc"] = mcc_at(recs[metric]["l0"])
    out["extra"] = rows_extra
    return out


def table(results: list[dict]) -> str:
    lines = ["| source | d_in | latents | true L0 | metric | recommended L0 (bracket) | error | edge | MCC at rec. | "
             "MCC at 2% default (k) |", "| --- | ---: | ---: | ---: | --- | --- | ---: | --- | ---: | ---: |"]
    for r in results:
        for metric in r["recommended"]:
            rec = r["recommended"][metric]
            lines.append(f"| {r['source']} | {r['d_in']} | {r['latent_dim']} | {r['true_l0']:.1f} | {metric} | "
                         f"{rec['l0']} ({rec['bracket'][0]:g}–{rec['bracket'][1]:g}) | {rec['error']:+.0%} | "
                         f"{rec['at_edge'] or '—'} | {rec['mcc']:.3f} | {r['mcc_default']:.3f} ({r['default_k']}) |")
    return "\n".join(lines)


def curves(results: list[dict]) -> str:
    out = []
    for r in results:
        two = "consistency" in r["ladder"][0]
        out += [f"**{r['source']}** (true L0 {r['true_l0']:.1f}; {r['steps']} steps × {r['batch']}; n = {r['n']})", "",
                "| k | eval L0 | FVU | c_dec | s_n^dec | MCC |" + (" consistency | MCC (seed 1) |" if two else "")
                + " seconds |", "| ---: " * (9 if two else 7) + "|"]
        for row in r["ladder"]:
            out.append(f"| {row['k']} | {row['l0']:.2f} | {row['fvu']:.4f} | {row['c_dec']:.5f} | {row['s_n_dec']:.4f} | "
                       f"{row['mcc']:.3f} |" + (f" {row['consistency']:.4f} | {row['mcc_seed1']:.3f} |" if two else "")
                       + f" {row['seconds']:.0f} |")
        out.append("")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=DEFAULT_RUN, help=f"any of {', '.join(SOURCES)}")
    parser.add_argument("--save", default=None, help="a folder to save each SAE's W_dec and b_dec in (for re-analysis)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per SAE (default: per source)")
    parser.add_argument("--seeds", type=int, default=1, choices=(1, 2),
                        help="2: also train a second init seed per rung and add cross-seed consistency")
    parser.add_argument("--rungs", type=int, default=None, help="rungs on the ladder (default: per source)")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    parser.add_argument("--json", default=None, help="also write the raw results here (written after each source)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for name in args.only.split(","):
        started = time.perf_counter()
        res = run_source(name, args)
        res["seconds"] = round(time.perf_counter() - started, 1)
        results.append(res)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        print(table([res]), flush=True)
    print(table(results))
    print(curves(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
