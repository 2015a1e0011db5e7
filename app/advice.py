"""One source of advice about the sparsity penalty.

Every value the app suggests for l1_alpha — the validator's fix, the recommended settings, a
preset, auto-tune's first pilot, a runtime event, the early-stop "Restart with …" and the
verdict — comes from :func:`suggest`, given what is known at that moment:

* always: the L0 model and the run's shape (d_in, latent_dim, steps, batch, target);
* ``offset``: this source's shift from the model, learned from its earlier runs
  (``ActivationSet.stats()``);
* at runtime or after a run: what the run measured (``Observation``): its l1_alpha, its L0 at
  a step, how far that is into the warm-up, and its recent trend.

What it does with them:

1. Inside the warm-up nothing about the penalty is known yet: no suggestion.
2. While L0 is still moving toward the target faster than the model expects a settling run to,
   it waits (``Advice.wait``): the fall of the first few hundred steps is not where the run ends.
3. Otherwise the measurement is carried to the run's last step by the model's run-length term,
   and turned into the run's own shift from the model's curve (a measurement near the ceiling
   only says "at least this dense": then the larger of it and the source's shift counts). The
   suggestion is the l1_alpha the shifted model puts at the target.
4. Whatever the evidence, the suggestion is kept inside the window of values the validator
   accepts for the same config on the same source (:func:`form_window`): a value the form then
   warned about would be a contradiction, and a round-trip test over many configurations
   (tests/test_advice.py) holds every suggestion to it.

Pure Python, no I/O.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from . import l0_model

# The validator's penalty findings, in terms of the expected L0 (mid) and its range's top (high):
RED_ABOVE = 0.15  # a range reaching above this is dense ...
ON_TARGET = 1.5  # ... unless the expected L0 is within this factor of the target (then it is the target's doing)
OVER = 3.0  # expected more than 3× the target: a warning
STARVED = 5.0  # expected more than 5× below the target: a warning
MARGIN = 1.15  # suggestions stay this far inside the window, so two-figure rounding cannot leave it
FAST = 1.5  # L0 falling this many times faster (per log-step) than the model expects is "still moving"
SATURATED_SHARE = 0.8  # an L0 above this share of the ceiling says only "at least this dense"


@dataclass(frozen=True)
class Known:
    """What a suggestion is about: the config's shape and the source's learned shift."""

    d_in: int
    latent_dim: int
    target: float
    steps: int
    batch: int
    offset: float = 0.0
    runs_seen: int = 0


@dataclass(frozen=True)
class Observation:
    """What a run measured: L0 (a fraction) at ``step`` with ``l1_alpha`` in force."""

    l1_alpha: float
    l0: float
    step: int
    warmup_steps: int = 0
    before: tuple[int, float] | None = None  # an earlier (step, L0) of the same run: the trend


@dataclass(frozen=True)
class Advice:
    l1_alpha: float | None  # the value to use (None: nothing can be said yet)
    expected: float | None = None  # the L0 the observed run is expected to end at
    wait: bool = False  # the run is still moving toward the target: say nothing yet
    why: str = ""


def penalty_state(known: Known, alpha: float) -> tuple[float, float, float]:
    """(low, expected, high) L0 at ``alpha``: the range the validator shows."""
    return l0_model.predict_range(alpha, known.d_in, known.latent_dim, known.steps, known.batch, known.offset)


def penalty_problem(known: Known, alpha: float) -> str | None:
    """What the validator warns about at ``alpha``: "dense", "over", "starved" or None."""
    low, mid, high = penalty_state(known, alpha)
    if high > RED_ABOVE and mid > ON_TARGET * known.target:
        return "dense"
    if mid > OVER * known.target:
        return "over"
    if mid < known.target / STARVED:
        return "starved"
    return None


def on_target(known: Known, alpha: float) -> bool:
    mid = penalty_state(known, alpha)[1]
    return 1 / ON_TARGET <= mid / known.target <= ON_TARGET


def form_window(known: Known) -> tuple[float, float]:
    """The l1_alpha values (weakest, strongest) the validator accepts without a warning, with a margin."""
    top = l0_model.ceiling(known.d_in, known.latent_dim)
    highest = OVER * known.target
    if top > RED_ABOVE:  # the range may reach red: only on target, or below red with its spread
        highest = min(highest, max(RED_ABOVE / l0_model.band(), ON_TARGET * known.target))
    lowest = known.target / STARVED
    weak = _alpha_for(known, highest / MARGIN)
    strong = _alpha_for(known, lowest * MARGIN)
    return min(weak, strong), max(weak, strong)


def _alpha_for(known: Known, l0: float) -> float:
    return l0_model.alpha_for(l0, known.d_in, known.latent_dim, known.steps, known.batch, known.offset)


def _model_rate(known: Known, alpha: float, step_a: int, step_b: int) -> float:
    """d ln L0 / d ln step the model expects between two steps of this run."""
    if step_b <= step_a:
        return 0.0
    ratio = l0_model.progress_ratio(alpha, known.d_in, known.latent_dim, (step_a, known.batch), (step_b, known.batch))
    return math.log(ratio) / math.log(step_b / step_a)


def still_moving(known: Known, obs: Observation) -> bool:
    """L0 heading toward the target faster than the model expects a settling run to move."""
    if obs.before is None or obs.l0 <= 0:
        return False
    step0, l0_before = obs.before
    if step0 <= 0 or l0_before <= 0 or obs.step <= step0:
        return False
    rate = math.log(obs.l0 / l0_before) / math.log(obs.step / step0)
    model = _model_rate(known, obs.l1_alpha, step0, obs.step)
    if obs.l0 > known.target:  # above: moving toward it means falling, faster than the model's fall
        return rate < 0 and rate < FAST * min(model, -0.05)
    return rate > 0.05  # below and rising


def projected(known: Known, obs: Observation) -> float:
    """The L0 the observed run is expected to end at (its last step is ``known.steps``)."""
    if obs.step >= known.steps:
        return obs.l0
    return obs.l0 * l0_model.progress_ratio(obs.l1_alpha, known.d_in, known.latent_dim, (max(obs.step, 1), known.batch),
                                            (known.steps, known.batch))


def suggest(known: Known, obs: Observation | None = None) -> Advice:
    """The l1_alpha to use for ``known`` given what is known now (see the module's docstring)."""
    lo, hi = form_window(known)
    if obs is None:
        value = _alpha_for(known, known.target)
        return Advice(_inside(value, lo, hi), why="model")
    if obs.step < obs.warmup_steps:
        return Advice(None, obs.l0, why="warm-up")
    if still_moving(known, obs):
        return Advice(None, None, wait=True, why="moving")
    top = l0_model.ceiling(known.d_in, known.latent_dim)
    expected = end = projected(known, obs)
    saturated = obs.l0 >= SATURATED_SHARE * top
    if saturated:  # near the ceiling L0 says only "at least this dense": read it as the least it can mean
        end = projected(known, _at(obs, SATURATED_SHARE * top))
    shift = None
    if 0 < end < 1 and obs.l1_alpha > 0:
        shift = l0_model.run_shift(obs.l1_alpha, known.d_in, known.latent_dim, known.steps, known.batch, end)
    if shift is None:  # collapsed to nothing: back off tenfold
        value = obs.l1_alpha / 10 if end <= 0 else _alpha_for(known, known.target)
        return Advice(_inside(value, lo, hi), expected, why="collapsed")
    shift = max(-l0_model.MAX_SHIFT, min(l0_model.MAX_SHIFT, shift))
    if saturated:
        shift = max(shift, known.offset)
    value = l0_model.alpha_for(known.target, known.d_in, known.latent_dim, known.steps, known.batch, shift)
    return Advice(_inside(value, lo, hi), expected, why="measured")


def _at(obs: Observation, l0: float) -> Observation:
    """The same observation at another L0."""
    return Observation(obs.l1_alpha, l0, obs.step, obs.warmup_steps, obs.before)


def _inside(value: float, lo: float, hi: float) -> float:
    return min(hi, max(lo, value))


def clamp(known: Known, value: float) -> float:
    """A value chosen by another rule (a dead-latent or collapse back-off) kept inside the form's window."""
    lo, hi = form_window(known)
    return _inside(value, lo, hi)
