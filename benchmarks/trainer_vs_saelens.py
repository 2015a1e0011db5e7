"""Our trainer beside SAELens's own ``SAETrainer`` and a bare PyTorch loop doing the same maths.

Same data (one in-memory tensor), same shapes, same optimizer (Adam, lr 1e-3, gradient
clipping at 1), interleaved round by round; each contender's best round counts. Throughput
is steady state, measured the same way for every contender: the time from the draw of batch
``warmup`` to the draw of batch ``warmup + steps`` (so set-up, the normalization estimate
and the final evaluation are outside it; on CUDA the device is synchronised at both ends).

Standard = ReLU + decoder-norm-weighted L1; TopK = k latents per token. For SAELens,
``autocast=True`` is its bfloat16 mode; ours is ``precision="bfloat16"``; the bare loop uses
the same autocast. Prints tokens/s per contender and the ratios, and writes them with the
machine and the versions to ``benchmarks/results/trainer_vs_saelens[_<device>].txt``.

Usage: ``python benchmarks/trainer_vs_saelens.py [--device cpu] [--d-in 768] [--latents 8192]
[--batch 4096] [--steps 6] [--warmup 2] [--rounds 2] [--k 32] [--cases standard-fp32,...]``
"""
from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.sae.sources import ActivationSource  # noqa: E402
from app.sae.trainer import TrainConfig, train  # noqa: E402

CASES = ("standard-fp32", "standard-bf16", "topk-fp32", "topk-bf16")
L1_ALPHA = 0.003


class Clock:
    """Timestamps the draws of batches ``warmup`` and ``warmup + steps``."""

    def __init__(self, warmup: int, steps: int, device: torch.device) -> None:
        self.warmup, self.steps, self.device = warmup, steps, device
        self.start = self.end = None

    def batches(self, data: torch.Tensor, batch: int, count: int):
        n = data.shape[0] // batch
        for i in range(count):
            if i in (self.warmup, self.warmup + self.steps):
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                now = time.perf_counter()
                if i == self.warmup:
                    self.start = now
                else:
                    self.end = now
            yield data[(i % n) * batch:(i % n + 1) * batch]

    def tokens_per_s(self, batch: int) -> float:
        return self.steps * batch / (self.end - self.start)


class ClockedSource(ActivationSource):
    def __init__(self, data: torch.Tensor, clock: Clock, count: int) -> None:
        self.data, self.clock, self.count = data, clock, count
        self.d_in, self.n_tokens = data.shape[1], None

    def batches(self, batch_size, *, seed, device, start=0):
        return self.clock.batches(self.data, batch_size, self.count)

    def sample(self, n, *, device):
        return self.data[:n]

    eval_rows = sample


def run_ours(data, args, arch: str, precision: str, device, *, sparse_topk: bool = True) -> float:
    clock = Clock(args.warmup, args.steps, device)
    count = args.warmup + args.steps + 1
    cfg = TrainConfig(latent_dim=args.latents, architecture=arch, l1_alpha=L1_ALPHA if arch == "standard" else None,
                      k=args.k if arch == "topk" else None, learning_rate=1e-3, batch_size=args.batch,
                      total_steps=count, lr_warmup_steps=0, l1_warmup_steps=0, log_every=10,
                      dead_window_tokens=10**9, norm_sample_tokens=1024, eval_tokens=1024,
                      precision=precision, device=str(device))
    if sparse_topk:
        train(ClockedSource(data, clock, count), cfg)
    else:
        from app.sae import models, trainer

        build = models.build_sae
        trainer.build_sae = lambda *a, **kw: build(*a, **kw, sparse_topk=False)
        try:
            train(ClockedSource(data, clock, count), cfg)
        finally:
            trainer.build_sae = build
    return clock.tokens_per_s(args.batch)


def run_ours_dense_topk(data, args, arch: str, precision: str, device) -> float:
    """Our trainer with TopK done densely: the baseline of the sparse path."""
    return run_ours(data, args, arch, precision, device, sparse_topk=False) if arch == "topk" else float("nan")


def run_saelens(data, args, arch: str, precision: str, device) -> float:
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    clock = Clock(args.warmup, args.steps, device)
    count = args.warmup + args.steps + 1
    if arch == "standard":
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=args.d_in, d_sae=args.latents, l1_coefficient=L1_ALPHA,
                                                            device=str(device)))
    else:
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=args.d_in, d_sae=args.latents, k=args.k, device=str(device)))
    cfg = SAETrainerConfig(total_training_samples=count * args.batch, train_batch_size_samples=args.batch, lr=1e-3, lr_end=1e-3,
                           device=str(device), autocast=precision == "bfloat16",
                           logger=LoggingConfig(log_to_wandb=False),
                           dead_feature_window=10**9, feature_sampling_window=10**9)
    with tf32(precision, device):
        SAETrainer(cfg, sae, clock.batches(data.to(device), args.batch, count)).fit()
    return clock.tokens_per_s(args.batch)


@contextlib.contextmanager
def tf32(precision: str, device):
    """TF32 matmuls for the contenders that have no setting of their own."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def run_bare(data, args, arch: str, precision: str, device) -> float:
    """The same maths with nothing around it: no metrics, no callbacks, no dead-latent tracking."""
    clock = Clock(args.warmup, args.steps, device)
    count = args.warmup + args.steps + 1
    g = torch.Generator().manual_seed(0)
    w_dec = torch.randn(args.latents, args.d_in, generator=g)
    w_dec = (0.1 * w_dec / w_dec.norm(dim=1, keepdim=True)).to(device).requires_grad_()
    w_enc = w_dec.detach().t().clone().requires_grad_()
    b_enc = torch.zeros(args.latents, device=device, requires_grad=True)
    b_dec = torch.zeros(args.d_in, device=device, requires_grad=True)
    params = [w_enc, w_dec, b_enc, b_dec]
    opt = torch.optim.Adam(params, lr=1e-3)
    bf16 = precision == "bfloat16"
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with tf32(precision, device):
        return _bare_steps(clock, data, args, arch, device, ctx, (w_enc, w_dec, b_enc, b_dec), opt, count)


def _bare_steps(clock, data, args, arch, device, ctx, params, opt, count) -> float:
    w_enc, w_dec, b_enc, b_dec = params
    for x in clock.batches(data.to(device), args.batch, count):
        with ctx:
            pre = (x - b_dec) @ w_enc + b_enc
            if arch == "standard":
                f = torch.relu(pre)
            else:
                values, indices = pre.topk(args.k, dim=-1)
                f = torch.zeros_like(pre).scatter_(-1, indices, torch.relu(values))
            x_hat = f @ w_dec + b_dec
        loss = (x - x_hat).pow(2).sum(-1).mean() / args.d_in
        if arch == "standard":
            loss = loss + L1_ALPHA * (f * w_dec.norm(dim=1)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params), 1.0)
        opt.step()
        if arch == "topk":
            with torch.no_grad():
                w_dec.div_(w_dec.norm(dim=1, keepdim=True))
    return clock.tokens_per_s(args.batch)


CONTENDERS = {"ours": run_ours, "ours-dense-topk": run_ours_dense_topk, "saelens": run_saelens, "bare": run_bare}
LABELS = {"ours": "ours", "ours-dense-topk": "ours, dense TopK", "saelens": "SAELens", "bare": "bare loop"}
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "tf32": "tf32"}


def machine(device: torch.device) -> str:
    try:
        import sae_lens

        saelens_version = sae_lens.__version__
    except ImportError:  # a GPU box without it: the other contenders still run
        saelens_version = "not installed"

    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor())
        where = f"{cpu}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}"
    return (f"{where}; torch {torch.__version__}, sae-lens {saelens_version}, "
            f"Python {platform.python_version()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--latents", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cases", default=",".join(CASES), help="architecture-precision: fp32, bf16 or tf32")
    parser.add_argument("--contenders", default="ours,ours-dense-topk,saelens,bare")
    parser.add_argument("--out", default=None, help="results file (default: benchmarks/results/...)")
    args = parser.parse_args()
    device = torch.device(args.device)
    data = torch.randn(4 * args.batch, args.d_in, generator=torch.Generator().manual_seed(0)).to(device)
    lines = [f"# benchmarks/trainer_vs_saelens.py on {machine(device)}",
             f"# d_in {args.d_in} -> {args.latents:,} latents, batch {args.batch:,}, k {args.k}; steady state over "
             f"{args.steps} steps after {args.warmup}; best of {args.rounds} interleaved rounds; tokens/s", ""]
    print("\n".join(lines), flush=True)
    names = args.contenders.split(",")
    results: dict[str, dict[str, float]] = {}
    for case in args.cases.split(","):
        arch, prec = case.split("-")
        best = {name: 0.0 for name in names if arch == "topk" or name != "ours-dense-topk"}
        for _ in range(args.rounds):
            for name in best:
                best[name] = max(best[name], CONTENDERS[name](data, args, arch, PRECISIONS[prec], device))
        results[case] = best
        parts = [f"{LABELS[n]} {v:>10,.0f}" for n, v in best.items()]
        ratios = [f"ours/{LABELS[n]} {best['ours'] / v:.2f}x" for n, v in best.items() if n != "ours" and v > 0]
        line = f"{case:<14} " + "  ".join(parts) + "  |  " + "  ".join(ratios)
        lines.append(line)
        print(line, flush=True)
    lines.append("")
    for case, best in results.items():
        arch, prec = case.split("-")
        base = results.get(f"{arch}-fp32", {})
        for name, label in (("saelens", "SAELens"), ("ours", "our own")):
            if prec != "fp32" and base.get(name):
                line = f"{case}: ours {best['ours'] / base[name]:.2f}x {label} {arch} fp32"
                lines.append(line)
                print(line)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / (
        "trainer_vs_saelens.txt" if device.type == "cpu" else f"trainer_vs_saelens_{device.type}.txt")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
