"""The RQ worker class: JSON jobs, our job functions only, and shutdowns that leave work resumable.

Kept free of torch: the worker's parent process only talks to Redis and the database;
each job runs in a forked work-horse, where torch (and CUDA) is first imported.
"""
from __future__ import annotations

import os
import signal

from rq import Worker

from ..db import database
from . import lifecycle, queue


class UnknownJob(RuntimeError):
    """A job on the queue names a function that is not one of SAE Studio's."""


class StudioWorker(Worker):
    """An RQ ``Worker`` that

    - runs only the app's own job functions (anything else on the queue fails with a reason),
    - on its first SIGTERM (a warm shutdown) passes it on to the work-horse, whose job then
      saves a checkpoint and ends its record ``interrupted`` instead of running on for hours,
    - marks the record ``interrupted`` at once when its work-horse is killed outright.
    """

    def perform_job(self, job, queue_, execution) -> bool:
        if job.func_name not in lifecycle.JOB_FUNCTIONS.values():
            self.handle_job_failure(job, queue=queue_, exc_string=f"Refused: {job.func_name!r} is not a SAE Studio "
                                                                  "job function.", execution=execution)
            return False
        return super().perform_job(job, queue_, execution)

    def setup_work_horse_signals(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        lifecycle.install_shutdown_handler()

    def handle_warm_shutdown_request(self) -> None:
        super().handle_warm_shutdown_request()
        if self.horse_pid:
            try:
                os.kill(self.horse_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def handle_work_horse_killed(self, job, retpid, ret_val, rusage) -> None:
        super().handle_work_horse_killed(job, retpid, ret_val, rusage)
        how = f"signal {os.WTERMSIG(ret_val)}" if ret_val and os.WIFSIGNALED(ret_val) else f"exit status {ret_val}"
        with database.connection_context():  # opened and closed here: forked horses must not share it
            for model in lifecycle.job_models():
                record = lifecycle.retry_write(lambda m=model: m.get_or_none(m.rq_job_id == job.id), what="find job")
                if record is not None and record.status == "running":
                    lifecycle.mark_interrupted(record, f"Interrupted: the process running the {lifecycle.label(record)} "
                                                       f"was killed ({how}).", self.settings)

    settings: dict = {}


def make_worker(settings: dict, name: str | None = None) -> StudioWorker:
    redis = queue.connection({**settings, "REDIS_SOCKET_TIMEOUT_S": None})  # blocking dequeues wait for long
    worker = StudioWorker([queue.job_queue(settings, redis)], connection=redis, name=name,
                          serializer=queue.SERIALIZER)
    worker.settings = settings
    return worker
