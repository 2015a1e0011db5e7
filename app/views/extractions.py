"""Extraction: capture a transformer's activations over a text corpus (form, progress, cancel)."""
from __future__ import annotations

from flask import Blueprint, current_app, g, redirect, render_template, request, url_for
from werkzeug.exceptions import RequestEntityTooLarge

from .. import security
from ..auth import require_change
from ..extraction.capture_names import SITES
from ..extraction.text import TEXT_SUFFIXES, TextSourceError, TextSpec
from ..forms import ExtractionForm, StreamForm
from ..models import Extraction
from ..work import deletion, lifecycle
from ..work.extraction import create_extraction, named_text_spec
from ..work.queue import QueueUnavailable
from ..work.sources import drop_text_upload, store_text_upload
from .records import delete_flow, get_or_404

bp = Blueprint("extractions", __name__, url_prefix="/extractions")


def render_index(form=None, status=200, stream_form=None):
    jobs = list(Extraction.select().order_by(Extraction.id.desc()).limit(200))
    return render_template("extractions.html", form=form or ExtractionForm(formdata=None), jobs=jobs, sites=SITES,
                           stream_form=stream_form or StreamForm(formdata=None, prefix="stream"),
                           suffixes=", ".join(TEXT_SUFFIXES)), status


@bp.get("/")
def index():
    return render_index()


def _store_text_upload(form: ExtractionForm) -> TextSpec | None:
    """Keep an uploaded corpus once it reads as text; otherwise errors on the form, nothing kept."""
    try:
        return store_text_upload(current_app.config, form.text_file.data, (form.text_column.data or "text").strip())
    except TextSourceError as exc:
        field = form.text_column if exc.field == "text_column" else form.text_file
        field.errors.append(f"Refused: {exc}. Nothing was kept.")
        return None


def _corpus(form) -> TextSpec | None:
    """The corpus a validated form names: an upload kept (None, with the error at its field, if it
    does not read as text), or a named dataset or the stdlib."""
    return _store_text_upload(form) if form.text_kind.data == "file" else named_text_spec(form.data)


@bp.post("/")
def start():
    form = ExtractionForm()
    if not form.validate_on_submit():
        return render_index(form, 422)
    d = form.data
    spec = _corpus(form)
    if spec is None:
        return render_index(form, 422)
    try:
        job = create_extraction(current_app.config, d, spec, created_by=g.user.id,
                                model_size_bytes=form.model_size_bytes)
    except QueueUnavailable as exc:
        drop_text_upload(spec)
        form.form_errors.append(f"Not started: {exc}. Nothing was kept; try again once the queue is back.")
        return render_index(form, 503)
    return redirect(url_for("extractions.show", extraction_id=job.id), code=303)


@bp.post("/stream")
def stream():
    """A streamed source: recorded at once (its corpus counted), then trained on from the training form."""
    from ..work.streams import StreamRefused, create_streamed_source

    form = StreamForm(prefix="stream")
    if not form.validate_on_submit():
        return render_index(stream_form=form, status=422)
    d = form.data
    spec = _corpus(form)
    if spec is None:
        return render_index(stream_form=form, status=422)
    try:
        source = create_streamed_source(current_app.config, d, spec, created_by=g.user.id,
                                        model_size_bytes=form.model_size_bytes)
    except StreamRefused as exc:
        drop_text_upload(spec)
        field = getattr(form, exc.field, None) or form.layers
        field.errors.append(f"Refused: {exc} Nothing was kept.")
        return render_index(stream_form=form, status=422)
    return redirect(url_for("pages.new_training", source_id=source.id), code=303)


def get_extraction_or_404(extraction_id: int) -> Extraction:
    return get_or_404(Extraction, extraction_id, "extraction")


@bp.get("/<int:extraction_id>")
def show(extraction_id: int):
    return render_template("extraction_detail.html", job=get_extraction_or_404(extraction_id), sites=SITES)


@bp.get("/<int:extraction_id>/progress")
def progress(extraction_id: int):
    return render_template("_partials/extraction_progress.html", job=get_extraction_or_404(extraction_id), sites=SITES)


@bp.post("/<int:extraction_id>/cancel")
def cancel(extraction_id: int):
    job = get_extraction_or_404(extraction_id)
    require_change(job)
    lifecycle.request_cancel(job)
    return render_template("_partials/extraction_progress.html", job=Extraction.get_by_id(job.id), sites=SITES)


@bp.route("/<int:extraction_id>/delete", methods=["GET", "POST"])
def delete(extraction_id: int):
    job = get_extraction_or_404(extraction_id)
    return delete_flow(job, deletion.plan_extraction, deletion.delete_extraction,
                       action=url_for("extractions.delete", extraction_id=job.id),
                       back=url_for("extractions.show", extraction_id=job.id), done=url_for("extractions.index"))


@bp.errorhandler(RequestEntityTooLarge)
def too_large(error):
    if request.endpoint != "extractions.start" or security.held_to_small_limit():
        return security.too_large(error)
    form = ExtractionForm(formdata=None)
    form.text_file.errors = [f"Refused: the file is larger than the limit of {current_app.config['MAX_UPLOAD_MB']:,} "
                             "MB. Nothing was kept."]
    return render_index(form, 413)
