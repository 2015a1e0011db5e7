"""The trainer's sweep: many SAEs on one pass over the batches, each as if it had trained alone."""
from __future__ import annotations

import torch

from app.sae.sources import SyntheticSource
from app.sae.trainer import Checkpointing, Member, TrainConfig, train, train_many

SOURCE = dict(d_in=32, n_features=64, mean_active=3.0, seed=5)
BASE = dict(latent_dim=64, batch_size=128, total_steps=60, log_every=10, learning_rate=1e-3, lr_warmup_steps=5,
            l1_warmup_steps=10, seed=3, dead_window_tokens=2_000, checkpoint_every_steps=20, eval_tokens=1024)
CONFIGS = [dict(architecture="standard", l1_alpha=1e-3), dict(architecture="standard", l1_alpha=1e-2),
           dict(architecture="topk", k=4), dict(architecture="jumprelu", target_l0=0.06, l0_coefficient=10.0, jumprelu_bandwidth=0.05)]


def cfg(**changes) -> TrainConfig:
    return TrainConfig(**{**BASE, **changes})


def source() -> SyntheticSource:
    return SyntheticSource(**SOURCE)


def weights(sae) -> dict:
    return {k: v.detach().clone() for k, v in sae.state_dict().items()}


def test_each_member_of_a_sweep_ends_exactly_as_it_would_have_alone():
    """Same batches, same updates: sharing a batch changes nothing about any member (CPU, bit for bit)."""
    alone = [train(source(), cfg(**c)) for c in CONFIGS]
    ended = {}
    members = [Member(cfg(**c), on_end=lambda r, sae, i=i: ended.__setitem__(i, (r, weights(sae))))
               for i, c in enumerate(CONFIGS)]
    train_many(source(), members)
    assert sorted(ended) == list(range(len(CONFIGS)))
    for i, (result, sae) in enumerate(alone):
        together, w = ended[i]
        assert together.steps == result.steps == BASE["total_steps"] and together.status == "completed"
        assert together.eval["l0"] == result.eval["l0"] and together.eval["fvu"] == result.eval["fvu"]
        for name, tensor in weights(sae).items():
            assert torch.equal(tensor, w[name]), (CONFIGS[i], name)


def test_a_member_that_fails_or_stops_ends_alone_and_the_others_train_on():
    ended, errors, logs = {}, {}, {1: 0}

    def explode(point):
        raise RuntimeError("boom at a log point")

    def stop_at_30(point):
        logs[1] += 1
        return "stop asked" if point.step >= 30 else None

    members = [Member(cfg(**CONFIGS[0]), on_log=explode, on_error=lambda exc: errors.__setitem__(0, exc),
                      on_end=lambda r, s: ended.__setitem__(0, r)),
               Member(cfg(**CONFIGS[1]), on_log=stop_at_30, on_end=lambda r, s: ended.__setitem__(1, r)),
               Member(cfg(**CONFIGS[2]), on_end=lambda r, s: ended.__setitem__(2, r))]
    train_many(source(), members)
    assert isinstance(errors[0], RuntimeError) and 0 not in ended
    assert ended[1].status == "stopped" and ended[1].steps == 30 and ended[1].reason == "stop asked"
    assert ended[2].status == "completed" and ended[2].steps == BASE["total_steps"]


def test_members_resumed_from_checkpoints_at_different_steps_end_as_if_never_interrupted():
    """A crash can fall between two members' checkpoints: each continues from its own step on the
    batches it would have seen, and ends bit-identical to an uninterrupted sweep."""
    straight = {}
    train_many(source(), [Member(cfg(**c), on_end=lambda r, s, i=i: straight.__setitem__(i, weights(s)))
                          for i, c in enumerate(CONFIGS[:2])])
    saved = {0: {}, 1: {}}

    def keep(i):
        return Checkpointing(lambda state, i=i: saved[i].__setitem__(state["step"], _copy(state)), 20, 1e9)

    stop_at = {0: 40, 1: 20}  # member 0 got its step-40 checkpoint out, member 1 only its step-20 one
    members = [Member(cfg(**c), checkpointing=keep(i),
                      should_stop=lambda i=i, box={"n": 0}: _count_to(box, stop_at[i]))
               for i, c in enumerate(CONFIGS[:2])]
    train_many(source(), members)
    resumed = {}
    train_many(source(), [Member(cfg(**c), resume=saved[i][stop_at[i]],
                                 on_end=lambda r, s, i=i: resumed.__setitem__(i, (r, weights(s))))
                          for i, c in enumerate(CONFIGS[:2])])
    for i in (0, 1):
        result, w = resumed[i]
        assert result.steps == BASE["total_steps"]
        for name, tensor in straight[i].items():
            assert torch.equal(tensor, w[name]), (i, name)


def test_members_must_share_the_batch_size():
    import pytest

    with pytest.raises(ValueError, match="batch size"):
        train_many(source(), [Member(cfg(**CONFIGS[0])), Member(cfg(**CONFIGS[1], batch_size=64))])


def _count_to(box: dict, n: int) -> str | None:
    """A stop check that lets ``n`` steps through, then asks to stop."""
    box["n"] += 1
    return "interrupted for the test" if box["n"] > n else None


def _copy(state: dict) -> dict:
    import copy
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return copy.deepcopy(torch.load(buffer, weights_only=True))
