"""Search l1_alpha for a target L0 with short pilot trainings.

Each pilot trains a fresh SAE for a few hundred steps and measures its L0 on held-out
activations. The search works in log space: while only one side of the target is known it
steps by the ratio observed/target raised to 1/0.7 (the elasticity of L0 in l1_alpha,
deliberately gentler than the L0 model's sparse-regime slope), at most tenfold; once pilots lie on both sides it
interpolates between the nearest two on the log–log line, kept strictly inside the bracket
(falling back to bisection). It stops when a pilot is within ``tolerance`` of the target,
or when the next guess repeats one already tried (the edge of the valid range).

Pilots are short; the run they tune is not, and L0 keeps falling while the penalty acts. So
each pilot's L0 is projected to the full run's length (``project``: the L0 model's
run-length term) and the search aims the projection, not the pilot's own L0, at the target.

A pilot whose reconstruction has collapsed (FVU above 0.9) counts as too sparse whatever
its L0: with the decoder-norm-weighted penalty a crushed SAE can keep latents "firing"
through decoder rows shrunk to nothing.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ..training_config import L1_ALPHA_MAX, L1_ALPHA_MIN_EXCLUSIVE
from .sources import ActivationSource
from .trainer import TrainConfig, train

# −d log L0 / d log l1_alpha assumed for a one-sided step. The L0 model's slope is −1.1 where L0 is
# small and flattens toward 0 where it is dense, so a gentler 0.75 steps further out of the dense regime.
ELASTICITY = 0.75
ALPHA_MIN, ALPHA_MAX = 1.1 * L1_ALPHA_MIN_EXCLUSIVE, L1_ALPHA_MAX
COLLAPSED_FVU = 0.9


def too_dense(pilot: Pilot, target: float) -> bool:
    return pilot.expected > target and pilot.fvu <= COLLAPSED_FVU


@dataclass
class Pilot:
    l1_alpha: float
    l0_fraction: float  # measured at the pilot's end
    fvu: float
    projected: float | None = None  # the L0 the full run is expected to end at with this l1_alpha

    @property
    def expected(self) -> float:
        return self.l0_fraction if self.projected is None else self.projected

    def to_dict(self) -> dict:
        return {"l1_alpha": self.l1_alpha, "l0_fraction": self.l0_fraction, "fvu": self.fvu,
                "projected": self.projected}


def next_alpha(pilots: list[Pilot], target: float) -> float:
    """The l1_alpha to try next, given the pilots so far (at least one)."""
    dense = [p for p in pilots if too_dense(p, target)]  # penalty too weak
    sparse = [p for p in pilots if not too_dense(p, target)]  # penalty too strong
    last = pilots[-1]
    if not dense or not sparse:
        ratio = max(last.expected, 1e-6) / target
        if last.fvu > COLLAPSED_FVU:
            ratio = min(ratio, 0.1)  # collapsed: back off tenfold
        factor = min(10.0, max(0.1, ratio ** (1 / ELASTICITY)))
        return min(ALPHA_MAX, max(ALPHA_MIN, last.l1_alpha * factor))
    lo = max(dense, key=lambda p: p.l1_alpha)  # strongest penalty still too dense
    hi = min(sparse, key=lambda p: p.l1_alpha)  # weakest penalty already too sparse
    a_lo, a_hi = math.log(lo.l1_alpha), math.log(hi.l1_alpha)
    y_lo, y_hi = math.log(max(lo.expected, 1e-6)), math.log(max(hi.expected, 1e-6))
    guess = (a_lo + a_hi) / 2
    if y_lo != y_hi:
        guess = a_lo + (math.log(target) - y_lo) * (a_hi - a_lo) / (y_hi - y_lo)
    # Stay clearly inside the bracket so each pilot shrinks it.
    margin = 0.1 * (a_hi - a_lo)
    guess = min(a_hi - margin, max(a_lo + margin, guess))
    return math.exp(guess)


def tune_l1_alpha(source: ActivationSource, *, latent_dim: int, target: float, start: float,
                  learning_rate: float = 1e-3, batch_size: int = 256, pilot_steps: int = 400,
                  max_pilots: int = 8, tolerance: float = 0.2, seed: int = 0, device: str = "auto",
                  project: Callable[[float, float], float] | None = None,
                  on_pilot: Callable[[Pilot, int], None] | None = None,
                  should_stop: Callable[[], str | None] | None = None) -> tuple[Pilot | None, list[Pilot], str]:
    """Run pilots until one is expected to land within ``tolerance`` of ``target``.

    ``project(l1_alpha, pilot_l0)`` gives the L0 the full run would end at; without it the
    pilots are taken at their word.

    Returns ``(best pilot, all pilots, outcome)`` where outcome is "found", "exhausted"
    (``max_pilots`` run without landing; the best is the closest), "edge" (the search
    would repeat a pilot at the edge of the valid range) or the stop reason.
    """
    pilots: list[Pilot] = []
    alpha = min(ALPHA_MAX, max(ALPHA_MIN, start))
    warmup = max(1, pilot_steps // 10)
    for i in range(max_pilots):
        cfg = TrainConfig(latent_dim=latent_dim, l1_alpha=alpha, learning_rate=learning_rate,
                          batch_size=batch_size, total_steps=pilot_steps, lr_warmup_steps=warmup,
                          l1_warmup_steps=warmup, log_every=max(1, pilot_steps // 4), seed=seed,
                          eval_tokens=8192, device=device)
        result, _ = train(source, cfg, should_stop=should_stop)
        if result.status == "stopped":
            return _closest(pilots, target), pilots, result.reason or "stopped"
        measured = result.eval["l0_fraction"]
        pilot = Pilot(alpha, measured, result.eval["fvu"], project(alpha, measured) if project else None)
        pilots.append(pilot)
        if on_pilot:
            on_pilot(pilot, i)
        if abs(pilot.expected / target - 1) <= tolerance and pilot.fvu <= COLLAPSED_FVU:
            return pilot, pilots, "found"
        alpha = next_alpha(pilots, target)
        if any(abs(math.log(alpha / p.l1_alpha)) < 0.01 for p in pilots):
            return _closest(pilots, target), pilots, "edge"
    return _closest(pilots, target), pilots, "exhausted"


def _closest(pilots: list[Pilot], target: float) -> Pilot | None:
    """The pilot nearest the target among those that still reconstruct."""
    usable = [p for p in pilots if p.fvu <= COLLAPSED_FVU] or pilots
    if not usable:
        return None
    return min(usable, key=lambda p: abs(math.log(max(p.expected, 1e-9) / target)))
