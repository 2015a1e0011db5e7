"""What L0 a standard SAE ends at, given its l1_alpha, widths and run length.

The model, fitted by ``benchmarks/calibrate_l1_alpha.py`` on a sweep that covers the
whole curve (dense regime included) and scored on sources it never saw::

    L0_fraction = m · σ(z)
    z = a + b·ln l1_alpha + c·ln d_in + e·ln(latent_dim / d_in) + g·ln total_steps + k·ln batch_size
    m = exp(m0 + h·ln(latent_dim / d_in))

σ is the logistic function. With a weak penalty z is large and L0 saturates at the ceiling
m (about half the latents: a ReLU encoder with no penalty fires on half its inputs); with
a strong one L0 ≈ m·e^z falls as a power of l1_alpha, and further the longer the run
(g < 0: L0 keeps falling while the penalty acts) and the larger its batches (k < 0). The coefficients and the held-out error
per source are in ``app/calibration.json``; the error sets the range around a prediction.

A source's own runs refine it: each completed run (and each auto-tune pilot) on a source
says how far that source lies from the model's curve, as a shift of z; the mean shift,
shrunk toward 0 while there are few runs (``source_offset``), is added to z for every later
prediction on the source. The hierarchical built-in source, for one, ends about 1.7× denser
than the model's average source at the same l1_alpha.

Pure Python: the validator, the recommendations, the runtime rules, the verdict and auto-tune all read it
through ``app/advice.py``, the one place a suggested l1_alpha comes from.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .training_config import L1_ALPHA_MAX, L1_ALPHA_MIN_EXCLUSIVE

CALIBRATION = json.loads(Path(__file__).with_name("calibration.json").read_text())
COEF = CALIBRATION["model"]
ALPHA_LOW = 2 * L1_ALPHA_MIN_EXCLUSIVE  # the smallest l1_alpha a recommendation gives


def _inside(value: int, key: str) -> int:
    """``value`` brought inside the range of run lengths (or batch sizes) the sweep measured.

    Past the longest measured run the model does not extrapolate the fall of L0 (it would
    keep falling as a power of the length forever): it takes L0 as settled there, and
    steering, on in the recommendations, corrects what is left. Likewise for the batch.
    """
    low, high = CALIBRATION[key]
    return int(min(max(value, low), high))


def _z(l1_alpha: float, d_in: int, latent_dim: int, steps: int, batch: int) -> float:
    c = COEF
    return (c["a"] + c["b"] * math.log(l1_alpha) + c["c"] * math.log(d_in)
            + c["e"] * math.log(latent_dim / d_in) + c["g"] * math.log(_inside(steps, "steps_range"))
            + c["k"] * math.log(_inside(batch, "batch_range")))


def ceiling(d_in: int, latent_dim: int) -> float:
    """The L0 fraction with (almost) no penalty."""
    return min(1.0, math.exp(COEF["m0"] + COEF["h"] * math.log(latent_dim / d_in)))


def predict(l1_alpha: float, d_in: int, latent_dim: int, steps: int, batch: int, offset: float = 0.0) -> float:
    """The L0 fraction a run of ``steps`` steps of ``batch`` tokens ends at (``offset``: the source's shift)."""
    z = _z(l1_alpha, d_in, latent_dim, steps, batch) + offset
    return ceiling(d_in, latent_dim) / (1 + math.exp(-z)) if z > -700 else 0.0


def band() -> float:
    """The factor either side of a prediction that held-out runs fell within (their worst source's RMS error)."""
    return math.exp(CALIBRATION["band_log"])


def predict_range(l1_alpha: float, d_in: int, latent_dim: int, steps: int, batch: int,
                  offset: float = 0.0) -> tuple[float, float, float]:
    """(low, expected, high) L0 fractions; the high end never above the ceiling."""
    mid = predict(l1_alpha, d_in, latent_dim, steps, batch, offset)
    return mid / band(), mid, min(ceiling(d_in, latent_dim), mid * band())


def alpha_for(target: float, d_in: int, latent_dim: int, steps: int, batch: int, offset: float = 0.0) -> float:
    """The l1_alpha the model says ends a run of ``steps`` × ``batch`` at ``target``, inside the valid range."""
    lo, hi = math.log(ALPHA_LOW), math.log(L1_ALPHA_MAX)
    if predict(math.exp(hi), d_in, latent_dim, steps, batch, offset) >= target:
        return L1_ALPHA_MAX
    if predict(math.exp(lo), d_in, latent_dim, steps, batch, offset) <= target:
        return ALPHA_LOW
    for _ in range(60):  # L0 falls monotonically with l1_alpha: bisect in log space
        mid = (lo + hi) / 2
        if predict(math.exp(mid), d_in, latent_dim, steps, batch, offset) > target:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


SATURATED = 0.99  # share of the ceiling above which L0 says nothing more about the penalty


def _logit(share: float) -> float:
    """z for an L0 that is ``share`` of the ceiling (capped just below it)."""
    share = min(share, SATURATED)
    return math.log(share / (1 - share))


def corrected_alpha(l1_alpha: float, observed: float, target: float, d_in: int, latent_dim: int,
                    *, max_factor: float = 10.0) -> float:
    """The l1_alpha that moves a run which ended at ``observed`` to ``target``.

    The model's shape with the run's own offset: the curve shifted to pass through what this
    run measured, read off at the target (the run length cancels out). At most ``max_factor`` either way.
    """
    if observed <= 0:
        return max(ALPHA_LOW, l1_alpha / max_factor)
    top = ceiling(d_in, latent_dim)
    # Move along the model's curve, shifted to pass through what this run measured.
    log_alpha = math.log(l1_alpha) + (_logit(target / top) - _logit(observed / top)) / COEF["b"]
    factor = max(-math.log(max_factor), min(math.log(max_factor), log_alpha - math.log(l1_alpha)))
    return min(L1_ALPHA_MAX, max(ALPHA_LOW, l1_alpha * math.exp(factor)))


def run_shift(l1_alpha: float, d_in: int, latent_dim: int, steps: int, batch: int, measured: float) -> float | None:
    """How far one measured run lies from the model's curve, in z (None for a run that says nothing)."""
    if not 1e-4 < measured < 1 or not 0 < l1_alpha:
        return None
    top = ceiling(d_in, latent_dim)
    return _logit(measured / top) - _logit(predict(l1_alpha, d_in, latent_dim, steps, batch) / top)


MAX_SHIFT = 3.0  # about 20× in the sparse regime: beyond it a run is broken, not informative


def source_offset(shifts: list[float]) -> float:
    """The shift to apply on a source, from its runs' shifts: their mean, shrunk toward 0 as one
    run at the model's curve would (so a single odd run moves predictions only halfway)."""
    kept = [max(-MAX_SHIFT, min(MAX_SHIFT, s)) for s in shifts]
    return sum(kept) / (len(kept) + 1) if kept else 0.0


def progress_ratio(l1_alpha: float, d_in: int, latent_dim: int, done: tuple[int, int],
                   whole: tuple[int, int]) -> float:
    """How L0 after the run ``whole`` compares with L0 after ``done`` (each (steps, batch)), same l1_alpha.

    The model's run-length and batch terms applied to a run that stopped short (same batch)
    or to a pilot (shorter, smaller batches) standing in for the real run.
    """
    return predict(l1_alpha, d_in, latent_dim, *whole) / max(predict(l1_alpha, d_in, latent_dim, *done), 1e-12)
