"""The JSON API for scripts: the same form validation as the HTML form."""
from __future__ import annotations

from flask import Blueprint, current_app, g, request
from peewee import JOIN, fn
from werkzeug.datastructures import MultiDict

from ..auth import require_change
from ..forms import ACKNOWLEDGE_IN_API, ACKNOWLEDGE_IN_FORM, ExtractionForm, TrainingForm, json_to_formdata
from ..models import (STATUSES, ActivationSet, DownstreamEval, Event, Extraction, FeatureJob, ImportedSAE, MetricPoint,
                      Sweep, Template, Training, User)
from ..training_config import BY_NAME
from ..work import deletion, finder, lifecycle, sweeps
from ..work.extraction import create_extraction, named_text_spec
from ..work.queue import QueueUnavailable
from ..work.training import NotResumable, checkpoint_step, create_training, resume_training
from .formatting import progress_view
from .records import MAX_ID, external_url, get_or_404, get_training_or_404

bp = Blueprint("api", __name__, url_prefix="/api")

METRIC_FIELDS = ("step", "tokens", "loss", "mse", "sparsity_loss", "l1", "l0", "l0_fraction", "fvu", "dead",
                 "lr", "l1_alpha", "tokens_per_s")


# --- query parameters: every bad one is named in a 422, every list comes a page at a time --------

PAGE_DEFAULT, PAGE_MAX = 100, 1000
METRICS_PAGE_DEFAULT, METRICS_PAGE_MAX = 1000, 10_000


class BadQuery(Exception):
    """The query string was refused; ``errors`` names each bad parameter, as a 422 does a body's fields."""

    def __init__(self, errors: dict[str, list[str]]):
        super().__init__("bad query parameters")
        self.errors = errors


@bp.errorhandler(BadQuery)
def bad_query(exc: BadQuery):
    return {"errors": exc.errors}, 422


def whole(lo: int, hi: int):
    """A parser of a whole number in [lo, hi], written in ASCII digits (no sign, at most 19 of them)."""
    def parse(raw: str) -> int:
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 19 or not lo <= int(raw) <= hi:
            raise ValueError(f"Must be a whole number from {lo:,} to {hi:,}.")
        return int(raw)
    return parse


def choice(options):
    def parse(raw: str) -> str:
        if raw not in options:
            raise ValueError(f"Must be one of: {', '.join(options)}.")
        return raw
    return parse


PAGING = {"limit": whole(1, PAGE_MAX), "before_id": whole(1, MAX_ID)}


def query_params(parsers: dict) -> dict:
    """The query string read by ``parsers`` (name → parse(raw)); ``BadQuery`` names each value that
    does not parse, and each parameter the endpoint does not take."""
    values, errors = {}, {}
    for name in request.args:
        raws = request.args.getlist(name)
        if name not in parsers:
            errors[name] = [f"Unknown parameter: this endpoint takes {', '.join(parsers)}."]
        elif len(raws) > 1:
            errors[name] = ["Give it once."]
        else:
            try:
                values[name] = parsers[name](raws[0])
            except ValueError as exc:
                errors[name] = [str(exc)]
    if errors:
        raise BadQuery(errors)
    return values


def with_creator(model):
    """Every row of ``model`` with its creator in the same query."""
    return model.select(model, User).join(User, JOIN.LEFT_OUTER, on=(model.created_by == User.id))


def creator_name(record) -> str | None:
    return record.created_by.username if record.created_by_id else None


def iso(moment) -> str | None:
    return moment.isoformat() + "Z" if moment else None


def page_of(query, model, params: dict, key: str, to_dict) -> dict:
    """Newest first, ``limit`` rows (100 unless said, at most 1,000) with ids below ``before_id``;
    ``next`` links the following page (null on the last)."""
    limit = params.get("limit", PAGE_DEFAULT)
    if "before_id" in params:
        query = query.where(model.id < params["before_id"])
    rows = list(query.order_by(model.id.desc()).limit(limit + 1))
    more = len(rows) > limit
    rows = rows[:limit]
    following = {**request.args.to_dict(), "limit": limit, "before_id": rows[-1].id} if more else None
    return {key: [to_dict(r) for r in rows], "next": external_url(request.endpoint, **following) if more else None}


def jobs_page(model, key: str, to_dict, *, status_filter=None, where=None) -> dict:
    """A page of one kind of queued work, newest first, filtered by ``status`` when the query gives one
    (``status_filter(status)``: the condition, where it is not the row's own status)."""
    params = query_params({**PAGING, "status": choice(STATUSES)})
    query = with_creator(model)
    if where is not None:
        query = query.where(where)
    if "status" in params:
        query = query.where(status_filter(params["status"]) if status_filter else model.status == params["status"])
    return page_of(query, model, params, key, to_dict)


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
        **{k: v for k, v in placement_dict(run).items() if k != "worker"},
        "latest_metrics": metric_dict(latest) if latest else None,
        "quality_grade": view["grade"], "summary": run.summary, "created_by": creator_name(run),
        "created_at": run.created_at.isoformat() + "Z",
        "started_at": run.started_at.isoformat() + "Z" if run.started_at else None,
        "finished_at": run.finished_at.isoformat() + "Z" if run.finished_at else None,
        "events": [{"step": e.step, "level": e.level, "code": e.code, "message": e.message,
                    "suggestion": e.suggestion} for e in run.events.order_by(Event.id)],
        # every job's results on its own record (the latest 20 of each), whoever started it
        "feature_jobs": [feature_job_dict(j) for j in run_jobs(run, run.feature_jobs, FeatureJob)],
        "downstream_evals": [downstream_dict(j) for j in run_jobs(run, run.downstream_evals, DownstreamEval)],
    }


def run_jobs(run: Training, jobs, model) -> list:
    """The run's latest 20 jobs of one kind, with their creators, each knowing its run (no query per job)."""
    rows = list(jobs.select(model, User).join(User, JOIN.LEFT_OUTER, on=(model.created_by == User.id))
                .order_by(model.id.desc()).limit(20))
    for job in rows:
        job.training = run
    return rows


def requested_device(payload) -> tuple[str | None, dict[str, list[str]]]:
    """The body's optional ``device``: the device the run must run on (placement waits for it)."""
    from ..work.resources import device_name_problem

    if not isinstance(payload, dict) or payload.get("device") is None:
        return None, {}
    problem = device_name_problem(payload["device"])
    if problem:
        return None, {"device": [problem]}
    return payload["device"].strip(), {}


def placement_dict(record) -> dict:
    """Where a job runs, ran and waits: its worker and device now, why it waits, what it asked for,
    and each attempt's worker and device."""
    return {"worker": record.worker_name, "placed_on": record.placed_on, "reserved_bytes": record.reserved_bytes,
            "wait_reason": record.wait_reason if record.status == "queued" else None,
            "requested_device": record.requested_device,
            "attempts": [{k: a.get(k) for k in ("attempt", "worker", "device", "at")} for a in record.attempts_log or []]}


@bp.post("/trainings")
def create():
    payload = request.get_json(silent=True)
    if payload is None:
        return {"errors": {"_body": ["Send the training's fields as a JSON object (Content-Type: application/json)."]}}, 422
    requested, device_errors = requested_device(payload)
    formdata, errors = json_to_formdata({k: v for k, v in payload.items() if k != "device"}
                                        if isinstance(payload, dict) else payload)
    errors.update(device_errors)
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
        run = create_training({**form.training_fields(), "created_by": g.user.id, "requested_device": requested},
                              current_app.config)
    except QueueUnavailable as exc:
        return unavailable(exc)
    return {"id": run.id, "status": run.status, "reason": run.reason,
            "url": external_url("pages.detail", training_id=run.id),
            "findings": [f.to_dict() for f in form.findings]}, 201


@bp.get("/trainings")
def list_trainings():
    return jobs_page(Training, "trainings", training_dict)


@bp.get("/trainings/<int:training_id>")
def show(training_id: int):
    return training_dict(get_training_or_404(training_id))


@bp.get("/trainings/<int:training_id>/metrics")
def metrics(training_id: int):
    """The run's metric points in step order, a page at a time: ``since_step`` (points after it),
    ``limit`` (default 1,000, at most 10,000) and ``every`` (at most one point per ``every`` steps:
    the first logged in each interval [k·every, (k+1)·every)). ``next`` links the following page."""
    run = get_training_or_404(training_id)
    params = query_params({"since_step": whole(0, MAX_ID), "since": whole(0, MAX_ID),
                           "limit": whole(1, METRICS_PAGE_MAX), "every": whole(1, MAX_ID)})
    if "since" in params and "since_step" in params and params["since"] != params["since_step"]:
        raise BadQuery({"since": ["Give since_step only (since is its older name)."]})
    since = params.get("since_step", params.get("since", 0))
    limit = params.get("limit", METRICS_PAGE_DEFAULT)
    every = params.get("every")
    points = run.metrics.where(MetricPoint.step > since)
    if every is not None and every > 1:
        # the first point of each interval of ``every`` steps (integer division on both backends)
        firsts = (MetricPoint.select(fn.MIN(MetricPoint.step))
                  .where((MetricPoint.training == run.id) & (MetricPoint.step > since))
                  .group_by(MetricPoint.step / every).order_by(fn.MIN(MetricPoint.step)).limit(limit + 1))
        points = points.where(MetricPoint.step.in_(firsts))
    rows = list(points.order_by(MetricPoint.step).limit(limit + 1))
    more = len(rows) > limit
    rows = rows[:limit]
    next_since = None
    if more:
        last = rows[-1].step
        # the next page starts at the next interval, so no interval gives two points
        next_since = last if every is None or every == 1 else min((last // every + 1) * every - 1, MAX_ID)
    query = {"limit": limit, **({"every": every} if every is not None else {})}
    return {"id": run.id, "latent_dim": run.latent_dim, "since_step": since, "limit": limit, "every": every,
            "points": [metric_dict(p) for p in rows], "next_since_step": next_since,
            "next": external_url("api.metrics", training_id=run.id, since_step=next_since, **query)
            if more else None}


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


# --- sweeps ---------------------------------------------------------------------------------

def sweep_dict(sweep: Sweep) -> dict:
    parts = sweeps.group_of(sweep)
    rows = sweeps.member_rows(sweep)
    suggested = sweeps.suggestion(sweep, rows)
    return {
        "id": sweep.id, "url": external_url("sweeps.detail", sweep_id=sweep.id), "name": sweep.name,
        "mode": sweep.mode, "status": sweeps.group_status(parts), "part_status": sweep.status,
        "reason": sweep.reason, "source_id": sweep.source_id,
        "axes": sweep.axes, "base": sweep.base, "created_by": creator_name(sweep),
        "created_at": iso(sweep.created_at), "started_at": iso(sweep.started_at), "finished_at": iso(sweep.finished_at),
        **{k: v for k, v in placement_dict(sweep).items()},
        "members": [{**row, "url": external_url("pages.detail", training_id=row["id"])} for row in rows],
        "suggested": {"id": suggested["row"]["id"], "rule": suggested["why"]} if suggested else None,
        "finding": sweep.finding,
        # split over devices: each part is a sweep of its own (its own job, device and status); "members"
        # and "status" above are the whole sweep's, "part_status" this part's
        "parts": [{"id": p.id, "part": p.part, "status": p.status, "placed_on": p.placed_on,
                   "wait_reason": p.wait_reason, "members": [r["id"] for r in rows if r["part"] == p.part]}
                  for p in parts],
        "group_status": sweeps.group_status(parts),
    }


def sweep_check_errors(check: sweeps.SweepCheck) -> dict:
    """A refused sweep's 422 body: the sweep's own errors, then each member's by its label."""
    errors = dict(check.errors)
    for i, member in enumerate(check.members):
        if member.errors:
            errors[f"members.{i}"] = [f"{member.label}: {name}: {' '.join(m)}" for name, m in member.errors.items()]
    return errors


@bp.post("/sweeps")
def create_sweep():
    """Body: ``{"name", "base": {training fields}, "axes": [{"param", "values"}], "mode": "grid"|"find_l0",
    "device", "template_id"}``. With ``template_id`` the template's configuration is the base (``base``'s
    fields, a ``source_id`` at least, override it) and a sweep template's axes and mode are the sweep's
    unless given. Every member is validated as a run of its own; nothing is created unless all pass."""
    payload = request.get_json(silent=True)
    if not isinstance(payload, dict):
        return {"errors": {"_body": ["Send the sweep as a JSON object: base, axes, and optionally name, mode, "
                                     "device, template_id."]}}, 422
    unknown = set(payload) - {"name", "base", "axes", "mode", "device", "template_id"}
    if unknown:
        return {"errors": {name: ["Unknown field."] for name in sorted(unknown)}}, 422
    if "template_id" in payload:
        payload, errors = sweep_from_template(payload)
        if errors:
            return {"errors": errors}, 422
    mode = payload.get("mode", "grid")
    if mode not in sweeps.MODES:
        return {"errors": {"mode": [f"One of {', '.join(sweeps.MODES)}."]}}, 422
    name = payload.get("name") or ""
    if not isinstance(name, str) or len(name) > 200:
        return {"errors": {"name": ["A name of at most 200 characters."]}}, 422
    requested, device_errors = requested_device(payload)
    if device_errors:
        return {"errors": device_errors}, 422
    base = payload.get("base")
    axes = payload.get("axes")
    if mode == "find_l0":
        base, axes, errors = finder.finder_plan(base, axes)
        if errors:
            return {"errors": errors}, 422
    if isinstance(base, dict):  # a script has no box to tick: it sends the field, once for every member
        base = {**base}
    check = sweeps.check_sweep(base, axes, current_app.config, mode=mode, device=requested)
    findings = [{"member": m.label, **f.to_dict()} for m in check.members for f in m.findings]
    findings += [{"member": None, **f.to_dict()} for f in check.findings]
    if not check.ok:
        errors = sweep_check_errors(check)
        for key, messages in errors.items():
            errors[key] = [m.replace(ACKNOWLEDGE_IN_FORM, ACKNOWLEDGE_IN_API) for m in messages]
        return {"errors": errors, "findings": findings}, 422
    try:
        sweep = sweeps.create_sweep(check, name=name, mode=mode, settings=current_app.config, created_by=g.user.id,
                                    requested_device=requested)
    except QueueUnavailable as exc:
        return unavailable(exc)
    return {**sweep_dict(sweep), "findings": findings}, 201


def sweep_from_template(payload: dict) -> tuple[dict, dict]:
    """A sweep body with its template filled in: the template's configuration under ``base``'s fields, and
    a sweep template's axes and mode where the body gives none."""
    template_id = payload["template_id"]
    if not isinstance(template_id, int) or isinstance(template_id, bool) or not 1 <= template_id <= MAX_ID:
        return payload, {"template_id": ["The id of a template (GET /api/templates lists them)."]}
    template = Template.get_or_none(Template.id == template_id)
    if template is None:
        return payload, {"template_id": [f"No template {template_id}."]}
    base = payload.get("base", {})
    if not isinstance(base, dict):
        return payload, {"base": ["Send the base configuration as a JSON object of the training form's fields "
                                  "(with a template: a source_id, and anything to change)."]}
    # as the template's "training" body: its fields and the form's seed (a template holds no seed)
    filled = {"seed": BY_NAME["seed"].default, **{k: v for k, v in (template.config or {}).items() if v is not None},
              **base}
    part = template.sweep or {}
    body = {k: v for k, v in payload.items() if k != "template_id"}
    body["base"] = filled
    if "mode" not in body and part.get("mode"):
        body["mode"] = part["mode"]
    if "axes" not in body and part.get("axes"):
        body["axes"] = part["axes"]
    if "name" not in body:
        body["name"] = template.name[:200]
    return body, {}


@bp.post("/sweeps/<int:sweep_id>/template")
def save_sweep_template(sweep_id: int):
    """Body: ``{"name"}``. The sweep saved as a template of the caller's own: its base configuration, axes
    and mode; ``POST /api/sweeps`` with its ``template_id`` starts the same sweep on another source."""
    from ..work.templates import NoMemberLeft, template_from_sweep

    sweep = get_or_404(Sweep, sweep_id, "sweep")
    payload = request.get_json(silent=True)
    if not isinstance(payload, dict) or set(payload) - {"name"}:
        return {"errors": {"_body": ['Send {"name": "..."}.']}}, 422
    name = payload.get("name")
    if not isinstance(name, str) or not name.strip() or len(name.strip()) > 200:
        return {"errors": {"name": ["A name of 1 to 200 characters."]}}, 422
    try:
        template = template_from_sweep(sweep, name=name.strip(), created_by=g.user.id)
    except NoMemberLeft as exc:
        return {"id": sweep.id, "error": str(exc)}, 409
    return template_dict(template), 201


@bp.get("/sweeps")
def list_sweeps():
    """One item per sweep (a sweep split over devices is its first part, with every part under ``parts``);
    ``status`` finds the sweeps with a part in that status."""
    from peewee import fn

    def with_a_part(status):
        return Sweep.id.in_(Sweep.select(fn.COALESCE(Sweep.part_of, Sweep.id)).where(Sweep.status == status))

    return jobs_page(Sweep, "sweeps", sweep_dict, status_filter=with_a_part, where=Sweep.part_of.is_null())


@bp.get("/sweeps/<int:sweep_id>")
def show_sweep(sweep_id: int):
    return sweep_dict(get_or_404(Sweep, sweep_id, "sweep"))


@bp.post("/sweeps/<int:sweep_id>/cancel")
def cancel_sweep(sweep_id: int):
    sweep = get_or_404(Sweep, sweep_id, "sweep")
    if not any(part.is_active for part in sweeps.group_of(sweep)):
        return {"id": sweep.id, "status": sweep.status, "error": f"The sweep has already ended ({sweep.status})."}, 409
    require_change(sweep)
    sweeps.cancel_sweep(sweep)
    sweep = Sweep.get_by_id(sweep.id)
    return {"id": sweep.id, "status": sweep.status, "cancel_requested": sweep.cancel_requested}, 202


@bp.post("/sweeps/<int:sweep_id>/resume")
def resume_sweep(sweep_id: int):
    sweep = get_or_404(Sweep, sweep_id, "sweep")
    require_change(sweep)
    try:
        sweep = sweeps.resume_group(sweep, current_app.config)
    except sweeps.SweepRefused as exc:
        return {"id": sweep.id, "status": sweep.status, "error": str(exc)}, 409
    except QueueUnavailable as exc:
        return unavailable(exc)
    return sweep_dict(sweep), 202


def downstream_dict(job: DownstreamEval) -> dict:
    """``on_run``: its result is also the run's (``summary.downstream``); another user's evaluation
    keeps it here only."""
    return {"id": job.id, "training_id": job.training_id, "status": job.status, "reason": job.reason,
            "progress": job.progress, "token_budget": job.token_budget, "result": job.summary,
            "created_by": creator_name(job), "on_run": job.on_run, "created_at": iso(job.created_at),
            "finished_at": iso(job.finished_at)}


def feature_job_dict(job: FeatureJob) -> dict:
    return {"id": job.id, "url": external_url("features.show", job_id=job.id), "training_id": job.training_id,
            "imported_id": job.imported_id, "source_id": job.source_id, "status": job.status, "reason": job.reason,
            "progress": job.progress, "sample_tokens": job.sample_tokens, "result": job.summary,
            "created_by": creator_name(job), "on_run": job.on_run, "created_at": iso(job.created_at),
            "finished_at": iso(job.finished_at)}


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
    return downstream_dict(get_or_404(DownstreamEval, job_id, "downstream evaluation"))


@bp.get("/features/<int:job_id>")
def show_feature_job(job_id: int):
    return feature_job_dict(get_or_404(FeatureJob, job_id, "feature job"))


DELETABLE = {
    "trainings": (Training, "training", deletion.delete_training, deletion.plan_training),
    "sources": (ActivationSet, "activation source", deletion.delete_source, deletion.plan_source),
    "extractions": (Extraction, "extraction", deletion.delete_extraction, deletion.plan_extraction),
    "imports": (ImportedSAE, "imported SAE", deletion.delete_imported, deletion.plan_imported),
    "templates": (Template, "template", deletion.delete_template, deletion.plan_template),
    "sweeps": (Sweep, "sweep", deletion.delete_sweep, deletion.plan_sweep),
}


@bp.delete("/<any(trainings, sources, extractions, imports, templates, sweeps):kind>/<int:record_id>")
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
        "name": job.name, "created_by": creator_name(job), "created_at": iso(job.created_at),
        "started_at": iso(job.started_at), "finished_at": iso(job.finished_at),
    }


def _form_from_json(form_class, fields: tuple[str, ...], what: str):
    """A text-corpus form (extraction or stream) filled from a JSON body; (form, None) when valid,
    else (None, the 422 answer)."""
    payload = request.get_json(silent=True)
    if not isinstance(payload, dict):
        return None, ({"errors": {"_body": [f"Send the {what}'s fields as a JSON object."]}}, 422)
    errors = {k: ["Unknown field."] for k in payload if k not in fields}
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
    defaults = form_class(formdata=None, meta={"csrf": False}).data  # what the HTML form starts with
    for key in fields:
        if key not in payload and defaults.get(key) not in (None, ""):
            formdata[key] = "y" if defaults[key] is True else str(defaults[key])
    form = form_class(formdata=formdata, meta={"csrf": False})
    valid = form.validate()
    for name, messages in form.errors.items():
        errors.setdefault(name, list(messages))
    if errors or not valid:
        return None, ({"errors": errors}, 422)
    return form, None


@bp.post("/extractions")
def create_extraction_api():
    """An extraction over the stdlib docstrings or a Hugging Face dataset (files go through the form)."""
    form, refused = _form_from_json(ExtractionForm, EXTRACTION_FIELDS, "extraction")
    if refused:
        return refused
    try:
        job = create_extraction(current_app.config, form.data, named_text_spec(form.data), created_by=g.user.id,
                                model_size_bytes=form.model_size_bytes)
    except QueueUnavailable as exc:
        return unavailable(exc)
    return extraction_dict(job), 201


STREAM_FIELDS = ("name", "model_name", "layers", "site", "text_kind", "dataset_name", "dataset_split", "text_column",
                 "context_length", "batch_size", "model_dtype", "exclude_special", "buffer_tokens")


@bp.post("/sources/streamed")
def create_streamed_source_api():
    """A source streamed from a model as runs train on it: layers × site, over the stdlib docstrings or a
    Hugging Face dataset (files go through the form). Nothing runs until a run or sweep starts."""
    from ..forms import StreamForm
    from ..work.streams import StreamRefused, create_streamed_source

    form, refused = _form_from_json(StreamForm, STREAM_FIELDS, "streamed source")
    if refused:
        return refused
    try:
        source = create_streamed_source(current_app.config, form.data, named_text_spec(form.data),
                                        created_by=g.user.id, model_size_bytes=form.model_size_bytes)
    except StreamRefused as exc:
        return {"errors": {exc.field: [str(exc)]}}, 422
    return source_dict(source), 201


@bp.get("/extractions/<int:extraction_id>")
def show_extraction(extraction_id: int):
    return extraction_dict(get_or_404(Extraction, extraction_id, "extraction"))


@bp.get("/extractions")
def list_extractions():
    return jobs_page(Extraction, "extractions", extraction_dict)


# --- what the other pages list: sources, templates, imported SAEs -----------------------------

SOURCE_DETAILS = {
    "synthetic": ("n_features", "mean_active", "seed", "structure"),
    "extracted": ("model", "layer", "site", "site_label", "text_label", "dtype", "model_dtype", "context_length",
                  "exclude_special", "documents", "extraction_id"),
    "streamed": ("model", "hooks", "layers", "site", "site_label", "text_label", "model_dtype", "context_length",
                 "model_batch", "buffer_tokens", "holdout_tokens", "exclude_special", "corpus_tokens", "corpus_counted",
                 "resident_bytes"),
}


def source_dict(source: ActivationSet) -> dict:
    """What a script needs to train on a source: its id (``source_id`` in ``POST /api/trainings``),
    its width and size, and where it came from."""
    params = source.params or {}
    details = {key: params[key] for key in SOURCE_DETAILS.get(source.kind, ()) if key in params}
    if source.kind == "extracted" and isinstance(params.get("norm"), dict):
        details["mean_norm"] = params["norm"].get("mean_norm")
    if source.kind == "file":
        array = params.get("array") or {}
        details.update(original_name=params.get("original_name"), format=array.get("format"),
                       dtype=array.get("dtype"))
    return {"id": source.id, "name": source.name, "kind": source.kind, "d_in": source.d_in,
            "training_tokens": source.n_tokens, "total_rows": source.total_rows, "details": details,
            "created_by": creator_name(source), "created_at": iso(source.created_at),
            "new_training_url": external_url("pages.new_training", source_id=source.id)}


@bp.get("/sources")
def list_sources():
    params = query_params({**PAGING, "kind": choice(("synthetic", "file", "extracted", "streamed")),
                           "d_in": whole(1, MAX_ID)})
    query = with_creator(ActivationSet)
    if "kind" in params:
        query = query.where(ActivationSet.kind == params["kind"])
    if "d_in" in params:
        query = query.where(ActivationSet.d_in == params["d_in"])
    return page_of(query, ActivationSet, params, "sources", source_dict)


def template_dict(template: Template) -> dict:
    """``config`` holds the template's fields; ``training`` is a body for ``POST /api/trainings``
    from it (the config and the form's seed): add a ``source_id`` (and a ``name``) and post it."""
    return {"id": template.id, "name": template.name, "d_in": template.d_in, "builtin": template.builtin,
            "architecture": (template.config or {}).get("architecture"), "provenance": template.provenance,
            "config": template.config, "training": {"seed": BY_NAME["seed"].default, **(template.config or {})},
            "created_by": creator_name(template), "created_at": iso(template.created_at),
            # a sweep template's axes and mode: POST /api/sweeps {"template_id", "base": {"source_id"}} starts it
            "sweep": template.sweep,
            "new_training_url": external_url("pages.new_training", template=template.id)}


@bp.get("/templates")
def list_templates():
    params = query_params({**PAGING, "d_in": whole(1, MAX_ID)})
    query = with_creator(Template)
    if "d_in" in params:
        query = query.where(Template.d_in == params["d_in"])
    return page_of(query, Template, params, "templates", template_dict)


def imported_dict(sae: ImportedSAE) -> dict:
    """An imported SAE and its feature jobs (the latest 20): it is browsed, not trained."""
    jobs = sae.feature_jobs.order_by(FeatureJob.id.desc()).limit(20)
    return {"id": sae.id, "name": sae.name, "architecture": sae.architecture, "d_in": sae.d_in, "d_sae": sae.d_sae,
            "k": sae.k, "created_by": creator_name(sae), "created_at": iso(sae.created_at),
            "feature_jobs": [{"id": j.id, "status": j.status, "source_id": j.source_id,
                              "url": external_url("features.show", job_id=j.id)} for j in jobs]}


@bp.get("/imports")
def list_imports():
    params = query_params({**PAGING, "d_in": whole(1, MAX_ID)})
    query = with_creator(ImportedSAE)
    if "d_in" in params:
        query = query.where(ImportedSAE.d_in == params["d_in"])
    return page_of(query, ImportedSAE, params, "imports", imported_dict)


@bp.get("/workers")
def list_workers():
    """Every worker's host, device, memory, current jobs, last beat and state (admins), from the database."""
    from ..auth import require_admin
    from .workers import workers

    require_admin()
    return {"workers": workers(current_app.config)}
