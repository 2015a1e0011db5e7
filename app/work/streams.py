"""Streamed sources: activations computed from a model as training runs (``app.sae.stream``).

A streamed source is a record, not a job: the model, the corpus, the hook points and the buffer.
It is made at once (nothing is computed but a count of the corpus's tokens, so that a run that
would repeat it is told before it starts), and every run or sweep on it runs the model itself.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from .. import paths
from ..errors import UserError
from ..extraction.capture_names import BUNDLED_MINILM, SITES
from ..models import ActivationSet
from ..training_config import parse_hook_point

COUNT_SECONDS = 5.0  # the corpus count stops here (a web request waits for it); the source then says "at least"
HOLDOUT_TOKENS = 16_384  # the corpus's first tokens, held out for evaluation (as the trainer evaluates on)


class StreamRefused(UserError, ValueError):
    """The streamed source cannot be made; the message is for the user (``field`` names the cause)."""

    def __init__(self, message: str, field: str = "layers") -> None:
        super().__init__(message)
        self.field = field


def parse_layers(text: str, n_layers: int | None = None) -> list[int]:
    """Layers as a person writes them: ``0-5``, ``1,3,5`` or ``2``, in order, each once."""
    layers: list[int] = []
    for part in (text or "").replace(" ", "").split(","):
        if not part:
            continue
        lo, dash, hi = part.partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise StreamRefused(f"{part!r} is not a layer or a range of layers: write e.g. 0-5 or 1,3,5")
        first, last = int(lo), int(hi) if dash else int(lo)
        if last < first:
            raise StreamRefused(f"{part!r} runs backwards: write the lower layer first")
        layers.extend(range(first, last + 1))
    layers = list(dict.fromkeys(layers))
    if not layers:
        raise StreamRefused("Name at least one layer (e.g. 0-5, or 1,3,5).")
    if len(layers) > 64:
        raise StreamRefused(f"{len(layers)} layers is more than the 64 one stream captures.")
    if n_layers is not None and max(layers) >= n_layers:
        raise StreamRefused(f"Out of range: the model has {n_layers} layers (0 to {n_layers - 1}).")
    return layers


def buffer_bytes(d_in: int, hooks: int, buffer_tokens: int) -> int:
    """The mixing buffers: the round being trained on and the next one, written shuffled in place as
    the model computes it, each ``buffer_tokens`` float32 rows of ``d_in`` per hook point."""
    return 2 * buffer_tokens * d_in * 4 * hooks


def stream_memory_bytes(model_size: int | None, model_dtype: str, d_in: int, hooks: int, buffer_tokens: int) -> int:
    """What a streamed source holds on the training device: its model at its precision, and its buffers."""
    from .resources import model_need

    return model_need(model_size, model_dtype) + buffer_bytes(d_in, hooks, buffer_tokens)


def count_tokens(tokenizer, spec, context_length: int, exclude_special: bool, *, seconds: float = COUNT_SECONDS,
                 holdout: int = HOLDOUT_TOKENS) -> tuple[int, bool]:
    """The corpus's training tokens per pass (held-out head left out), and whether it was counted to
    its end within ``seconds`` (if not, it holds at least that many)."""
    from ..extraction.capture import Tokenized
    from ..extraction.text import documents

    tok = Tokenized(tokenizer, context_length)
    started, total = time.monotonic(), 0
    for window in tok.windows(documents(spec)):
        total += sum(1 for p in window.positions if p >= 0) if exclude_special else len(window.ids)
        if time.monotonic() - started > seconds:
            return max(0, total - holdout), False
    return max(0, total - holdout), True


def create_streamed_source(settings: dict, d: dict, spec, *, created_by: int | None = None,
                           model_size_bytes: int | None = None) -> ActivationSet:
    """Record a streamed source from a validated form's data ``d`` and its corpus ``spec``."""
    from transformers import AutoTokenizer

    from ..extraction.capture import resolve_model
    from ..extraction.hub import layer_count, model_config
    from .resources import _local_model_bytes

    name = d["model_name"].strip()
    resolved = name if name == BUNDLED_MINILM else paths.resolve(name, settings, "model")
    config = model_config(resolved) or {}
    d_in = config.get("hidden_size") or config.get("n_embd") or config.get("d_model")
    if not d_in:
        raise StreamRefused("The model's configuration names no hidden size: it cannot be streamed.", "model_name")
    layers = parse_layers(d["layers"], layer_count(config) if config else None)
    hooks = [parse_hook_point(f"{layer}.{d['site']}") for layer in layers]
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(resolved))
    except Exception as exc:  # noqa: BLE001 - the loader's many errors, for the user
        raise StreamRefused(f"Could not load the model's tokenizer: {exc}", "model_name") from exc
    read_spec = spec if spec.kind != "hf" else replace(spec, dataset=paths.resolve(spec.dataset, settings, "dataset"))
    corpus_tokens, counted = count_tokens(tokenizer, read_spec, d["context_length"], bool(d["exclude_special"]))
    if counted and corpus_tokens == 0:
        raise StreamRefused(f"The corpus holds no more than the {HOLDOUT_TOKENS:,} tokens held out for evaluation: "
                            "there is nothing to train on. Choose a longer corpus.", "text_kind")
    size = model_size_bytes or _local_model_bytes(resolve_model(resolved) if name == BUNDLED_MINILM else resolved)
    params = {
        "model": name, "model_dtype": d["model_dtype"], "layers": layers, "site": d["site"], "site_label": SITES[d["site"]],
        "hooks": hooks, "n_layers": layer_count(config) if config else None, "context_length": d["context_length"],
        "model_batch": d["batch_size"], "buffer_tokens": d["buffer_tokens"], "holdout_tokens": HOLDOUT_TOKENS,
        "exclude_special": bool(d["exclude_special"]), "text": spec.to_dict(), "text_label": spec.describe(),
        "corpus_tokens": corpus_tokens, "corpus_counted": counted, "model_size_bytes": size,
        "resident_bytes": stream_memory_bytes(size, d["model_dtype"], int(d_in), len(hooks), d["buffer_tokens"]),
    }
    label = (f"layers {layers[0]}–{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 1
             else "layer" + ("s " if len(layers) > 1 else " ") + ", ".join(map(str, layers)))
    title = (d.get("name") or "").strip() or f"{Path(name).name} {label} {SITES[d['site']]}, streamed from {spec.describe()}"
    return ActivationSet.create(name=title[:200], kind="streamed", d_in=int(d_in), n_tokens=None, params=params,
                                created_by=created_by)


def build_streamed(source: ActivationSet, settings: dict, *, device, on_repeat=None):
    """The core's ``StreamedSource`` for a stored streamed source: its model loaded on ``device``."""
    from ..extraction.capture import load_model
    from ..extraction.text import TextSpec, documents
    from ..sae.stream import StreamedSource

    p = source.params
    spec = TextSpec(**p["text"])
    if spec.kind == "hf":  # the web checked the name; the worker checks again where it reads
        spec = replace(spec, dataset=paths.resolve(spec.dataset, settings, "dataset"))
    model_name = p["model"] if p["model"] == BUNDLED_MINILM else paths.resolve(p["model"], settings, "model")
    tokenizer, model = load_model(model_name, device, p.get("model_dtype") or "float32")
    return StreamedSource(model, tokenizer, lambda: documents(spec), list(p["hooks"]),
                          context_length=int(p["context_length"]), model_batch=int(p["model_batch"]),
                          buffer_tokens=int(p["buffer_tokens"]), holdout_tokens=int(p["holdout_tokens"]),
                          exclude_special=bool(p["exclude_special"]), device=device, on_repeat=on_repeat)



def run_meta(run) -> dict:
    """Where a run's activations came from, as an extraction records it (model, layer, site, corpus,
    context length, precision): an extracted store's metadata, or a streamed source's at the run's
    hook point; empty for a source with no model behind it."""
    source = run.source
    if source.kind == "extracted":
        return source.params
    if source.kind == "streamed":
        params = source.params
        layer, _, site = (run.hook_point or params["hooks"][0]).partition(".")
        return {**params, "layer": int(layer), "site": site, "site_label": SITES.get(site, site)}
    return {}
