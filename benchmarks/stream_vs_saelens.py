"""Our streamed trainer (``StreamedSource`` + ``train``) against SAELens's own activation store and
trainer (``LanguageModelSAETrainingRunner``), on the same small causal LM and the same corpus (issue 21).

Nothing is downloaded. The script
  1. trains a byte-level BPE tokenizer on standard-library docstrings and a small GPT-2 (n_embd 256,
     4 layers, 4 heads by default) on them briefly (``--lm-steps``, 30 by default: the 2-core box this
     was measured on is shared), and saves both with ``save_pretrained`` into a temporary folder;
  2. loads the same weights into TransformerLens (a ``HookedTransformerConfig`` written out by hand
     and TransformerLens's own ``convert_gpt2_weights``, no fold/centre processing) and checks that
     ``blocks.1.hook_resid_post`` equals the HF model's ``hidden_states[2]`` (our hook "1.resid");
  3. splits the docstrings: every ``--eval-every``-th document is held out for the FVU comparison,
     the rest is the training corpus of both contenders. SAELens gets it pre-tokenized (documents
     joined with EOS between them, cut into rows of ``--context`` tokens, an in-memory
     ``datasets.Dataset`` with an ``input_ids`` column); ours reads the documents themselves and cuts
     them into windows of at most ``--context`` tokens per document, as the app does;
  4. trains one TopK SAE on each side, same hook, width, k, batch, learning rate (constant: no warm-up,
     no decay on either side), float32 (or, with ``--precision bfloat16``, the SAE's steps under bfloat16
     autocast on both sides), same number of training tokens, same mixing buffer in tokens;
     the wall-clock runs from the construction of each side's source/runner to the end of training
     (model forward passes, normalisation estimate and, on our side, its final evaluation included);
  5. measures FVU and L0 of both SAEs on the same held-out activations, computed with the HF model
     (two sets: per-document windows, as ours trains on, and concatenated rows, as SAELens trains on);
  6. prints a markdown table (tokens/s = training tokens ÷ that wall-clock) and writes it to
     ``benchmarks/results/stream_vs_saelens.txt``.

Usage: ``python benchmarks/stream_vs_saelens.py [--train-tokens 102400] [--lm-steps 30] [--saelens-prefetch] ...``
(``--quick`` for a tiny smoke run that writes nothing).
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.extraction.text import stdlib_docstrings  # noqa: E402

HOOK_OURS = "1.resid"
HOOK_TL = "blocks.1.hook_resid_post"
HF_HIDDEN = 2  # hidden_states[2] is block 1's output


# --- the model ---------------------------------------------------------------------------------------

def build_tokenizer(docs: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(docs, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")


def build_lm(folder: Path, train_docs: list[str], args) -> dict:
    """Tokenizer + GPT2LMHeadModel, trained for ``args.lm_steps`` steps, saved into ``folder``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    started = time.perf_counter()
    tokenizer = build_tokenizer(train_docs[:3000], args.vocab)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=args.d_model, n_layer=args.layers, n_head=args.heads,
                        n_positions=256, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config)
    loss = float("nan")
    if args.lm_steps:
        ids = joined_ids(tokenizer, train_docs)
        data = torch.tensor(ids[:len(ids) // args.context * args.context]).view(-1, args.context)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        g = torch.Generator().manual_seed(0)
        model.train()
        for step in range(args.lm_steps):
            batch = data[torch.randint(len(data), (16,), generator=g)]
            out = model(input_ids=batch, labels=batch)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            loss = out.loss.item()
            if step % 100 == 0 or step == args.lm_steps - 1:
                print(f"  lm step {step:4d}  loss {loss:.3f}", flush=True)
    tokenizer.save_pretrained(folder)
    model.eval().save_pretrained(folder)
    return {"vocab": len(tokenizer), "lm_loss": loss, "lm_seconds": time.perf_counter() - started,
            "params": sum(p.numel() for p in model.parameters())}


def joined_ids(tokenizer, docs: list[str]) -> list[int]:
    """The documents' tokens in order, EOS between them (the usual pre-tokenization of a corpus)."""
    eos = tokenizer.eos_token_id
    out: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        out.extend(enc)
        out.append(eos)
    return out


def to_transformer_lens(folder: Path):
    """The saved GPT-2 as a HookedTransformer, built without any network access."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
    from transformers import AutoTokenizer, GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd, d_vocab=c.vocab_size, n_ctx=c.n_positions, act_fn="gelu_new",
        normalization_type="LN", eps=c.layer_norm_epsilon, positional_embedding_type="standard",
        original_architecture="GPT2LMHeadModel", tokenizer_prepends_bos=False, default_prepend_bos=False,
        dtype=torch.float32, device="cpu", model_name="local-gpt2")
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False, refactor_factored_attn_matrices=False)
    return model.eval()


def check_same_model(tl_model, hf_base, tokenizer, docs: list[str], context: int) -> float:
    ids = torch.tensor(joined_ids(tokenizer, docs)[:4 * context]).view(4, context)
    with torch.inference_mode():
        hf = hf_base(input_ids=ids, output_hidden_states=True).hidden_states[HF_HIDDEN]
        _, cache = tl_model.run_with_cache(ids, names_filter=[HOOK_TL], prepend_bos=False)
    tl = cache[HOOK_TL]
    diff = (hf - tl).abs().max().item()
    ok = torch.allclose(hf, tl, rtol=1e-4, atol=1e-4)
    print(f"  TransformerLens {HOOK_TL} vs HF hidden_states[{HF_HIDDEN}]: max |diff| {diff:.2e}, "
          f"allclose(rtol=1e-4, atol=1e-4) {ok}", flush=True)
    if not ok:
        raise SystemExit("the TransformerLens model does not compute the HF model's activations")
    return diff


# --- held-out activations ----------------------------------------------------------------------------

def heldout_sets(hf_base, tokenizer, eval_docs: list[str], context: int, n: int) -> dict[str, torch.Tensor]:
    """``n`` activations at the hook from documents neither side trains on, two ways: each document's
    first window on its own (as our stream cuts them), and EOS-joined rows (as SAELens's rows are)."""
    out = {}
    # per document: windows of at most `context` tokens, each run alone (no padding)
    rows, got = [], 0
    with torch.inference_mode():
        for enc in tokenizer(eval_docs, add_special_tokens=False)["input_ids"]:
            for begin in range(0, len(enc), context):
                ids = torch.tensor([enc[begin:begin + context]])
                rows.append(hf_base(input_ids=ids, output_hidden_states=True).hidden_states[HF_HIDDEN][0])
                got += ids.shape[1]
            if got >= n:
                break
    out["per-document windows"] = torch.cat(rows)[:n].float()
    ids = joined_ids(tokenizer, eval_docs)
    m = min(len(ids) // context, math.ceil(n / context))
    data = torch.tensor(ids[:m * context]).view(m, context)
    with torch.inference_mode():
        acts = torch.cat([hf_base(input_ids=data[i:i + 16], output_hidden_states=True).hidden_states[HF_HIDDEN]
                          for i in range(0, m, 16)])
    out["joined rows"] = acts.reshape(-1, acts.shape[-1])[:n].float()
    return out


def fvu_l0(encode_decode, x: torch.Tensor) -> tuple[float, float]:
    err = var = l0 = 0.0
    mean = x.mean(dim=0, keepdim=True)
    with torch.no_grad():
        for i in range(0, x.shape[0], 2048):
            xb = x[i:i + 2048]
            x_hat, f = encode_decode(xb)
            err += (xb - x_hat).pow(2).sum().item()
            var += (xb - mean).pow(2).sum().item()
            l0 += (f != 0).sum().item()
    return err / var, l0 / x.shape[0]


def ours_eval(sae, scale: float):
    def run(x):
        xs = x * scale
        f = sae.encode(xs)
        if not torch.is_tensor(f):  # a sparse TopK result
            f = f.to_dense() if hasattr(f, "to_dense") else torch.as_tensor(f)
        return sae.decode(f) / scale, f
    return run


def saelens_eval(sae):
    def run(x):
        f = sae.encode(x)
        return sae.decode(f), f
    return run


# --- the contenders ----------------------------------------------------------------------------------

def run_ours(folder: Path, train_docs: list[str], args) -> dict:
    from app.extraction.capture import load_model
    from app.sae.stream import StreamedSource
    from app.sae.trainer import Member, TrainConfig, dead_window, train_many

    tokenizer, model = load_model(str(folder), torch.device("cpu"))
    steps = args.train_tokens // args.batch
    cfg = TrainConfig(latent_dim=args.latents, architecture="topk", k=args.k, l1_alpha=None,
                      learning_rate=args.lr, batch_size=args.batch, total_steps=steps, lr_warmup_steps=0,
                      lr_decay_fraction=0.0, l1_warmup_steps=0, log_every=max(10, steps // 5),
                      precision=args.precision, device="cpu", seed=0, norm_sample_tokens=args.norm_tokens,
                      eval_tokens=args.holdout_tokens, checkpoint_every_steps=10_000_000,
                      checkpoint_every_minutes=1440)
    started = time.perf_counter()
    source = StreamedSource(model, tokenizer, lambda: iter(train_docs), [HOOK_OURS], context_length=args.context,
                            model_batch=args.store_prompts, buffer_tokens=args.buffer_tokens,
                            holdout_tokens=args.holdout_tokens)
    ended = []  # as the app trains it: the member names its hook point, so the prefetch stops at its last round
    train_many(source, [Member(cfg, hook=HOOK_OURS, on_end=lambda result, sae: ended.append((result, sae)))])
    result, sae = ended[0]
    wall = time.perf_counter() - started
    stats = source.stats()
    return {"sae": sae, "scale": result.norm_scale, "wall": wall, "tokens": result.tokens, "steps": result.steps,
            "status": result.status, "model_tokens": stats["model_tokens"], "epochs": stats["epochs"],
            "own_eval": result.eval, "dead_window_steps": dead_window(cfg) // args.batch}


def run_saelens(tl_model, rows: torch.Tensor, args, *, dead_window_steps: int, prefetch: bool) -> dict:
    import datasets
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    dataset = datasets.Dataset.from_dict({"input_ids": rows.tolist()})
    steps = args.train_tokens // args.batch
    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=args.d_model, d_sae=args.latents, k=args.k, dtype="float32", device="cpu",
                                  normalize_activations="expected_average_only_in"),
        model_name="local-gpt2", hook_name=HOOK_TL, dataset_path="", streaming=False, is_dataset_tokenized=True,
        context_size=args.context, prepend_bos=False,
        # this version's mixing buffer holds n_batches_in_buffer × context_size tokens
        n_batches_in_buffer=args.buffer_tokens // args.context, store_batch_size_prompts=args.store_prompts,
        training_tokens=steps * args.batch, train_batch_size_tokens=args.batch,
        lr=args.lr, lr_scheduler_name="constant", lr_warm_up_steps=0, lr_decay_steps=0, lr_end=args.lr,
        dead_feature_window=dead_window_steps, feature_sampling_window=max(dead_window_steps, steps + 1),
        n_batches_for_norm_estimate=max(1, args.norm_tokens // args.batch),
        device="cpu", dtype="float32", seed=0, prefetch_llm_batches=prefetch,
        autocast=args.precision == "bfloat16",  # the SAE's steps under bfloat16 autocast, as ours
        logger=LoggingConfig(log_to_wandb=False), n_checkpoints=0, checkpoint_path=None, output_path=None,
        save_final_checkpoint=False, verbose=False, exclude_special_tokens=False)
    started = time.perf_counter()
    runner = LanguageModelSAETrainingRunner(cfg, override_dataset=dataset, override_model=tl_model)
    built = time.perf_counter()
    sae = runner.run()
    wall = time.perf_counter() - started
    return {"sae": sae.eval(), "wall": wall, "setup": built - started, "tokens": steps * args.batch, "steps": steps,
            "rows_read": runner.activations_store.n_dataset_processed}


def precision_note(args) -> str:
    if args.precision == "float32":
        return "float32"
    return "SAE steps under bfloat16 autocast on both sides (ours precision bfloat16, SAELens autocast=True), LM float32"


# --- the report --------------------------------------------------------------------------------------

def machine() -> str:
    from importlib.metadata import version

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}, "
            f"{torch.backends.cpu.get_cpu_capability()}; torch {version('torch')}, transformers "
            f"{version('transformers')}, transformer-lens {version('transformer-lens')}, sae-lens "
            f"{version('sae-lens')}, datasets {version('datasets')}, Python {platform.python_version()}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--lm-steps", type=int, default=30)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--latents", type=int, default=None, help="default 4 × d_model")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-tokens", type=int, default=100 * 1024)
    p.add_argument("--buffer-tokens", type=int, default=65_536)
    p.add_argument("--store-prompts", type=int, default=32, help="windows per model forward pass, both sides")
    p.add_argument("--norm-tokens", type=int, default=8192)
    p.add_argument("--holdout-tokens", type=int, default=4096, help="our stream's own held-out head")
    p.add_argument("--eval-tokens", type=int, default=8192, help="held-out activations for the FVU comparison")
    p.add_argument("--eval-every", type=int, default=25, help="every n-th docstring is held out")
    p.add_argument("--saelens-prefetch", action="store_true",
                   help="also run SAELens with prefetch_llm_batches=True (its forward passes in a thread)")
    p.add_argument("--precision", default="float32", choices=["float32", "bfloat16"],
                   help="the SAE's steps on both sides: float32, or bfloat16 autocast (ours: precision bfloat16; "
                        "SAELens: autocast=True); the LM runs in float32 on both")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="tiny settings, nothing written")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "stream_vs_saelens.txt"))
    args = p.parse_args()
    if args.quick:
        args.d_model, args.layers, args.vocab, args.lm_steps = 64, 3, 600, 20
        args.train_tokens, args.buffer_tokens, args.norm_tokens = 150 * 256, 4096, 1024
        args.batch, args.eval_tokens, args.holdout_tokens = 256, 1024, 512
    args.latents = args.latents or 4 * args.d_model
    if args.threads:
        torch.set_num_threads(args.threads)
    args.train_tokens = args.train_tokens // args.batch * args.batch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    load_before = os.getloadavg()

    docs = list(stdlib_docstrings())
    eval_docs = [d for i, d in enumerate(docs) if i % args.eval_every == 0]
    train_docs = [d for i, d in enumerate(docs) if i % args.eval_every != 0]
    print(f"corpus: {len(docs):,} docstrings, {len(train_docs):,} to train on, {len(eval_docs):,} held out", flush=True)

    with tempfile.TemporaryDirectory(prefix="stream_vs_saelens_") as tmp:
        folder = Path(tmp) / "gpt2-small-local"
        print("building the LM ...", flush=True)
        lm = build_lm(folder, train_docs, args)
        from app.extraction.capture import load_model

        tokenizer, hf_base = load_model(str(folder), torch.device("cpu"))
        tl_model = to_transformer_lens(folder)
        diff = check_same_model(tl_model, hf_base, tokenizer, eval_docs, args.context)
        ids = joined_ids(tokenizer, train_docs)
        rows = torch.tensor(ids[:len(ids) // args.context * args.context]).view(-1, args.context)
        corpus_tokens = len(ids)
        print(f"  training corpus: {corpus_tokens:,} tokens, {rows.shape[0]:,} SAELens rows of {args.context}", flush=True)
        heldout = heldout_sets(hf_base, tokenizer, eval_docs, args.context, args.eval_tokens)

        print("warm-up (untimed, 4 steps each: first-call costs out of the measurement) ...", flush=True)
        warm = argparse.Namespace(**{**vars(args), "train_tokens": 4 * args.batch, "buffer_tokens": 4 * args.batch})
        run_ours(folder, train_docs, warm)
        run_saelens(tl_model, rows, warm, dead_window_steps=2, prefetch=False)
        print("ours: StreamedSource + train ...", flush=True)
        ours = run_ours(folder, train_docs, args)
        print(f"  {ours['tokens']:,} tokens in {ours['wall']:.1f} s", flush=True)
        print("SAELens: LanguageModelSAETrainingRunner ...", flush=True)
        lens = run_saelens(tl_model, rows, args, dead_window_steps=ours["dead_window_steps"], prefetch=False)
        print(f"  {lens['tokens']:,} tokens in {lens['wall']:.1f} s", flush=True)
        contenders = [("ours (StreamedSource + train)", ours, ours_eval(ours["sae"], ours["scale"])),
                      ("SAELens (runner, ActivationsStore)", lens, saelens_eval(lens["sae"]))]
        if args.saelens_prefetch:
            print("SAELens with prefetch_llm_batches=True ...", flush=True)
            lens_pf = run_saelens(tl_model, rows, args, dead_window_steps=ours["dead_window_steps"], prefetch=True)
            print(f"  {lens_pf['tokens']:,} tokens in {lens_pf['wall']:.1f} s", flush=True)
            contenders.append(("SAELens, prefetch_llm_batches=True", lens_pf, saelens_eval(lens_pf["sae"])))
    load_after = os.getloadavg()
    print(f"load average now: {load_after}", flush=True)

    names = list(heldout)
    head = ("| contender | tokens | wall-clock s | tokens/s | ours ÷ this | "
            + " | ".join(f"FVU ({n}) | L0 ({n})" for n in names) + " |")
    lines = [head, "|" + "---|" * (5 + 2 * len(names))]
    for label, r, fn in contenders:
        cells = [label, f"{r['tokens']:,}", f"{r['wall']:.1f}", f"{r['tokens'] / r['wall']:,.0f}",
                 f"{(ours['tokens'] / ours['wall']) / (r['tokens'] / r['wall']):.2f}×"]
        for n in names:
            f, l0 = fvu_l0(fn, heldout[n])
            cells += [f"{f:.4f}", f"{l0:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    settings = [
        f"# benchmarks/stream_vs_saelens.py, {time.strftime('%Y-%m-%d %H:%M')}",
        f"# machine: {machine()}",
        f"# load average (1, 5, 15 min): before {tuple(round(v, 2) for v in load_before)}, "
        f"after {tuple(round(v, 2) for v in load_after)}",
        f"# LM: GPT-2 architecture built here, n_embd {args.d_model}, {args.layers} layers, {args.heads} heads, "
        f"n_positions 256, vocab {lm['vocab']:,} (byte-level BPE on the docstrings), {lm['params']:,} parameters, "
        f"trained {args.lm_steps} steps (16 × {args.context} tokens, AdamW 1e-3), final LM loss {lm['lm_loss']:.3f}",
        f"# TransformerLens copy: {HOOK_TL} equals HF hidden_states[{HF_HIDDEN}] (max |diff| {diff:.1e})",
        f"# corpus: Python stdlib docstrings, {len(train_docs):,} documents / {corpus_tokens:,} tokens to train on; "
        f"every {args.eval_every}th docstring ({len(eval_docs):,}) held out for the FVU comparison",
        f"# SAE: TopK, d_in {args.d_model} -> {args.latents:,} latents, k {args.k}, batch {args.batch:,} tokens, "
        f"Adam lr {args.lr:g} constant (no warm-up, no decay), {precision_note(args)}, {args.train_tokens:,} training tokens "
        f"({args.train_tokens // args.batch} steps), hook layer 1 residual (ours {HOOK_OURS}, SAELens {HOOK_TL})",
        f"# buffer: {args.buffer_tokens:,} tokens on both sides (ours: rounds of buffer_tokens, each fully shuffled, "
        f"next round computed in a thread; SAELens: n_batches_in_buffer {args.buffer_tokens // args.context} × "
        f"context {args.context}, mixing fraction 0.5); {args.store_prompts} windows per forward pass on both sides",
        f"# normalisation: both estimate a scalar from {args.norm_tokens:,} tokens (ours: norm_scale, "
        f"E|cx|^2 = d_in; SAELens: expected_average_only_in, folded into the weights at the end)",
        f"# dead-latent window for AuxK: {ours['dead_window_steps']} steps on both sides",
        f"# ours: model ran over {ours['model_tokens']:,} tokens in all (training rounds, the norm sample, its own "
        f"{args.holdout_tokens:,}-token held-out evaluation), corpus passes {ours['epochs']}; its own eval "
        f"FVU {ours['own_eval'].get('fvu', float('nan')):.4f}, L0 {ours['own_eval'].get('l0', float('nan')):.1f}",
        f"# SAELens: runner set-up {lens['setup']:.1f} s (inside its wall-clock), dataset rows read "
        f"{lens['rows_read']:,}",
        f"# held-out FVU/L0: {args.eval_tokens:,} activations per set from the HF model at the hook; ours "
        f"fed c·x (c = its norm_scale {ours['scale']:.4f}), SAELens fed raw x",
        "",
    ]
    text = "\n".join(settings) + table + "\n"
    print()
    print(text)
    if not args.quick:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
