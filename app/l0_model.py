"""What L0 a standard SAE ends at, given its l1_alpha, widths and run length.

The model, fitted by ``benchmarks/calibrate_l1_alpha.py`` on a sweep that covers the
whole curve (dense regime included) and scored on sources it never saw::

    L0_fraction = m · σ(z)
    z = a + b·ln l1_alpha + c·ln d_in + e·ln(latent_dim / d_in) + g·ln total_steps
    m = exp(m0 + h·ln(latent_dim / d_in))

σ is the logistic function. With a weak penalty z is large and L0 saturates at the ceiling
m (about half the latents: a ReLU encoder with no penalty fires on half its inputs); with
a strong one L0 ≈ m·e^z falls as a power of l1_alpha, and further the longer the run
(g < 0: L0 keeps falling while the penalty acts). The coefficients and the held-out error
per source are in ``app/calibration.json``; the error sets the range around a prediction.

Pure Python: the validator, the recommendations, the verdict and auto-tune all read it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .training_config import L1_ALPHA_MAX, L1_ALPHA_MIN_EXCLUSIVE

CALIBRATION = json.loads(Path(__file__).with_name("calibration.json").read_text())
COEF = CALIBRATION["model"]
ALPHA_LOW = 2 * L1_ALPHA_MIN_EXCLUSIVE  # the smallest l1_alpha a recommendation gives


def fitted_steps(steps: int) -> int:
    """``steps`` brought inside the run lengths the sweep measured.

    Past the longest measured run the model does not extrapolate the fall of L0 (it would
    keep falling as a power of the length forever): it takes L0 as settled there, and
    steering, on in the recommendations, corrects what is left.
    """
    low, high = CALIBRATION.get("steps_range", (1, 10**9))
    return int(min(max(steps, low), high))


def _z(l1_alpha: float, d_in: int, latent_dim: int, steps: int) -> float:
    c = COEF
    return (c["a"] + c["b"] * math.log(l1_alpha) + c["c"] * math.log(d_in)
            + c["e"] * math.log(latent_dim / d_in) + c["g"] * math.log(fitted_steps(steps)))


def ceiling(d_in: int, latent_dim: int) -> float:
    """The L0 fraction with (almost) no penalty."""
    return min(1.0, math.exp(COEF["m0"] + COEF["h"] * math.log(latent_dim / d_in)))


def predict(l1_alpha: float, d_in: int, latent_dim: int, steps: int) -> float:
    """The L0 fraction a run ends at."""
    z = _z(l1_alpha, d_in, latent_dim, steps)
    return ceiling(d_in, latent_dim) / (1 + math.exp(-z)) if z > -700 else 0.0


def band() -> float:
    """The factor either side of a prediction that held-out runs fell within (their worst source's RMS error)."""
    return math.exp(CALIBRATION["band_log"])


def predict_range(l1_alpha: float, d_in: int, latent_dim: int, steps: int) -> tuple[float, float, float]:
    """(low, expected, high) L0 fractions; the high end never above the ceiling."""
    mid = predict(l1_alpha, d_in, latent_dim, steps)
    return mid / band(), mid, min(ceiling(d_in, latent_dim), mid * band())


def elasticity(l1_alpha: float, d_in: int, latent_dim: int, steps: int) -> float:
    """d ln L0 / d ln l1_alpha at this point (negative; near 0 in the saturated dense regime)."""
    z = _z(l1_alpha, d_in, latent_dim, steps)
    return COEF["b"] * (1 - 1 / (1 + math.exp(-z)))


def alpha_for(target: float, d_in: int, latent_dim: int, steps: int) -> float:
    """The l1_alpha the model says ends a run of ``steps`` at ``target``, inside the valid range."""
    lo, hi = math.log(ALPHA_LOW), math.log(L1_ALPHA_MAX)
    if predict(math.exp(hi), d_in, latent_dim, steps) >= target:
        return L1_ALPHA_MAX
    if predict(math.exp(lo), d_in, latent_dim, steps) <= target:
        return ALPHA_LOW
    for _ in range(60):  # L0 falls monotonically with l1_alpha: bisect in log space
        mid = (lo + hi) / 2
        if predict(math.exp(mid), d_in, latent_dim, steps) > target:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


def corrected_alpha(l1_alpha: float, observed: float, target: float, d_in: int, latent_dim: int,
                    *, max_factor: float = 10.0) -> float:
    """The l1_alpha that moves a run which ended at ``observed`` to ``target``.

    The model's shape with the run's own offset: the curve shifted to pass through what this
    run measured, read off at the target (the run length cancels out). At most ``max_factor`` either way.
    """
    if observed <= 0:
        return max(ALPHA_LOW, l1_alpha / max_factor)
    top = ceiling(d_in, latent_dim)
    observed, target = min(observed / top, 0.999), min(target / top, 0.999)
    # Move along the model's curve, shifted to pass through what this run measured.
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    log_alpha = math.log(l1_alpha) + (logit(target) - logit(observed)) / COEF["b"]
    factor = max(-math.log(max_factor), min(math.log(max_factor), log_alpha - math.log(l1_alpha)))
    return min(L1_ALPHA_MAX, max(ALPHA_LOW, l1_alpha * math.exp(factor)))


def progress_ratio(l1_alpha: float, d_in: int, latent_dim: int, steps_done: int, steps_total: int) -> float:
    """How much lower (≤ 1) L0 ends after ``steps_total`` than after ``steps_done`` at the same l1_alpha.

    The model's run-length term applied to a run (or a pilot) that stopped short.
    """
    if fitted_steps(steps_done) >= fitted_steps(steps_total):
        return 1.0
    return (predict(l1_alpha, d_in, latent_dim, steps_total)
            / max(predict(l1_alpha, d_in, latent_dim, steps_done), 1e-12))
