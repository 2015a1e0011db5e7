"""The Workers page (admins) and ``GET /api/workers``: every worker's host, device, memory, current
job, last beat and state — read from the workers' beats and the job records in the database, never
from Redis (placement: app/work/resources.py)."""
from __future__ import annotations

import datetime as dt

from flask import Blueprint, current_app, render_template

from .. import auth
from ..models import WorkerBeat, utcnow
from ..work import lifecycle
from .formatting import job_url

bp = Blueprint("workers", __name__)

def stale_after_s(settings: dict) -> float:
    """A beat older than this: the worker is gone or stuck (the banner's limit)."""
    return 3 * float(settings["SWEEP_INTERVAL_S"]) + 15


def workers(settings: dict) -> list[dict]:
    """Each worker that has beaten, newest first within name order, with what it runs now."""
    from ..work.resources import reserved_on

    now = utcnow()
    limit = now - dt.timedelta(seconds=stale_after_s(settings))
    running: dict[str, list] = {}
    for model in lifecycle.job_models():
        for record in model.select().where(model.status == "running"):
            running.setdefault(record.worker_name, []).append(record)
    rows = []
    for beat in WorkerBeat.select().order_by(WorkerBeat.name):
        jobs = running.get(beat.name, [])
        state = "stale" if beat.last_seen < limit else ("busy" if jobs else "idle")
        reserved = reserved_on(beat.device_key) if beat.device_key else 0
        rows.append({
            "name": beat.name, "host": beat.host, "pid": beat.pid, "state": state,
            "device": beat.device_label, "device_key": beat.device_key,
            "memory_free_bytes": beat.memory_free_bytes, "memory_total_bytes": beat.memory_total_bytes,
            "reserved_bytes": reserved,
            "last_beat": beat.last_seen.isoformat() + "Z", "last_beat_age_s": round((now - beat.last_seen).total_seconds(), 1),
            "queue_error": beat.queue_error, "maintenance_error": beat.maintenance_error,
            "jobs": [{"kind": lifecycle.label(r), "id": r.id, "name": getattr(r, "name", "") or "",
                      "url": job_url(r), "reserved_bytes": r.reserved_bytes} for r in jobs],
        })
    return rows


@bp.get("/workers/")
def page():
    auth.require_admin()
    from ..work.resources import fmt_gib

    return render_template("workers.html", workers=workers(current_app.config), fmt_gib=fmt_gib,
                           stale_after_s=stale_after_s(current_app.config))
