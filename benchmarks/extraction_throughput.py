"""Extraction speed and training from the activation store, each beside its baseline, in one run.

Usage: python benchmarks/extraction_throughput.py [--tokens 50000] [--d-in 768 --latents 8192 --steps 60]

1. Extraction: the bundled MiniLM over standard-library docstrings, layer 3 residual. The
   baseline is the bare model: the same padded batches through a full forward pass, with
   nothing captured or written. Ours hooks the layer, stops the pass there, drops padding
   and writes the shards (float32 and float16).
2. Training: our trainer reading a sharded store memory-mapped (several shards, float32
   and float16) against the same rows as an in-memory tensor (target: the store costs
   under 10% of training throughput). The store was just written, so it is in the page
   cache, as a store that fits in RAM would be after the first pass.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from app.extraction.capture import BUNDLED_MINILM, Tokenized, batches_of, extract, load_model  # noqa: E402
from app.extraction.store import ShardWriter  # noqa: E402
from app.extraction.text import stdlib_docstrings  # noqa: E402
from app.sae.sources import StoreSource  # noqa: E402
from trainer_throughput import TensorSource, ours  # noqa: E402

CPU = torch.device("cpu")


def bare_forward(model, tokenizer, tokens: int, context: int, batch: int) -> float:
    tok = Tokenized(tokenizer, context)
    done, start = 0, time.perf_counter()
    with torch.inference_mode():
        for windows in batches_of(tok.windows(stdlib_docstrings()), batch):
            width = max(len(w.ids) for w in windows)
            ids = torch.zeros((len(windows), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, w in enumerate(windows):
                ids[row, :len(w.ids)] = torch.tensor(w.ids)
                mask[row, :len(w.ids)] = 1
            model(input_ids=ids, attention_mask=mask)
            done += sum(sum(p >= 0 for p in w.positions) for w in windows)
            if done >= tokens:
                break
    return done / (time.perf_counter() - start)


def ours_extract(model, tokenizer, tokens: int, context: int, batch: int, dtype: str, folder: Path) -> float:
    writer = ShardWriter(folder, model.config.hidden_size, dtype)
    start = time.perf_counter()
    done, _, _ = extract(model, tokenizer, stdlib_docstrings(), writer, layer=3, site="resid", token_budget=tokens,
                         context_length=context, batch_size=batch, exclude_special=True, device=CPU)
    writer.commit({})
    return done / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=50_000)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--extract-batch", type=int, default=32)
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--latents", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=60)
    a = p.parse_args()
    print(f"{torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer, model = load_model(BUNDLED_MINILM, CPU)
        bare_forward(model, tokenizer, 2_000, a.context, a.extract_batch)  # warm-up
        ext = {
            "bare MiniLM forward, all 6 layers (baseline)": bare_forward(model, tokenizer, a.tokens, a.context,
                                                                         a.extract_batch),
            "ours, layer 3 captured, float32 store": ours_extract(model, tokenizer, a.tokens, a.context,
                                                                  a.extract_batch, "float32", tmp / "f32"),
            "ours, layer 3 captured, float16 store": ours_extract(model, tokenizer, a.tokens, a.context,
                                                                  a.extract_batch, "float16", tmp / "f16"),
        }
        print(f"\nExtraction, {a.tokens:,} tokens, context {a.context}, batch {a.extract_batch} windows:")
        base = next(iter(ext.values()))
        for name, tps in ext.items():
            print(f"  {name:46s} {tps:10,.0f} tokens/s  ({100 * tps / base:5.1f}% of baseline)")

        rows = torch.randn(a.batch * (a.steps + 4), a.d_in)
        for dtype in ("float32", "float16"):
            writer = ShardWriter(tmp / f"train-{dtype}", a.d_in, dtype)
            for chunk in torch.split(rows, 8192):
                n = len(chunk)
                writer.add(chunk.numpy(), np.zeros(n), np.zeros(n), np.zeros(n))
            writer.commit({})
        shards = len(list((tmp / "train-float32").glob("*.acts.npy")))
        figures = {
            "in-memory tensor (baseline)": ours(TensorSource(rows), a.latents, a.batch, a.steps),
            f"store, float32, {shards} shards, memory-mapped": ours(StoreSource(tmp / "train-float32"), a.latents,
                                                                   a.batch, a.steps),
            "store, float16, memory-mapped": ours(StoreSource(tmp / "train-float16"), a.latents, a.batch, a.steps),
            "in-memory tensor again (noise check)": ours(TensorSource(rows), a.latents, a.batch, a.steps),
        }
        print(f"\nTraining, d_in {a.d_in}, {a.latents:,} latents, batch {a.batch}, {a.steps} steps:")
        base = next(iter(figures.values()))
        for name, tps in figures.items():
            print(f"  {name:46s} {tps:10,.0f} tokens/s  ({100 * tps / base:5.1f}% of baseline)")


if __name__ == "__main__":
    main()
