"""HTML pages and htmx fragments for trainings."""
from __future__ import annotations

from flask import Blueprint, abort, current_app, g, redirect, render_template, request, url_for

from .. import charts
from ..chart_series import KEYS as SERIES_KEYS, ChartSeries, from_points
from ..auth import require_change
from ..forms import TrainingForm
from ..models import Event, MetricPoint, Template, Training
from ..sae import architectures
from ..work import deletion, lifecycle
from ..work.queue import QueueUnavailable
from ..work.training import NotResumable, checkpoint_step, create_training, resume_training, sae_folder
from .formatting import progress_view
from .records import delete_flow, get_training_or_404, id_arg, id_args

bp = Blueprint("pages", __name__)


@bp.get("/")
def index():
    runs = list(Training.select().order_by(Training.id.desc()))
    rows = [(run, progress_view(run, run.latest_metric())) for run in runs]
    return render_template("index.html", rows=rows)


def render_training_form(form: TrainingForm, status: int = 200, *, source_run=None, template=None):
    templates = list(Template.select().order_by(Template.builtin.desc(), Template.d_in, Template.name))
    return render_template("training_form.html", form=form, source_run=source_run, template=template,
                           templates=templates), status


@bp.get("/trainings/new")
def new_training():
    """The form: blank with defaults, from a template (``?template=``) or from a run (``?from=``)."""
    form, source_run, template = TrainingForm(), None, None
    if id_arg("template") is not None:
        template = Template.get_or_none(Template.id == id_arg("template"))
        if template is not None:
            form = TrainingForm(data={k: v for k, v in template.config.items() if v is not None})
    if id_arg("from") is not None:
        source_run = Training.get_or_none(Training.id == id_arg("from"))
        if source_run is not None:
            data = {k: v for k, v in source_run.config_dict().items() if v is not None}
            suggested = request.args.get("l1_alpha", type=float)
            if suggested is not None:
                data["l1_alpha"] = suggested
                # "Restart with …": the L0 model's value starts the run near the target and steering
                # closes what the model misses on this source (a stopped dense run says little about
                # where a strong penalty lands; benchmarks/results/restart_advice.md)
                arch = architectures.find(data.get("architecture"))
                if request.args.get("steer") == "1" and arch is not None and arch.by_penalty:
                    data["steer_l1_alpha"] = True
            target = request.args.get("target_l0", type=float)
            if target is not None and 0 < target <= 1:
                # "Train at this L0" (the L0 finder): the target, and k with it where k sets the L0
                data["target_l0"] = target
                arch = architectures.find(data.get("architecture"))
                if arch is not None and arch.by_k and data.get("latent_dim"):
                    data["k"] = max(1, round(target * data["latent_dim"]))
            form = TrainingForm(data=data)
    if id_arg("source_id") is not None:
        form.source_id.data = id_arg("source_id")  # "Train an SAE on it" after an extraction
    form.first_render()
    return render_training_form(form, source_run=source_run, template=template)


@bp.post("/trainings")
def create():
    form = TrainingForm()
    if not form.validate_on_submit():
        return render_training_form(form, 422)
    try:
        run = create_training({**form.training_fields(), "created_by": g.user.id}, current_app.config)
    except QueueUnavailable as exc:
        form.form_errors.append(f"Not started: {exc}. Nothing was created; try again once the queue is back.")
        return render_training_form(form, 503)
    return redirect(url_for("pages.detail", training_id=run.id), code=303)


@bp.post("/trainings/hints")
def form_hints():
    """Live help and the validator's findings beside the form's fields (htmx, on every change)."""
    form = TrainingForm()
    form.validate_fields()
    form.attach_findings(form.preflight(), with_errors=True)
    return render_template("_partials/form_hints.html", form=form, oob=True)


@bp.post("/trainings/recommend")
def recommend():
    """Fill the form with settings that work for the chosen source and latent_dim (htmx)."""
    from ..devices import device_memory
    from ..validation import recommend_settings

    form = TrainingForm()
    form.validate_fields()
    source = form.sources.get(form.source_id.data)
    latent_dim = form.latent_dim.data if not form.latent_dim.errors and form.latent_dim.data else None
    target = form.target_l0.data if not form.target_l0.errors and form.target_l0.data else None
    reasons = {}
    if source is not None and latent_dim and target and not form.architecture.errors:
        on_gpu = device_memory(current_app.config.get("SAE_DEVICE", "auto")).device.startswith("cuda")
        settings = recommend_settings(source.stats(), latent_dim=latent_dim,
                                      target_l0=target, architecture=form.architecture.data, on_gpu=on_gpu)
        for name, (value, why) in settings.items():
            field = getattr(form, name)
            field.data = value
            field.raw_data = [str(value)]
            reasons[name] = why
    for field in form:
        field.errors = []
        field.reason = reasons.get(field.name)
    form.validate_fields()  # errors for what the recommendation left invalid, not for what it replaced
    form.attach_findings(form.preflight())
    return render_template("_partials/training_form_body.html", form=form, recommended=bool(reasons))


@bp.get("/trainings/<int:training_id>")
def detail(training_id: int):
    run = get_training_or_404(training_id)
    return render_template("training_detail.html", run=run, **progress_context(run))


def chart_series(run: Training) -> ChartSeries:
    """The run's charted metrics: from its row (bounded, kept by the worker), or, for a run
    recorded before that, from its points."""
    if run.chart:
        return ChartSeries(state=run.chart)
    return from_points(run.metrics.select(MetricPoint.step, *(getattr(MetricPoint, k) for k in SERIES_KEYS))
                       .order_by(MetricPoint.step))


JOBS_SHOWN = 10  # feature jobs and downstream evaluations listed on a run's page


def progress_context(run: Training) -> dict:
    from ..forms import FeatureJobForm
    from ..models import RESUMABLE_STATUSES, DownstreamEval, FeatureJob
    from ..work.downstream import why_not

    features_job = run.feature_jobs.order_by(FeatureJob.id.desc()).first()
    feature_jobs = list(run.feature_jobs.order_by(FeatureJob.id.desc()).limit(JOBS_SHOWN))
    downstream_jobs = list(run.downstream_evals.order_by(DownstreamEval.id.desc()).limit(JOBS_SHOWN))
    ground_truth = (run.summary or {}).get("ground_truth")
    own = next((j for j in feature_jobs if j.on_run and j.status == "completed"), None)  # the run's, or its owner's
    if own is not None:
        ground_truth = (own.summary or {}).get("ground_truth", ground_truth)
    latest = run.latest_metric()
    series = chart_series(run)
    summary = run.summary or {}
    return {
        "latest": latest,
        "view": progress_view(run, latest),
        "verdict": summary.get("verdict"),
        "events": list(run.events.order_by(Event.id.desc()).limit(50)),
        "l0_chart": charts.l0_chart(series, run.target_l0, run.total_steps),
        "loss_chart": charts.loss_chart(series, run.total_steps),
        "l1_alpha_chart": charts.l1_alpha_chart(series, run.total_steps)
        if architectures.get(run.architecture).by_penalty else None,
        "histogram_chart": charts.histogram_chart(summary["density_histogram"])
        if summary.get("density_histogram") else None,
        "has_checkpoint": sae_folder(run, current_app.config) is not None, "features_job": features_job,
        "ground_truth": ground_truth,
        "downstream_job": downstream_jobs[0] if downstream_jobs else None,
        # other users' jobs on this run: their results stay on their own records, listed here by job
        "others_feature_jobs": [j for j in feature_jobs if not j.on_run],
        "others_downstream_jobs": [j for j in downstream_jobs if not j.on_run],
        "downstream": summary.get("downstream"), "downstream_why_not": why_not(run, current_app.config),
        "feature_form": FeatureJobForm(formdata=None),
        "checkpoint_step": checkpoint_step(run, current_app.config),
        "resumable": run.status in RESUMABLE_STATUSES and (
            run.status == "interrupted" or checkpoint_step(run, current_app.config) is not None),
    }


@bp.post("/trainings/<int:training_id>/downstream")
def start_downstream(training_id: int):
    from ..work.downstream import create_downstream, why_not

    run = get_training_or_404(training_id)
    if (reason := why_not(run, current_app.config)) is not None:
        abort(409, description=reason)
    try:
        create_downstream(current_app.config, run, created_by=g.user.id)
    except QueueUnavailable as exc:
        return render_template("error.html", title="Not started",
                               message=f"{exc}. Nothing was created; try again once the queue is back."), 503
    return redirect(url_for("pages.detail", training_id=run.id) + "#downstream", code=303)


@bp.get("/trainings/<int:training_id>/progress")
def progress(training_id: int):
    """The live fragment. Its polling trigger is left out once the run has ended."""
    run = get_training_or_404(training_id)
    return render_template("_partials/progress.html", run=run, **progress_context(run))


@bp.post("/trainings/<int:training_id>/cancel")
def cancel(training_id: int):
    run = get_training_or_404(training_id)
    require_change(run)
    if run.is_active:
        lifecycle.request_cancel(run)
    run = Training.get_by_id(run.id)
    if request.htmx:
        return render_template("_partials/progress.html", run=run, **progress_context(run))
    return redirect(url_for("pages.detail", training_id=run.id), code=303)


@bp.post("/trainings/<int:training_id>/resume")
def resume(training_id: int):
    """Continue an interrupted, failed or cancelled run from its checkpoint, on the same record."""
    from ..training_config import BY_NAME

    run = get_training_or_404(training_id)
    require_change(run)
    learning_rate, problem, status = None, None, 422
    raw = request.form.get("learning_rate", "").strip()
    if raw:
        try:
            learning_rate = float(raw)
        except ValueError:
            problem = f"The learning rate must be a number (got {raw[:40]!r})."
        else:
            if not BY_NAME["learning_rate"].in_range(learning_rate):
                problem = "The learning rate must lie between 1e-06 and 0.1."
    if problem is None:
        try:
            resume_training(run, current_app.config, learning_rate=learning_rate)
        except NotResumable as exc:
            problem, status = str(exc), 409
        except QueueUnavailable as exc:
            problem, status = f"Not resumed: {exc}", 503
    if problem is not None:
        run = Training.get_by_id(run.id)
        return render_template("training_detail.html", run=run, resume_error=problem, **progress_context(run)), status
    return redirect(url_for("pages.detail", training_id=run.id), code=303)


@bp.route("/trainings/<int:training_id>/delete", methods=["GET", "POST"])
def delete(training_id: int):
    """Ask once, naming what goes with the run; then delete it and its files."""
    run = get_training_or_404(training_id)
    return delete_flow(run, deletion.plan_training, deletion.delete_training,
                       action=url_for("pages.delete", training_id=run.id),
                       back=url_for("pages.detail", training_id=run.id), done=url_for("pages.index"))


@bp.get("/compare")
def compare():
    """Runs side by side: configs (differences marked), curves overlaid, and the frontier."""
    ids = id_args("ids")
    runs = list(Training.select().where(Training.id.in_(ids)).order_by(Training.id)) if ids else []
    if len(runs) < 2:
        return render_template("error.html", title="Choose runs to compare",
                               message="Tick two or more runs in the list, then press Compare."), 400
    labels = {r.id: f"#{r.id} {r.name}".strip() for r in runs}
    configs = [r.config_dict() for r in runs]
    keys = [k for k in configs[0] if k != "name"]
    rows = [(k, [c[k] for c in configs], len({repr(c[k]) for c in configs}) > 1) for k in keys]
    series = {r.id: chart_series(r) for r in runs}
    l0_points = [y for r in runs for _, y in series[r.id].points("l0_fraction") if y and y > 0]
    l0 = charts.overlay_chart("L0 fraction, log scale", [(labels[r.id], series[r.id].points("l0_fraction"))
                                                         for r in runs],
                              y_percent=True, log_y=True, bands=charts.GRADE_BANDS, y_max=1.0,
                              y_min=min(l0_points + [min(r.target_l0 for r in runs)]) / 2)
    fvu = charts.overlay_chart("FVU (unexplained variance)", [(labels[r.id], series[r.id].points("fvu"))
                                                              for r in runs])
    colors = {r.id: charts.PALETTE[i % len(charts.PALETTE)] for i, r in enumerate(runs)}
    finished = Training.select().where(Training.summary.is_null(False))
    frontier = charts.scatter_chart("All finished runs: sparsity vs reconstruction", [
        (t.summary.get("l0_fraction"), t.summary.get("fvu"), f"#{t.id}", colors.get(t.id)) for t in finished])
    def downstream_score(t):
        return ((t.summary or {}).get("downstream") or {}).get("score")

    scored = [t for t in finished if downstream_score(t) is not None]
    model_frontier = charts.scatter_chart(
        "Runs evaluated on their model: sparsity vs what survives the splice",
        [(t.summary.get("l0_fraction"), downstream_score(t), f"#{t.id}", colors.get(t.id)) for t in scored],
        y_label="downstream score") if scored else None
    summaries = [(r, progress_view(r, r.latest_metric())) for r in runs]
    return render_template("compare.html", runs=runs, rows=rows, l0_chart=l0, fvu_chart=fvu,
                           frontier=frontier, model_frontier=model_frontier,
                           has_downstream=any((r.summary or {}).get("downstream") for r in runs),
                           # an encoder's evaluation has no KL score (it has no next-token distribution)
                           has_kl=any(((r.summary or {}).get("downstream") or {}).get("kl_score") is not None
                                      for r in runs),
                           summaries=summaries, labels=labels, colors=colors,
                           has_ground_truth=any((r.summary or {}).get("ground_truth") for r in runs))
