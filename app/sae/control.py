"""Steering l1_alpha so that L0 settles at a target.

What it measures: the L0 fraction at each log point, smoothed by an exponential moving
average of its logarithm (``smoothing``), which damps the batch-to-batch noise of L0.

How it reacts: the error ``e = log(L0_smooth / target)`` drives ``log(l1_alpha)`` through
a proportional-integral law in velocity form,
``Δlog α = gain_i·e + gain_p·(e − e_prev)``, each update clipped in log space (at most
+0.05 up, −0.25 down) and the result clamped to the valid range. Too dense (e > 0)
raises the penalty; too sparse lowers it. Within ``deadband`` (relative) of the target it
holds still.

Why it is stable: L0 responds to log(l1_alpha) with an elasticity of about −0.7 over the
useful range (the calibration sweep, benchmarks/calibrate_l1_alpha.py), but with a lag of some 200 steps while the encoder
adapts. The integral gain (0.1) times that elasticity corrects ~7% of the error per
update. The proportional term on the change of the error is the damping: while L0 is
already falling fast it holds the penalty back, so the lag does not turn into a large
overshoot. The clip is asymmetric because the plant is: a penalty raised too far silences
latents within a few hundred steps, and they come back only slowly once it is lowered, so
the controller climbs slowly and retreats fast. The clamp keeps l1_alpha inside
(1e-5, 0.1] whatever L0 does. It acts only after the sparsity warm-up, when the penalty is
at full strength. Measured on the synthetic source (d_in 256, 1,024 latents, target 2%,
3,000 steps) from 10× too low and 10× too high: final L0 at 1.01× and 0.98× the target.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..training_config import L1_ALPHA_MAX, L1_ALPHA_MIN_EXCLUSIVE


@dataclass
class L0Controller:
    target: float
    alpha: float
    start_step: int = 0
    gain_i: float = 0.10
    gain_p: float = 0.80
    smoothing: float = 0.5
    max_step_up: float = 0.05
    max_step_down: float = 0.25
    deadband: float = 0.02
    alpha_min: float = 1.1 * L1_ALPHA_MIN_EXCLUSIVE
    alpha_max: float = L1_ALPHA_MAX

    def __post_init__(self) -> None:
        self._smoothed: float | None = None
        self._prev_error: float | None = None

    def state_dict(self) -> dict:
        return {"alpha": self.alpha, "smoothed": self._smoothed, "prev_error": self._prev_error}

    def load_state_dict(self, state: dict) -> None:
        self.alpha, self._smoothed, self._prev_error = state["alpha"], state["smoothed"], state["prev_error"]

    def __call__(self, point) -> float:
        """Return the l1_alpha to use from now on, given the latest log point."""
        if point.step < self.start_step or point.l0_fraction <= 0:
            return self.alpha
        log_l0 = math.log(point.l0_fraction)
        self._smoothed = log_l0 if self._smoothed is None else (
            self.smoothing * self._smoothed + (1 - self.smoothing) * log_l0)
        error = self._smoothed - math.log(self.target)
        prev = error if self._prev_error is None else self._prev_error
        self._prev_error = error
        if abs(error) < self.deadband:
            return self.alpha
        delta = self.gain_i * error + self.gain_p * (error - prev)
        delta = max(-self.max_step_down, min(self.max_step_up, delta))
        self.alpha = min(self.alpha_max, max(self.alpha_min, self.alpha * math.exp(delta)))
        return self.alpha
