"""Grading, runtime rules and the post-training verdict: is this run sparse, and is it going wrong?

Pure functions and small classes over plain numbers; no Flask, no database, no torch.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from . import advice as _advice
from .findings import Finding
from .sae import architectures
from .training_config import DEFAULT_L1_ALPHA, L1_ALPHA_MAX, L1_ALPHA_MIN_EXCLUSIVE, defaults, target_l0_count

GREEN_BELOW = 0.05
OFF_TARGET = 1.5  # a run that ends further than this factor from its target says so
RED_ABOVE = 0.15
DEAD_RED_FRACTION = 0.5
DENSE_WARNING_ABOVE = 0.20
_CONFIG_DEFAULTS = defaults()  # RunSpec's settings left out: the configuration's defaults

GRADE_LABELS = {
    "green": "Sparse",
    "yellow": "Borderline",
    "red": "Dense",
    None: "No data yet",
}
DEAD_LABEL = "Dead latents"  # red for the other reason: say which


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


def grade_label(l0_fraction: float | None, dead: int | None, latent_dim: int) -> str:
    """The badge's word: which problem a red grade is ("Dense" or "Dead latents"), or the grade's name."""
    g = grade(l0_fraction, dead, latent_dim)
    if g == "red" and dead is not None and dead > DEAD_RED_FRACTION * latent_dim:
        return DEAD_LABEL
    return GRADE_LABELS[g]


def format_l0(l0: float, latent_dim: int) -> str:
    """"L0 = 4,096 of 8,192 latents (50.0%)": the count and the fraction, always both."""
    return f"L0 = {l0:,.0f} of {latent_dim:,} latents ({100 * l0 / latent_dim:.1f}%)"


def format_target(target_fraction: float, latent_dim: int) -> str:
    return f"target {100 * target_fraction:.1f}% ({target_l0_count(target_fraction, latent_dim):,.0f} latents)"


def clamp_l1_alpha(value: float) -> float:
    """Bring a suggestion inside the valid range (1e-5, 0.1]."""
    return min(L1_ALPHA_MAX, max(value, 2 * L1_ALPHA_MIN_EXCLUSIVE))


def suggest_l1_alpha(current: float, observed_fraction: float, target_fraction: float,
                     recommended: float | None = None) -> float:
    """A next l1_alpha that moves L0 toward the target.

    Raising l1_alpha lowers L0 roughly in proportion over the useful range (the calibration
    sweep), so scale the penalty by observed/target, at most tenfold per suggestion. A run
    more than 10× too dense is pointed at least at the L0 model's ``recommended`` value
    (the default 0.003 when none is known): a penalty that weak was never in the running.
    """
    floor = recommended or DEFAULT_L1_ALPHA
    if current <= 0:
        return clamp_l1_alpha(floor)
    ratio = observed_fraction / max(target_fraction, 1e-9)
    suggestion = current * min(10.0, max(0.1, ratio))
    if ratio > 10:
        suggestion = max(suggestion, floor)
    return clamp_l1_alpha(suggestion)


@dataclass
class RunSpec:
    """What the rules need to know about the run; a setting left out takes its default from
    ``app.training_config`` (the form's and the API's)."""

    architecture: str
    latent_dim: int
    target_l0: float
    warmup_steps: int
    l1_warmup_steps: int = _CONFIG_DEFAULTS["l1_warmup_steps"]
    early_stop: bool = _CONFIG_DEFAULTS["early_stop"]
    early_stop_step: int = _CONFIG_DEFAULTS["early_stop_step"]
    early_stop_l0: float = _CONFIG_DEFAULTS["early_stop_l0"]
    plateau_window: int = _CONFIG_DEFAULTS["plateau_window"]
    steering: bool = _CONFIG_DEFAULTS["steer_l1_alpha"]
    recommended_l1_alpha: float | None = None  # the L0 model's value for this run, if known
    d_in: int | None = None  # with total_steps: lets advice project L0 to the end of the run
    total_steps: int | None = None
    batch_size: int = _CONFIG_DEFAULTS["batch_size"]
    l0_offset: float = 0.0  # the source's shift from the L0 model, learned from its earlier runs

    @classmethod
    def of_run(cls, run, recommended_l1_alpha: float | None = None, d_in: int | None = None,
               l0_offset: float = 0.0) -> RunSpec:
        """The spec of a stored run (anything with the training config's attributes)."""
        return cls(architecture=run.architecture, latent_dim=run.latent_dim, target_l0=run.target_l0,
                   warmup_steps=max(run.l1_warmup_steps, run.lr_warmup_steps), l1_warmup_steps=run.l1_warmup_steps,
                   early_stop=run.early_stop, early_stop_step=run.early_stop_step, early_stop_l0=run.early_stop_l0,
                   plateau_window=run.plateau_window, steering=run.steer_l1_alpha,
                   recommended_l1_alpha=recommended_l1_alpha, d_in=d_in, total_steps=run.total_steps,
                   batch_size=run.batch_size, l0_offset=l0_offset)

    @property
    def arch(self) -> architectures.Architecture:
        return architectures.get(self.architecture)

    @property
    def by_penalty(self) -> bool:
        """Its sparsity is set by l1_alpha: the penalty's rules (dense, off target, early stop) apply."""
        return self.arch.by_penalty

    def known(self) -> _advice.Known | None:
        """What the L0 model needs to project this run (None: no model for it, or no shape)."""
        if self.d_in is None or not self.total_steps or not self.arch.l0_model:
            return None
        return _advice.Known(self.d_in, self.latent_dim, self.target_l0, self.total_steps, self.batch_size,
                            self.l0_offset)

    def advise(self, l1_alpha: float, l0_now: float, step: int, before=None) -> _advice.Advice:
        """``_advice.suggest`` for this run at ``step`` (``before``: an earlier point, for the trend)."""
        known = self.known()
        if known is None:  # no shape to project with: the ratio of what was measured to the target
            return _advice.Advice(suggest_l1_alpha(l1_alpha, l0_now, self.target_l0, self.recommended_l1_alpha),
                                 l0_now, why="ratio")
        trend = (before.step, before.l0_fraction) if before is not None else None
        return _advice.suggest(known, _advice.Observation(l1_alpha, l0_now, step, self.l1_warmup_steps, trend))

    def l1_fix(self, l1_alpha: float, l0_now: float, step: int) -> tuple[float, float]:
        """(the L0 expected at the end of the run, the l1_alpha that ends it at the target).

        L0 keeps falling while the penalty acts: the L0 model carries what a run measures at
        ``step`` to its last step before the correction is read off, so advice given a
        tenth of the way in is not the advice for a run that has ended.
        """
        got = self.advise(l1_alpha, l0_now, max(step, self.l1_warmup_steps))
        return got.expected, got.l1_alpha


@dataclass
class History:
    """The points seen after the warm-ups, and running facts about them."""

    points: deque = field(default_factory=lambda: deque(maxlen=64))
    best_loss: float = math.inf
    best_loss_step: int = 0
    min_loss: float = math.inf
    early_stop_checked: bool = False

    def ago(self, n: int):
        """The point ``n`` log points before the latest (None if there are not that many)."""
        return self.points[-1 - n] if len(self.points) > n else None


Rule = Callable[[RunSpec, History, object], "Finding | None"]
RULES: list[tuple[str, Rule]] = []
TREND_POINTS = 5  # log points over which a trend is judged


def rule(code: str):
    """Register a runtime rule under ``code``. A rule sees the spec, the history and the new point."""

    def register(fn: Rule) -> Rule:
        RULES.append((code, fn))
        return fn

    return register


@rule("dense")
def dense_rule(spec: RunSpec, history: History, point) -> Finding | None:
    """L0 above 0.20 and no longer falling fast (right after warm-up it is still dropping)."""
    if not spec.by_penalty or point.l0_fraction <= DENSE_WARNING_ABOVE:
        return None
    before = history.ago(TREND_POINTS)
    if before is None or point.l0_fraction < 0.9 * before.l0_fraction:
        return None
    got = spec.advise(point.l1_alpha, point.l0_fraction, point.step, before)
    if got.wait or got.l1_alpha is None:
        return None
    suggestion = got.l1_alpha
    return Finding(
        "warning", "dense",
        f"Features are dense: {format_l0(point.l0, spec.latent_dim)}, {format_target(spec.target_l0, spec.latent_dim)}.",
        f"Increase l1_alpha (the sparsity penalty) from {point.l1_alpha:.3g} to about {suggestion:.3g}.")


def settled_ratio(spec: RunSpec, history: History, point, *, drift: float) -> float | None:
    """L0 over its target, once L0 has moved less than ``drift``× over the last few points (else None)."""
    before = history.ago(TREND_POINTS)
    if before is None or before.l0_fraction <= 0:
        return None
    if abs(math.log(max(point.l0_fraction, 1e-9) / before.l0_fraction)) >= math.log(drift):
        return None
    return point.l0_fraction / spec.target_l0


@rule("off_target")
def off_target_rule(spec: RunSpec, history: History, point) -> Finding | None:
    """L0 more than 3× or less than ⅓ of the target, once it has settled and is projected to end there.

    Trend-aware through ``_advice.suggest``: while L0 still falls toward the target faster than the
    model expects of a settling run, it waits; then it carries L0 to the run's end before it speaks.
    """
    if not spec.by_penalty or spec.steering:
        return None
    ratio = settled_ratio(spec, history, point, drift=1.25)
    if ratio is None or 1 / 3 <= ratio <= 3 or point.l0_fraction > DENSE_WARNING_ABOVE:
        return None  # above 20% the dense rule has already said it
    got = spec.advise(point.l1_alpha, point.l0_fraction, point.step, history.ago(TREND_POINTS))
    if got.wait or got.l1_alpha is None:
        return None  # still moving toward the target faster than a settling run: wait for it
    projected, suggestion = got.expected, got.l1_alpha
    if 1 / 3 <= projected / spec.target_l0 <= 3:
        return None  # on course: it is expected to end within 3× of the target
    if (suggestion > point.l1_alpha) != (ratio > 3):
        return None  # the projection says the run will cross the target: no move to advise
    move, size = ("Increase", f"{ratio:.1f}×") if ratio > 3 else ("Lower", f"only {ratio:.2f}×")
    return Finding("warning", "off_target",
                   f"L0 is {size} the target: {format_l0(point.l0, spec.latent_dim)}, "
                   f"{format_target(spec.target_l0, spec.latent_dim)}.",
                   f"{move} l1_alpha from {point.l1_alpha:.3g} to about {suggestion:.3g}, or switch on 'steer l1_alpha'.")


@rule("jumprelu_off_target")  # the code predates the registry; checkpoints' monitor state is keyed by it
def trained_off_target_rule(spec: RunSpec, history: History, point) -> Finding | None:
    """An architecture trained to the target L0 itself (JumpReLU): L0 settled more than 1.5× away
    from it means its penalty lost."""
    if spec.arch.sparsity_set_by != architectures.TARGET:
        return None
    ratio = settled_ratio(spec, history, point, drift=1.1)
    if ratio is None or 1 / 1.5 <= ratio <= 1.5:
        return None
    return Finding("warning", "off_target",
                   f"L0 has settled {ratio:.2f}× the target: {format_l0(point.l0, spec.latent_dim)}, "
                   f"{format_target(spec.target_l0, spec.latent_dim)}.",
                   "Raise the L0 penalty weight (l0_coefficient) tenfold, or lower the learning rate.")


@rule("dead")
def dead_rule(spec: RunSpec, history: History, point) -> Finding | None:
    """More than half the latents dead, with the trend."""
    if point.dead is None or point.dead <= DEAD_RED_FRACTION * spec.latent_dim:
        return None
    before = history.ago(TREND_POINTS)
    trend = ""
    if before is not None and before.dead is not None:
        change = point.dead - before.dead
        trend = (f", up {change:,} in the last {point.step - before.step:,} steps" if change > 0 else
                 f", down {-change:,} in the last {point.step - before.step:,} steps" if change < 0 else ", steady")
    tip = spec.arch.dead_advice
    share = point.dead / spec.latent_dim
    return Finding("warning", "dead", f"{point.dead:,} of {spec.latent_dim:,} latents ({share:.0%}) are dead{trend}.", tip)


@rule("race_to_zero")
def race_to_zero_rule(spec: RunSpec, history: History, point) -> Finding | None:
    """L0 collapsing toward 0 while the reconstruction gets worse: the penalty wins."""
    before = history.ago(TREND_POINTS)
    if not spec.by_penalty or before is None or before.l0_fraction <= 0:
        return None
    collapsing = point.l0_fraction < 0.5 * before.l0_fraction and point.l0_fraction < spec.target_l0
    worse = point.fvu > 1.1 * before.fvu and point.fvu > 0.05
    if not (collapsing and worse):
        return None
    suggestion = backed_off(spec.known(), point.l1_alpha, point.l1_alpha / 3)
    change = (f"lower l1_alpha from {point.l1_alpha:.3g} to about {suggestion:.3g}." if suggestion is not None
              else f"lower l1_alpha from {point.l1_alpha:.3g}, or switch on 'steer l1_alpha'.")
    return Finding("warning", "race_to_zero",
                   f"L0 is collapsing ({100 * before.l0_fraction:.2f}% → {100 * point.l0_fraction:.2f}% of latents) "
                   f"while the unexplained variance rises ({before.fvu:.3f} → {point.fvu:.3f}).",
                   f"The sparsity penalty is too strong: {change}")


def backed_off(known: _advice.Known | None, l1_alpha: float, value: float) -> float | None:
    """A lower l1_alpha chosen by a rule of its own (race to zero, dead latents), kept inside the valid
    range and, where the run's shape is known, inside the form's window (``_advice.clamp``), so the form
    does not warn about the value the app names. None when what is left is not below ``l1_alpha`` (a
    penalty the L0 model already calls weak for this source, or the valid range's floor): no value the
    form accepts is a step down, so none is named.
    """
    value = clamp_l1_alpha(value)
    if known is not None:  # without the run's shape the valid range is all that is known
        value = _advice.clamp(known, value)
    return value if float(f"{value:.3g}") < l1_alpha else None


@rule("exploding")
def exploding_rule(spec: RunSpec, history: History, point) -> Finding | None:
    """The optimizer has diverged: stops the run.

    In normalized space reconstructing every token as 0 costs an MSE term of 1, so an MSE
    above 2 that is also 10× the best loss is divergence, not a penalty being raised.
    """
    if not math.isfinite(history.min_loss) or point.mse <= 2.0 or point.loss <= 10 * history.min_loss:
        return None
    return Finding("error", "exploding",
                   f"The loss exploded to {point.loss:.3g}, more than 10× its best ({history.min_loss:.3g}), "
                   f"and reconstructs worse than predicting zero (MSE term {point.mse:.3g}).",
                   "Lower the learning rate (for example by 3×) and restart.", stop="failed")


@rule("plateau")
def plateau_rule(spec: RunSpec, history: History, point) -> Finding | None:
    """No improvement of the loss over the plateau window."""
    if spec.steering or point.step - history.best_loss_step < spec.plateau_window:
        return None
    return Finding("info", "plateau",
                   f"The loss has not improved for {point.step - history.best_loss_step:,} steps "
                   f"(best {history.best_loss:.4g} at step {history.best_loss_step:,}).",
                   "More steps will not help at this learning rate: stop here, or lower the learning rate.")


@rule("early_stop")
def early_stop_rule(spec: RunSpec, history: History, point) -> Finding | None:
    """Still dense at the check step: stop now rather than spend the rest of the budget."""
    check_at = max(spec.early_stop_step, spec.l1_warmup_steps)
    if (not spec.early_stop or not spec.by_penalty or history.early_stop_checked
            or point.step < check_at):
        return None
    history.early_stop_checked = True
    if point.l0_fraction <= spec.early_stop_l0:
        return None
    _, suggestion = spec.l1_fix(point.l1_alpha, point.l0_fraction, point.step)
    return Finding("error", "early_stop",
                   f"Stopped early at step {point.step:,}: still dense, {format_l0(point.l0, spec.latent_dim)} "
                   f"(threshold {100 * spec.early_stop_l0:.0f}%).",
                   f"Restart with l1_alpha about {suggestion:.3g} (now {point.l1_alpha:.3g}) and steering on.",
                   stop="stopped_early")


class RuntimeMonitor:
    """Applies the registered rules to each logged point once the warm-ups are over.

    A rule that fired is silent for ``repeat_every`` steps, so the event list stays
    readable on a long run; a finding that stops the run is never held back.
    """

    def __init__(self, spec: RunSpec, *, repeat_every: int = 1000) -> None:
        self.spec, self.repeat_every = spec, repeat_every
        self.history = History()
        self._last_fired: dict[str, int] = {}
        self.stop: Finding | None = None

    def state_dict(self) -> dict:
        """What the rules remember, as plain values (kept in a training's checkpoint)."""
        h = self.history
        return {"points": [dict(vars(p)) for p in h.points], "best_loss": h.best_loss,
                "best_loss_step": h.best_loss_step, "min_loss": h.min_loss,
                "early_stop_checked": h.early_stop_checked, "last_fired": dict(self._last_fired)}

    def load_state_dict(self, state: dict) -> None:
        from types import SimpleNamespace

        h = self.history
        h.points.clear()
        h.points.extend(SimpleNamespace(**p) for p in state["points"])
        h.best_loss, h.best_loss_step = float(state["best_loss"]), int(state["best_loss_step"])
        h.min_loss, h.early_stop_checked = float(state["min_loss"]), bool(state["early_stop_checked"])
        self._last_fired = {str(k): int(v) for k, v in state["last_fired"].items()}

    def observe(self, point) -> list[Finding]:
        """Record ``point``; return the findings to report now."""
        if point.step <= self.spec.warmup_steps:
            return []
        h = self.history
        h.points.append(point)
        h.min_loss = min(h.min_loss, point.loss)
        if point.loss < h.best_loss * (1 - 1e-3):
            h.best_loss, h.best_loss_step = point.loss, point.step
        findings = []
        for code, check in RULES:
            finding = check(self.spec, h, point)
            if finding is None:
                continue
            last = self._last_fired.get(code)
            if finding.stop or last is None or point.step - last >= self.repeat_every:
                self._last_fired[code] = point.step
                findings.append(finding)
            if finding.stop and self.stop is None:
                self.stop = finding
        return findings


def density_histogram(frequencies, *, low: float = -6.0, high: float = 0.0, width: float = 0.25) -> dict:
    """Counts of latents by log10 firing frequency; latents that never fired are counted apart."""
    n_bins = int(round((high - low) / width))
    counts = [0] * n_bins
    never = 0
    for f in frequencies:
        if f <= 0:
            never += 1
            continue
        i = int((math.log10(f) - low) / width)
        counts[min(max(i, 0), n_bins - 1)] += 1
    return {"low": low, "width": width, "counts": counts, "never_fired": never}


@dataclass
class RunProgress:
    """How far a run got and what it was set to: what advice computed from it must account for."""

    steps_done: int
    total_steps: int
    warmup_steps: int = 0  # the warm-up the architecture waits out (Architecture.warmup)
    d_in: int | None = None
    batch_size: int = 1024
    l0_offset: float = 0.0  # the source's shift from the L0 model, learned from its earlier runs

    def known(self, latent_dim: int, target_l0: float, arch: architectures.Architecture | None = None
              ) -> _advice.Known | None:
        if not self.d_in or (arch is not None and not arch.l0_model):
            return None
        return _advice.Known(self.d_in, latent_dim, target_l0, self.total_steps, self.batch_size, self.l0_offset)

    @property
    def in_warmup(self) -> bool:
        return self.steps_done < self.warmup_steps

    @property
    def finished(self) -> bool:
        return self.steps_done >= self.total_steps


def verdict(summary: dict, *, architecture: str, latent_dim: int, target_l0: float,
            l1_alpha: float | None, recommended: float | None = None, progress: RunProgress | None = None) -> dict:
    """The grade, a plain-language headline and the one change most likely to improve the run.

    ``l1_alpha`` is the penalty in force at the end (the steered value, or the configured one
    once the warm-up is over). With ``progress`` the advice accounts for a run that stopped
    short: inside its warm-up nothing about the penalty can be judged yet; after it, L0 is
    carried to the run's last step by the L0 model before a correction is suggested.
    """
    l0f, fvu, dead = summary["l0_fraction"], summary["fvu"], summary.get("dead")
    g = grade(l0f, dead, latent_dim)
    ev = f"{100 * (1 - fvu):.1f}% of the variance explained"
    l0_text = format_l0(summary["l0"], latent_dim)
    target_k = max(1, round(target_l0_count(target_l0, latent_dim)))
    arch = architectures.get(architecture)
    penalty = arch.by_penalty

    if progress is not None and progress.in_warmup:
        what = arch.warmup
        return {"grade": None, "suggested_l1_alpha": None,
                "headline": (f"Stopped inside its {what} warm-up, at step {progress.steps_done:,} of "
                             f"{progress.warmup_steps:,}: {l0_text}, but "
                             + ("the penalty was not yet at full strength, so " if arch.warmup == "sparsity" else "")
                             + "this says nothing yet about where the run would settle."),
                "advice": "Resume it or run it longer: no setting can be judged from a run this short."}

    known = progress.known(latent_dim, target_l0, arch) if progress is not None else None
    expected, expected_note, got = l0f, "", None
    if penalty and l1_alpha:
        if known is not None:  # one source of advice: the run's evidence, the source's shift, the form's window
            got = _advice.suggest(known, _advice.Observation(l1_alpha, l0f, progress.steps_done))
            expected = got.expected if got.expected is not None else l0f
        if known is not None and not progress.finished:
            expected_note = (f" It stopped at step {progress.steps_done:,} of {progress.total_steps:,}; at this "
                             f"l1_alpha the L0 model expects it to end near {100 * expected:.2g}%.")

    def corrected() -> float | None:
        if not (penalty and l1_alpha):
            return None
        if got is not None:
            return got.l1_alpha
        return suggest_l1_alpha(l1_alpha, expected, target_l0, recommended)

    suggested = corrected()
    off = expected / target_l0 if target_l0 else 1.0
    off_text = (f"{off:.1f}× the target" if off > 1 else f"{1 / off:.1f}× below the target") if off > 0 else ""

    def sparser() -> str:
        if penalty:
            return (f"Increase l1_alpha from {l1_alpha:.3g} to about {suggested:.3g}." if l1_alpha and suggested
                    else "Increase l1_alpha (the sparsity penalty).")
        return arch.advise_sparser(target_k=target_k, target_l0=target_l0, l0_fraction=l0f)

    def denser() -> str:
        if penalty:
            return (f"Lower l1_alpha from {l1_alpha:.3g} to about {suggested:.3g}." if l1_alpha and suggested
                    else "Lower l1_alpha (the sparsity penalty).")
        return arch.advise_denser(target_k=target_k)

    keep_suggestion = True
    if dead is not None and dead > DEAD_RED_FRACTION * latent_dim:
        headline = f"Dead latents: more than half the latents are dead ({dead:,} of {latent_dim:,}); {l0_text}."
        if penalty and l1_alpha:
            suggested = backed_off(known, l1_alpha, min(suggested or l1_alpha, l1_alpha / 3))
        remedy = " and switch on the dead-latent remedy" if arch.resample else ""
        advice = (f"Lower l1_alpha to about {suggested:.3g}{remedy}." if penalty and l1_alpha and suggested
                  else f"Lower l1_alpha{remedy}." if penalty else arch.dead_advice)
    elif expected > RED_ABOVE:
        headline = f"Dense: {l0_text}, {ev}. These features are unlikely to be interpretable.{expected_note}"
        advice = sparser()
    elif expected < target_l0 / 3 and fvu > 0.3:
        headline = (f"Over-sparse: {l0_text} with only {ev}; the penalty is crushing the reconstruction."
                    f"{expected_note}")
        advice = denser()
    elif off > OFF_TARGET or (0 < off < 1 / OFF_TARGET):
        where = "is expected to end" if expected_note else "ended"
        label = "Borderline" if grade(expected, dead, latent_dim) == "yellow" else "Sparse"
        headline = f"{label} but off target: {l0_text}, {ev}; it {where} {off_text}.{expected_note}"
        advice = sparser() if off > 1 else denser()
    elif g == "yellow" or grade(expected, dead, latent_dim) == "yellow":
        headline = f"Borderline: {l0_text}, {ev}. Sparse enough to browse, denser than most useful SAEs.{expected_note}"
        advice = sparser()
    else:
        keep_suggestion = False
        headline = f"Sparse: {l0_text}, {ev}; on target.{expected_note}"
        if progress is not None and not progress.finished:
            advice = "Resume it: it is on course for its target."
        elif fvu > 0.2:
            advice = "Reconstruction is weak: train for more steps or add latents."
        elif summary.get("dense_latents", 0) > 0.01 * latent_dim:
            advice = (f"{summary['dense_latents']:,} latents fire on more than 10% of tokens: "
                      "a little more l1_alpha may split them.")
        else:
            advice = "Nothing pressing: inspect the features."
    return {"grade": g, "headline": headline, "advice": advice,
            "suggested_l1_alpha": suggested if keep_suggestion else None}
