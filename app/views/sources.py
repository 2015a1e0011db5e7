"""Activation sources: list, upload a file, define a synthetic source."""
from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

from flask import Blueprint, current_app, g, redirect, render_template, request, url_for

from werkzeug.exceptions import RequestEntityTooLarge

from .. import security
from ..db import database
from ..forms import SyntheticSourceForm, UploadForm
from ..models import ActivationSet
from ..sae.files import ActivationFileError, holdout_rows, inspect_activation_file
from ..work import deletion
from .records import delete_flow, get_or_404

bp = Blueprint("sources", __name__, url_prefix="/sources")

UPLOAD_SUFFIXES = (".npy", ".safetensors", ".pt")
MIN_ROWS = 1024  # one default-sized batch, and enough rows to hold some out for evaluation


def render_sources(upload_form=None, synthetic_form=None, status=200):
    sources = list(ActivationSet.select().order_by(ActivationSet.id))
    return render_template("sources.html", sources=sources, upload_form=upload_form or UploadForm(formdata=None),
                           synthetic_form=synthetic_form or SyntheticSourceForm(formdata=None),
                           max_mb=current_app.config["MAX_UPLOAD_MB"]), status


@bp.get("/")
def index():
    return render_sources()


def _convert_pt(src: Path, dst: Path) -> None:
    """Convert in a child process: the web process never imports torch."""
    proc = subprocess.run([sys.executable, "-m", "app.sae.pt_convert", str(src), str(dst)],
                          capture_output=True, text=True, timeout=3600,
                          cwd=str(Path(__file__).resolve().parents[2]))
    if proc.returncode != 0:
        lines = (proc.stderr or "").strip().splitlines()
        raise ActivationFileError(lines[-1] if lines else "the .pt file could not be read")


def store_upload(file_storage, name: str, *, created_by: int | None = None) -> ActivationSet:
    """Check an uploaded file and keep it under DATA_DIR/sources; keep nothing on failure."""
    data_dir = Path(current_app.config["DATA_DIR"])
    filename = file_storage.filename or ""
    suffix = Path(filename).suffix.lower()
    if suffix not in UPLOAD_SUFFIXES:
        raise ActivationFileError(f"unsupported file type {suffix or '(none)'}; use .npy, .safetensors or .pt")
    staging = data_dir / "uploads"
    staging.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    raw = staging / f"{token}{suffix}"
    kept = raw
    try:
        file_storage.save(raw)
        if suffix == ".pt":
            kept = staging / f"{token}.npy"
            _convert_pt(raw, kept)
        info = inspect_activation_file(kept, min_rows=MIN_ROWS, max_bytes=current_app.config["MAX_UPLOAD_MB"] * 2**20)
        final_dir = data_dir / "sources"
        final_dir.mkdir(parents=True, exist_ok=True)
        final = final_dir / f"{token}{kept.suffix}"
        kept.replace(final)
        with database.atomic():
            return ActivationSet.create(
                created_by=created_by,
                name=name or Path(filename).name, kind="file", d_in=info.d_in,
                n_tokens=info.rows - holdout_rows(info.rows),
                params={"array": info.to_dict(), "original_name": Path(filename).name},
                path=str(final.relative_to(data_dir)))
    finally:
        for leftover in (raw, staging / f"{token}.npy"):
            leftover.unlink(missing_ok=True)


@bp.post("/upload")
def upload():
    form = UploadForm()
    if not form.validate_on_submit():
        return render_sources(upload_form=form, status=422)
    try:
        store_upload(form.file.data, (form.name.data or "").strip(), created_by=g.user.id)
    except ActivationFileError as exc:
        form.file.errors.append(f"Refused: {exc}. Nothing was kept.")
        return render_sources(upload_form=form, status=422)
    return redirect(url_for("sources.index"), code=303)


@bp.post("/synthetic")
def synthetic():
    form = SyntheticSourceForm()
    if not form.validate_on_submit():
        return render_sources(synthetic_form=form, status=422)
    d = form.data
    structure = d["structure"] or "independent"
    hard = structure == "hierarchical"
    ActivationSet.create(
        created_by=g.user.id,
        name=f"Synthetic{' (hierarchical)' if hard else ''}: {d['n_features']:,} ground-truth features in d_in "
             f"{d['d_in']}, ~{d['mean_active']:g} active per token",
        kind="synthetic", d_in=d["d_in"], n_tokens=None,
        params={"n_features": d["n_features"], "mean_active": d["mean_active"], "seed": d["seed"],
                "structure": structure})
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
    if request.endpoint != "sources.upload":
        return security.too_large(error)
    form = UploadForm(formdata=None)
    form.file.errors = [
        f"Refused: the file is larger than the limit of {current_app.config['MAX_UPLOAD_MB']:,} MB. Nothing was kept."]
    return render_sources(upload_form=form, status=413)
