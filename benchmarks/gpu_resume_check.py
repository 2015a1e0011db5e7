"""Resume on CUDA: a run trained straight against the same run stopped and resumed from its
checkpoint, for both architectures and both precisions. On the CPU the two are bit-identical
(tested); on CUDA some kernels (index-add, reductions) add in a varying order, so this prints
how far apart the weights and the held-out L0 and FVU end.

Usage: ``python benchmarks/gpu_resume_check.py [--device cuda]``
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.sae.sources import SyntheticSource  # noqa: E402
from app.sae.trainer import Checkpointing, TrainConfig, train  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    source = SyntheticSource(256, 512, 5.0, seed=0)
    print(f"# device {torch.cuda.get_device_name() if args.device.startswith('cuda') else args.device}, "
          f"torch {torch.__version__}; {args.steps} steps, checkpoint every 200, resumed from step 400")
    for arch in ("standard", "topk"):
        for precision in ("float32", "bfloat16"):
            cfg = TrainConfig(latent_dim=1024, architecture=arch, l1_alpha=0.003 if arch == "standard" else None,
                              k=20 if arch == "topk" else None, batch_size=1024, total_steps=args.steps,
                              lr_warmup_steps=50, l1_warmup_steps=100, log_every=20, checkpoint_every_steps=200,
                              dead_window_tokens=100_000, precision=precision, device=args.device)
            saved: dict[int, bytes] = {}

            def keep(state: dict) -> None:
                buf = io.BytesIO()
                torch.save(state, buf)
                saved[int(state["step"])] = buf.getvalue()

            straight, sae_a = train(source, cfg, checkpointing=Checkpointing(keep, 200, 1e9))
            state = torch.load(io.BytesIO(saved[400]), map_location="cpu", weights_only=True)
            resumed, sae_b = train(source, cfg, resume=state)
            diff = max((a - b).abs().max().item() for a, b in zip(sae_a.state_dict().values(),
                                                                  sae_b.state_dict().values()))
            print(f"{arch:<8} {precision:<8} max |weight difference| {diff:.2e}; held-out L0 "
                  f"{straight.eval['l0']:.3f} vs {resumed.eval['l0']:.3f}, FVU {straight.eval['fvu']:.5f} vs "
                  f"{resumed.eval['fvu']:.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
