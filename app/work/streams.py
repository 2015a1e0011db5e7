"""Streamed sources: activations computed from a model as training runs (``app.sae.stream``).

A streamed source is a record, not a job: the model, the corpus, the hook points and the buffer.
It is made at once (nothing is computed but a count of the corpus's tokens, so that a run that
would repeat it is told before it starts), and every run or sweep on it runs the model itself.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

from .. import paths
from ..errors import UserError
from ..extraction.capture_names import BUNDLED_MINILM, SITES
from ..models import ActivationSet
from ..training_config import parse_hook_point

log = logging.getLogger("sae_studio.streams")

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


class Keeping:
    """The activation stores a streamed job keeps while it trains ("keep a store while streaming"): one
    per hook point in ``hooks`` (hook → dtype), written round by round into
    ``activations/.keeping-<owner>-<id>-<hook>`` as the stream computes them (``StreamedSource.keep``).

    ``settle`` is called once the job's stream has closed. When the job ended for good in this process
    (completed, stopped early) or was cancelled, each store becomes a source of kind "extracted", as an
    extraction of those tokens would: moved to ``activations/kept-…`` and recorded in one transaction
    that first checks this attempt still holds the job. Interrupted or failed, the partial store stays
    for the resume, which continues it from its checkpoint's round; superseded, it belongs to the
    attempt that holds the job. A job resumed after its store was kept does not add to it."""

    def __init__(self, owner, hooks: dict[str, str], settings: dict, *, notify) -> None:
        self.owner, self.hooks, self.settings, self.notify = owner, dict(hooks), settings, notify
        self.kind = "sweep" if type(owner).__name__ == "Sweep" else "run"
        self.folder = Path(settings["DATA_DIR"]) / "activations"
        self.stores: dict = {}
        self.stream = None

    def partial(self, hook: str) -> Path:
        return self.folder / f".keeping-{self.kind}-{self.owner.id}-{hook}"

    def attach(self, stream) -> None:
        from ..extraction.store import RoundStore

        self.stream = stream
        kept = self.already_kept()
        for hook, source in kept.items():
            if hook in self.hooks:
                self.notify(hook, "info", "store_already_kept",
                            f"This {self.kind}'s activation store at {hook} was kept when it ended before (source "
                            f"#{source.id}); resumed, it does not add to it.", None)
        self.stores = {hook: RoundStore(self.partial(hook), stream.d_in, dtype)
                       for hook, dtype in self.hooks.items() if hook not in kept}
        if self.stores:
            stream.keep(self.stores)

    def already_kept(self) -> dict[str, ActivationSet]:
        """The stores this job kept when an earlier attempt of it ended, by hook point."""
        prefix = f"activations/kept-{self.kind}-{self.owner.id}-"
        found = {}
        for source in ActivationSet.select().where(ActivationSet.path.startswith(prefix)):
            params = source.params or {}
            found[f"{params.get('layer')}.{params.get('site')}"] = source
        return found

    def settle(self, ended: str | None) -> list[ActivationSet]:
        from ..extraction.store import StoreError
        from .lifecycle import Superseded

        if self.stream is not None:
            self.stream.release_keeping()  # no round is written from here on
        if not self.stores or ended not in ("completed", "stopped_early", "cancelled"):
            return []
        made = []
        for hook, store in self.stores.items():
            why = self.stream.keep_failed.get(hook)
            if why:
                store.abort()
                self.notify(hook, "warning", "store_not_kept", f"No activation store was kept at {hook}: {why}",
                            "Extract the layer instead" + (", or keep the store in float32 if float16 overflowed."
                                                           if store.dtype == "float16" else "."))
                continue
            try:
                source = self._become_source(hook, store)
            except Superseded:
                return made  # the job is another attempt's now: the partial stores are its own
            except StoreError as exc:
                store.abort()
                self.notify(hook, "info", "store_not_kept", f"No activation store was kept at {hook}: {exc}.", None)
                continue
            except Exception as exc:  # noqa: BLE001 - the job has ended: the store is lost, and it says why
                log.exception("the store kept at %s could not become a source", hook)
                store.abort()
                self.notify(hook, "warning", "store_not_kept", f"The activation store kept at {hook} could not "
                            f"become a source: {type(exc).__name__}: {exc}", "Extract the layer instead.")
                continue
            made.append(source)
            self.notify(hook, "info", "store_kept",
                        f"Kept an activation store of {source.params['n_tokens']:,} tokens at {hook} "
                        f"({source.params['dtype']}): source #{source.id}, “{source.name}”, which trains without "
                        "running the model.", None)
        return made

    def _meta(self, hook: str) -> dict:
        stream, params = self.stream, self.owner.source.params
        layer, _, site = hook.partition(".")
        return {"model": params["model"], "model_path": getattr(stream.model, "name_or_path", "") or params["model"],
                "architecture": type(stream.model).__name__, "layout": stream.layout.name,
                "n_layers": stream.n_layers, "layer": int(layer), "site": site, "site_label": SITES.get(site, site),
                "context_length": params["context_length"], "model_dtype": params.get("model_dtype") or "float32",
                "exclude_special": params["exclude_special"], "text": params["text"], "text_label": params["text_label"],
                "extraction_id": None, "model_size_bytes": params.get("model_size_bytes"),
                "kept_by": {self.kind: self.owner.id, "streamed_source": self.owner.source_id},
                "first_corpus_token": params["holdout_tokens"]}

    def _become_source(self, hook: str, store) -> ActivationSet:
        """Seal the store, then in one transaction: check this attempt still holds the job as it ended it,
        move the store to its final folder and record it as a source (moved back if that fails)."""
        from ..db import database
        from ..sae.files import holdout_rows
        from .lifecycle import current, retry_write, superseded

        meta = store.seal(self._meta(hook))
        owner, model = self.owner, type(self.owner)
        final = self.folder / f"kept-{self.kind}-{owner.id}-a{owner.attempt}-{hook}"
        name = (f"{Path(meta['model']).name} layer {meta['layer']} {meta['site_label']}, {meta['text_label']} "
                f"(kept by {self.kind} {owner.id})")[:200]

        def create() -> ActivationSet:
            try:
                with database.atomic():
                    if not model.update(attempt=owner.attempt).where(current(owner)).execute():
                        raise superseded(owner, "its kept store")
                    store.move(final)
                    return ActivationSet.create(name=name, kind="extracted", d_in=meta["d_in"],
                                                n_tokens=meta["n_tokens"] - holdout_rows(meta["n_tokens"]),
                                                params=meta, path=f"activations/{final.name}",
                                                created_by=owner.created_by_id)
            except BaseException:
                store.move_back(final)  # as it was: a retry, or the attempt that holds the job, finds it
                raise

        source = retry_write(create, what="kept store")
        store.tidy(final, meta)
        return source


def keeping_for(owner, members, settings: dict, stream, *, notify, skip: set | None = None) -> Keeping | None:
    """The stores ``owner`` (a run, or a sweep) keeps on ``stream``, attached to it, but for the hook points
    in ``skip`` (kept by another part of the same sweep); None if it keeps none."""
    from .sweeps import kept_hooks

    if not getattr(stream, "hooks", None):
        return None
    hooks = {hook: dtype for hook, dtype in kept_hooks(members, owner.source).items() if hook not in (skip or ())}
    if not hooks:
        return None
    keeping = Keeping(owner, hooks, settings, notify=notify)
    keeping.attach(stream)
    return keeping


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
