"""Activation sources and text corpora from the web: uploads checked, converted and kept under
``DATA_DIR``, and the records that name them. What the sources page and the extraction form
call; nothing is queued here, and nothing half-written is kept when a check fails."""
from __future__ import annotations

import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

from ..db import database
from ..extraction.text import TEXT_SUFFIXES, TextSourceError, TextSpec, check_corpus
from ..models import ActivationSet
from ..sae.files import ActivationFileError, holdout_rows, inspect_activation_file

UPLOAD_SUFFIXES = (".npy", ".safetensors", ".pt")
MIN_ROWS = 1024  # one default-sized batch, and enough rows to hold some out for evaluation


def _torch_archive_problem(src: Path) -> str | None:
    """Why ``src`` cannot be a tensor file the converter loads, found without starting it: it loads only
    torch.save's zip archive (what torch has written since 1.6; a memory-mapped load refuses the older
    format), which holds a ``data.pkl`` record. Reading a zip's directory runs nothing from it."""
    try:
        with zipfile.ZipFile(src) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return "not a loadable tensor file without executing code (not the zip archive torch.save writes)"
    if not any(name.endswith("/data.pkl") or name == "data.pkl" for name in names):
        return ("not a loadable tensor file without executing code (a zip archive, but not one torch.save wrote: "
                "it has no data.pkl)")
    return None


def _convert_pt(src: Path, dst: Path) -> None:
    """Convert in a child process: the web process never imports torch. A file that is not even
    torch.save's archive is refused first, without starting a child process for it."""
    problem = _torch_archive_problem(src)
    if problem:
        raise ActivationFileError(problem)
    proc = subprocess.run([sys.executable, "-m", "app.sae.pt_convert", str(src), str(dst)],
                          capture_output=True, text=True, timeout=3600,
                          cwd=str(Path(__file__).resolve().parents[2]))
    if proc.returncode != 0:
        lines = (proc.stderr or "").strip().splitlines()
        raise ActivationFileError(lines[-1] if lines else "the .pt file could not be read")


def store_upload(settings: dict, file_storage, name: str, *, created_by: int | None = None) -> ActivationSet:
    """Check an uploaded activation file and keep it under DATA_DIR/sources as a new source;
    keep nothing on failure (``ActivationFileError`` says why)."""
    data_dir = Path(settings["DATA_DIR"])
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
        info = inspect_activation_file(kept, min_rows=MIN_ROWS, max_bytes=settings["MAX_UPLOAD_MB"] * 2**20)
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


def create_synthetic(d: dict, *, created_by: int | None = None) -> ActivationSet:
    """A synthetic source from the validated form's data ``d``."""
    structure = d["structure"] or "independent"
    hard = structure == "hierarchical"
    return ActivationSet.create(
        created_by=created_by,
        name=f"Synthetic{' (hierarchical)' if hard else ''}: {d['n_features']:,} ground-truth features in d_in "
             f"{d['d_in']}, ~{d['mean_active']:g} active per token",
        kind="synthetic", d_in=d["d_in"], n_tokens=None,
        params={"n_features": d["n_features"], "mean_active": d["mean_active"], "seed": d["seed"],
                "structure": structure})


def store_text_upload(settings: dict, upload, column: str) -> TextSpec:
    """Keep an uploaded corpus under DATA_DIR/texts once it reads as text (``TextSourceError``,
    with the field it concerns, if not: nothing is kept)."""
    suffix = Path(upload.filename or "").suffix.lower()
    if suffix not in TEXT_SUFFIXES:
        raise TextSourceError(f"unsupported file type {suffix or '(none)'}; use {', '.join(TEXT_SUFFIXES)}",
                              field="text_file")
    folder = Path(settings["DATA_DIR"]) / "texts"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{uuid.uuid4().hex}{suffix}"
    upload.save(path)
    spec = TextSpec("file", path=str(path), column=column)
    try:
        check_corpus(spec)
    except TextSourceError:
        path.unlink(missing_ok=True)
        raise
    return spec


def drop_text_upload(spec: TextSpec) -> None:
    """Remove a kept corpus whose extraction could not be queued."""
    if spec.path:
        Path(spec.path).unlink(missing_ok=True)
