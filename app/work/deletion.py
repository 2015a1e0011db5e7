"""Deleting records and their files, with what depends on them named first.

Each ``plan_*`` says what a delete would take with it (or why it is refused) without
changing anything; the pages show it and ask once, the API returns it. Each ``delete_*``
checks again and then removes the rows and the files. A running job is never deleted from
under its worker: cancel it first.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..db import database
from ..errors import UserError
from ..models import (ActivationSet, DownstreamEval, Event, Extraction, FeatureJob, FeatureStat, ImportedSAE, MetricPoint, Template,
                      Sweep, Training, TuneJob)
from .lifecycle import retry_write
from .training import run_folder


class DeleteRefused(UserError, ValueError):
    """The delete cannot go ahead; the message names what stands in the way."""


@dataclass
class DeletePlan:
    """What a delete removes besides the record itself, and why it would be refused."""

    what: str
    also: list[str] = field(default_factory=list)
    refused: str | None = None
    files: list[Path] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"what": self.what, "also": self.also, "refused": self.refused}


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _ids(records) -> str:
    return ", ".join(f"#{r.id}" for r in records)


def plan_training(run: Training, settings: dict) -> DeletePlan:
    plan = DeletePlan(f"run #{run.id}" + (f" ({run.name})" if run.name else ""))
    if run.status == "running":
        plan.refused = "The run is running: cancel it first, then delete it."
    points, events, jobs = run.metrics.count(), run.events.count(), run.feature_jobs.count()
    plan.also = [_count(points, "metric point"), _count(events, "event")]
    if jobs:
        plan.also.append(_count(jobs, "feature-statistics job"))
    evaluations = list(run.downstream_evals)
    if evaluations:
        plan.also.append(_count(len(evaluations), "downstream evaluation"))
        running = [e for e in evaluations if e.status == "running"]
        if running and not plan.refused:
            plan.refused = f"A downstream evaluation of it is running ({_ids(running)}): cancel it first."
    plan.files = [run_folder(run, settings)]
    return plan


def plan_source(source: ActivationSet, settings: dict) -> DeletePlan:
    plan = DeletePlan(f"activation source #{source.id} ({source.name})")
    runs = list(source.trainings)
    tunes = list(source.tunes.where(TuneJob.status.in_(("queued", "running"))))
    if runs:
        plan.refused = (f"{_count(len(runs), 'run')} trained on it ({_ids(runs)}): delete "
                        f"{'it' if len(runs) == 1 else 'them'} first.")
    elif tunes:
        plan.refused = f"An auto-tune is using it ({_ids(tunes)}): cancel it first."
    jobs = source.feature_jobs.count()
    if jobs:
        plan.also.append(_count(jobs, "feature-statistics job") + " browsed on it")
    if source.kind in ("file", "extracted") and source.path:
        plan.files = [Path(settings["DATA_DIR"]) / source.path]
    if source.kind == "streamed" and (source.params.get("text") or {}).get("path"):
        plan.files = [Path(source.params["text"]["path"])]  # its uploaded corpus, kept under DATA_DIR/texts
    return plan


def plan_extraction(job: Extraction, settings: dict) -> DeletePlan:
    plan = DeletePlan(f"extraction #{job.id}")
    if job.status == "running":
        plan.refused = "The extraction is running: cancel it first."
    files = [Path(settings["DATA_DIR"]) / "activations" / str(job.id)]
    if job.text.get("path"):
        files.append(Path(job.text["path"]))
    if job.activation_set_id is not None:
        source_plan = plan_source(job.activation_set, settings)
        plan.refused = plan.refused or source_plan.refused and f"Its activation source is in use: {source_plan.refused}"
        plan.also = [source_plan.what, *source_plan.also]
    plan.files = files
    return plan


def plan_imported(sae: ImportedSAE, settings: dict) -> DeletePlan:
    plan = DeletePlan(f"imported SAE #{sae.id} ({sae.name})")
    jobs = sae.feature_jobs.count()
    if jobs:
        plan.also.append(_count(jobs, "feature-statistics job"))
    plan.files = [Path(settings["DATA_DIR"]) / sae.path]
    return plan


def plan_template(template: Template, settings: dict) -> DeletePlan:
    return DeletePlan(f"template #{template.id} ({template.name})")


def _remove_files(paths: list[Path], settings: dict) -> None:
    root = Path(settings["DATA_DIR"]).resolve()
    for path in paths:
        resolved = path.resolve()
        if root not in resolved.parents:  # never outside the data folder, whatever a row says
            continue
        if resolved.is_dir():
            shutil.rmtree(resolved, ignore_errors=True)
        else:
            resolved.unlink(missing_ok=True)


def _feature_jobs_delete(query) -> None:
    ids = [j.id for j in query]
    if ids:
        FeatureStat.delete().where(FeatureStat.job.in_(ids)).execute()
        FeatureJob.delete().where(FeatureJob.id.in_(ids)).execute()


def _checked(plan: DeletePlan) -> DeletePlan:
    if plan.refused:
        raise DeleteRefused(plan.refused)
    return plan


def _delete_training_rows(run: Training) -> None:
    """A run's rows and what hangs on them (inside the caller's transaction)."""
    _feature_jobs_delete(FeatureJob.select(FeatureJob.id).where(FeatureJob.training == run.id))
    MetricPoint.delete().where(MetricPoint.training == run.id).execute()
    Event.delete().where(Event.training == run.id).execute()
    DownstreamEval.delete().where(DownstreamEval.training == run.id).execute()
    # a queued run's job finds no row when a worker takes it, and does nothing
    if not Training.delete().where((Training.id == run.id) & (Training.status != "running")).execute():
        raise DeleteRefused(f"Run #{run.id} started meanwhile: cancel it first, then delete it.")


def delete_training(run: Training, settings: dict) -> DeletePlan:
    plan = _checked(plan_training(run, settings))

    def delete() -> None:
        with database.atomic():
            _delete_training_rows(run)

    retry_write(delete, what="delete run")
    _remove_files(plan.files, settings)
    return plan


def plan_sweep(sweep: Sweep, settings: dict) -> DeletePlan:
    """A sweep goes with every member run it still has (their metrics, events, jobs and files), and a
    sweep split over devices with every part."""
    from .sweeps import group_of

    parts = group_of(sweep)
    plan = DeletePlan(f"sweep #{parts[0].id}" + (f" ({sweep.name})" if sweep.name else ""))
    active = [p for p in parts if p.is_active]
    if active:
        plan.refused = (f"The sweep is {active[0].status}: cancel it first, then delete it." if len(parts) == 1 else
                        f"Part {active[0].part} of the sweep is {active[0].status}: cancel the sweep first, then "
                        "delete it.")
    members = list(Training.select().where(Training.sweep.in_([p.id for p in parts])).order_by(Training.id))
    for member in members:
        member_plan = plan_training(member, settings)
        plan.refused = plan.refused or member_plan.refused
        plan.files += member_plan.files
    if len(parts) > 1:
        plan.also.append(f"its {len(parts)} parts (sweeps {_ids(parts)}), one per device")
    if members:
        plan.also.append(_count(len(members), "member run") + f" ({_ids(members)}), each with its metrics, events, "
                                                                "jobs and files")
    return plan


def delete_sweep(sweep: Sweep, settings: dict) -> DeletePlan:
    from .sweeps import group_of

    plan = _checked(plan_sweep(sweep, settings))
    ids = [p.id for p in group_of(sweep)]

    def delete() -> None:
        with database.atomic():
            if Sweep.select().where(Sweep.id.in_(ids) & Sweep.status.in_(("queued", "running"))).exists():
                raise DeleteRefused("The sweep was resumed meanwhile: cancel it first, then delete it.")
            for member in Training.select().where(Training.sweep.in_(ids)):
                _delete_training_rows(member)
            Sweep.delete().where(Sweep.id.in_(ids)).execute()

    retry_write(delete, what="delete sweep")
    _remove_files(plan.files, settings)
    return plan


def _delete_source_rows(source: ActivationSet) -> None:
    _feature_jobs_delete(FeatureJob.select(FeatureJob.id).where(FeatureJob.source == source.id))
    TuneJob.delete().where(TuneJob.source == source.id).execute()
    Sweep.delete().where(Sweep.source == source.id).execute()  # no run is left on it, so no member either
    Extraction.update(activation_set=None).where(Extraction.activation_set == source.id).execute()
    ActivationSet.delete_by_id(source.id)


def delete_source(source: ActivationSet, settings: dict) -> DeletePlan:
    plan = _checked(plan_source(source, settings))

    def delete() -> None:
        with database.atomic():
            if Training.select().where(Training.source == source.id).exists():
                raise DeleteRefused("A run was started on it meanwhile: delete that run first.")
            _delete_source_rows(source)

    retry_write(delete, what="delete source")
    _remove_files(plan.files, settings)
    return plan


def delete_extraction(job: Extraction, settings: dict) -> DeletePlan:
    plan = _checked(plan_extraction(job, settings))
    source_files = plan_source(job.activation_set, settings).files if job.activation_set_id else []

    def delete() -> None:
        with database.atomic():
            if job.activation_set_id is not None:
                if Training.select().where(Training.source == job.activation_set_id).exists():
                    raise DeleteRefused("A run was started on its activations meanwhile: delete that run first.")
                _delete_source_rows(job.activation_set)
            if not Extraction.delete().where((Extraction.id == job.id) & (Extraction.status != "running")).execute():
                raise DeleteRefused("The extraction started meanwhile: cancel it first.")

    retry_write(delete, what="delete extraction")
    _remove_files(plan.files + source_files, settings)
    return plan


def delete_imported(sae: ImportedSAE, settings: dict) -> DeletePlan:
    plan = _checked(plan_imported(sae, settings))

    def delete() -> None:
        with database.atomic():
            _feature_jobs_delete(FeatureJob.select(FeatureJob.id).where(FeatureJob.imported == sae.id))
            ImportedSAE.delete_by_id(sae.id)

    retry_write(delete, what="delete imported SAE")
    _remove_files(plan.files, settings)
    return plan


def delete_template(template: Template, settings: dict) -> DeletePlan:
    plan = plan_template(template, settings)
    retry_write(lambda: Template.delete_by_id(template.id), what="delete template")
    return plan
