"""One outcome path: however a job's work ends, ``lifecycle.outcome`` records it the same way for
every kind, on a real database (docs/design.md, "The life of a queued record")."""
from __future__ import annotations

import pytest

from app.errors import UserError
from app.models import ActivationSet, TuneJob
from app.work import lifecycle
from app.work.resources import TooLarge


def claimed_tune() -> TuneJob:
    tune = TuneJob.create(source=ActivationSet.select().first(), latent_dim=512, target_l0=0.02, learning_rate=1e-3,
                          batch_size=256, pilot_steps=400, status="queued")
    assert lifecycle.claim(tune)
    return tune


def test_a_user_error_fails_the_job_with_its_message_and_is_not_raised(app):
    tune = claimed_tune()
    assert issubclass(TooLarge, UserError)

    def work():
        raise TooLarge(f"Too large for {app.config['DATA_DIR']}/x: lower latent_dim.")

    assert lifecycle.outcome(tune, app.config, work) == "failed"
    row = TuneJob.get_by_id(tune.id)
    assert row.status == "failed" and row.reason == "Too large for DATA_DIR/x: lower latent_dim."  # redacted


def test_any_other_error_fails_the_job_with_its_type_and_is_raised_again(app):
    tune = claimed_tune()

    def work():
        raise KeyError("pilots")

    with pytest.raises(KeyError):
        lifecycle.outcome(tune, app.config, work)
    row = TuneJob.get_by_id(tune.id)
    assert row.status == "failed" and row.reason == "KeyError: 'pilots'"


def test_a_stop_check_ends_it_cancelled_and_an_error_after_its_end_leaves_the_end(app):
    tune = claimed_tune()

    def work():
        raise InterruptedError("Cancelled by the user.")

    assert lifecycle.outcome(tune, app.config, work) == "cancelled"
    assert TuneJob.get_by_id(tune.id).status == "cancelled"
    done = claimed_tune()

    def broken_after_end():
        lifecycle.finish(done, "completed", result_l1_alpha=0.004)
        raise RuntimeError("after the end")

    assert lifecycle.outcome(done, app.config, broken_after_end) == "completed"
    row = TuneJob.get_by_id(done.id)
    assert row.status == "completed" and row.result_l1_alpha == 0.004 and row.reason is None


def test_a_superseded_job_writes_nothing(app):
    tune = claimed_tune()
    stale = TuneJob.get_by_id(tune.id)
    stale.attempt -= 1  # another attempt holds the row now

    def work():
        lifecycle.fenced_update(stale, what="progress", pilots=[{"l1_alpha": 1.0}])

    assert lifecycle.outcome(stale, app.config, work) == "superseded"
    row = TuneJob.get_by_id(tune.id)
    assert row.status == "running" and row.pilots == [] and row.reason is None
