"""Record helpers shared by the blueprints (this module holds no routes): find one or 404,
and the ask-once-then-delete flow."""
from __future__ import annotations

from flask import abort, current_app, redirect, render_template, request, url_for

from ..auth import require_change
from ..models import Training
from ..work import deletion


MAX_ID = 2**63 - 1


def id_arg(name: str) -> int | None:
    """A record id from the query string: ASCII digits within range, else None."""
    raw = request.args.get(name, "")
    return int(raw) if raw.isascii() and raw.isdigit() and int(raw) <= MAX_ID else None


def id_args(name: str) -> list[int]:
    return [int(v) for v in request.args.getlist(name) if v.isascii() and v.isdigit() and int(v) <= MAX_ID]


def external_url(endpoint: str, **values) -> str:
    """An absolute link for the API: under EXTERNAL_URL when configured, never from a client's Host alone."""
    base = current_app.config.get("EXTERNAL_URL")
    return base + url_for(endpoint, **values) if base else url_for(endpoint, _external=True, **values)


def get_or_404(model, record_id: int, what: str):
    """The ``model`` row with ``record_id``, or a 404 that names ``what`` was looked for."""
    record = model.get_or_none(model.id == record_id)
    if record is None:
        abort(404, description=f"There is no {what} #{record_id}.")
    return record


def get_training_or_404(training_id: int) -> Training:
    return get_or_404(Training, training_id, "training")


def delete_flow(record, plan, delete, *, action: str, back: str, done: str):
    """GET: the confirmation page, naming what goes with the record (or why it can't go).
    POST: delete it and go to ``done``, or show the page again with the refusal (409)."""
    settings = current_app.config
    if request.method == "POST":
        require_change(record)
        try:
            delete(record, settings)
        except deletion.DeleteRefused as exc:
            return render_template("delete.html", plan=plan(record, settings), error=str(exc), action=action,
                                   back=back), 409
        return redirect(done, code=303)
    return render_template("delete.html", plan=plan(record, settings), action=action, back=back)
