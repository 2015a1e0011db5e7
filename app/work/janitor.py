"""The janitor: removes files that no record owns, left by crashes and killed processes.

Run by the maintenance process beside each worker (every ``JANITOR_INTERVAL_S``). It only
removes what is both unreferenced and older than ``JANITOR_MIN_AGE_S``, so a file that a
request or a job is writing right now is never touched.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from ..models import ActivationSet, Extraction, ImportedSAE, Training


def _old(path: Path, min_age_s: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime >= min_age_s
    except FileNotFoundError:
        return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def orphans(settings: dict) -> list[Path]:
    """The files and folders under DATA_DIR that nothing owns and nothing is writing."""
    data = Path(settings["DATA_DIR"])
    min_age = settings["JANITOR_MIN_AGE_S"]
    found: list[Path] = []

    def scan(folder: str, owned: set[str], pattern: str = "*") -> None:
        for path in (data / folder).glob(pattern) if (data / folder).is_dir() else []:
            if path.name not in owned and _old(path, min_age):
                found.append(path)

    running = {str(e.id) for e in Extraction.select(Extraction.id).where(Extraction.status.in_(("queued", "running")))}
    extractions = {str(e.id) for e in Extraction.select(Extraction.id)}
    # a store in place belongs to its extraction; a partial one only while that extraction runs
    scan("activations", extractions | {f".partial-{i}" for i in running})
    scan("runs", {str(r.id) for r in Training.select(Training.id)})
    scan("uploads", set())  # staging: a finished upload has moved on to sources/
    scan("sources", {Path(s.path).name for s in ActivationSet.select().where(ActivationSet.kind == "file")})
    scan("imported", {Path(i.path).name for i in ImportedSAE.select(ImportedSAE.path)})
    corpora = {Path(e.text.get("path", "")).name for e in Extraction.select(Extraction.text) if e.text}
    scan("texts", corpora)
    for run_dir in (data / "runs").glob("*") if (data / "runs").is_dir() else []:
        for tmp in run_dir.glob("*.tmp"):  # a checkpoint or weights file half-written when a worker died
            if _old(tmp, min_age):
                found.append(tmp)
    return found


def clean(settings: dict) -> list[str]:
    """Remove the orphans; return what was removed, relative to DATA_DIR."""
    data = Path(settings["DATA_DIR"])
    removed = []
    for path in orphans(settings):
        _remove(path)
        removed.append(str(path.relative_to(data)))
    return removed
