"""Templates: proven presets and the user's own, to fill the training form."""
from __future__ import annotations

import json

from flask import Blueprint, Response, current_app, g, redirect, render_template, request, url_for

from ..auth import require_change
from ..forms import TemplateForm, TrainingForm, json_to_formdata
from ..models import Template
from ..work import deletion
from ..work.templates import check_sweep_part, create_template, duplicate_template, update_template
from ..work.templates import import_templates as create_imported
from .records import get_or_404

bp = Blueprint("templates", __name__, url_prefix="/templates")


def get_template_or_404(template_id: int) -> Template:
    return get_or_404(Template, template_id, "template")


def render_list(import_errors=None, status=200):
    templates = list(Template.select().order_by(Template.builtin.desc(), Template.d_in, Template.name))
    return render_template("templates_list.html", templates=templates, import_errors=import_errors or []), status


@bp.get("/")
def index():
    return render_list()


@bp.post("/from-form")
def save_from_form():
    """Save the training form's current values as a new template (named by ``template_name``)."""
    data = request.form.copy()
    data["name"] = data.get("template_name", "")
    data.pop("provenance", None)
    form = TemplateForm(formdata=data)
    if not form.validate():
        problems = {k: v for k, v in form.errors.items()}
        return render_template("_partials/template_saved.html", template=None, problems=problems), 422
    training = TrainingForm()
    source = training.sources.get(training.source_id.data)
    template = create_template(name=form.name.data.strip(), created_by=g.user.id, d_in=source.d_in if source else None,
                               config=form.template_config(), provenance=form.provenance.data or "saved from the form")
    return render_template("_partials/template_saved.html", template=template, problems=None)


@bp.route("/<int:template_id>/edit", methods=["GET", "POST"])
def edit(template_id: int):
    template = get_template_or_404(template_id)
    if request.method == "GET":
        form = TemplateForm(data={"name": template.name, "d_in": template.d_in, "provenance": template.provenance,
                                  **{k: v for k, v in template.config.items() if v is not None}})
    else:
        require_change(template)
        form = TemplateForm()
        if form.validate():
            update_template(template, name=form.name.data.strip(), d_in=form.d_in.data,
                            provenance=form.provenance.data or "", config=form.template_config())
            return redirect(url_for("templates.index"), code=303)
    return render_template("template_edit.html", form=form, template=template), (422 if form.errors else 200)


@bp.post("/<int:template_id>/duplicate")
def duplicate(template_id: int):
    t = get_template_or_404(template_id)
    duplicate_template(t, created_by=g.user.id)
    return redirect(url_for("templates.index"), code=303)


@bp.post("/<int:template_id>/delete")
def delete(template_id: int):
    template = get_template_or_404(template_id)
    require_change(template)
    deletion.delete_template(template, current_app.config)
    return redirect(url_for("templates.index"), code=303)


def json_download(payload, filename: str) -> Response:
    return Response(json.dumps(payload, indent=2), mimetype="application/json",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})


@bp.get("/<int:template_id>/export")
def export_one(template_id: int):
    return json_download(get_template_or_404(template_id).export(), f"template-{template_id}.json")


@bp.get("/export")
def export_all():
    return json_download([t.export() for t in Template.select().order_by(Template.id)], "templates.json")


def parse_templates(text: str) -> tuple[list[dict], list[str]]:
    """Validate every template in ``text``; return (rows to create, errors). All or nothing."""
    try:
        payload = json.loads(text)
    except ValueError as exc:
        return [], [f"Not valid JSON: {exc}."]
    items = payload if isinstance(payload, list) else [payload]
    if not items:
        return [], ["The file holds no template."]
    rows, errors = [], []
    for i, item in enumerate(items, start=1):
        label = f"Template {i}" + (f" ({item.get('name')})" if isinstance(item, dict) and item.get("name") else "")
        sweep_part = None
        if isinstance(item, dict) and "sweep" in item:  # a sweep template's axes and mode (null: none)
            item = dict(item)
            raw = item.pop("sweep")
            if raw is not None:
                sweep_part, sweep_errors = check_sweep_part(raw, current_app.config)
                if sweep_errors:
                    errors.extend(f"{label}: sweep: {m}" for m in sweep_errors)
                    continue
        formdata, mapping_errors = json_to_formdata(item, template=True)
        if formdata is None:
            errors.extend(f"{label}: {m}" for msgs in mapping_errors.values() for m in msgs)
            continue
        form = TemplateForm(formdata=formdata, meta={"csrf": False})
        valid = form.validate()
        problems = {**{k: v for k, v in form.errors.items()}, **mapping_errors}
        if problems or not valid:
            errors.extend(f"{label}: {field}: {m}" for field, msgs in problems.items() for m in msgs)
            continue
        rows.append({"name": form.name.data.strip(), "d_in": form.d_in.data, "provenance": form.provenance.data or "",
                     "config": form.template_config(), "builtin": False, "sweep": sweep_part})
    return rows, errors


@bp.post("/import")
def import_templates():
    upload = request.files.get("file")
    text = upload.read().decode("utf-8", errors="replace") if upload and upload.filename else request.form.get("json", "")
    rows, errors = parse_templates(text)
    if errors:
        return render_list(import_errors=errors + ["Nothing was imported."], status=422)
    create_imported(rows, created_by=g.user.id)
    return redirect(url_for("templates.index"), code=303)
