"""The JSON API for scripts: the same form validation as the HTML form."""
from __future__ import annotations

from flask import Blueprint, current_app, g, request
from werkzeug.datastructures import MultiDict

from ..auth import require_change
from ..forms import ACKNOWLEDGE_IN_API, ACKNOWLEDGE_IN_FORM, ExtractionForm, TrainingForm, json_to_formdata
from ..models import ActivationSet, Event, Extraction, ImportedSAE, MetricPoint, Template, Training
from ..training_config import BY_NAME
from ..work import deletion, lifecycle
from ..work.extraction import create_extraction, named_text_spec
from ..work.queue import QueueUnavailable
from ..work.training import NotResumable, checkpoint_step, create_training, resume_training
from .formatting import progress_view
from .records import external_url, get_or_404, id_arg

bp = Blueprint("api", __name__, url_prefix="/api")

METRIC_FIELDS = ("step", "tokens", "loss", "mse", "sparsity_loss", "l1", "l0", "l0_fraction", "fvu", "dead",
                 "lr", "l1_alpha", "tokens_per_s")


def get_training_or_404(training_id: int) -> Training:
    return get_or_404(Training, training_id, "training")


def unavailable(exc: QueueUnavailable) -> tuple[dict, int]:
    return {"errors": {"_queue": [f"{exc}. Nothing was created; try again once the queue is back."]}}, 503


def metric_dict(point: MetricPoint) -> dict:
    return {name: getattr(point, name) for name in METRIC_FIELDS}


def training_dict(run: Training) -> dict:
    latest = run.latest_metric()
    view = progress_view(run, latest)
    return {
        "id": run.id, "url": external_url("pages.detail", training_id=run.id),
        "status": run.status, "reason": run.reason, "failed_step": run.failed_step,
        "heartbeat_at": run.heartbeat_at.isoformat() + "Z" if run.heartbeat_at else None,
        "worker": run.worker_name, "checkpoint_step": checkpoint_step(run, current_app.config),
        "step": run.step, "total_steps": run.total_steps, "tokens_seen": run.tokens_seen,
        "config": run.config_dict(), "device": run.device, "norm_scale": run.norm_scale,
        "latest_metrics": metric_dict(latest) if latest else None,
        "quality_grade": view["grade"], "summary": run.summary,
        "created_at": run.created_at.isoformat() + "Z",
        "started_at": run.started_at.isoformat() + "Z" if run.started_at else None,
        "finished_at": run.finished_at.isoformat() + "Z" if run.finished_at else None,
        "events": [{"step": e.step, "level": e.level, "code": e.code, "message": e.message,
                    "suggestion": e.suggestion} for e in run.events.order_by(Event.id)],
    }


@bp.post("/trainings")
def create():
    payload = request.get_json(silent=True)
    if payload is None:
        return {"errors": {"_body": ["Send the training's fields as a JSON object (Content-Type: application/json)."]}}, 422
    formdata, errors = json_to_formdata(payload)
    if formdata is None:
        return {"errors": errors}, 422
    form = TrainingForm(formdata=formdata, meta={"csrf": False})
    valid = form.validate()
    # The mapping's message (null, wrong type, unknown) is the precise one for its field.
    for name, messages in form.errors.items():
        if name not in errors:
            # a script has no box to tick: it sends the field
            errors[name] = [ACKNOWLEDGE_IN_API if m == ACKNOWLEDGE_IN_FORM else m for m in messages]
    if errors or not valid:
        return {"errors": errors, "findings": [f.to_dict() for f in form.findings]}, 422
    try:
        run = create_training({**form.training_fields(), "created_by": g.user.id}, current_app.config)
    except QueueUnavailable as exc:
        return unavailable(exc)
    return {"id": run.id, "status": run.status, "reason": run.reason,
            "url": external_url("pages.detail", training_id=run.id),
            "findings": [f.to_dict() for f in form.findings]}, 201


@bp.get("/trainings")
def list_trainings():
    return {"trainings": [training_dict(r) for r in Training.select().order_by(Training.id.desc())]}


@bp.get("/trainings/<int:training_id>")
def show(training_id: int):
    return training_dict(get_training_or_404(training_id))


@bp.get("/trainings/<int:training_id>/metrics")
def metrics(training_id: int):
    run = get_training_or_404(training_id)
    since = id_arg("since") or 0
    points = run.metrics.where(MetricPoint.step > since).order_by(MetricPoint.step)
    return {"id": run.id, "latent_dim": run.latent_dim, "points": [metric_dict(p) for p in points]}


@bp.post("/trainings/<int:training_id>/cancel")
def cancel(training_id: int):
    run = get_training_or_404(training_id)
    if not run.is_active:
        return {"id": run.id, "status": run.status, "error": f"The run has already ended ({run.status})."}, 409
    require_change(run)
    lifecycle.request_cancel(run)
    run = Training.get_by_id(run.id)
    return {"id": run.id, "status": run.status, "cancel_requested": run.cancel_requested}, 202


@bp.post("/trainings/<int:training_id>/resume")
def resume(training_id: int):
    """Continue an interrupted, failed or cancelled run from its checkpoint. Body (optional):
    ``{"learning_rate": 0.0003}`` to resume at another step size."""
    run = get_training_or_404(training_id)
    payload = request.get_json(silent=True) or {}
    if not isinstance(payload, dict) or set(payload) - {"learning_rate"}:
        return {"errors": {"_body": ["Send nothing, or {\"learning_rate\": <number>}."]}}, 422
    learning_rate = payload.get("learning_rate")
    if learning_rate is not None:
        number = isinstance(learning_rate, (int, float)) and not isinstance(learning_rate, bool)
        try:  # an integer too large for a float (a 310-digit one) is simply out of range
            learning_rate = float(learning_rate) if number else None
        except OverflowError:
            learning_rate = None
        if learning_rate is None or not BY_NAME["learning_rate"].in_range(learning_rate):
            return {"errors": {"learning_rate": ["Must be a number between 1e-06 and 0.1."]}}, 422
    require_change(run)
    try:
        run = resume_training(run, current_app.config, learning_rate=learning_rate)
    except NotResumable as exc:
        return {"id": run.id, "status": run.status, "error": str(exc)}, 409
    except QueueUnavailable as exc:
        return unavailable(exc)
    return {"id": run.id, "status": run.status, "checkpoint_step": checkpoint_step(run, current_app.config)}, 202


def downstream_dict(job) -> dict:
    return {"id": job.id, "training_id": job.training_id, "status": job.status, "reason": job.reason,
            "progress": job.progress, "token_budget": job.token_budget, "result": job.summary}


@bp.post("/trainings/<int:training_id>/downstream")
def start_downstream(training_id: int):
    """Queue a downstream evaluation of the run's SAE. Body (optional): ``{"tokens": 8192}``."""
    from ..work.downstream import create_downstream, why_not

    run = get_training_or_404(training_id)
    payload = request.get_json(silent=True) or {}
    if not isinstance(payload, dict) or set(payload) - {"tokens"}:
        return {"errors": {"_body": ["Send nothing, or {\"tokens\": <whole number>}."]}}, 422
    tokens = payload.get("tokens")
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or not 256 <= tokens <= 1_000_000):
        return {"errors": {"tokens": ["Must be a whole number between 256 and 1,000,000."]}}, 422
    if (reason := why_not(run, current_app.config)) is not None:
        return {"id": run.id, "error": reason}, 409
    try:
        job = create_downstream(current_app.config, run, token_budget=tokens, created_by=g.user.id)
    except QueueUnavailable as exc:
        return unavailable(exc)
    return downstream_dict(job), 202


@bp.get("/downstream/<int:job_id>")
def show_downstream(job_id: int):
    from ..models import DownstreamEval

    return downstream_dict(get_or_404(DownstreamEval, job_id, "downstream evaluation"))


DELETABLE = {
    "trainings": (Training, "training", deletion.delete_training, deletion.plan_training),
    "sources": (ActivationSet, "activation source", deletion.delete_source, deletion.plan_source),
    "extractions": (Extraction, "extraction", deletion.delete_extraction, deletion.plan_extraction),
    "imports": (ImportedSAE, "imported SAE", deletion.delete_imported, deletion.plan_imported),
    "templates": (Template, "template", deletion.delete_template, deletion.plan_template),
}


@bp.delete("/<any(trainings, sources, extractions, imports, templates):kind>/<int:record_id>")
def delete(kind: str, record_id: int):
    """Delete a record and its files; 409 naming what stands in the way (a running job, runs on a source)."""
    model, what, delete_record, plan = DELETABLE[kind]
    record = get_or_404(model, record_id, what)
    require_change(record)
    try:
        done = delete_record(record, current_app.config)
    except deletion.DeleteRefused as exc:
        return {"error": str(exc), "plan": plan(record, current_app.config).to_dict()}, 409
    return {"deleted": done.to_dict()}, 200


EXTRACTION_FIELDS = ("name", "model_name", "layer", "site", "text_kind", "dataset_name", "dataset_split", "text_column",
                     "token_budget", "context_length", "batch_size", "dtype", "model_dtype", "exclude_special")


def extraction_dict(job: Extraction) -> dict:
    return {
        "id": job.id, "url": external_url("extractions.show", extraction_id=job.id),
        "status": job.status, "reason": job.reason, "model_name": job.model_name, "layer": job.layer,
        "site": job.site, "text": job.text, "token_budget": job.token_budget, "tokens_done": job.tokens_done,
        "documents_done": job.documents_done, "tokens_per_s": job.tokens_per_s, "eta_s": job.eta_s,
        "context_length": job.context_length, "batch_size": job.batch_size, "dtype": job.dtype,
        "model_dtype": job.model_dtype,
        "exclude_special": job.exclude_special, "device": job.device, "source_id": job.activation_set_id,
    }


@bp.post("/extractions")
def create_extraction_api():
    """An extraction over the stdlib docstrings or a Hugging Face dataset (files go through the form)."""
    payload = request.get_json(silent=True)
    if not isinstance(payload, dict):
        return {"errors": {"_body": ["Send the extraction's fields as a JSON object."]}}, 422
    errors = {k: ["Unknown field."] for k in payload if k not in EXTRACTION_FIELDS}
    if payload.get("text_kind") == "file":
        errors["text_kind"] = ["Upload a text file through the form at /extractions/; the API takes 'stdlib' or 'hf'."]
    formdata = MultiDict()
    for key, value in payload.items():
        if key in errors or value is None:
            continue
        if isinstance(value, (dict, list)) or (isinstance(value, bool) and key != "exclude_special"):
            errors[key] = ["Wrong type."]
        elif key == "exclude_special":
            if value is not False:
                formdata[key] = "y"
        else:
            formdata[key] = str(value)
    defaults = ExtractionForm(formdata=None, meta={"csrf": False}).data  # what the HTML form starts with
    for key in EXTRACTION_FIELDS:
        if key not in payload and defaults.get(key) not in (None, ""):
            formdata[key] = "y" if defaults[key] is True else str(defaults[key])
    form = ExtractionForm(formdata=formdata, meta={"csrf": False})
    valid = form.validate()
    for name, messages in form.errors.items():
        errors.setdefault(name, list(messages))
    if errors or not valid:
        return {"errors": errors}, 422
    try:
        job = create_extraction(current_app.config, form.data, named_text_spec(form.data), created_by=g.user.id)
    except QueueUnavailable as exc:
        return unavailable(exc)
    return extraction_dict(job), 201


@bp.get("/extractions/<int:extraction_id>")
def show_extraction(extraction_id: int):
    return extraction_dict(get_or_404(Extraction, extraction_id, "extraction"))
