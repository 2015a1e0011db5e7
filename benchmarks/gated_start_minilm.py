"""Where a Gated SAE's steering starts, on real activations: the bundled MiniLM, before and after.

The two ground-truth generators moved the start of steering from 0.03 to the standard SAE's l1_alpha
for the run (``start_l1_alpha`` in app/sae/architectures/gated.py; ``gated_variants.md``). This checks
it on real activations: the default extraction (layer 3 residual stream, 200,000 tokens of
standard-library docstrings), then a Gated SAE (8× d_in, target L0 32, 1,000 steps of 1,024, learning
rate 1e-3, 5% warm-ups), steered to the target from each start on the same batches; reported: L0, FVU
and never-fired latents on the store's held-out rows, where steering ended, and the downstream
evaluation the worker runs (the SAE spliced into the encoder over 8,192 held-out tokens).

    python benchmarks/gated_start_minilm.py [--threads N]
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from app.extraction.capture_names import BUNDLED_MINILM  # noqa: E402
from app.extraction.splice import load_for_eval  # noqa: E402
from app.sae.architectures.gated import start_l1_alpha  # noqa: E402
from app.sae.control import L0Controller  # noqa: E402
from app.sae.trainer import TrainConfig, train  # noqa: E402
from minilm_acts import default_extraction, held_out_downstream  # noqa: E402

CPU = torch.device("cpu")
LAYER, SITE, BUDGET, CONTEXT, BATCH = 3, "resid", 200_000, 128, 32
STEPS, RUN_BATCH, L0 = 1000, 1024, 32


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the figures are not timings)")
    torch.set_num_threads(parser.parse_args().threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tokens, documents, source = default_extraction(Path(tmp) / "store", layer=LAYER, site=SITE, budget=BUDGET,
                                                       context=CONTEXT, batch=BATCH)
        evaluator = load_for_eval(BUNDLED_MINILM, CPU)
        latents = 8 * source.d_in
        target = L0 / latents
        starts = {"0.03 (the preset until now)": 0.03,
                  "the standard SAE's value (now)": start_l1_alpha(source.d_in, latents, target, STEPS, RUN_BATCH)}
        for label, alpha in starts.items():
            started = time.perf_counter()
            cfg = TrainConfig(architecture="gated", latent_dim=latents, l1_alpha=alpha, batch_size=RUN_BATCH,
                              total_steps=STEPS, lr_warmup_steps=STEPS // 20, l1_warmup_steps=STEPS // 20,
                              learning_rate=1e-3, target_l0=target, precision="float32", device="cpu")
            steer = L0Controller(target=target, alpha=alpha, start_step=cfg.l1_warmup_steps)
            result, sae = train(source, cfg, l1_alpha_control=steer)
            sae.eval()
            outcome = held_out_downstream(evaluator, sae, result.norm_scale, documents, layer=LAYER, site=SITE,
                                          context=CONTEXT)
            row = {"start": label, "l1_alpha": alpha, "ended": steer.alpha, "l0": result.eval["l0"],
                   "fvu": result.eval["fvu"], "never_fired": result.eval["never_fired"],
                   "fidelity": outcome["fidelity_score"], "cosine": outcome["cosine"],
                   "seconds": round(time.perf_counter() - started, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    lines = ["# Where a Gated SAE's steering starts, on the bundled MiniLM (benchmarks/gated_start_minilm.py)", "",
             f"Layer 3 residual stream, {tokens:,} tokens of docstrings; {latents:,} latents (8× d_in), target L0 "
             f"{L0}, {STEPS:,} steps of {RUN_BATCH:,}, steered; downstream over 8,192 held-out tokens.", "",
             "| steering starts at | l1_alpha | ended at | L0 | FVU | never fired | downstream fidelity | cosine |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['start']} | {r['l1_alpha']:g} | {r['ended']:.3g} | {r['l0']:.1f} | {r['fvu']:.4f} | "
              f"{r['never_fired']:,} | {r['fidelity']:.4f} | {r['cosine']:.4f} |" for r in rows]
    (ROOT / "benchmarks" / "results" / "gated_start_minilm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
