"""How long the downstream evaluation of the bundled MiniLM takes after its default extraction.

The default extraction (the form's defaults: layer 3, residual stream, 200,000 tokens of
standard-library docstrings in windows of 128) is captured; a TopK SAE (8× d_in, k 32) is
trained on it for 1,000 steps; then the evaluation the worker runs is timed end to end:
loading the encoder, skipping the documents the extraction read, and splicing the SAE in
over DOWNSTREAM_TOKENS (8,192) held-out tokens (clean, spliced and ablated passes).

    python benchmarks/downstream_minilm.py
"""
from __future__ import annotations

import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from app.extraction.capture_names import BUNDLED_MINILM  # noqa: E402
from app.extraction.splice import downstream_eval, load_for_eval  # noqa: E402
from app.extraction.text import stdlib_docstrings  # noqa: E402
from app.sae.trainer import TrainConfig, train  # noqa: E402
from minilm_acts import default_extraction  # noqa: E402

CPU = torch.device("cpu")
LAYER, SITE, BUDGET, CONTEXT, BATCH = 3, "resid", 200_000, 128, 32


def main() -> int:
    tokens_eval = int(os.environ.get("DOWNSTREAM_TOKENS", 8192))  # the app's default
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        tokens, documents, source = default_extraction(Path(tmp) / "store", layer=LAYER, site=SITE, budget=BUDGET,
                                                       context=CONTEXT, batch=BATCH)
        extraction_s = time.perf_counter() - started
        cfg = TrainConfig(architecture="topk", latent_dim=8 * source.d_in, k=32, batch_size=1024, total_steps=1000,
                          target_l0=32 / (8 * source.d_in), precision="float32", device="cpu")
        result, sae = train(source, cfg)
        sae.eval()

        started = time.perf_counter()
        tokenizer, model, causal = load_for_eval(BUNDLED_MINILM, CPU)
        held_out = itertools.islice(stdlib_docstrings(), documents, None)
        outcome = downstream_eval(model, tokenizer, causal, sae, norm_scale=result.norm_scale, layer=LAYER, site=SITE,
                                  docs=held_out, token_budget=tokens_eval, context_length=CONTEXT, batch_size=16,
                                  exclude_special=True, device=CPU)
        eval_s = time.perf_counter() - started
    report = {"extraction": {"tokens": tokens, "documents": documents, "seconds": round(extraction_s, 1)},
              "sae": {"fvu": result.eval["fvu"], "l0": result.eval["l0"]},
              "downstream": {"seconds": round(eval_s, 1), "tokens": outcome["tokens"],
                             "fidelity_score": outcome["fidelity_score"], "cosine": outcome["cosine"],
                             "l2_ratio": outcome["l2_ratio"], "fvu_at_hook": outcome["fvu"]},
              "torch_threads": torch.get_num_threads()}
    print(json.dumps(report, indent=2))
    out = ROOT / "benchmarks" / "results" / "downstream_minilm.json"
    out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
