"""Template filters and helpers shared by pages and fragments."""
from __future__ import annotations

import datetime as dt
import math

from flask import url_for

from .. import training_config
from ..models import utcnow
from ..sae import architectures
from ..sae.architectures._base import num as fmt_num
from ..quality import GRADE_LABELS, RED_ABOVE, format_l0, format_target, grade, grade_label


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m" if h else (f"{m}m {s:02d}s" if m else f"{s}s")


def progress_view(run, latest) -> dict:
    """Everything the progress fragment shows, computed once."""
    step = run.step
    elapsed = eta = None
    if run.started_at:
        end = run.finished_at or utcnow()
        elapsed = (end - run.started_at).total_seconds()
        if run.is_active and step > 0:
            eta = elapsed / step * (run.total_steps - step)
    summary = run.summary or {}
    if summary.get("l0") is not None:
        l0, l0_fraction, fvu, dead = summary["l0"], summary["l0_fraction"], summary["fvu"], summary.get("dead")
        measured_on = "held-out evaluation"
    elif latest is not None:
        l0, l0_fraction, fvu, dead = latest.l0, latest.l0_fraction, latest.fvu, latest.dead
        measured_on = f"training, step {latest.step:,}"
    else:
        l0 = l0_fraction = fvu = dead = None
        measured_on = None
    g = grade(l0_fraction, dead, run.latent_dim)
    return {
        "percent": 100.0 * step / run.total_steps if run.total_steps else 0.0,
        "elapsed": elapsed, "eta": eta, "grade": g, "grade_label": grade_label(l0_fraction, dead, run.latent_dim),
        "l0_text": format_l0(l0, run.latent_dim) if l0 is not None else "L0 not measured yet",
        "target_text": format_target(run.target_l0, run.latent_dim),
        "l0": l0, "l0_fraction": l0_fraction, "fvu": fvu, "dead": dead, "measured_on": measured_on,
    }


def queue_banner(settings: dict) -> str | None:
    """What a user should know about the queue, from the workers' beats in the database (never Redis)."""
    from ..models import WorkerBeat

    limit = utcnow() - dt.timedelta(seconds=3 * settings["SWEEP_INTERVAL_S"] + 15)
    beats = list(WorkerBeat.select().where(WorkerBeat.last_seen >= limit))
    if not beats:
        return ("No worker is running: queued work waits until one starts (`make run` starts one; "
                "see the README for more).")
    if all(b.queue_error for b in beats):
        return (f"{beats[0].queue_error}. Pages show what the database holds; new work cannot be started "
                "until the queue is back, and queued work then proceeds.")
    return None


def admin_banners(settings: dict) -> list[tuple[str, str]]:
    """What an admin should fix on the server: (element id, text) for each.

    A live worker whose maintenance part has failed ``MAINTENANCE_FAILURES_SHOWN`` rounds in a row
    (its beat says which and why, with credentials and server paths redacted), and a DATA_DIR
    that other accounts on the machine can read.
    """
    from ..config import data_dir_exposure
    from ..models import WorkerBeat

    shown = []
    limit = utcnow() - dt.timedelta(seconds=3 * settings["SWEEP_INTERVAL_S"] + 15)
    failing = list(WorkerBeat.select().where(WorkerBeat.last_seen >= limit,
                                             WorkerBeat.maintenance_failures >= settings["MAINTENANCE_FAILURES_SHOWN"])
                   .order_by(WorkerBeat.name))
    if failing:
        details = "; ".join(f"worker {b.name}: {b.maintenance_error}" for b in failing)  # redacted when recorded
        details = details.replace(str(settings["DATA_DIR"]), "DATA_DIR")
        shown.append(("maintenance-banner", "Maintenance keeps failing, so interrupted work may not be noticed or "
                      f"orphaned files removed (see the worker's log): {details}"))
    exposed = data_dir_exposure(settings["DATA_DIR"])
    if exposed:
        shown.append(("data-dir-banner", exposed))
    return shown


# The terms a reader may take for one another, defined once: every page that shows one of them
# names it with its definition (``_partials/terms.html``). "Dead" is measured in training,
# "never fired" on held-out tokens with the encoder used after training, so the two may differ
# (an architecture that trains on each batch's top k is evaluated with its learned threshold).
GLOSSARY = {
    "dead": ("Dead (in training)",
             "A latent is dead when it fired on none of the last dead-window tokens of training "
             "(dead_window_tokens); unknown until that many tokens have been trained on."),
    "never_fired": ("Never fired (held out)",
                    "A latent never fired when it was zero on every one of the held-out tokens evaluated after "
                    "training, with the encoder as it is used from then on ("
                    f"{architectures.titles(lambda a: a.inference_as is not None, ' and ')}: the "
                    "learned threshold instead of each batch's top k). It can differ from the dead count, "
                    "which is measured on training batches."),
}


# Each kind of queued record's page: (endpoint, its argument, the record's field that fills it).
# A downstream evaluation has no page of its own: it is shown on its run's.
JOB_PAGES = {"Training": ("pages.detail", "training_id", "id"), "TuneJob": ("tune.show", "tune_id", "id"),
             "Extraction": ("extractions.show", "extraction_id", "id"),
             "FeatureJob": ("features.show", "job_id", "id"), "Sweep": ("sweeps.detail", "sweep_id", "id"),
             "DownstreamEval": ("pages.detail", "training_id", "training_id")}


def job_url(record) -> str | None:
    """The page that shows ``record`` (any kind of queued work), or None for a kind with none."""
    page = JOB_PAGES.get(type(record).__name__)
    if page is None:
        return None
    endpoint, arg, field = page
    return url_for(endpoint, **{arg: getattr(record, field)})


def queue_position(record) -> dict | None:
    """Where a queued job stands, from the database rows alone (pages render with Redis down).

    The queue is first in, first out across every kind of job: ``ahead`` are the queued jobs
    put on it before this one, ``running`` the jobs the workers are busy with now.
    """
    from ..work.lifecycle import job_models, label

    if record.status != "queued":
        return None
    if getattr(record, "sweep_id", None) is not None:  # a sweep's member waits where its sweep does
        record = record.sweep
        if record.status != "queued":
            return None
    mine = record.queued_at or record.created_at
    ahead, running = [], []
    for model in job_models():
        since = model.queued_at.is_null(False) & (model.queued_at < mine) | (
            model.queued_at.is_null() & (model.created_at < mine))
        own_job = [model.sweep.is_null()] if hasattr(model, "sweep") else []  # members ride on their sweep's job
        for other in model.select().where(model.status == "queued", since, *own_job):
            ahead.append((other.queued_at or other.created_at, label(other), other))
        for other in model.select().where(model.status == "running", *own_job):
            running.append((other.started_at or other.created_at, label(other), other))
    ahead.sort(key=lambda t: t[0])
    running.sort(key=lambda t: t[0])
    return {"position": len(ahead) + 1, "ahead": [(what, r) for _, what, r in ahead],
            "running": [(what, r) for _, what, r in running]}


def param_value(param: training_config.Param, value) -> str:
    """A stored hyper-parameter as a person reads it: a choice by its label, counts with separators."""
    if value is None:
        return "—"
    if param.choices is not None:
        return dict(param.choices).get(value, str(value))
    if param.type is bool:
        return "yes" if value else "no"
    if param.type is str:
        return value or "(empty: the default)"
    return fmt_num(value)


# Values that read better beside what they mean for this run (each still the stored value first).
CONFIG_DETAILS = {
    "latent_dim": lambda run: f"{run.latent_dim:,} ({run.latent_dim / run.source.d_in:.0f}× d_in {run.source.d_in})",
    "target_l0": lambda run: f"{100 * run.target_l0:.1f}% ({run.target_l0_count:,.0f} latents)",
    "hook_point": lambda run: _hook_point(run),
}


def _hook_point(run) -> str:
    params = run.source.params or {}
    hook = run.hook_point or (params.get("hooks") or ["?"])[0]
    return f"{hook} ({params.get('site_label', '')}, streamed from {params.get('model', '?')})"


def config_rows(run) -> list[tuple[str, str]]:
    """The run's configuration panel: (label, value) of every hyper-parameter its architecture uses,
    in ``training_config.PARAMS`` order."""
    arch = architectures.find(run.architecture)
    words = arch.describe(run) if arch is not None else {}  # its own settings, in its own words
    rows = []
    for param in training_config.PARAMS:
        if not param.applies_to(run.architecture):
            continue
        if param.name in ("hook_point", "keep_store") and run.source.kind != "streamed":
            continue  # only a streamed source has hook points, and a store to keep
        value = getattr(run, param.name)
        detail = CONFIG_DETAILS.get(param.name)
        if value is not None and param.name in words:
            text = words[param.name]
        elif value is not None and detail is not None:
            text = detail(run)
        else:
            text = param_value(param, value)
        rows.append((param.label, text))
    return rows


def register_filters(app) -> None:
    app.jinja_env.globals["config_rows"] = config_rows
    app.jinja_env.globals["GLOSSARY"] = GLOSSARY
    app.jinja_env.globals["queue_position"] = queue_position
    app.jinja_env.globals["job_url"] = job_url
    app.jinja_env.globals["queue_banner"] = lambda: queue_banner(app.config)
    app.jinja_env.globals["admin_banners"] = lambda: admin_banners(app.config)
    app.jinja_env.filters["num"] = fmt_num
    app.jinja_env.filters["duration"] = fmt_duration
    app.jinja_env.globals["GRADE_LABELS"] = GRADE_LABELS
    app.jinja_env.globals["RED_ABOVE"] = RED_ABOVE  # the grade's own limit, never a copy of it
    app.jinja_env.globals["architectures"] = architectures  # templates ask the registry, never name one
    app.jinja_env.globals["now"] = lambda: dt.datetime.now()
