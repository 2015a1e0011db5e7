"""A store with a planted feature and an SAE that reads it, for feature tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from app.models import ActivationSet
from app.sae.export import LoadedSAE, export_files, zip_bytes

PLANTED = {150: 3.0, 800: 5.0, 1234: 4.0, 1900: 2.0}  # row: strength
TEXT = "The quick brown fox jumps over the lazy dog near the river bank. " * 80


def planted_store(env, tiny_models, *, text: str = TEXT, planted: dict | None = None, d_in: int = 16):
    """Rows of noise over ``text``'s tokens, plus direction e_3 at the planted rows; an extracted source."""
    from transformers import AutoTokenizer

    from app.extraction.store import ShardWriter

    planted = PLANTED if planted is None else planted
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models["gpt2"]))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:2000]
    rng = np.random.default_rng(0)
    acts = rng.normal(scale=0.1, size=(len(ids), d_in)).astype(np.float32)
    for row, strength in planted.items():
        acts[row, 3] += strength
    writer = ShardWriter(Path(env["DATA_DIR"]) / "activations" / "planted", d_in, "float32", shard_bytes=d_in * 4 * 600)
    writer.add(acts, np.array(ids), np.arange(len(ids)) // 500, np.arange(len(ids)) % 500)
    meta = writer.commit({"model": str(tiny_models["gpt2"]), "layer": 1, "site": "resid"})
    source = ActivationSet.create(name="planted", kind="extracted", d_in=d_in, n_tokens=len(ids) - len(ids) // 20,
                                  params=meta, path="activations/planted")
    return source, planted, ids, tokenizer, acts


def reader_weights(d_in: int = 16, d_sae: int = 8) -> dict:
    """An SAE whose latent 0 reads direction e_3 (threshold 0.5); the others barely fire."""
    rng = np.random.default_rng(1)
    w_enc = rng.normal(scale=0.01, size=(d_in, d_sae)).astype(np.float32)
    w_enc[:, 0] = 0
    w_enc[3, 0] = 1.0
    return {"W_enc": w_enc, "W_dec": np.ascontiguousarray(w_enc.T), "b_enc": np.full(d_sae, -0.5, np.float32),
            "b_dec": np.zeros(d_in, np.float32)}


def saelens_zip(d_in: int, d_sae: int, weights: dict, architecture="standard", k=None) -> bytes:
    sae = LoadedSAE(architecture, d_in, d_sae, k, weights, 1.0, {})
    return zip_bytes(export_files(sae, None, {"model_name": "elsewhere"}), "my-sae")
