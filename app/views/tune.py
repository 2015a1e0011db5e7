"""Auto-tune: find l1_alpha for a target L0 with pilot trainings in the worker (htmx fragments)."""
from __future__ import annotations

import math

from flask import Blueprint, current_app, g, render_template

from .. import charts, training_config
from ..auth import require_change
from ..forms import TrainingForm
from ..models import TuneJob
from ..sae import architectures
from ..training_config import BY_NAME
from ..work import lifecycle
from ..work.queue import QueueUnavailable
from ..work.resources import TooLarge, check_submission, tune_bytes
from ..work.tune import create_tune, pilot_plan
from .records import get_or_404

bp = Blueprint("tune", __name__, url_prefix="/tunes")

# The form's other fields an auto-tune reads: the seed, and the run it aims at (steps, batch).
OPTIONAL = ("seed", "total_steps", "batch_size")


def tune_context(tune: TuneJob) -> dict:
    pts = [(math.log10(p["l1_alpha"]), p["l0_fraction"]) for p in tune.pilots or []]
    projected = [(math.log10(p["l1_alpha"]), p["projected"]) for p in tune.pilots or [] if p.get("projected")]
    chart = charts.line_chart(
        "Pilots: L0 fraction against l1_alpha", [
            charts.Series("pilot's own L0", sorted(pts), "#2563eb"),
            *([charts.Series(f"expected after {tune.run_steps:,} steps", sorted(projected), "#16a34a")]
              if projected and tune.run_steps else []),
            charts.Series("target", [(min(x for x, _ in pts) - 0.1, tune.target_l0),
                                     (max(x for x, _ in pts) + 0.1, tune.target_l0)], "#555", dashed=True),
        ], log_y=True, x_label="log10 l1_alpha", width=420, height=200) if pts else None
    return {"tune": tune, "chart": chart}


@bp.post("/")
def start():
    """Start an auto-tune for the form's source, latent_dim, target L0 and learning rate."""
    form = TrainingForm()
    form.validate_fields()
    needed = ("source_id", "latent_dim", "target_l0")
    problems = {n: getattr(form, n).errors for n in needed if getattr(form, n).errors}
    for name in OPTIONAL:  # left empty, each takes its default; given, it must be in range
        field = getattr(form, name)
        if field.errors and field.raw_data and str(field.raw_data[0]).strip():
            problems[name] = field.errors
    pilot = architectures.get(training_config.BY_NAME["architecture"].default)  # what sae/tune.py's pilots train
    if form.architecture.data != pilot.name:
        problems["architecture"] = [f"Auto-tune searches l1_alpha with short pilot runs of the architecture the L0 "
                                    f"model is fitted on, so only {pilot.title[0].lower() + pilot.title[1:]} can be "
                                    "tuned: the k-set architectures have L0 = k, one trained to the target L0 needs "
                                    "no search, and steering finds another penalty-set one's l1_alpha."]
    source = form.sources.get(form.source_id.data)
    if not problems and source is not None:
        try:
            batch = pilot_plan(None, form.batch_size.data if not form.batch_size.errors else None)[1]
            check_submission(current_app.config, tune_bytes(source.d_in, form.latent_dim.data, batch),
                             "An auto-tune pilot", "Lower latent_dim.")
        except TooLarge as exc:
            problems["latent_dim"] = [str(exc)]
    if problems:
        return render_template("_partials/tune.html", tune=None, problems=problems), 422
    try:
        tune = create_tune(current_app.config, created_by=g.user.id, source_id=form.source_id.data, latent_dim=form.latent_dim.data,
                           target_l0=form.target_l0.data, seed=form.seed.data if not form.seed.errors and form.seed.data is not None
                           else BY_NAME["seed"].default,
                           run_steps=form.total_steps.data if not form.total_steps.errors else None,
                           run_batch=form.batch_size.data if not form.batch_size.errors else None)
    except QueueUnavailable as exc:
        return render_template("_partials/tune.html", tune=None,
                               problems={"queue": [f"Not started: {exc}."]}), 503
    return render_template("_partials/tune.html", **tune_context(tune))


def get_tune_or_404(tune_id: int) -> TuneJob:
    return get_or_404(TuneJob, tune_id, "auto-tune")


@bp.get("/<int:tune_id>")
def show(tune_id: int):
    return render_template("_partials/tune.html", **tune_context(get_tune_or_404(tune_id)))


@bp.post("/<int:tune_id>/cancel")
def cancel(tune_id: int):
    tune = get_tune_or_404(tune_id)
    require_change(tune)
    lifecycle.request_cancel(tune)
    return render_template("_partials/tune.html", **tune_context(TuneJob.get_by_id(tune.id)))
