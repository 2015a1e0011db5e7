"""Every architecture of ours beside SAELens's own trainer of the same architecture, on the
hierarchical synthetic source: MCC, MMCS, FVU and L0 on held-out tokens.

The source has hierarchy, correlated firing and Zipfian frequencies (``HierarchicalSource``):
2,048 true features in d_in 256, about 15 active per token. Each SAE has 2,048 latents and
sees the same stream of 1.5M training samples (the same batches, normalized to E‖x‖² = d_in
for both). L0 is matched by construction where the architecture allows it (k = 16 for TopK,
BatchTopK and Matryoshka; target 16 for JumpReLU, SAELens in its quadratic "target L0" mode);
the standard SAEs take our calibrated l1_alpha (SAELens's MSE is summed over d_in where ours
is averaged, so its coefficient is d_in × ours). SAELens's SAEs are evaluated as SAELens loads
them for use (saved and loaded back: BatchTopK and Matryoshka become JumpReLUs), ours as we
export them.

    python benchmarks/architectures.py            # the whole table (about an hour on 2 CPU cores)
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
from app.training_config import matryoshka_levels  # noqa: E402
from app.validation import recommended_l1_alpha  # noqa: E402

ARCHITECTURES = ("standard", "topk", "batchtopk", "jumprelu", "matryoshka")
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
    steps = args.samples // args.batch
    target = args.k / args.latents
    cfg = TrainConfig(architecture=arch, latent_dim=args.latents, batch_size=args.batch, total_steps=steps,
                      learning_rate=1e-3, lr_warmup_steps=steps // 20, l1_warmup_steps=steps // 20,
                      target_l0=target, k=args.k if arch in ("topk", "batchtopk", "matryoshka") else None,
                      l1_alpha=recommended_l1_alpha(args.d_in, args.latents, target) if arch == "standard" else None,
                      l0_coefficient=1.0 if arch == "jumprelu" else None,
                      jumprelu_bandwidth=0.05 if arch == "jumprelu" else None,
                      matryoshka_prefixes="" if arch == "matryoshka" else None,
                      precision="float32", log_every=100, device="cpu")
    _, sae = train(source, cfg)
    return measure(sae.eval(), source, x_eval)


def run_saelens(arch: str, source, args, x_eval, scale: float) -> dict:
    from sae_lens import SAE
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (MatryoshkaBatchTopKTrainingSAE,
                                                        MatryoshkaBatchTopKTrainingSAEConfig)
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    steps = args.samples // args.batch
    common = {"d_in": args.d_in, "d_sae": args.latents, "device": "cpu"}
    if arch == "standard":
        alpha = recommended_l1_alpha(args.d_in, args.latents, args.k / args.latents)
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(**common, l1_coefficient=args.d_in * alpha,
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
    cfg = SAETrainerConfig(total_training_samples=steps * args.batch, train_batch_size_samples=args.batch, lr=1e-3,
                           lr_end=1e-6, lr_warm_up_steps=steps // 20, lr_decay_steps=steps // 5, device="cpu",
                           logger=LoggingConfig(log_to_wandb=False))
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
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--samples", type=int, default=1_500_000)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "architectures.json"))
    args = parser.parse_args()

    source = HierarchicalSource(args.d_in, args.features, 16.0, seed=0)
    scale = normalization_scale(source.sample(8192, device=CPU))
    x_eval = source.eval_rows(16_384, device=CPU) * scale
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results["setup"] = {"source": f"HierarchicalSource(d_in={args.d_in}, n_features={args.features}, mean_active=16)",
                        "latents": args.latents, "k_or_target": args.k, "samples": args.samples, "batch": args.batch,
                        "torch_threads": torch.get_num_threads()}
    for arch in args.only.split(","):
        for who in args.contenders.split(","):
            started = time.perf_counter()
            row = run_ours(arch, source, args, x_eval) if who == "ours" else run_saelens(arch, source, args, x_eval, scale)
            row["seconds"] = round(time.perf_counter() - started, 1)
            results.setdefault("runs", {})[f"{arch}/{who}"] = row
            print(f"{arch:<11} {who:<8} L0 {row['l0']:6.2f}  FVU {row['fvu']:.4f}  MCC {row['mcc']:.3f}  "
                  f"MMCS {row['mmcs']:.3f}  never fired {row['never_fired']:5d}  {row['seconds']:.0f} s", flush=True)
            out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
