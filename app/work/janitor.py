"""The janitor: removes files that no record owns, left by crashes and killed processes.

Run by the maintenance process beside each worker (every ``JANITOR_INTERVAL_S``). It only
removes what is both unreferenced and older than ``JANITOR_MIN_AGE_S``, so a file that a
request or a job is writing right now is never touched. Each folder is scanned, and each
file removed, on its own: one that fails is reported (``JanitorError``, after the rest is
done) and never stops the others.
"""
from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from ..models import ACTIVE_STATUSES, RESUMABLE_STATUSES, ActivationSet, Extraction, ImportedSAE, Sweep, Training
from .training import FINAL_FILES

log = logging.getLogger("sae_studio.janitor")


class JanitorError(RuntimeError):
    """Some folders could not be scanned or some orphans not removed; the rest was done."""


def _old(path: Path, min_age_s: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime >= min_age_s
    except FileNotFoundError:
        return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _names(paths: Iterable[str | None]) -> set[str]:
    """The last part of each stored path; records without a local path (a Hub dataset, the
    standard library's docstrings) own nothing on disk."""
    return {Path(p).name for p in paths if p}


def _scans(settings: dict) -> list[tuple[str, Callable[[], set[str]]]]:
    """Each folder under DATA_DIR the janitor looks in, with the names that records own there."""
    data = Path(settings["DATA_DIR"])

    def activations() -> set[str]:
        running = {str(e.id) for e in Extraction.select(Extraction.id)
                   .where(Extraction.status.in_(("queued", "running")))}
        # a store in place belongs to its extraction; a partial one only while that extraction runs
        owned = {str(e.id) for e in Extraction.select(Extraction.id)} | {f".partial-{i}" for i in running}
        # a store kept while streaming belongs to its source; one being kept, to its run or sweep while
        # that is queued or running, or may be resumed (which continues it); once the job has ended for
        # good its store was kept or given up, and a partial one left is an orphan
        owned |= _names(s.path for s in ActivationSet.select(ActivationSet.path)
                        .where(ActivationSet.kind == "extracted"))
        live = ACTIVE_STATUSES + RESUMABLE_STATUSES
        keepers = ({f"run-{r.id}" for r in Training.select(Training.id).where(Training.status.in_(live))}
                   | {f"sweep-{s.id}" for s in Sweep.select(Sweep.id).where(Sweep.status.in_(live))})
        owned |= {p.name for p in (data / "activations").glob(".keeping-*")
                  if "-".join(p.name.split("-")[1:3]) in keepers}
        return owned

    return [
        ("activations", activations),
        ("runs", lambda: {str(r.id) for r in Training.select(Training.id)}),
        ("uploads", set),  # staging: a finished upload has moved on to sources/
        ("sources", lambda: _names(s.path for s in ActivationSet.select(ActivationSet.path)
                                   .where(ActivationSet.kind == "file"))),
        ("imported", lambda: _names(i.path for i in ImportedSAE.select(ImportedSAE.path))),
        ("texts", lambda: _names((e.text or {}).get("path") for e in Extraction.select(Extraction.text)
                                 if isinstance(e.text, dict))),
    ]


def orphans(settings: dict, errors: list[str] | None = None) -> list[Path]:
    """The files and folders under DATA_DIR that nothing owns and nothing is writing.

    A folder that cannot be scanned is noted in ``errors`` (when given; otherwise it raises).
    """
    data = Path(settings["DATA_DIR"])
    min_age = settings["JANITOR_MIN_AGE_S"]
    found: list[Path] = []
    for folder, owned in _scans(settings):
        try:
            if not (data / folder).is_dir():
                continue
            names = owned()
            found.extend(p for p in (data / folder).iterdir() if p.name not in names and _old(p, min_age))
        except Exception as exc:  # noqa: BLE001 - the other folders are still scanned
            if errors is None:
                raise
            errors.append(f"scanning {folder}/: {type(exc).__name__}: {exc}")
    try:
        in_force = {str(r.id): (r.checkpoint_name, r.final_name)
                    for r in Training.select(Training.id, Training.checkpoint_name, Training.final_name)}
        for run_dir in (data / "runs").iterdir() if (data / "runs").is_dir() else []:
            if run_dir in found or not run_dir.is_dir():
                continue
            checkpoint, final = in_force.get(run_dir.name, (None, None))
            for tmp in run_dir.glob("*.tmp"):  # a checkpoint or weights file half-written when a worker died
                if _old(tmp, min_age):
                    found.append(tmp)
            # a checkpoint the row does not name: a process killed between writing it and committing
            # it, or one whose claim was lost (app.work.training.save_checkpoint)
            for stale in run_dir.glob("checkpoint-a*.pt"):
                if stale.name != checkpoint and _old(stale, min_age):
                    found.append(stale)
            # a final folder the row does not name: a process killed between saving it and its end, or
            # one whose end was refused; and once the row names one, the old layout's files beside it
            for stale in run_dir.glob("final-a*"):
                if stale.name != final and _old(stale, min_age):
                    found.append(stale)
            if final:
                found.extend(path for path in (run_dir / name for name in FINAL_FILES)
                             if path.exists() and _old(path, min_age))
    except Exception as exc:  # noqa: BLE001
        if errors is None:
            raise
        errors.append(f"scanning runs/ for .tmp files, checkpoints and final folders: {type(exc).__name__}: {exc}")
    return found


def clean(settings: dict) -> list[str]:
    """Remove the orphans; return what was removed, relative to DATA_DIR.

    Raises ``JanitorError`` naming what failed, once everything else has been removed.
    """
    data = Path(settings["DATA_DIR"])
    errors: list[str] = []
    removed = []
    for path in orphans(settings, errors):
        relative = str(path.relative_to(data))
        try:
            _remove(path)
        except Exception as exc:  # noqa: BLE001 - the other orphans still go
            errors.append(f"removing {relative}: {type(exc).__name__}: {exc}")
            continue
        removed.append(relative)
    if errors:
        if removed:
            log.info("janitor removed %s", removed)
        raise JanitorError("; ".join(errors))
    return removed
