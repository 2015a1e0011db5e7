"""Grading and runtime rules: is this run sparse, and is it going wrong?

Pure functions and small classes over plain numbers; no Flask, no database.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

GREEN_BELOW = 0.05
RED_ABOVE = 0.15
DEAD_RED_FRACTION = 0.5
DENSE_WARNING_ABOVE = 0.20
L1_ALPHA_MIN_EXCLUSIVE = 1e-5
L1_ALPHA_MAX = 0.1

GRADE_LABELS = {
    "green": "Sparse",
    "yellow": "Borderline",
    "red": "Dense or dead",
    None: "No data yet",
}


def grade(l0_fraction: float | None, dead: int | None, latent_dim: int) -> str | None:
    """green < 0.05 ≤ yellow ≤ 0.15 < red (L0 fraction); more than half dead is red."""
    if l0_fraction is None or not math.isfinite(l0_fraction):
        return None
    if dead is not None and dead > DEAD_RED_FRACTION * latent_dim:
        return "red"
    if l0_fraction < GREEN_BELOW:
        return "green"
    if l0_fraction <= RED_ABOVE:
        return "yellow"
    return "red"


def format_l0(l0: float, latent_dim: int) -> str:
    """"L0 = 4,096 of 8,192 latents (50.0%)": the count and the fraction, always both."""
    return f"L0 = {l0:,.0f} of {latent_dim:,} latents ({100 * l0 / latent_dim:.1f}%)"


def format_target(target_fraction: float, latent_dim: int) -> str:
    return f"target {100 * target_fraction:.1f}% ({target_fraction * latent_dim:,.0f} latents)"


def clamp_l1_alpha(value: float) -> float:
    """Bring a suggestion inside the valid range (1e-5, 0.1]."""
    return min(L1_ALPHA_MAX, max(value, 2 * L1_ALPHA_MIN_EXCLUSIVE))


def suggest_l1_alpha(current: float, observed_fraction: float, target_fraction: float) -> float:
    """A next l1_alpha that moves L0 toward the target.

    Raising l1_alpha lowers L0 roughly in proportion over the useful range (DESIGN.md's
    sweep), so scale the penalty by observed/target, at most tenfold per suggestion.
    """
    if current <= 0:
        return 0.003
    ratio = observed_fraction / max(target_fraction, 1e-9)
    return clamp_l1_alpha(current * min(10.0, max(0.1, ratio)))


@dataclass
class Finding:
    """A runtime observation to record on the run as an event."""

    level: str
    code: str
    message: str
    suggestion: str | None = None


class RuntimeMonitor:
    """Applies the runtime rules to each logged point once the warm-ups are over.

    A rule that fired is silent for ``repeat_every`` steps, so the event list stays
    readable on a long run.
    """

    TREND_POINTS = 5  # log points over which "still falling" is judged

    def __init__(self, *, architecture: str, latent_dim: int, target_l0: float,
                 warmup_steps: int, repeat_every: int = 1000) -> None:
        self.architecture, self.latent_dim, self.target_l0 = architecture, latent_dim, target_l0
        self.warmup_steps, self.repeat_every = warmup_steps, repeat_every
        self._last_fired: dict[str, int] = {}
        self._recent_l0: deque[float] = deque(maxlen=self.TREND_POINTS)

    def observe(self, point) -> list[Finding]:
        if point.step <= self.warmup_steps:
            return []
        self._recent_l0.append(point.l0_fraction)
        findings = []
        for rule in (self._dense, self._dead):
            finding = rule(point)
            if finding is None:
                continue
            last = self._last_fired.get(finding.code)
            if last is None or point.step - last >= self.repeat_every:
                self._last_fired[finding.code] = point.step
                findings.append(finding)
        return findings

    def _dense(self, point) -> Finding | None:
        if self.architecture != "standard" or point.l0_fraction <= DENSE_WARNING_ABOVE:
            return None
        # Right after the sparsity warm-up L0 is still high but falling fast; warn only
        # once it has stopped falling (less than 10% lower than TREND_POINTS logs ago).
        if len(self._recent_l0) < self.TREND_POINTS or point.l0_fraction < 0.9 * self._recent_l0[0]:
            return None
        suggestion = suggest_l1_alpha(point.l1_alpha, point.l0_fraction, self.target_l0)
        return Finding(
            "warning", "dense",
            f"Features are dense: {format_l0(point.l0, self.latent_dim)}, "
            f"{format_target(self.target_l0, self.latent_dim)}.",
            f"Increase l1_alpha (the sparsity penalty) from {point.l1_alpha:.3g} to about {suggestion:.3g}.")

    def _dead(self, point) -> Finding | None:
        if point.dead is None or point.dead <= DEAD_RED_FRACTION * self.latent_dim:
            return None
        share = point.dead / self.latent_dim
        tip = ("Lower l1_alpha (the sparsity penalty)." if self.architecture == "standard"
               else "Lower the learning rate or raise k.")
        return Finding("warning", "dead", f"{point.dead:,} of {self.latent_dim:,} latents ({share:.0%}) are dead.", tip)
