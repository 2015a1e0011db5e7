"""The CUDA path, checked in one short run on a GPU box (and runnable on a CPU: it then says so).

Usage: python benchmarks/gpu_check.py [--quick]
Needs torch, numpy, safetensors and (for the extraction part) transformers and tokenizers;
no Flask, Redis or database. Prints, each beside its CPU or bare-loop baseline:

1. outcomes: the same standard and TopK configs trained on CUDA and on the CPU (held-out
   L0 and FVU should agree closely; the runs are not bitwise equal);
2. throughput: our trainer on CUDA from an in-memory tensor and from a memory-mapped
   store, beside a bare PyTorch loop on the same GPU;
3. extraction: a tiny GPT-2 built here, activations captured on CUDA against the CPU's;
4. feature statistics: the same SAE's per-latent statistics on CUDA and on the CPU.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from app.extraction.store import ShardWriter  # noqa: E402
from app.sae import features as F  # noqa: E402
from app.sae.models import build_sae  # noqa: E402
from app.sae.sources import StoreSource, SyntheticSource  # noqa: E402
from app.sae.trainer import TrainConfig, train  # noqa: E402
from trainer_throughput import TensorSource, bare_loop, ours  # noqa: E402


def outcome(device: str, architecture: str, steps: int) -> tuple[dict, float]:
    source = SyntheticSource(256, 512, 5.0, seed=0)
    standard = architecture == "standard"
    cfg = TrainConfig(latent_dim=1024, architecture=architecture, l1_alpha=0.003 if standard else None,
                      k=16 if architecture == "topk" else None, batch_size=1024, total_steps=steps,
                      lr_warmup_steps=50, l1_warmup_steps=100, log_every=50, device=device, seed=0)
    start = time.perf_counter()
    result, sae = train(source, cfg)
    rec = F.ground_truth_recovery(sae, source.features)
    return {**{k: round(v, 4) for k, v in result.eval.items() if isinstance(v, float)}, "mmcs": round(rec.mmcs, 3),
            "recovered": round(rec.recovered, 3)}, time.perf_counter() - start


def tiny_gpt2(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from app.extraction.text import stdlib_docstrings

    docs = list(itertools.islice(stdlib_docstrings(), 200))
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=500, special_tokens=["<s>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="<s>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=3, n_head=4, n_positions=256,
                                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    tok.save_pretrained(folder)
    model.save_pretrained(folder)
    return docs


def extraction(device: str, folder: Path, docs: list[str], out: Path, model_dtype: str = "float32") -> np.ndarray:
    from app.extraction.capture import extract, load_model
    from app.extraction.store import open_shards

    tokenizer, model = load_model(str(folder), torch.device(device), model_dtype)
    writer = ShardWriter(out, model.config.hidden_size, "float32")
    start = time.perf_counter()
    tokens, _, _ = extract(model, tokenizer, docs, writer, layer=1, site="resid", token_budget=10**6,
                           context_length=64, batch_size=16, exclude_special=True, device=torch.device(device))
    elapsed = time.perf_counter() - start
    meta = writer.commit({})
    print(f"  {device:5s} {model_dtype:8s} {tokens:,} tokens in {elapsed:.2f} s")
    acts, index = open_shards(out, meta)
    return np.concatenate(acts), np.concatenate(index)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="fewer steps (a CPU smoke run)")
    p.add_argument("--parts", default="1234", help="which of the four checks to run, e.g. 2")
    a = p.parse_args()
    cuda = torch.cuda.is_available()
    gpu = "cuda" if cuda else "cpu"
    where = f"available: {torch.cuda.get_device_name(0)}" if cuda else "NOT available"
    print(f"torch {torch.__version__}; CUDA {where}")
    steps = 300 if a.quick else 1500

    if "1" in a.parts:
        run_outcomes(gpu, steps)
    with tempfile.TemporaryDirectory() as tmp:
        if "2" in a.parts:
            run_throughput(gpu, Path(tmp), 20 if a.quick else 200)
        if "3" in a.parts:
            run_extraction(gpu, cuda, Path(tmp))
    if "4" in a.parts:
        run_features(gpu, cuda)


def run_outcomes(gpu: str, steps: int) -> None:
    print(f"\n1. Outcomes, synthetic d_in 256, 1,024 latents, {steps} steps, batch 1,024 (held-out):")
    for arch in ("standard", "topk"):
        for device in dict.fromkeys([gpu, "cpu"]):
            result, seconds = outcome(device, arch, steps)
            print(f"  {arch:8s} {device:5s} {seconds:6.1f} s  {result}")


def run_throughput(gpu: str, tmp: Path, big_steps: int) -> None:
    print("\n2. Throughput, d_in 768, 16,384 latents, batch 4,096:")
    rows = torch.randn(4096 * 64, 768)
    writer = ShardWriter(Path(tmp) / "store", 768, "float16")
    for chunk in torch.split(rows, 16384):
        n = len(chunk)
        writer.add(chunk.numpy(), np.zeros(n), np.zeros(n), np.zeros(n))
    writer.commit({})
    bare_loop(rows, 16384, 4096, 10, gpu)  # warm-up: CUDA context, kernels, allocator
    base = bare_loop(rows, 16384, 4096, big_steps, gpu)
    store = StoreSource(Path(tmp) / "store")
    figures = {f"bare PyTorch loop on {gpu} (baseline)": base,
               "ours, in-memory tensor": ours(TensorSource(rows), 16384, 4096, big_steps, gpu),
               "ours, memory-mapped float16 store": ours(store, 16384, 4096, big_steps, gpu),
               "bare PyTorch loop again (noise check)": bare_loop(rows, 16384, 4096, big_steps, gpu)}
    for name, tps in figures.items():
        print(f"  {name:40s} {tps:12,.0f} tokens/s ({100 * tps / base:5.1f}%)")


def run_extraction(gpu: str, cuda: bool, tmp: Path) -> None:
    print("\n3. Extraction, tiny GPT-2 (d 64, 3 layers), layer 1 residual:")
    folder = Path(tmp) / "gpt2"
    docs = tiny_gpt2(folder)
    got = {d: extraction(d, folder, docs, Path(tmp) / f"x-{d}") for d in dict.fromkeys([gpu, "cpu"])}
    if cuda:
        (a_gpu, i_gpu), (a_cpu, i_cpu) = got["cuda"], got["cpu"]
        same_rows = np.array_equal(i_gpu, i_cpu)
        diff = float(np.abs(a_gpu - a_cpu).max()) if same_rows else float("nan")
        print(f"  same rows (token, document, position): {same_rows}; max |cuda − cpu| = {diff:.2e}")
        low, _ = extraction(gpu, folder, docs, Path(tmp) / "x-bf16", "bfloat16")
        print(f"  bfloat16 model on cuda: max |bf16 − fp32| = {np.abs(low - a_cpu).max():.2e} "
              f"(largest |activation| {np.abs(a_cpu).max():.2f})")


def run_features(gpu: str, cuda: bool) -> None:
    print("\n4. Feature statistics of one SAE on 20,000 synthetic rows:")
    torch.manual_seed(1)  # not the source's seed 0, which would draw its true features as the decoder
    sae = build_sae("topk", 256, 2048, k=16)
    x = SyntheticSource(256, 512, 5.0).sample(20_000, device=torch.device("cpu"))
    source = SyntheticSource(256, 512, 5.0)
    results = {}
    for device in dict.fromkeys([gpu, "cpu"]):
        start = time.perf_counter()
        model, xs = sae.to(device), x.to(device)
        stats = F.latent_stats(model, xs, top_n=10)
        rows = np.where(stats.top_rows >= 0, stats.top_rows, -1)
        acts = F.latent_activations_at(model, xs, np.arange(model.d_sae), rows, stats.thresholds)
        neighbours = F.decoder_neighbours(model)
        recovery = F.ground_truth_recovery(model, source.features)
        results[device] = (stats, acts, neighbours, recovery)
        print(f"  {device:5s} {time.perf_counter() - start:.2f} s (statistics, example activations, neighbours, "
              f"recovery MMCS {recovery.mmcs:.4f})")
    if cuda:
        (g, g_acts, g_nb, _), (c, c_acts, c_nb, _) = results["cuda"], results["cpu"]
        print(f"  frequency max diff {np.abs(g.frequency - c.frequency).max():.2e}; max-activation max diff "
              f"{np.abs(g.max_active - c.max_active).max():.2e}; top rows equal for "
              f"{100 * (g.top_rows == c.top_rows).all(axis=1).mean():.1f}% of latents; example activations max diff "
              f"{np.abs(g_acts - c_acts).max():.2e}; nearest latent equal for "
              f"{100 * (g_nb[0][:, 0] == c_nb[0][:, 0]).mean():.1f}%")


if __name__ == "__main__":
    main()
