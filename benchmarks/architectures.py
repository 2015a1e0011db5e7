"""Every architecture of ours beside SAELens's own trainer of the same architecture, on a synthetic
source with known features: MCC, MMCS, FVU and L0 on held-out tokens. Two generators: ours
(``--generator ours``, below) and SAELens's own (``--generator saelens``: ``sae_lens.synthetic``
as a small SynthSAEBench, ``benchmarks/synthsaebench.py``; k defaults to its true L0).

The source has hierarchy, correlated firing and Zipfian frequencies (``HierarchicalSource``):
2,048 true features in d_in 256, about 15 active per token. Each SAE has 2,048 latents and
sees the same stream of 1.5M training samples (the same batches, normalized to E‖x‖² = d_in
for both). L0 is matched by construction where the architecture allows it (k = 16 for TopK,
BatchTopK and Matryoshka; target 16 for JumpReLU, SAELens in its quadratic "target L0" mode).
Our standard SAE starts at the calibrated l1_alpha and steers it to the target L0 (the form's
"steer l1_alpha"); SAELens's standard SAE, which cannot steer, gets the penalty ours ended at
(``--saelens-l1``: its MSE is summed over d_in where ours is averaged, so its coefficient is
d_in × ours). Both trainers get the same learning rate, warm-up and decay. SAELens's SAEs are evaluated as SAELens loads
them for use (saved and loaded back: BatchTopK and Matryoshka become JumpReLUs), ours as we
export them.

    python benchmarks/architectures.py            # the whole table (about an hour on 2 CPU cores)
    python benchmarks/architectures.py --generator saelens
    python benchmarks/architectures.py --combine results/architectures.json results/architectures_synthsaebench.json
    python benchmarks/architectures.py --only jumprelu --samples 300000
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.sae.features import ground_truth_recovery  # noqa: E402
from app.sae.metrics import evaluate  # noqa: E402
from app.sae.sources import HierarchicalSource, normalization_scale  # noqa: E402
from app.sae.trainer import TrainConfig, train  # noqa: E402
from app.sae.architectures.gated import start_l1_alpha as gated_start_l1_alpha  # noqa: E402
from app.sae.architectures.matryoshka import level_sizes as matryoshka_levels  # noqa: E402
from app.validation import recommended_l1_alpha  # noqa: E402

ARCHITECTURES = ("standard", "topk", "batchtopk", "jumprelu", "matryoshka", "matryoshka_topk", "gated")
PENALIZED = ("standard", "gated")  # sparsity set by l1_alpha: ours steers it to the target, SAELens gets where ours ended
K_SET = ("topk", "batchtopk", "matryoshka", "matryoshka_topk")
CPU = torch.device("cpu")


class Adapter(torch.nn.Module):
    """SAELens's inference SAE behind the two calls our metrics make."""

    def __init__(self, sae) -> None:
        super().__init__()
        self.sae, self.d_sae = sae, sae.cfg.d_sae
        self.W_dec = sae.W_dec

    def forward(self, x):
        f = self.sae.encode(x)
        return self.sae.decode(f), f


def measure(sae, source, x_eval) -> dict:
    with torch.no_grad():
        metrics = evaluate(sae, x_eval)
        recovery = ground_truth_recovery(sae, source.features)
    return {"l0": metrics["l0"], "fvu": metrics["fvu"], "mcc": recovery.mcc, "mmcs": recovery.mmcs,
            "never_fired": metrics["never_fired"]}


def run_ours(arch: str, source, args, x_eval) -> dict:
    from app.sae.control import L0Controller

    steps = args.samples // args.batch
    target = args.k / args.latents
    cfg = TrainConfig(architecture=arch, latent_dim=args.latents, batch_size=args.batch, total_steps=steps,
                      learning_rate=args.lr, lr_warmup_steps=steps // 20, l1_warmup_steps=steps // 20,
                      target_l0=target, k=args.k if arch in K_SET else None,
                      l1_alpha=(recommended_l1_alpha(args.d_in, args.latents, target) if arch == "standard"
                                else gated_start_l1_alpha(args.d_in, args.latents, target, steps, args.batch)
                                if arch == "gated" else None),
                      l0_coefficient=10.0 if arch == "jumprelu" else None,
                      jumprelu_bandwidth=0.05 if arch == "jumprelu" else None,
                      matryoshka_prefixes="" if arch.startswith("matryoshka") else None,
                      precision="float32", log_every=50, device="cpu",
                      **({"dead_window_tokens": args.dead_window} if args.dead_window else {}),
                      **({"dead_latent_remedy": args.remedy} if args.remedy != "none" else {}))
    steer = L0Controller(target=target, alpha=cfg.l1_alpha, start_step=cfg.l1_warmup_steps) if arch in PENALIZED else None
    result, sae = train(source, cfg, l1_alpha_control=steer)
    row = measure(sae.eval(), source, x_eval)
    if steer is not None:
        row["final_l1_alpha"] = steer.alpha
    return row


def run_saelens(arch: str, source, args, x_eval, scale: float) -> dict:
    from sae_lens import SAE
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (MatryoshkaBatchTopKTrainingSAE,
                                                        MatryoshkaBatchTopKTrainingSAEConfig)
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    steps = args.samples // args.batch
    common = {"d_in": args.d_in, "d_sae": args.latents, "device": "cpu"}
    if arch == "standard":
        alpha = args.saelens_l1 or recommended_l1_alpha(args.d_in, args.latents, args.k / args.latents)
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(**common, l1_coefficient=args.d_in * alpha,
                                                            l1_warm_up_steps=steps // 20))
    elif arch == "gated":  # its loss sums the squared error over d_in where ours averages it: d_in × our penalty
        alpha = args.saelens_l1 or gated_start_l1_alpha(args.d_in, args.latents, args.k / args.latents, steps,
                                                        args.batch)
        sae = GatedTrainingSAE(GatedTrainingSAEConfig(**common, l1_coefficient=args.d_in * alpha,
                                                      l1_warm_up_steps=steps // 20))
    elif arch == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(**common, k=args.k))
    elif arch == "batchtopk":
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common, k=args.k))
    elif arch == "matryoshka":
        widths = list(matryoshka_levels("", args.latents))
        sae = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(**common, k=args.k,
                                                                                  matryoshka_widths=widths))
    else:
        sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(**common, jumprelu_sparsity_loss_mode="quadratic",
                                                            target_l0=float(args.k)))
    batches = (b * scale for b in source.batches(args.batch, seed=0, device=CPU))
    # the same schedule as ours: 5% warm-up, linear decay over the last 20%
    cfg = SAETrainerConfig(total_training_samples=steps * args.batch, train_batch_size_samples=args.batch, lr=args.lr,
                           lr_end=1e-6, lr_warm_up_steps=steps // 20, lr_decay_steps=steps // 5, device="cpu",
                           logger=LoggingConfig(log_to_wandb=False),
                           **({"dead_feature_window": max(1, args.dead_window // args.batch)} if args.dead_window else {}))
    trained = SAETrainer(cfg, sae, batches).fit()
    with tempfile.TemporaryDirectory() as folder:
        trained.save_inference_model(folder)
        loaded = SAE.load_from_disk(folder, device="cpu")
    return measure(Adapter(loaded.eval()), source, x_eval)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(ARCHITECTURES))
    parser.add_argument("--contenders", default="ours,saelens")
    parser.add_argument("--features", type=int, default=2048)
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--latents", type=int, default=2048)
    parser.add_argument("--generator", choices=("ours", "saelens"), default="ours",
                        help="ours: HierarchicalSource; saelens: sae_lens.synthetic's generator (benchmarks/synthsaebench.py)")
    parser.add_argument("--k", type=int, default=None,
                        help="k or target L0 (default: 16 on ours, the generator's true L0 rounded on SAELens's)")
    parser.add_argument("--samples", type=int, default=1_500_000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--saelens-l1", type=float, default=None,
                        help="our l1_alpha for SAELens's standard SAE (default: the run of ours in the results file)")
    parser.add_argument("--ours-from", default=None,
                        help="a results file holding our standard run, for --saelens-l1 (when run in parallel)")
    parser.add_argument("--merge", nargs="+", default=None, help="merge these results files into --out and stop")
    parser.add_argument("--combine", nargs=2, default=None, metavar=("OURS_JSON", "SAELENS_JSON"),
                        help="write results/architectures_two_generators.md from the two generators' results and stop")
    parser.add_argument("--dead-window", type=int, default=None,
                        help="tokens a latent may stay silent before AuxK treats it as dead (ours: dead_window_tokens, "
                             "default 200,000; SAELens: dead_feature_window, the same in steps)")
    parser.add_argument("--remedy", choices=("none", "resample"), default="none",
                        help="ours: the dead-latent remedy (standard and gated; the form's default is none)")
    parser.add_argument("--out", default=None,
                        help="results file (default: results/architectures.json, or architectures_synthsaebench.json)")
    args = parser.parse_args()
    name = "architectures.json" if args.generator == "ours" else "architectures_synthsaebench.json"
    out = Path(args.out or ROOT / "benchmarks" / "results" / name)
    if args.combine:
        text = combined(*(json.loads(Path(name).read_text()) for name in args.combine))
        (ROOT / "benchmarks" / "results" / "architectures_two_generators.md").write_text(text)
        print(text)
        return 0
    if args.merge:
        merged: dict = {}
        for name in args.merge:
            part = json.loads(Path(name).read_text())
            merged.setdefault("setup", part["setup"])
            merged.setdefault("runs", {}).update(part.get("runs", {}))
        order = [f"{a}/{w}" for a in ARCHITECTURES for w in ("ours", "saelens")]
        order += sorted(key for key in merged["runs"] if key not in order)
        merged["runs"] = {key: merged["runs"][key] for key in order if key in merged["runs"]}
        out.write_text(json.dumps(merged, indent=2))
        out.with_suffix(".md").write_text(table(merged))
        print(table(merged))
        return 0

    if args.generator == "ours":
        source = HierarchicalSource(args.d_in, args.features, 16.0, seed=0)
        described = f"HierarchicalSource(d_in={args.d_in}, n_features={args.features}, mean_active=16)"
        args.k = args.k or 16
    else:
        from synthsaebench import SynthSAEBenchSource

        source = SynthSAEBenchSource(args.d_in, args.features, rows=args.samples)
        described = f"{source.description}; true L0 {source.true_l0:.1f}"
        args.k = args.k or round(source.true_l0)
    scale = normalization_scale(source.sample(8192, device=CPU))
    x_eval = source.eval_rows(16_384, device=CPU) * scale
    results = json.loads(out.read_text()) if out.exists() else {}
    results["setup"] = {"source": described,
                        "latents": args.latents, "k_or_target": args.k, "samples": args.samples, "batch": args.batch,
                        "learning_rate": args.lr,
                        "torch_threads": torch.get_num_threads(),
                        "aux_window_tokens": TrainConfig.__dataclass_fields__["aux_window_tokens"].default}
    for arch in args.only.split(","):
        for who in args.contenders.split(","):
            if who == "saelens" and arch == "matryoshka_topk":
                continue  # SAELens has no Matryoshka with per-token TopK selection
            given_l1 = args.saelens_l1
            if arch in PENALIZED and who == "saelens" and args.saelens_l1 is None:
                theirs = json.loads(Path(args.ours_from).read_text()) if args.ours_from else results
                args.saelens_l1 = theirs.get("runs", {}).get(f"{arch}/ours", {}).get("final_l1_alpha")
            started = time.perf_counter()
            row = run_ours(arch, source, args, x_eval) if who == "ours" else run_saelens(arch, source, args, x_eval, scale)
            args.saelens_l1 = given_l1  # a penalty found for one architecture is not another's
            row["seconds"] = round(time.perf_counter() - started, 1)
            label = f"{arch}, dead window {args.dead_window:,}" if args.dead_window else arch
            if args.remedy != "none" and who == "ours":
                label += ", resampling"
            results.setdefault("runs", {})[f"{label}/{who}"] = row
            print(f"{arch:<11} {who:<8} L0 {row['l0']:6.2f}  FVU {row['fvu']:.4f}  MCC {row['mcc']:.3f}  "
                  f"MMCS {row['mmcs']:.3f}  never fired {row['never_fired']:5d}  {row['seconds']:.0f} s", flush=True)
            out.write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(table(results))
    print(table(results))
    return 0


def table(results: dict) -> str:
    """The runs as a Markdown table, ours beside SAELens's for each architecture."""
    setup = results["setup"]
    lines = [f"{setup['source']}; {setup['latents']:,} latents; {setup['samples']:,} training samples in batches of "
             f"{setup['batch']:,} at learning rate {setup.get('learning_rate')}; k or target L0 {setup['k_or_target']}; "
             "held-out: 16,384 tokens; "
             f"{setup['torch_threads']} CPU thread(s)."
             + (f" Ours at the form's defaults (AuxK window {setup['aux_window_tokens']:,} tokens) unless the row "
                "says otherwise." if setup.get("aux_window_tokens") else "")
             + (f" {setup['note']}" if setup.get("note") else ""), "",
             "| architecture | trainer | L0 | FVU | MCC | MMCS | never fired | seconds |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for key, row in results.get("runs", {}).items():
        arch, who = key.split("/")
        lines.append(f"| {arch} | {'SAELens' if who == 'saelens' else 'ours'} | {row['l0']:.2f} | {row['fvu']:.3f} | "
                     f"{row['mcc']:.3f} | {row['mmcs']:.3f} | {row['never_fired']:,} | {row['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def combined(first: dict, second: dict) -> str:
    """One table, architecture × trainer, with each generator's L0, FVU, MCC and never-fired side by side."""
    keys = list(first["runs"]) + [key for key in second["runs"] if key not in first["runs"]]
    lines = ["Generators: (A) " + first["setup"]["source"] + f", k or target {first['setup']['k_or_target']}; "
             "(B) " + second["setup"]["source"] + f", k or target {second['setup']['k_or_target']}. Both: "
             f"{first['setup']['latents']:,} latents, {first['setup']['samples']:,} samples in batches of "
             f"{first['setup']['batch']}, learning rate {first['setup']['learning_rate']}, one CPU thread; held-out "
             "16,384 samples.", "",
             "| architecture | trainer | A: L0 | A: FVU | A: MCC | A: never fired | B: L0 | B: FVU | B: MCC | B: never fired |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def cells(row):
        if row is None:
            return ["–"] * 4
        return [f"{row['l0']:.2f}", f"{row['fvu']:.3f}", f"{row['mcc']:.3f}", f"{row['never_fired']:,}"]

    for key in keys:
        arch, who = key.split("/")
        lines.append("| " + " | ".join([arch, "SAELens" if who == "saelens" else "ours",
                                         *cells(first["runs"].get(key)), *cells(second["runs"].get(key))]) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
