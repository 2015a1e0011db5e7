"""Extraction: capture a transformer's activations over a text corpus (form, progress, cancel)."""
from __future__ import annotations

import uuid
from pathlib import Path

from flask import Blueprint, abort, current_app, redirect, render_template, url_for
from redis.exceptions import RedisError

from ..extraction.capture_names import SITES
from ..extraction.text import TEXT_SUFFIXES, TextSourceError, TextSpec, check_corpus
from ..forms import ExtractionForm
from ..jobqueue import enqueue_extraction, reconcile, request_cancel
from ..models import Extraction, utcnow

bp = Blueprint("extractions", __name__, url_prefix="/extractions")


def render_index(form=None, status=200):
    jobs = list(Extraction.select().order_by(Extraction.id.desc()).limit(200))
    return render_template("extractions.html", form=form or ExtractionForm(formdata=None), jobs=jobs, sites=SITES,
                           suffixes=", ".join(TEXT_SUFFIXES)), status


@bp.get("/")
def index():
    return render_index()


def _store_text_upload(form: ExtractionForm) -> TextSpec | None:
    """Keep an uploaded corpus under DATA_DIR/texts once it reads as text; otherwise errors, nothing kept."""
    upload = form.text_file.data
    suffix = Path(upload.filename or "").suffix.lower()
    if suffix not in TEXT_SUFFIXES:
        form.text_file.errors.append(f"Refused: unsupported file type {suffix or '(none)'}; use "
                                     f"{', '.join(TEXT_SUFFIXES)}. Nothing was kept.")
        return None
    folder = Path(current_app.config["DATA_DIR"]) / "texts"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{uuid.uuid4().hex}{suffix}"
    upload.save(path)
    spec = TextSpec("file", path=str(path), column=(form.text_column.data or "text").strip())
    try:
        check_corpus(spec)
    except TextSourceError as exc:
        path.unlink(missing_ok=True)
        field = form.text_column if exc.field == "text_column" else form.text_file
        field.errors.append(f"Refused: {exc}. Nothing was kept.")
        return None
    return spec


@bp.post("/")
def start():
    form = ExtractionForm()
    if not form.validate_on_submit():
        return render_index(form, 422)
    d = form.data
    if d["text_kind"] == "file":
        spec = _store_text_upload(form)
        if spec is None:
            return render_index(form, 422)
    else:
        spec = named_text_spec(d)
    job = create_extraction(form, spec)
    return redirect(url_for("extractions.show", extraction_id=job.id), code=303)


def named_text_spec(d: dict) -> TextSpec:
    """The corpus a validated form names without an upload: a Hugging Face dataset or the stdlib."""
    if d["text_kind"] == "hf":
        return TextSpec("hf", dataset=d["dataset_name"].strip(), split=(d["dataset_split"] or "train").strip(),
                        column=d["text_column"].strip())
    return TextSpec("stdlib")


def create_extraction(form: ExtractionForm, spec: TextSpec) -> Extraction:
    """Record a validated extraction and queue it; a queue failure is recorded on the row."""
    d = form.data
    job = Extraction.create(
        name=(d["name"] or "").strip(), model_name=d["model_name"].strip(), layer=d["layer"], site=d["site"],
        text=spec.to_dict(), token_budget=d["token_budget"], context_length=d["context_length"],
        batch_size=d["batch_size"], dtype=d["dtype"], model_dtype=d["model_dtype"],
        exclude_special=bool(d["exclude_special"]))
    try:
        enqueue_extraction(job, current_app.config)
    except RedisError as exc:
        Extraction.update(status="failed", reason=f"Could not reach the job queue: {exc}", finished_at=utcnow()).where(
            Extraction.id == job.id).execute()
    return Extraction.get_by_id(job.id)


def get_extraction_or_404(extraction_id: int) -> Extraction:
    job = Extraction.get_or_none(Extraction.id == extraction_id)
    if job is None:
        abort(404, description=f"There is no extraction #{extraction_id}.")
    reconcile(job, current_app.config)
    return Extraction.get_by_id(extraction_id)


@bp.get("/<int:extraction_id>")
def show(extraction_id: int):
    return render_template("extraction_detail.html", job=get_extraction_or_404(extraction_id), sites=SITES)


@bp.get("/<int:extraction_id>/progress")
def progress(extraction_id: int):
    return render_template("_partials/extraction_progress.html", job=get_extraction_or_404(extraction_id), sites=SITES)


@bp.post("/<int:extraction_id>/cancel")
def cancel(extraction_id: int):
    job = get_extraction_or_404(extraction_id)
    request_cancel(job, current_app.config)
    return render_template("_partials/extraction_progress.html", job=Extraction.get_by_id(job.id), sites=SITES)
