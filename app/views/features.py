"""Features: per-latent statistics and examples, the feature browser, export and import of SAEs."""
from __future__ import annotations

import csv
import io
import json
import re

from flask import Blueprint, Response, abort, current_app, g, redirect, render_template, request, url_for
from werkzeug.exceptions import RequestEntityTooLarge

from .. import charts, security
from ..auth import require_change
from ..forms import FeatureJobForm, ImportSAEForm
from ..models import ActivationSet, FeatureJob, FeatureStat, ImportedSAE, MetricPoint, Training
from ..sae.export import SAEFormatError
from ..work import deletion, lifecycle
from ..work.exports import NoSAE, read_upload, saelens_zip, store_imported_sae
from ..work.features import create_feature_job
from ..work.training import sae_folder
from ..work.queue import QueueUnavailable
from ..work.resources import TooLarge, check_submission, feature_bytes
from .records import delete_flow, get_or_404, get_training_or_404, id_arg

bp = Blueprint("features", __name__)

PAGE_SIZE = 50
MAX_LATENT = 2**31 - 1  # latent numbers are database integers; a larger number names no latent
SORTS = {"frequency": FeatureStat.frequency, "max": FeatureStat.max_active, "mean": FeatureStat.mean_active,
         "match": FeatureStat.match_cosine, "latent": FeatureStat.latent}


def get_job_or_404(job_id: int) -> FeatureJob:
    return get_or_404(FeatureJob, job_id, "feature job")


def latest_feature_job(run: Training) -> FeatureJob | None:
    return run.feature_jobs.order_by(FeatureJob.id.desc()).first()


@bp.post("/trainings/<int:training_id>/features")
def start_for_run(training_id: int):
    run = get_training_or_404(training_id)
    if sae_folder(run, current_app.config) is None:
        abort(409, description="This run has no checkpoint yet: feature statistics need a finished run.")
    form = FeatureJobForm()
    if not form.validate_on_submit():
        abort(422, description="; ".join(f"{k}: {' '.join(v)}" for k, v in form.errors.items()))
    try:
        check_submission(current_app.config,
                         feature_bytes(run.source.d_in, run.latent_dim, form.sample_tokens.data, 10),
                         "The feature statistics", "Sample fewer tokens.")
    except TooLarge as exc:
        abort(422, description=f"sample_tokens: {exc}")
    try:
        job = create_feature_job(current_app.config, training=run, source=run.source, created_by=g.user.id,
                                 sample_tokens=form.sample_tokens.data)
    except QueueUnavailable as exc:
        return render_template("error.html", title="Not started",
                               message=f"{exc}. Nothing was created; try again once the queue is back."), 503
    return redirect(url_for("features.show", job_id=job.id), code=303)


def _list_query(job: FeatureJob, sort: str, order: str, q: str):
    query = FeatureStat.select(FeatureStat.latent, FeatureStat.frequency, FeatureStat.mean_active,
                               FeatureStat.max_active, FeatureStat.match_feature, FeatureStat.match_cosine,
                               FeatureStat.top_tokens).where(FeatureStat.job == job.id)
    if q:
        if re.fullmatch(r"\d+", q):
            query = query.where(FeatureStat.latent == int(q))
        else:
            query = query.where(FeatureStat.top_tokens.contains(q))  # case-insensitive, wildcards escaped
    column = SORTS.get(sort, FeatureStat.frequency)
    return query.order_by(column.desc(nulls="LAST") if order == "desc" else column.asc(nulls="LAST"),
                          FeatureStat.latent)


@bp.get("/features/<int:job_id>")
def show(job_id: int):
    job = get_job_or_404(job_id)
    sort = request.args.get("sort", "frequency")
    sort = sort if sort in SORTS else "frequency"
    order = "asc" if request.args.get("order") == "asc" else "desc"
    q = request.args.get("q", "").strip()[:200]
    page = min(max(1, id_arg("page") or 1), 10**6)
    q_error = None
    if job.status == "completed" and re.fullmatch(r"\d+", q) and (len(q) > 10 or int(q) > MAX_LATENT):
        q_error = f"No latent has this number: latent numbers run from 0 to at most {MAX_LATENT:,}."
    query = _list_query(job, sort, order, q) if job.status == "completed" and q_error is None else None
    total = query.count() if query is not None else 0
    latents = list(query.paginate(page, PAGE_SIZE)) if query is not None else []
    summary = job.summary or {}
    histogram = charts.histogram_chart(summary["density_histogram"], title="Latent density on the sample") \
        if summary.get("density_histogram") else None
    return render_template("features.html", job=job, latents=latents, total=total, page=page, sort=sort,
                           order=order, q=q, q_error=q_error, pages=max(1, -(-total // PAGE_SIZE)),
                           histogram=histogram, page_size=PAGE_SIZE, sorts=SORTS), 422 if q_error else 200


@bp.get("/features/<int:job_id>/progress")
def progress(job_id: int):
    """The polled fragment; once the job has ended, htmx reloads the page to show the browser."""
    job = get_job_or_404(job_id)
    response = Response(render_template("_partials/feature_progress.html", job=job))
    if not job.is_active:
        response.headers["HX-Refresh"] = "true"
    return response


@bp.post("/features/<int:job_id>/cancel")
def cancel(job_id: int):
    job = get_job_or_404(job_id)
    require_change(job)
    lifecycle.request_cancel(job)
    return render_template("_partials/feature_progress.html", job=FeatureJob.get_by_id(job.id))


@bp.get("/features/<int:job_id>/latents/<int:latent>")
def latent(job_id: int, latent: int):
    job = get_job_or_404(job_id)
    stat = FeatureStat.get_or_none((FeatureStat.job == job.id) & (FeatureStat.latent == latent))
    if stat is None:
        abort(404, description=f"Latent {latent} has no statistics in feature job #{job.id}.")
    peak = max([e["act"] for e in stat.examples] + [1e-12])
    return render_template("latent.html", job=job, stat=stat, peak=peak,
                           n_latents=FeatureStat.select().where(FeatureStat.job == job.id).count())


# --- export -------------------------------------------------------------------------------

@bp.get("/trainings/<int:training_id>/export/saelens.zip")
def export_saelens(training_id: int):
    run = get_training_or_404(training_id)
    try:
        folder, data = saelens_zip(run, current_app.config)
    except NoSAE as exc:
        abort(409, description=str(exc))
    return Response(data, mimetype="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{folder}.zip"'})


@bp.get("/trainings/<int:training_id>/metrics.csv")
def export_metrics(training_id: int):
    run = get_training_or_404(training_id)
    columns = ["step", "tokens", "loss", "mse", "sparsity_loss", "l1", "l0", "l0_fraction", "fvu", "dead", "lr",
               "l1_alpha", "tokens_per_s"]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    for point in run.metrics.order_by(MetricPoint.step):
        writer.writerow(["" if getattr(point, c) is None else getattr(point, c) for c in columns])
    return Response(out.getvalue(), mimetype="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="run-{run.id}-metrics.csv"'})


@bp.get("/trainings/<int:training_id>/config.json")
def export_config(training_id: int):
    run = get_training_or_404(training_id)
    return Response(json.dumps(run.config_dict(), indent=2), mimetype="application/json",
                    headers={"Content-Disposition": f'attachment; filename="run-{run.id}-config.json"'})


# --- import -------------------------------------------------------------------------------

def render_imports(form=None, status=200):
    imported = list(ImportedSAE.select().order_by(ImportedSAE.id.desc()))
    sources = list(ActivationSet.select().order_by(ActivationSet.id))
    return render_template("imports.html", form=form or ImportSAEForm(formdata=None), imported=imported,
                           sources=sources, jobs={i.id: i.feature_jobs.order_by(FeatureJob.id.desc()).first()
                                                  for i in imported}), status


@bp.get("/imports/")
def imports():
    return render_imports()


@bp.post("/imports/")
def import_sae():
    """An SAE in the SAELens layout, as a zip, browsed on a source of the same d_in."""
    form = ImportSAEForm()
    if not form.validate_on_submit():
        return render_imports(form, 422)
    limit = current_app.config["MAX_UPLOAD_MB"] * 2**20
    try:
        files, sae = read_upload(form.file.data.read(), max_bytes=limit)
    except SAEFormatError as exc:
        form.file.errors.append(f"Refused: {exc}. Nothing was kept.")
        return render_imports(form, 422)
    source = ActivationSet.get_or_none(ActivationSet.id == form.source_id.data)
    if source.d_in != sae.d_in:
        form.source_id.errors.append(f"The SAE reads d_in {sae.d_in}, but this source has d_in {source.d_in}: "
                                     "choose activations of the width it was trained on. Nothing was kept.")
        return render_imports(form, 422)
    try:
        check_submission(current_app.config, feature_bytes(sae.d_in, sae.d_sae, form.sample_tokens.data, 10),
                         "The feature statistics", "Sample fewer tokens.")
    except TooLarge as exc:
        form.sample_tokens.errors.append(f"{exc} Nothing was kept.")
        return render_imports(form, 422)
    name = (form.name.data or "").strip() or form.file.data.filename or "imported SAE"
    try:
        job = store_imported_sae(current_app.config, files, sae, name=name, source=source, created_by=g.user.id,
                                 sample_tokens=form.sample_tokens.data)
    except QueueUnavailable as exc:  # the import is its statistics: without the queue, nothing is kept
        form.form_errors.append(f"Not imported: {exc}. Nothing was kept; try again once the queue is back.")
        return render_imports(form, 503)
    return redirect(url_for("features.show", job_id=job.id), code=303)


@bp.route("/imports/<int:imported_id>/delete", methods=["GET", "POST"])
def delete_imported(imported_id: int):
    sae = get_or_404(ImportedSAE, imported_id, "imported SAE")
    return delete_flow(sae, deletion.plan_imported, deletion.delete_imported,
                       action=url_for("features.delete_imported", imported_id=sae.id),
                       back=url_for("features.imports"), done=url_for("features.imports"))


@bp.errorhandler(RequestEntityTooLarge)
def too_large(error):
    if request.endpoint != "features.import_sae" or security.held_to_small_limit():
        return security.too_large(error)
    form = ImportSAEForm(formdata=None)
    form.file.errors = [f"Refused: the file is larger than the limit of {current_app.config['MAX_UPLOAD_MB']:,} MB. "
                        "Nothing was kept."]
    return render_imports(form, 413)
