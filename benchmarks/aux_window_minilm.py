"""AuxK's window on real activations: the bundled MiniLM, before and after the default changed.

The synthetic benchmarks chose ``aux_window_tokens`` = 5,000 (AuxK on latents silent for 5,000
tokens, where it used to wait for the 200,000-token dead-latent window). This checks that the
change does not cost real activations anything: the default extraction (layer 3 residual
stream, 200,000 tokens of standard-library docstrings), then for each architecture an SAE
(8× d_in, k 32, 1,000 steps of 1,024) trained once per window on the same batches; reported:
FVU and never-fired latents on the store's held-out rows, and the downstream evaluation the
worker runs (the SAE spliced into the encoder over 8,192 held-out tokens: fidelity, cosine).

    python benchmarks/aux_window_minilm.py
"""
from __future__ import annotations

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
from app.sae.trainer import TrainConfig, train  # noqa: E402
from minilm_acts import default_extraction, held_out_downstream  # noqa: E402

CPU = torch.device("cpu")
LAYER, SITE, BUDGET, CONTEXT, BATCH = 3, "resid", 200_000, 128, 32
WINDOWS = {"dead-latent window (200,000 tokens; before)": None, "5,000 tokens (the new default)": 5_000}


def main() -> int:
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tokens, documents, source = default_extraction(Path(tmp) / "store", layer=LAYER, site=SITE, budget=BUDGET,
                                                       context=CONTEXT, batch=BATCH)
        evaluator = load_for_eval(BUNDLED_MINILM, CPU)
        for arch in ("topk", "batchtopk"):
            for label, window in WINDOWS.items():
                started = time.perf_counter()
                cfg = TrainConfig(architecture=arch, latent_dim=8 * source.d_in, k=32, batch_size=1024,
                                  total_steps=1000, target_l0=32 / (8 * source.d_in), precision="float32",
                                  device="cpu", aux_window_tokens=window)
                result, sae = train(source, cfg)
                sae.eval()
                outcome = held_out_downstream(evaluator, sae, result.norm_scale, documents, layer=LAYER, site=SITE,
                                              context=CONTEXT)
                row = {"architecture": arch, "aux_window": label, "l0": result.eval["l0"], "fvu": result.eval["fvu"],
                       "never_fired": result.eval["never_fired"], "fidelity": outcome["fidelity_score"],
                       "cosine": outcome["cosine"], "seconds": round(time.perf_counter() - started, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    lines = ["# AuxK window on the bundled MiniLM (benchmarks/aux_window_minilm.py)", "",
             f"Layer 3 residual stream, {tokens:,} tokens of docstrings; 8× d_in latents, k 32, 1,000 steps of 1,024; "
             "downstream over 8,192 held-out tokens; one CPU thread.", "",
             "| architecture | AuxK window | L0 | FVU | never fired | downstream fidelity | cosine |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['architecture']} | {r['aux_window']} | {r['l0']:.1f} | {r['fvu']:.4f} | {r['never_fired']:,} | "
              f"{r['fidelity']:.4f} | {r['cosine']:.4f} |" for r in rows]
    (ROOT / "benchmarks" / "results" / "aux_window_minilm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
