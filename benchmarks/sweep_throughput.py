"""A sweep of N members trained as one (each batch read once, fed to all) against the same N trained
one after another, in one process, on the same source and device.

Usage: python benchmarks/sweep_throughput.py [--members 8 --d-in 768 --latents 8192 --batch 4096 --steps 6]
Reports the aggregate tokens per second (member-tokens trained per wall-clock second) of each way and
their ratio. The source is a memory-mapped activation file, so reading a batch costs what it costs
in the app. Members differ in their target L0 (TopK k), as a sweep over the sparsity does.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.sae.files import inspect_activation_file  # noqa: E402
from app.sae.sources import ArraySource  # noqa: E402
from app.sae.trainer import Member, TrainConfig, train, train_many  # noqa: E402


def configs(a) -> list[TrainConfig]:
    ks = [max(1, round(a.latents * f)) for f in np.geomspace(0.002, 0.05, a.members)]
    return [TrainConfig(architecture="topk", k=k, latent_dim=a.latents, batch_size=a.batch, total_steps=a.steps,
                        log_every=max(1, a.steps // 2), learning_rate=1e-3, lr_warmup_steps=0, seed=i,
                        norm_sample_tokens=a.batch, eval_tokens=a.batch, device=a.device, precision=a.precision)
            for i, k in enumerate(ks)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--members", type=int, default=8)
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--latents", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--tokens", type=int, default=65_536)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="float32")
    a = p.parse_args()
    print(f"{a.members} members, d_in {a.d_in} → {a.latents:,} latents, batch {a.batch:,}, {a.steps} steps each, "
          f"on {a.device} ({torch.get_num_threads()} threads), {a.precision}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "acts.npy"
        np.save(path, np.random.default_rng(0).standard_normal((a.tokens, a.d_in), dtype=np.float32))
        source = ArraySource(path, inspect_activation_file(path, min_rows=1, max_bytes=2**40))
        cfgs = configs(a)
        train(source, TrainConfig(**{**cfgs[0].__dict__, "total_steps": 1}))  # warm-up: allocator, kernels
        member_tokens = a.members * a.steps * a.batch

        start = time.perf_counter()
        for cfg in cfgs:
            train(source, cfg)
        sequential = member_tokens / (time.perf_counter() - start)

        start = time.perf_counter()
        train_many(source, [Member(cfg) for cfg in cfgs])
        together = member_tokens / (time.perf_counter() - start)
    print(f"  one after another: {sequential:12,.0f} member-tokens/s")
    print(f"  as one sweep:      {together:12,.0f} member-tokens/s")
    print(f"  ratio (sweep / one after another): {together / sequential:.2f}×")
    print("  (both include each member's normalization sample and held-out evaluation)")


if __name__ == "__main__":
    main()
