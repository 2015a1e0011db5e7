"""The queue side of jobs, for the web process: enqueue, cancel, reconcile.

Jobs are enqueued by dotted name so the web process never imports torch.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from redis import Redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from .models import Event, JobRecord, Training, TuneJob, utcnow

TRAINING_JOB = "app.jobs.run_training"
TUNE_JOB = "app.jobs.run_tune"
EXTRACTION_JOB = "app.jobs.run_extraction"
FEATURES_JOB = "app.jobs.run_features"


def redis_connection(url: str) -> Redis:
    return Redis.from_url(url)


def training_queue(settings: dict) -> Queue:
    return Queue(settings["QUEUE_NAME"], connection=redis_connection(settings["REDIS_URL"]))


def _enqueue(record: JobRecord, job_name: str, settings: dict) -> None:
    """Put a queued record's job on the queue and note its RQ job id on the row."""
    job = training_queue(settings).enqueue(job_name, record.id, job_timeout=settings["JOB_TIMEOUT_S"],
                                           result_ttl=86_400, failure_ttl=7 * 86_400,
                                           description=f"{type(record).__name__} {record.id}")
    type(record).update(rq_job_id=job.id).where(type(record).id == record.id).execute()
    record.rq_job_id = job.id


def enqueue_training(training: Training, settings: dict) -> None:
    """Put the run on the queue. The row must be ``queued``."""
    _enqueue(training, TRAINING_JOB, settings)


def enqueue_tune(tune: TuneJob, settings: dict) -> None:
    """Put an auto-tune on the queue. The row must be ``queued``."""
    _enqueue(tune, TUNE_JOB, settings)


def enqueue_extraction(extraction, settings: dict) -> None:
    """Put an extraction on the queue. The row must be ``queued``."""
    _enqueue(extraction, EXTRACTION_JOB, settings)


def create_feature_job(settings: dict, *, source, training=None, imported=None, sample_tokens: int | None = None):
    """Create and queue a feature-statistics job for a run's checkpoint or an imported SAE."""
    from .models import FeatureJob

    if sample_tokens is None:
        sample_tokens = settings["FEATURE_SAMPLE_TOKENS"]
    if source.total_rows is not None:
        sample_tokens = min(sample_tokens, source.total_rows)
    job = FeatureJob.create(training=training, imported=imported, source=source, sample_tokens=sample_tokens)
    try:
        _enqueue(job, FEATURES_JOB, settings)
    except Exception as exc:
        FeatureJob.update(status="failed", reason=f"Could not reach the job queue: {exc}", finished_at=utcnow()).where(
            FeatureJob.id == job.id).execute()
        raise
    return job


def request_cancel(record: JobRecord, settings: dict) -> None:
    """Cancel a queued run or auto-tune at once; ask a running one to stop at its next step."""
    model = type(record)
    if record.status == "queued":
        updated = (model.update(status="cancelled", reason="Cancelled before it started.", finished_at=utcnow(),
                                cancel_requested=True)
                   .where((model.id == record.id) & (model.status == "queued")).execute())
        if updated:
            if record.rq_job_id:
                try:
                    Job.fetch(record.rq_job_id, connection=redis_connection(settings["REDIS_URL"])).cancel()
                except NoSuchJobError:
                    pass
            if isinstance(record, Training):
                Event.create(training=record, level="info", code="cancelled", message="Cancelled before it started.")
            return
    if record.is_active:
        model.update(cancel_requested=True).where(model.id == record.id).execute()


def reconcile(record: JobRecord, settings: dict) -> bool:
    """Mark a run, auto-tune or extraction failed whose job died without saying so.

    A work-horse killed by the OS cannot update its row; RQ does record the job as
    failed. A dead extraction's half-written store is removed. Returns True when the row
    was changed.
    """
    if not record.is_active or not record.rq_job_id:
        return False
    try:
        job = Job.fetch(record.rq_job_id, connection=redis_connection(settings["REDIS_URL"]))
        status = job.get_status()
    except NoSuchJobError:
        status = None
    if status not in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED, None):
        return False
    model = type(record)
    what = {"Training": "training", "TuneJob": "auto-tune", "Extraction": "extraction",
            "FeatureJob": "feature job"}.get(model.__name__, "job")
    detail = ("its job is no longer known to the queue" if status is None
              else f"its worker reported the job {status.value}")
    reason = f"The {what} stopped without finishing: {detail} (the worker process may have been killed)."
    if status is not None and job.latest_result() is not None and job.latest_result().exc_string:
        reason += " " + job.latest_result().exc_string.strip().splitlines()[-1]
    extra = {"failed_step": record.step} if isinstance(record, Training) else {}
    updated = (model.update(status="failed", reason=reason, finished_at=utcnow(), **extra)
               .where((model.id == record.id) & (model.status.in_(("queued", "running")))).execute())
    if not updated:
        return False
    if isinstance(record, Training):
        Event.create(training=record, step=record.step, level="error", code="lost", message=reason)
    if what == "extraction":
        shutil.rmtree(Path(settings["DATA_DIR"]) / "activations" / f".partial-{record.id}", ignore_errors=True)
    return True
