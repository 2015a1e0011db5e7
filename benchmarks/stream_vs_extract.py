"""Six layers of the bundled MiniLM: one streamed sweep (one forward pass feeds six SAEs) against six
extractions plus six trainings, at the same tokens per SAE, in one process, on this machine.

Usage: python benchmarks/stream_vs_extract.py [--layers 0-5 --tokens 131072 --latents 1536 --k 32 --batch 1024]

Both ways read the same corpus (the standard library's docstrings) from the first document after the
stream's held-out head, train TopK SAEs with the same settings and seeds, and are scored on the same
held-out rows (the stream's held-out head, at each layer), so the FVU columns compare like with like.
The extraction way pays what the app pays: each extraction runs the model up to its layer and writes a
store to disk; each training reads it back. The streamed way runs the model once, to the last layer,
and never writes activations. Peak host memory (RSS) of the streamed sweep is measured against the
prediction the form makes from its buffer settings. A third way is the streamed sweep again, keeping a
float16 store of every layer as it goes (the "keep a store while streaming" option): what the by-product
costs, and six trainings on the kept stores, which then need no model at all.
"""
from __future__ import annotations

import argparse
import itertools
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.extraction.capture import extract, load_model  # noqa: E402
from app.extraction.capture_names import BUNDLED_MINILM  # noqa: E402
from app.extraction.store import RoundStore, ShardWriter  # noqa: E402
from app.extraction.text import stdlib_docstrings  # noqa: E402
from app.sae.metrics import evaluate  # noqa: E402
from app.sae.sources import StoreSource  # noqa: E402
from app.sae.stream import Position, StreamedSource  # noqa: E402
from app.sae.trainer import Member, TrainConfig, resolve_precision, train, train_many  # noqa: E402
from app.work.streams import buffer_bytes  # noqa: E402

CPU = torch.device("cpu")


class PeakRSS:
    """The process's resident memory, sampled every 20 ms while the block runs (its peak above the start)."""

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    def __enter__(self):
        self.peak, self.done = 0, threading.Event()
        self.start = self.rss()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while not self.done.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()

    @property
    def grew(self) -> int:
        return max(0, self.peak - self.start)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", default="0-5")
    p.add_argument("--tokens", type=int, default=131_072, help="training tokens per SAE")
    p.add_argument("--latents", type=int, default=1536)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--buffer", type=int, default=65_536)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--model-batch", type=int, default=32)
    p.add_argument("--no-prefetch", action="store_true", help="compute each round when it is needed, not ahead")
    p.add_argument("--no-keep", action="store_true", help="leave out the sweep that keeps stores")
    p.add_argument("--precision", default="float32", choices=["float32", "auto", "bfloat16"],
                   help="the SAEs' matmuls, on both ways (the training form's default is auto: bfloat16 on a CPU "
                        "with AVX512-BF16 or AMX); the model runs in float32 either way")
    a = p.parse_args()
    lo, _, hi = a.layers.partition("-")
    layers = list(range(int(lo), int(hi or lo) + 1))
    hooks = [f"{layer}.resid" for layer in layers]
    steps = a.tokens // a.batch
    tokenizer, model = load_model(BUNDLED_MINILM, CPU)
    docs = lambda: stdlib_docstrings()  # noqa: E731
    print(f"MiniLM layers {layers[0]}–{layers[-1]} (resid), {a.tokens:,} tokens per SAE ({steps} steps of {a.batch}), "
          f"TopK {a.latents} latents k={a.k}, SAE precision {resolve_precision(a.precision, CPU)}"
          f"{' (auto)' if a.precision == 'auto' else ''}, buffer {a.buffer:,} tokens, context {a.context}, "
          f"{torch.get_num_threads()} CPU threads; load average before {os.getloadavg()[0]:.2f}")

    def cfg(seed: int) -> TrainConfig:
        return TrainConfig(architecture="topk", k=a.k, l1_alpha=None, latent_dim=a.latents, batch_size=a.batch,
                           total_steps=steps, log_every=max(1, steps // 4), learning_rate=1e-3, lr_warmup_steps=10,
                           seed=seed, norm_sample_tokens=8192, eval_tokens=8192, precision=a.precision,
                           dead_window_tokens=max(1_000, a.tokens // 4))

    stream = StreamedSource(model, tokenizer, docs, hooks, context_length=a.context, model_batch=a.model_batch,
                            buffer_tokens=a.buffer, holdout_tokens=16_384, prefetch=not a.no_prefetch)
    held_out = {hook: stream.eval_rows(8192, device=CPU, hook=hook) for hook in hooks}  # the common yardstick
    first_doc = stream._range(0, 1, Position())[0][0].doc  # where training begins, for both ways

    # --- the streamed sweep ---------------------------------------------------------------------
    ended: dict = {}
    stream.model_tokens, stream.model_seconds = 0, 0.0
    with PeakRSS() as rss:
        started = time.perf_counter()
        train_many(stream, [Member(cfg(i), hook=hook, on_end=lambda r, s, hook=hook: ended.__setitem__(hook, (r, s)))
                            for i, hook in enumerate(hooks)], data_seed=0)
        streamed_s = time.perf_counter() - started
    model_share = stream.model_seconds / streamed_s
    predicted = buffer_bytes(stream.d_in, len(hooks), stream.round_tokens(a.batch))

    # --- six extractions, then six trainings ------------------------------------------------------
    trained: dict = {}
    extract_s = train_s = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for i, (layer, hook) in enumerate(zip(layers, hooks, strict=True)):
            started = time.perf_counter()
            writer = ShardWriter(Path(tmp) / str(layer), stream.d_in, "float32")
            extract(model, tokenizer, itertools.islice(docs(), first_doc, None), writer, layer=layer, site="resid",
                    token_budget=a.tokens + 16_384, context_length=a.context, batch_size=a.model_batch,
                    exclude_special=True, device=CPU)
            writer.commit({"layer": layer})
            extract_s += time.perf_counter() - started
            started = time.perf_counter()
            result = train(StoreSource(Path(tmp) / str(layer)), cfg(i))
            train_s += time.perf_counter() - started
            trained[hook] = result
        # --- the streamed sweep again, keeping a float16 store per layer; then six trainings on them --------
        keep_s = kept_train_s = kept_bytes = 0.0
        kept: dict = {}
        if not a.no_keep:
            again = StreamedSource(model, tokenizer, docs, hooks, context_length=a.context,
                                   model_batch=a.model_batch, buffer_tokens=a.buffer, holdout_tokens=16_384,
                                   prefetch=not a.no_prefetch)
            stores = {hook: RoundStore(Path(tmp) / f".keeping-{hook}", stream.d_in, "float16") for hook in hooks}
            again.keep(stores)
            started = time.perf_counter()
            train_many(again, [Member(cfg(i), hook=hook) for i, hook in enumerate(hooks)], data_seed=0)
            keep_s = time.perf_counter() - started
            assert again.keep_failed is None, again.keep_failed
            for i, hook in enumerate(hooks):
                folder = Path(tmp) / f"kept-{hook}"
                stores[hook].commit(folder, {"layer": hook})
                kept_bytes += sum(f.stat().st_size for f in folder.iterdir())
                started = time.perf_counter()
                kept[hook] = train(StoreSource(folder), cfg(i))
                kept_train_s += time.perf_counter() - started

    def fvu(done, hook) -> float:
        result, sae = done
        sae.eval()
        return evaluate(sae, held_out[hook] * result.norm_scale)["fvu"]

    total = extract_s + train_s
    print()
    print("| way | wall-clock s | of which the model | ratio |")
    print("| --- | --- | --- | --- |")
    print(f"| 6 extractions + 6 trainings | {total:.1f} | {extract_s:.1f} (extractions; trainings {train_s:.1f}) | 1.00 |")
    print(f"| one streamed sweep | {streamed_s:.1f} | {stream.model_seconds:.1f} ({100 * model_share:.0f}%) | "
          f"{total / streamed_s:.2f}× faster |")
    if kept:
        print(f"| one streamed sweep keeping {len(hooks)} float16 stores | {keep_s:.1f} | — | {total / keep_s:.2f}× faster; "
              f"the stores cost {100 * (keep_s / streamed_s - 1):+.0f}% over the plain sweep, "
              f"{kept_bytes / 2**20:.0f} MiB on disk |")
        print(f"| then {len(hooks)} trainings on the kept stores (no model) | {kept_train_s:.1f} | 0 | against the "
              f"{len(hooks)} trainings on "
              f"extractions {train_s:.1f} |")
    print()
    print("| layer | FVU extracted | FVU streamed | difference |" + (" FVU on the kept store |" if kept else ""))
    print("| --- | --- | --- | --- |" + (" --- |" if kept else ""))
    for hook in hooks:
        e, s = fvu(trained[hook], hook), fvu(ended[hook], hook)
        on_kept = f" {fvu(kept[hook], hook):.4f} |" if kept else ""
        print(f"| {hook} | {e:.4f} | {s:.4f} | {100 * (s / e - 1):+.1f}% |{on_kept}")
    print()
    print(f"Peak host memory of the streamed sweep above its start: {rss.grew / 2**20:.0f} MiB; the buffers' "
          f"prediction {predicted / 2**20:.0f} MiB (2 rounds × {stream.round_tokens(a.batch):,} tokens × d_in "
          f"{stream.d_in} × 4 B × {len(hooks)} layers); the six SAEs and their Adam state add "
          f"{6 * 4 * 4 * 2 * stream.d_in * a.latents / 2**20:.0f} MiB. Max RSS of the process: "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB. Load average after "
          f"{os.getloadavg()[0]:.2f}.")


if __name__ == "__main__":
    main()
