"""Activation sources: list, upload a file, define a synthetic source."""
from __future__ import annotations

from flask import Blueprint, current_app, g, redirect, render_template, request, url_for
from werkzeug.exceptions import RequestEntityTooLarge

from .. import security
from ..forms import SyntheticSourceForm, UploadForm
from ..models import ActivationSet
from ..sae.files import ActivationFileError
from ..work import deletion
from ..work.sources import create_synthetic, store_upload
from .records import delete_flow, get_or_404

bp = Blueprint("sources", __name__, url_prefix="/sources")


def render_sources(upload_form=None, synthetic_form=None, status=200):
    sources = list(ActivationSet.select().order_by(ActivationSet.id))
    return render_template("sources.html", sources=sources, upload_form=upload_form or UploadForm(formdata=None),
                           synthetic_form=synthetic_form or SyntheticSourceForm(formdata=None),
                           max_mb=current_app.config["MAX_UPLOAD_MB"]), status


@bp.get("/")
def index():
    return render_sources()


@bp.post("/upload")
def upload():
    form = UploadForm()
    if not form.validate_on_submit():
        return render_sources(upload_form=form, status=422)
    try:
        store_upload(current_app.config, form.file.data, (form.name.data or "").strip(), created_by=g.user.id)
    except ActivationFileError as exc:
        form.file.errors.append(f"Refused: {exc}. Nothing was kept.")
        return render_sources(upload_form=form, status=422)
    return redirect(url_for("sources.index"), code=303)


@bp.post("/synthetic")
def synthetic():
    form = SyntheticSourceForm()
    if not form.validate_on_submit():
        return render_sources(synthetic_form=form, status=422)
    create_synthetic(form.data, created_by=g.user.id)
    return redirect(url_for("sources.index"), code=303)


@bp.route("/<int:source_id>/delete", methods=["GET", "POST"])
def delete(source_id: int):
    source = get_or_404(ActivationSet, source_id, "activation source")
    return delete_flow(source, deletion.plan_source, deletion.delete_source,
                       action=url_for("sources.delete", source_id=source.id), back=url_for("sources.index"),
                       done=url_for("sources.index"))


@bp.errorhandler(RequestEntityTooLarge)
def too_large(error):
    """An upload over the limit: said at the file field, nothing kept."""
    if request.endpoint != "sources.upload" or security.held_to_small_limit():
        return security.too_large(error)
    form = UploadForm(formdata=None)
    form.file.errors = [
        f"Refused: the file is larger than the limit of {current_app.config['MAX_UPLOAD_MB']:,} MB. Nothing was kept."]
    return render_sources(upload_form=form, status=413)
