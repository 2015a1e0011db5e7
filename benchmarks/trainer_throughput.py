"""Trainer throughput beside a bare PyTorch loop doing the same maths, in one process.

Usage: python benchmarks/trainer_throughput.py [--d-in 768 --latents 8192 --batch 1024 --steps 60]
The bare loop is the floor our trainer's bookkeeping (metrics accumulated on the device,
dead-latent tracking, schedules, callbacks) is measured against; it also reads batches
from a memory-mapped file against an in-memory tensor.
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
from app.sae.models import StandardSAE  # noqa: E402
from app.sae.sources import ArraySource, ActivationSource  # noqa: E402
from app.sae.trainer import TrainConfig, train  # noqa: E402


class TensorSource(ActivationSource):
    """In-memory rows: the baseline for the memory-mapped store."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows, self.d_in, self.n_tokens = rows, rows.shape[1], rows.shape[0]

    def batches(self, batch_size, *, seed, device, start=0):
        g = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(self.n_tokens, generator=g)
            for i in range(0, self.n_tokens - batch_size + 1, batch_size):
                yield self.rows[order[i:i + batch_size]].to(device)

    def sample(self, n, *, device):
        return self.rows[:n].to(device)

    eval_rows = sample


def bare_loop(rows: torch.Tensor, latents: int, batch: int, steps: int, device: str = "cpu") -> float:
    """The same maths with nothing else: rows already on the device, no metrics, no schedules."""
    sae = StandardSAE(rows.shape[1], latents, device=device)
    rows = rows.to(device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    start = time.perf_counter()
    for i in range(steps):
        x = rows[(i * batch) % (rows.shape[0] - batch):][:batch]
        parts, _, _ = sae.loss(x, l1_alpha=0.003)
        opt.zero_grad(set_to_none=True)
        parts.total.backward()
        opt.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def ours(source: ActivationSource, latents: int, batch: int, steps: int, device: str = "cpu") -> float:
    cfg = TrainConfig(latent_dim=latents, l1_alpha=0.003, batch_size=batch, total_steps=steps, lr_warmup_steps=5,
                      l1_warmup_steps=5, log_every=20, norm_sample_tokens=1024, eval_tokens=1024, device=device)
    start = time.perf_counter()
    train(source, cfg)  # ends with a held-out evaluation read back to the host: a sync
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--latents", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=60)
    a = p.parse_args()
    rows = torch.randn(a.batch * (a.steps + 4), a.d_in)
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "acts.npy", rows.numpy())
        info = inspect_activation_file(Path(tmp) / "acts.npy", min_rows=1, max_bytes=2**40)
        figures = {
            "bare PyTorch loop (baseline)": bare_loop(rows, a.latents, a.batch, a.steps),
            "our trainer, in-memory tensor": ours(TensorSource(rows), a.latents, a.batch, a.steps),
            "our trainer, memory-mapped .npy": ours(ArraySource(Path(tmp) / "acts.npy", info), a.latents, a.batch,
                                                    a.steps),
        }
    base = figures["bare PyTorch loop (baseline)"]
    print(f"d_in {a.d_in}, {a.latents:,} latents, batch {a.batch}, {a.steps} steps, "
          f"{torch.get_num_threads()} threads")
    for name, tps in figures.items():
        print(f"{name:34s} {tps:12,.0f} tokens/s  ({100 * tps / base:5.1f}% of baseline)")


if __name__ == "__main__":
    main()
