"""Sweep pages: start a sweep (or the L0 finder) from the training form, watch its members, act on it."""
from __future__ import annotations

from flask import Blueprint, current_app, g, redirect, render_template, request, url_for
from werkzeug.datastructures import MultiDict

from .. import charts
from ..auth import require_change
from ..forms import TrainingForm
from ..models import Sweep
from ..work import deletion, finder, sweeps
from ..work.templates import NoMemberLeft, describe_sweep_part, template_from_sweep
from ..work.queue import QueueUnavailable
from .records import delete_flow, get_or_404

bp = Blueprint("sweeps", __name__)

SWEEP_FIELDS = ("sweep_param_1", "sweep_values_1", "sweep_param_2", "sweep_values_2", "sweep_mode", "sweep_name")


def _as_formdata(payload: dict):
    """A member's configuration as the browser would post it (every value a string; blanks left out)."""
    return MultiDict({k: str(v) for k, v in payload.items() if v is not None and k not in SWEEP_FIELDS}), {}


@bp.get("/sweeps")
def index():
    # a sweep split over devices is one row: its first part's, with every part's members counted
    listed = list(Sweep.select().where(Sweep.part_of.is_null()).order_by(Sweep.id.desc()).limit(200))
    groups = {s.id: sweeps.group_of(s) for s in listed}
    counts = sweeps.status_counts([p.id for parts in groups.values() for p in parts])
    rows = []
    for s in listed:
        total: dict[str, int] = {}
        for part in groups[s.id]:
            for status, n in counts.get(part.id, {}).items():
                total[status] = total.get(status, 0) + n
        rows.append((s, total, sweeps.group_status(groups[s.id]), len(groups[s.id])))
    return render_template("sweeps.html", rows=rows)


@bp.post("/sweeps")
def create():
    """From the training form: its fields are the base; the sweep fields name the axes (or the finder)."""
    form = TrainingForm()
    mode = request.form.get("sweep_mode", "grid")
    base = {k: v for k, v in request.form.items() if k not in SWEEP_FIELDS and k != "csrf_token"}
    if mode == "find_l0":
        base, axes, errors = finder.finder_plan(base, None)
    elif mode == "grid":
        axes, errors = sweeps.axes_from_text([(request.form.get(f"sweep_param_{i}"),
                                               request.form.get(f"sweep_values_{i}")) for i in (1, 2)])
    else:
        axes, errors = [], {"sweep_values_1": ["Choose a sweep or the L0 finder."]}
    check = None
    if not errors:
        check = sweeps.check_sweep(base, axes, current_app.config, to_formdata=_as_formdata, mode=mode)
        errors = dict(check.errors)
        messages = [f"{m.label}: {name}: {' '.join(msgs)}" for m in check.members for name, msgs in m.errors.items()]
        if messages:
            errors.setdefault("sweep_values_1", []).extend(messages)
    errors = _at_sweep_fields(errors)
    base_ok = form.validate_on_submit() or not _form_blocks(form)
    if errors or check is None or not check.ok or not base_ok:
        if (check is not None and not form.acknowledge_warnings.errors
                and any("acknowledge_warnings" in m.errors for m in check.members)):
            form.acknowledge_warnings.errors = list(form.acknowledge_warnings.errors or []) + [
                "Some members have warnings: read them in the list under the sweep, then tick this box."]
        return _render(form, errors, mode), 422
    try:
        sweep = sweeps.create_sweep(check, name=request.form.get("sweep_name") or request.form.get("name") or "",
                                    mode=mode, settings=current_app.config, created_by=g.user.id)
    except QueueUnavailable as exc:
        return _render(form, {"sweep_values_1": [f"Not started: {exc}. Nothing was created."]}, mode), 503
    return redirect(url_for("sweeps.detail", sweep_id=sweep.id), code=303)


def _at_sweep_fields(errors: dict) -> dict:
    """Every message at a sweep field the page shows: an axis's own at its values, the rest at the first."""
    placed: dict[str, list[str]] = {}
    for key, messages in errors.items():
        if key.startswith("axes.") and key[5:].isdigit() and int(key[5:]) < 2:
            target = f"sweep_values_{int(key[5:]) + 1}"
        elif key in ("sweep_values_1", "sweep_values_2"):
            target = key
        else:
            target = "sweep_values_1"
            messages = messages if key in ("axes",) else [f"{key}: {m}" for m in messages]
        placed.setdefault(target, []).extend(messages)
    return {k: v for k, v in placed.items() if v}


def _form_blocks(form: TrainingForm) -> bool:
    """The base form's own errors block a sweep too, except the acknowledgement (checked per member)."""
    return any(name != "acknowledge_warnings" for name in form.errors)


def _render(form: TrainingForm, errors: dict, mode: str):
    return render_template("training_form.html", **_form_context(form), sweep_errors=errors, sweep_mode=mode)


def _form_context(form: TrainingForm) -> dict:
    from ..models import Template

    templates = list(Template.select().order_by(Template.builtin.desc(), Template.d_in, Template.name))
    return {"form": form, "templates": templates, "source_run": None, "template": None}


@bp.get("/sweeps/<int:sweep_id>")
def detail(sweep_id: int):
    sweep = get_or_404(Sweep, sweep_id, "sweep")
    if sweep.part_of:  # a part of a sweep split over devices: the sweep's page is its first part's
        return redirect(url_for("sweeps.detail", sweep_id=sweep.part_of, _anchor=f"part-{sweep.part}"), code=303)
    return render_template("sweep_detail.html", sweep=sweep, **members_context(sweep))


@bp.get("/sweeps/<int:sweep_id>/members")
def members(sweep_id: int):
    """The live table and charts (htmx); polling stops once the sweep and its members have ended."""
    sweep = get_or_404(Sweep, sweep_id, "sweep")
    return render_template("_partials/sweep_members.html", sweep=sweep, **members_context(sweep))


def members_context(sweep: Sweep) -> dict:
    parts = sweeps.group_of(sweep)
    rows = sweeps.member_rows(sweep)
    suggested = sweeps.suggestion(sweep, rows)
    colors = {r["id"]: charts.PALETTE[i % len(charts.PALETTE)] for i, r in enumerate(rows)}
    frontier = charts.scatter_chart("Members: sparsity against reconstruction", [
        (r["l0_fraction"], r["fvu"], f"#{r['id']}", colors[r["id"]]) for r in rows if r["final"]])
    scored = [r for r in rows if r["downstream_score"] is not None]
    model_frontier = charts.scatter_chart(
        "Members on their model: sparsity against the downstream score",
        [(r["l0_fraction"], r["downstream_score"], f"#{r['id']}", colors[r["id"]]) for r in scored],
        y_label=scored[0]["downstream_name"] or "downstream score") if scored else None
    finder_chart = None
    curve = (sweep.finding or {}).get("curve")
    if curve:
        finder_chart = charts.scatter_chart(
            "L0 finder: the metric against L0", [(p["l0_fraction"], p["metric"], f"#{p['member_id']}",
                                                 colors.get(p["member_id"])) for p in curve if p.get("metric") is not None],
            y_label=sweep.finding.get("metric_name", "metric"))
    active = any(p.is_active for p in parts) or any(r["status"] in ("queued", "running") for r in rows)
    return {"parts": parts, "group_status": sweeps.group_status(parts),
            "resumable": any(p.status in ("interrupted", "failed", "cancelled") for p in parts), "rows": rows, "suggested": suggested, "frontier": frontier, "model_frontier": model_frontier,
            "finder_chart": finder_chart, "colors": colors, "active": active, "suggestion_rule": sweeps.SUGGESTION_RULE,
            "compare_url": url_for("pages.compare", ids=[r["id"] for r in rows if r["final"]])}


@bp.route("/sweeps/<int:sweep_id>/delete", methods=["GET", "POST"])
def delete(sweep_id: int):
    """Ask once, naming the member runs that go with the sweep; then delete them all and their files."""
    sweep = get_or_404(Sweep, sweep_id, "sweep")
    return delete_flow(sweep, deletion.plan_sweep, deletion.delete_sweep,
                       action=url_for("sweeps.delete", sweep_id=sweep.id),
                       back=url_for("sweeps.detail", sweep_id=sweep.id), done=url_for("sweeps.index"))


@bp.post("/sweeps/<int:sweep_id>/cancel")
def cancel(sweep_id: int):
    sweep = get_or_404(Sweep, sweep_id, "sweep")
    require_change(sweep)
    if any(part.is_active for part in sweeps.group_of(sweep)):
        sweeps.cancel_sweep(sweep)
    return redirect(url_for("sweeps.detail", sweep_id=sweep.id), code=303)


@bp.post("/sweeps/<int:sweep_id>/resume")
def resume(sweep_id: int):
    sweep = get_or_404(Sweep, sweep_id, "sweep")
    require_change(sweep)
    try:
        sweeps.resume_group(sweep, current_app.config)
    except (sweeps.SweepRefused, QueueUnavailable) as exc:
        return render_template("sweep_detail.html", sweep=sweep, error=str(exc), **members_context(sweep)), 409
    return redirect(url_for("sweeps.detail", sweep_id=sweep.id), code=303)


@bp.post("/sweeps/<int:sweep_id>/template")
def save_template(sweep_id: int):
    """Save the sweep (its base, axes and mode) as a template of the user's own: the training form fills
    from it with the sweep's fields, to start the same sweep on another source."""
    sweep = get_or_404(Sweep, sweep_id, "sweep")
    name = (request.form.get("template_name") or "").strip()
    if not name or len(name) > 200:
        return render_template("sweep_detail.html", sweep=sweep, template_error="Give the template a name of at most "
                               "200 characters.", **members_context(sweep)), 422
    try:
        template = template_from_sweep(sweep, name=name, created_by=g.user.id)
    except NoMemberLeft as exc:
        return render_template("sweep_detail.html", sweep=sweep, template_error=str(exc), **members_context(sweep)), 409
    return redirect(url_for("templates.index", _anchor=f"template-{template.id}"), code=303)


def sweep_field_values(template=None) -> dict:
    """What the sweep's fields under the training form show: what was posted, or on a fresh form the
    axes of the sweep template it was filled from."""
    if request.method == "POST":
        return request.form
    values = {}
    if not template:  # also Jinja's undefined, on a form that came from no template
        return values
    for i, axis in enumerate((template.sweep or {}).get("axes") or [], start=1):
        values[f"sweep_param_{i}"] = axis["param"]
        values[f"sweep_values_{i}"] = ", ".join(str(v) for v in axis["values"])
    return values


@bp.app_context_processor
def sweep_choices() -> dict:
    return {"sweepable": sweeps.SWEEPABLE, "sweep_field_values": sweep_field_values,
            "describe_sweep_part": describe_sweep_part}
