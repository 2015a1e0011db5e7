"""Auto-tune: pilot trainings that search l1_alpha for a target L0 (create, run, finish)."""
from __future__ import annotations

from ..models import TuneJob
from . import lifecycle
from .resources import check_memory, tune_bytes

PILOT_STEPS = 400  # the shortest pilot
PILOT_STEPS_MAX = 2500
PILOT_BATCH = 256  # when the run's batch is not known
# Pilots are short, so they train at the step size that converges in 400 steps: the L0 a
# penalty gives at convergence hardly depends on the learning rate, only how fast it gets there.
PILOT_LEARNING_RATE = 1e-3


def pilot_plan(run_steps: int | None, run_batch: int | None) -> tuple[int, int]:
    """(steps, batch) of each pilot for a run of ``run_steps`` × ``run_batch``.

    A pilot stands in for the run: it takes the run's batch, and a quarter of its steps
    (400 to 2,500), so that the L0 model carries it over a short distance only. Measured on
    the default source: pilots of 400 × 256 carried to a run of 3,000 × 1,024 (a factor of
    about 9 in L0) ended 1.5× below the target; a quarter of the run at its batch lands.
    """
    batch = run_batch or PILOT_BATCH
    steps = max(PILOT_STEPS, min((run_steps or PILOT_STEPS) // 4, PILOT_STEPS_MAX))
    return steps, batch


def create_tune(settings: dict, *, source_id: int, latent_dim: int, target_l0: float, seed: int,
                run_steps: int | None = None, run_batch: int | None = None, created_by: int | None = None) -> TuneJob:
    """Record an auto-tune for a run of ``run_steps`` × ``run_batch`` and queue it (``QueueUnavailable`` if it
    can't be)."""
    pilot_steps, pilot_batch = pilot_plan(run_steps, run_batch)
    return lifecycle.create_and_enqueue(TuneJob, {
        "created_by": created_by, "source": source_id, "latent_dim": latent_dim, "target_l0": target_l0,
        "learning_rate": PILOT_LEARNING_RATE, "batch_size": pilot_batch, "pilot_steps": pilot_steps, "seed": seed,
        "run_steps": run_steps or pilot_steps, "run_batch": run_batch or pilot_batch}, settings)


def run_tune(tune_id: int) -> str:
    """Run an auto-tune's pilots, recording each on the row as it finishes."""
    return lifecycle.run_job(TuneJob, tune_id, _tune)


def _tune(tune: TuneJob, settings: dict, stop_check: lifecycle.StopCheck) -> str:
    from .. import l0_model
    from ..sae.tune import tune_l1_alpha
    from ..validation import recommended_l1_alpha
    from .training import build_source

    source = build_source(tune.source, settings["DATA_DIR"], settings)
    if getattr(source, "hooks", None):  # a streamed source: the pilots read its first hook point
        source = source.view(source.hooks[0])
    check_memory(settings, tune_bytes(source.d_in, tune.latent_dim, tune.batch_size), "An auto-tune pilot",
                 "Lower latent_dim.")
    pilots: list[dict] = []

    def on_pilot(pilot, index: int) -> None:
        pilots.append(pilot.to_dict())
        lifecycle.fenced_update(tune, what="pilot", pilots=pilots)

    run_steps, run_batch = tune.run_steps or tune.pilot_steps, tune.run_batch or tune.batch_size

    def project(alpha: float, pilot_l0: float) -> float:
        """The pilot's L0 carried to the run's steps and batch by the L0 model."""
        return pilot_l0 * l0_model.progress_ratio(alpha, source.d_in, tune.latent_dim,
                                                  (tune.pilot_steps, tune.batch_size), (run_steps, run_batch))

    best, _, outcome = tune_l1_alpha(
        source, latent_dim=tune.latent_dim, target=tune.target_l0, project=project,
        start=recommended_l1_alpha(source.d_in, tune.latent_dim, tune.target_l0, run_steps, run_batch,
                                   tune.source.stats().l0_offset),
        learning_rate=tune.learning_rate, batch_size=tune.batch_size, pilot_steps=tune.pilot_steps,
        max_pilots=tune.max_pilots, seed=tune.seed, device=settings["SAE_DEVICE"],
        on_pilot=on_pilot, should_stop=stop_check)
    if stop_check.interrupted:
        lifecycle.finish(tune, "interrupted", reason=f"{stop_check.interrupted} Start the auto-tune again.")
    elif outcome == "found":
        lifecycle.finish(tune, "completed", result_l1_alpha=best.l1_alpha)
    elif outcome in ("exhausted", "edge"):
        why = (f"in {tune.max_pilots} pilots" if outcome == "exhausted"
               else "before reaching the edge of the valid range")
        reason = (f"No pilot was expected to land within ±20% of the target {why}; the closest, l1_alpha "
                  f"{best.l1_alpha:.3g}, measured L0 {100 * best.l0_fraction:.2f}% (FVU {best.fvu:.2f}) and is "
                  f"expected to end a run of {run_steps:,} steps of {run_batch:,} at {100 * best.expected:.2f}%.")
        lifecycle.finish(tune, "completed", result_l1_alpha=best.l1_alpha, reason=reason)
    else:
        lifecycle.finish(tune, "cancelled", reason=outcome)
    return lifecycle.ended_as(tune) or "superseded"


lifecycle.register(lifecycle.JobKind(TuneJob, "auto-tune", "app.work.tune.run_tune"))
