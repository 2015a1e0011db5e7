"""Training straight from a model as it runs (app.sae.stream): many hook points from one forward pass,
batches that are functions of their index, a crash that resumes bit-identically, a corpus that repeats."""
from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch

from app.extraction.capture import extract, load_model
from app.extraction.store import RoundStore, ShardWriter, open_shards
from app.extraction.text import stdlib_docstrings
from app.sae.stream import StreamedSource, StreamError
from app.sae.trainer import Checkpointing, Member, TrainConfig, train_many

CPU = torch.device("cpu")


def docstrings(n: int = 300):
    return lambda: itertools.islice(stdlib_docstrings(), n)


@pytest.fixture(scope="module")
def gpt2(tiny_models):
    return load_model(str(tiny_models["gpt2"]), CPU)


def streamed(gpt2, hooks=("0.resid", "2.mlp"), docs=None, **kw) -> StreamedSource:
    tokenizer, model = gpt2
    kw = {"context_length": 48, "buffer_tokens": 1024, "holdout_tokens": 512, **kw}
    return StreamedSource(model, tokenizer, docs or docstrings(), list(hooks), **kw)


def test_one_pass_captures_every_hook_point_as_the_model_computes_it(gpt2):
    tokenizer, model = gpt2
    source = streamed(gpt2, hooks=("1.resid", "0.resid"))
    rows, index = source.head(40, device=CPU, hook="1.resid")
    first = [int(t) for t in index[index[:, 1] == index[0, 1], 0]]  # the first document's kept tokens
    with torch.inference_mode():
        hidden = model(input_ids=torch.tensor([first[:20]]), output_hidden_states=True).hidden_states
    # block 1's output is hidden_states[2]; the stream ran the window with its own context (the same
    # tokens: GPT-2's tokenizer adds no special tokens), and cut the pass after the deepest hook
    torch.testing.assert_close(rows[:20], hidden[2][0, :20].float(), rtol=1e-4, atol=1e-4)
    both, _ = source.head(40, device=CPU, hook="0.resid")
    torch.testing.assert_close(both[:20], hidden[1][0, :20].float(), rtol=1e-4, atol=1e-4)
    assert source.stats()["model_tokens"] > 0


def test_batch_n_is_the_same_however_the_stream_is_entered(gpt2):
    source = streamed(gpt2)
    straight = source.batches(128, seed=3, device=CPU)
    seen = [next(straight) for _ in range(20)]  # 8 batches a round: rounds 0, 1 and part of 2
    straight.close()
    assert set(seen[0]) == {"0.resid", "2.mlp"} and seen[0]["0.resid"].shape == (128, 32)
    # the hook points hold the same tokens: a sweep's members over layers see the same batches
    assert not torch.equal(seen[0]["0.resid"], seen[0]["2.mlp"])
    position = source.position_at(19, 128)
    assert position is not None and position["train"] <= 2 * 1024
    for start, where in ((19, position), (19, None), (9, None)):
        again = source.batches(128, seed=3, device=CPU, start=start, position=where)
        batch = next(again)
        again.close()
        assert all(torch.equal(batch[k], seen[start][k]) for k in batch), (start, where)
    other = source.batches(128, seed=4, device=CPU)
    assert not torch.equal(next(other)["0.resid"], seen[0]["0.resid"])  # the seed draws the shuffle
    other.close()
    # the held-out head is never trained on: no (document, position) of it is in the first rounds
    held = source.eval_rows(512, device=CPU, hook="0.resid")
    assert held.shape == (512, 32)

    def places(pieces):
        return {(p.doc, p.positions[i]) for p in pieces for i in p.keep}

    from app.sae.stream import Position

    head, _ = source._range(0, 512, Position(), held_out=True)
    trained, _ = source._range(0, 3 * 1024, Position())
    assert len(places(head)) == 512 and len(places(trained)) == 3 * 1024
    assert not places(head) & places(trained)


def test_a_short_corpus_is_read_again_and_says_so_and_one_too_short_is_refused(gpt2, tmp_path):
    passes = []
    source = streamed(gpt2, docs=docstrings(20), on_repeat=passes.append, holdout_tokens=256, buffer_tokens=512)
    store = kept(source, tmp_path, ["0.resid"], dtype="float16")["0.resid"]
    batches = source.batches(128, seed=0, device=CPU)
    for _ in range(40):  # ten rounds of 512: the corpus (under 3,000 tokens) is read again from round 5 on
        next(batches)
    batches.close()
    assert passes and passes[0] == 1 and source.stats()["epochs"] >= 2
    # a store kept while streaming holds the first pass once: every training token of the corpus
    from app.sae.stream import Position

    corpus = sum(len(p.keep) for p in source._range(0, 10**9, Position(), held_out=True)[0])
    # entered again past the first pass (a resume there), the store is continued, not given up
    again = source.batches(128, seed=0, device=CPU, start=36)
    next(again)
    again.close()
    meta = store.commit(tmp_path / "kept", {})
    assert source.keep_failed == {} and meta["n_tokens"] == corpus - 256 and meta["dtype"] == "float16"
    acts, index = open_shards(tmp_path / "kept")
    assert np.concatenate(acts).dtype == np.float16 and len(set(map(tuple, np.concatenate(index)[:, 1:]))) == corpus - 256
    empty = streamed(gpt2, docs=docstrings(2), holdout_tokens=100_000)
    with pytest.raises(StreamError, match="nothing to train on"):
        next(empty.batches(256, seed=0, device=CPU))


def _saved(states: dict, key: str):
    def save(state: dict) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)  # written out before returning: its tensors are the live ones
        states[key] = buffer.getvalue()

    return save


class Crash(Exception):
    pass


def kept(source, folder, hooks, dtype="float32"):
    """``source`` keeping a store of each hook point under ``folder``; returns the stores."""
    stores = {hook: RoundStore(folder / f".partial-{hook}", source.d_in, dtype) for hook in hooks}
    source.keep(stores)
    return stores


def test_a_streamed_sweep_that_crashes_resumes_with_the_same_weights(gpt2, tiny_models, tmp_path):
    """Two SAEs on two layers of one stream, checkpointed every 20 steps; a crash at step 50 loses
    what came after the checkpoint at 40, and the resumed pair ends bit-identical to a straight pair
    (its last round cut to the five batches the run reads, in the crashed run as in the straight one).
    Each keeps a store while streaming: the crashed-and-resumed stores are the straight ones, byte for
    byte, and hold what an extraction of the same tokens holds."""
    cfg = dict(latent_dim=64, architecture="topk", k=4, l1_alpha=None, batch_size=64, total_steps=65,
               log_every=10, lr_warmup_steps=5, checkpoint_every_steps=20, checkpoint_every_minutes=60,
               precision="float32", eval_tokens=256, norm_sample_tokens=512)
    hooks = ("0.resid", "2.resid")

    def pair(source, *, crash_at=None, states=None, resume=None):
        ended = {}
        members = []
        for i, hook in enumerate(hooks):
            def on_log(point, hook=hook):
                if crash_at is not None and point.step >= crash_at:
                    raise Crash
            members.append(Member(TrainConfig(**{**cfg, "seed": i}), hook=hook, on_log=on_log,
                                  checkpointing=Checkpointing(_saved(states, hook), 20, 3600) if states is not None
                                  else None,
                                  resume=None if resume is None else torch.load(io.BytesIO(resume[hook]),
                                                                                weights_only=False),
                                  on_end=lambda result, sae, hook=hook: ended.__setitem__(hook, (result, sae))))
        train_many(source, members, data_seed=7)
        return ended

    source = streamed(gpt2, hooks=hooks, buffer_tokens=640)
    straight_stores = kept(source, tmp_path / "straight", hooks)
    straight = pair(source)
    states: dict = {}
    crashing = streamed(gpt2, hooks=hooks, buffer_tokens=640)
    kept(crashing, tmp_path / "resumed", hooks)
    with pytest.raises(Crash):
        pair(crashing, crash_at=50, states=states)
    assert (tmp_path / "resumed" / ".partial-0.resid" / "round_000005.json").exists()  # past the checkpoint's round
    saved = {hook: torch.load(io.BytesIO(blob), weights_only=False) for hook, blob in states.items()}
    assert {s["step"] for s in saved.values()} == {40} and all(s["source_position"] for s in saved.values())
    # a fresh process: the model loaded again, the stream entered at the checkpoint's corpus position
    tokenizer, model = load_model(str(tiny_models["gpt2"]), CPU)
    fresh = StreamedSource(model, tokenizer, docstrings(), list(hooks), context_length=48, buffer_tokens=640,
                           holdout_tokens=512)
    resumed_stores = kept(fresh, tmp_path / "resumed", hooks)
    resumed = pair(fresh, resume=states)
    for hook in hooks:
        a, b = straight[hook][1].state_dict(), resumed[hook][1].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), hook
        assert straight[hook][0].eval == resumed[hook][0].eval
    assert not torch.equal(straight[hooks[0]][1].W_dec, straight[hooks[1]][1].W_dec)

    assert source.keep_failed == {} and fresh.keep_failed == {}
    for hook in hooks:
        a = straight_stores[hook].commit(tmp_path / f"straight-{hook}", {})
        b = resumed_stores[hook].commit(tmp_path / f"resumed-{hook}", {})
        # 65 steps of 64 rows: six rounds of 640, and of the seventh only the 320 rows its steps read
        assert a["n_tokens"] == b["n_tokens"] == 65 * 64 and a["shards"] == b["shards"] and a["norm"] == b["norm"]
        for x, y in zip(*(open_shards(tmp_path / f"{name}-{hook}") for name in ("straight", "resumed"))):
            assert all(np.array_equal(u, v) for u, v in zip(x, y))
    # an extraction of the same corpus (windows in its own order: sorted by length for less padding)
    # holds every kept token, with the same activation
    writer = ShardWriter(tmp_path / "extracted", 32, "float32")
    extract(model, tokenizer, docstrings()(), writer, layer=2, site="resid", token_budget=2 * (512 + 7 * 640),
            context_length=48, batch_size=32, exclude_special=True, device=CPU)
    writer.commit({})
    (ex_acts, ex_index), (k_acts, k_index) = (open_shards(tmp_path / name) for name in ("extracted", "straight-2.resid"))
    ex_acts, ex_index, k_acts, k_index = (np.concatenate(a) for a in (ex_acts, ex_index, k_acts, k_index))
    row_of = {(int(d), int(p)): i for i, (_, d, p) in enumerate(ex_index)}
    rows = np.array([row_of[(int(d), int(p))] for _, d, p in k_index])
    assert np.array_equal(ex_index[rows, 0], k_index[:, 0])  # the same token at each place
    np.testing.assert_allclose(k_acts, ex_acts[rows], rtol=1e-4, atol=1e-4)
    # in corpus order: the documents' tokens one after another, from the end of the held-out head on
    places = [tuple(row) for row in k_index[:, 1:]]
    assert places == sorted(places) and len(set(places)) == len(places)


def test_a_checkpoint_of_another_hook_point_is_refused(gpt2):
    cfg = TrainConfig(latent_dim=64, architecture="topk", k=4, l1_alpha=None, batch_size=64, total_steps=20,
                      log_every=10, precision="float32", eval_tokens=256, norm_sample_tokens=512)
    states: dict = {}
    source = streamed(gpt2, hooks=("0.resid", "2.resid"), buffer_tokens=640)
    train_many(source, [Member(cfg, hook="0.resid", should_stop=lambda: "stop",
                               checkpointing=Checkpointing(_saved(states, "a"), 10, 3600))])
    state = torch.load(io.BytesIO(states["a"]), weights_only=False)
    errors = []
    train_many(source, [Member(cfg, hook="2.resid", resume=state, on_error=errors.append)])
    assert errors and "hook point '0.resid'" in str(errors[0])
