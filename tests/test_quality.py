"""Grades and the runtime rules, from crafted metric streams."""
from __future__ import annotations

import pytest

from app.quality import RuntimeMonitor, format_l0, grade, suggest_l1_alpha
from app.sae.trainer import LogPoint


def point(step, l0_fraction, *, dead=None, l1_alpha=0.003, latent_dim=1000):
    return LogPoint(step=step, tokens=step * 100, loss=1.0, mse=0.5, sparsity_loss=0.5, l1=10.0,
                    l0=l0_fraction * latent_dim, l0_fraction=l0_fraction, fvu=0.1, dead=dead, lr=1e-3,
                    l1_alpha=l1_alpha, tokens_per_s=1.0)


@pytest.mark.parametrize("l0_fraction,dead,expected", [
    (0.0499, None, "green"), (0.05, None, "yellow"), (0.15, None, "yellow"), (0.1501, None, "red"),
    (0.5, 0, "red"), (0.01, 501, "red"), (0.01, 500, "green"), (None, None, None),
])
def test_grade_thresholds(l0_fraction, dead, expected):
    assert grade(l0_fraction, dead, 1000) == expected


def test_l0_is_shown_as_count_and_fraction():
    assert format_l0(4096, 8192) == "L0 = 4,096 of 8,192 latents (50.0%)"


def test_suggestion_moves_toward_target_and_stays_in_range():
    assert suggest_l1_alpha(0.001, 0.5, 0.05) == pytest.approx(0.01)
    assert suggest_l1_alpha(0.05, 0.5, 0.01) == 0.1  # capped at the maximum
    assert suggest_l1_alpha(0.003, 0.01, 0.02) == pytest.approx(0.0015)


def monitor(**kw):
    return RuntimeMonitor(architecture="standard", latent_dim=1000, target_l0=0.02, warmup_steps=100, **kw)


def test_dense_rule_waits_for_warmup_and_a_flat_l0():
    m = monitor()
    assert m.observe(point(100, 0.6)) == []  # still in warm-up
    falling = [m.observe(point(100 + 10 * i, 0.6 * 0.8 ** i)) for i in range(1, 6)]
    assert all(f == [] for f in falling)  # falling fast: no warning yet
    m = monitor()
    fired = [f for i in range(1, 8) for f in m.observe(point(100 + 10 * i, 0.55))]
    assert [f.code for f in fired] == ["dense"]
    assert "L0 = 550 of 1,000 latents (55.0%)" in fired[0].message
    assert "0.003" in fired[0].suggestion and "0.03" in fired[0].suggestion


def test_rules_are_rate_limited():
    m = monitor(repeat_every=500)
    fired = [f.code for i in range(1, 200) for f in m.observe(point(100 + 10 * i, 0.55))]
    assert fired.count("dense") == 4  # steps 150, 650, 1150, 1650


def test_dead_rule():
    m = monitor()
    assert m.observe(point(200, 0.01, dead=400)) == []
    [finding] = m.observe(point(210, 0.01, dead=600))
    assert finding.code == "dead" and "600 of 1,000 latents (60%)" in finding.message


def test_topk_runs_get_no_dense_warning():
    m = RuntimeMonitor(architecture="topk", latent_dim=1000, target_l0=0.02, warmup_steps=0)
    assert [f for i in range(1, 10) for f in m.observe(point(10 * i, 0.5))] == []
