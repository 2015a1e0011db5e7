"""TopK's two training paths side by side: the sparse one (``app/sae/sparse_topk.py``: index-adds over the
k chosen latents, and AuxK's) against the dense one (matmuls over every latent), per shape, in one run.

Usage: python benchmarks/topk_paths.py [--steps 20] [--out benchmarks/results/topk_paths.txt]

Each row times full training steps (forward, backward, Adam) of a TopK SAE on random activations after
three untimed steps: with AuxK on (a tenth of the latents marked silent, so its k_aux = d_in / 2 latents
are chosen too) and with it off, as a run's steps are while the dead-latent tracker reports none. The
paths alternate per shape so that a change in the machine's load hits both. Unforced, a step is sparse,
but a step with AuxK on of an SAE too narrow for it to pay (``sparse_topk.worth_sparse``) runs densely:
the last column says which path such a step takes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.sae.models import build_sae  # noqa: E402
from app.sae.sparse_topk import SPARSE_MIN_RATIO, worth_sparse  # noqa: E402

SHAPES = [(128, 512, 8, 512), (256, 1024, 32, 1024), (256, 1536, 32, 1024), (256, 2048, 16, 512),
          (256, 2048, 32, 1024), (384, 2048, 16, 1024), (384, 3072, 32, 1024), (384, 4096, 32, 1024),
          (768, 8192, 32, 1024), (768, 16384, 64, 4096)]


def step_ms(d_in: int, d_sae: int, k: int, batch: int, *, sparse: bool, steps: int, aux: bool) -> float:
    torch.manual_seed(0)
    sae = build_sae("topk", d_in, d_sae, k=k, sparse_topk=sparse)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    x = torch.randn(batch, d_in)
    dead = None
    if aux:
        dead = torch.zeros(d_sae, dtype=torch.bool)
        dead[: d_sae // 10] = True
    for i in range(steps + 3):
        if i == 3:
            started = time.perf_counter()
        loss = sae.loss(x, dead_mask=dead)[0].total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        sae.after_step()
    return (time.perf_counter() - started) / steps * 1000


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "topk_paths.txt"))
    a = p.parse_args()
    lines = [f"# benchmarks/topk_paths.py, {time.strftime('%Y-%m-%d %H:%M')}, {torch.get_num_threads()} torch threads, "
             f"torch {torch.__version__}, load average before {os.getloadavg()[0]:.2f}",
             f"# ms per training step (forward, backward, Adam), {a.steps} steps after 3 untimed. With AuxK on, a "
             f"step is sparse when d_sae >= {SPARSE_MIN_RATIO} x (k + k_aux), k_aux = d_in / 2; with it off, always",
             "| d_in | d_sae | k | batch | AuxK off: sparse ms | dense ms | faster | AuxK on: d_sae / (k + k_aux) "
             "| sparse ms | dense ms | faster | an AuxK step takes |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- | --- |"]

    def faster(sparse: float, dense: float) -> str:
        return f"sparse {dense / sparse:.2f}x" if sparse < dense else f"dense {sparse / dense:.2f}x"

    for d_in, d_sae, k, batch in SHAPES:
        off = [step_ms(d_in, d_sae, k, batch, sparse=sparse, steps=a.steps, aux=False) for sparse in (True, False)]
        on = [step_ms(d_in, d_sae, k, batch, sparse=sparse, steps=a.steps, aux=True) for sparse in (True, False)]
        ratio = d_sae / (k + min(d_in // 2, d_sae))
        chosen = "sparse" if worth_sparse(d_in, d_sae, k) else "dense"
        lines.append(f"| {d_in} | {d_sae:,} | {k} | {batch:,} | {off[0]:.1f} | {off[1]:.1f} | {faster(*off)} | "
                     f"{ratio:.1f} | {on[0]:.1f} | {on[1]:.1f} | {faster(*on)} | {chosen} |")
        print(lines[-1], flush=True)
    lines.append(f"# load average after {os.getloadavg()[0]:.2f}")
    Path(a.out).write_text("\n".join(lines) + "\n")
    print(f"written to {a.out}")


if __name__ == "__main__":
    main()
