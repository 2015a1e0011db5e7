"""The RQ worker class: JSON jobs, our job functions only, and shutdowns that leave work resumable.

Kept free of torch: the worker's parent process only talks to Redis and the database;
each job runs in a forked work-horse, where torch (and CUDA) is first imported.
"""
from __future__ import annotations

import importlib
import os
import random
import signal
import sys
import time
from pathlib import Path

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import Worker
from rq.worker import WorkerStatus

from ..db import database
from . import lifecycle, queue


class UnknownJob(RuntimeError):
    """A job on the queue names a function that is not one of SAE Studio's."""


# Functions a job may name as its on_success / on_failure / on_stopped callback. SAE Studio
# enqueues none (each job records its own outcome on its row), so none is allowed.
CALLBACK_FUNCTIONS: frozenset[str] = frozenset()


def refusal(job, *, connection=None, serializer=None, _seen: frozenset = frozenset()) -> str | None:
    """Why the worker must not run ``job``, or None when it is one of SAE Studio's own.

    Everything a job can make the worker import and call is checked: its function (a plain
    function, not a method of a stored instance), its success, failure and stopped callbacks,
    its webhooks (HTTP requests the worker would send) and each job it depends on (by the same
    rules; one that Redis no longer holds cannot be checked, so it is refused too).
    """
    try:
        return _refusal(job, connection, serializer, _seen)
    except RedisError:
        raise  # Redis trouble is not the job's fault: RQ's own handling applies
    except Exception as exc:  # noqa: BLE001 - a job that cannot even be read is not run
        return f"the job could not be read ({type(exc).__name__})."


def _refusal(job, connection, serializer, _seen: frozenset) -> str | None:
    from rq.exceptions import NoSuchJobError
    from rq.job import Job

    if job.func_name not in lifecycle.job_functions():
        return f"{job.func_name!r} is not a SAE Studio job function."
    if job.instance is not None:
        return f"{job.func_name!r} is called on a stored object, which SAE Studio never does."
    for kind in ("success", "failure", "stopped"):
        name = getattr(job, f"_{kind}_callback_name", None)
        if name and name not in CALLBACK_FUNCTIONS:
            return f"the job's on_{kind} callback {name!r} is not one of SAE Studio's functions."
    if getattr(job, "webhooks", None):
        return "the job has webhooks, which SAE Studio never sends."
    for dependency_id in getattr(job, "_dependency_ids", None) or []:
        if dependency_id in _seen:
            return f"the job's dependencies loop back to job {dependency_id!r}."
        try:
            dependency = Job.fetch(dependency_id, connection=connection or job.connection,
                                   serializer=serializer or job.serializer)
        except NoSuchJobError:
            return f"the job depends on job {dependency_id!r}, which Redis no longer holds, so it cannot be checked."
        why = refusal(dependency, connection=connection, serializer=serializer, _seen=_seen | {job.id})
        if why:
            return f"the job depends on job {dependency_id!r}, which is refused: {why}"
    return None


class StudioWorker(Worker):
    """An RQ ``Worker`` that

    - runs only the app's own job functions, with no callbacks, webhooks or foreign
      dependencies (``refusal``): anything else on the queue fails with the reason, logged,
      before a work-horse is forked and without running any of it,
    - on its first SIGTERM (a warm shutdown) passes it on to the work-horse, whose job then
      saves a checkpoint and ends its record ``interrupted`` instead of running on for hours,
    - marks the record ``interrupted`` at once when its work-horse is killed outright.
    """

    def _refuse(self, job, queue_, execution) -> bool:
        """Fail ``job`` without running it, its callbacks or its webhooks, when it is not ours."""
        why = refusal(job, connection=self.connection, serializer=self.serializer)
        if why is None:
            return False
        reason = f"Refused: {why}"
        self.log.warning("Worker %s: job %s refused: %s", self.name, job.id, reason)
        job.webhooks = []  # a refused job sends nothing anywhere
        self.handle_job_failure(job, queue=queue_, exc_string=reason, execution=execution)
        return True

    def execute_job(self, job, queue_) -> None:
        """Refuse a foreign job here, in the worker's own process: no work-horse is forked for it.
        A job that does not fit this worker's device now goes back on the queue (placement)."""
        self._handing_over = True  # a warm shutdown from here on is noted, not raised (``_shutdown``)
        try:
            if refusal(job, connection=self.connection, serializer=self.serializer) is not None:
                execution = self.prepare_execution(job)
                self._refuse(job, queue_, execution)
                self.set_state(WorkerStatus.IDLE)
                return
            if self._put_back(job, queue_):
                return
            self._put_back_ids.clear()  # a new sweep starts after each job this worker takes
            try:
                super().execute_job(job, queue_)
            except (RedisConnectionError, RedisTimeoutError) as exc:
                self._after_redis_lost(job, exc)
        finally:
            self._handing_over = False

    def _after_redis_lost(self, job, exc) -> None:
        """Redis went away around a job: RQ's bookkeeping of its end (the job's status, the registries)
        raised. The job's outcome is on its record, which it wrote to the database itself; a job that
        never ran is queued again by maintenance once Redis is back ("re-queues jobs Redis lost"). The
        worker goes on once its work-horse, if one is still running, has ended."""
        self.log.warning("Worker %s: Redis went away around job %s (%s); its record holds its outcome", self.name,
                         job.id, exc)
        pid = self.horse_pid
        if pid:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            self._horse_pid = 0

    _handing_over = False

    def _shutdown(self) -> None:
        """RQ answers a warm shutdown on a worker that is not busy by raising StopRequested out of whatever
        its process is doing. Once ``execute_job`` has a job and before RQ marks the worker busy, that is
        inside this worker's own checks (whether the job is ours, whether it fits the device), whose
        ``except Exception`` would swallow it: the job was then dropped, or forked without the stop and left
        to run to its end (hours) while the worker waited. There the request is only noted: the hand-over
        finishes, the horse is told to stop at once (``fork_work_horse``) and the worker stops after it.
        (A stop between RQ's dequeue and ``execute_job`` is RQ's own: it raises there, before our code.)"""
        if self._handing_over and self.get_state() != WorkerStatus.BUSY:
            self._stop_requested = True
            try:
                self.set_shutdown_requested_date()  # informational; a Redis outage must not escape the handler
            except RedisError:
                pass
            return
        super()._shutdown()

    def _put_back(self, job, queue_) -> bool:
        """When ``job``'s record does not fit this worker's device now: note why on its row and put the
        job back at the end of the queue (another worker's device may fit it, or this one later).

        The worker then takes the next job at once, so a job that fits here is found behind any number
        that do not. Only when it meets a job it already put back in this sweep (it has been round the
        whole queue) does it pause, ``PLACEMENT_RETRY_S`` give or take half, so a lone waiting job is not
        spun on. The pause's jitter matters: two workers that pause in step can otherwise keep taking
        each other's job forever (each pops the one that fits the other). The claim checks again, under
        the device's lock (``resources.claim_placed``)."""
        from . import resources

        try:
            with database.connection_context():  # opened and closed here: forked horses must not share it
                record = record_of(job)
                if record is None or record.status != "queued":
                    return False
                need = resources.need_bytes(record, self.settings)
                here = resources.this_device(self.settings)
                why = resources.admit(need, here, resources.reserved_on(here.key), record.requested_device)
                if why is None:
                    return False
                reason = resources.wait_reason(record, need, self.settings, here, why)
                if reason != record.wait_reason:
                    lifecycle.update_record(record, only_if=("queued",), what="wait reason", wait_reason=reason)
        except Exception:  # noqa: BLE001 - the claim in the work-horse decides anyway
            self.log.warning("Worker %s: placement check for job %s failed", self.name, job.id, exc_info=True)
            return False
        self.log.info("Worker %s: job %s waits: %s", self.name, job.id, why)
        queue_.enqueue_job(job)
        if job.id not in self._put_back_ids:
            self._put_back_ids.add(job.id)
            return True
        if self._burst:
            self.log.info("Worker %s: burst mode and nothing here fits: stopping", self.name)
            self._stop_requested = True
            return True
        self._put_back_ids = {job.id}  # round the queue once: pause, then sweep it again
        self._pause(self.placement_retry_s * random.uniform(0.5, 1.5))
        return True

    def _pause(self, seconds: float) -> None:
        """Sleep up to ``seconds``, ending early once a stop is requested."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self._stop_requested:
            time.sleep(0.05)

    def work(self, *args, burst: bool = False, **kwargs):
        self._burst = burst
        return super().work(*args, burst=burst, **kwargs)

    _burst = False
    placement_retry_s = 2.0

    def perform_job(self, job, queue_, execution) -> bool:
        if self._refuse(job, queue_, execution):  # checked again in the work-horse, in case
            return False
        return super().perform_job(job, queue_, execution)

    def setup_work_horse_signals(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        lifecycle.install_shutdown_handler()
        if self._stop_requested:  # the worker was asked to stop before this horse was forked
            lifecycle.SHUTDOWN.set()

    preload = False  # make_worker sets it for a worker that trains on the CPU

    def fork_work_horse(self, job, queue_) -> None:
        if self.preload:
            self._import_for_horses(job.func_name)
        super().fork_work_horse(job, queue_)
        # asked to stop after the fork but before the horse's pid was known: pass it on now, or the
        # job would run to its end (hours) while the worker waits for it
        if self._stop_requested:
            self._tell_horse_to_stop()

    def _import_for_horses(self, function: str) -> None:
        """Import here, once, what the horse of a job running ``function`` imports: every later horse
        is forked with it in memory (shared, copy-on-write) instead of spending one to four seconds
        of CPU importing it again, job after job. Only on a CPU worker: importing torch starts no
        thread and touches no device, so its horses fork as safely as before."""
        missing = [name for name in horse_modules(function) if name not in sys.modules]
        for name in missing:
            try:
                importlib.import_module(name)
            except ImportError:  # an extra that is not installed: the horse's own import says so
                pass
        if missing:
            self.log.info("Worker %s: imported %s once for every work-horse", self.name, ", ".join(missing))

    def handle_warm_shutdown_request(self) -> None:
        super().handle_warm_shutdown_request()
        self._tell_horse_to_stop()

    def _tell_horse_to_stop(self) -> None:
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

    # RQ waits out a Redis outage only inside its dequeue. Its work loop also asks Redis whether workers
    # are suspended and cleans registries before dequeuing, and beats after every job and while a horse
    # runs; there a refused connection ended the worker ("unhandled exception, quitting"): a worker that
    # had just started, or whose job had just ended, when Redis went away died with it. These are
    # bookkeeping: skipped while Redis is away (logged) and done again once it is back; the suspension
    # check is asked again until Redis answers, so a suspended worker never takes a job for want of it.
    def _reached_redis(self, what: str, call, *args, **kwargs) -> bool:
        try:
            call(*args, **kwargs)
            return True
        except (RedisConnectionError, RedisTimeoutError) as exc:
            self.log.warning("Worker %s: Redis is unreachable (%s); %s waits for it", self.name, exc, what)
            return False

    def check_for_suspension(self, burst: bool) -> None:
        wait = 1.0
        while not self._reached_redis("the suspension check", super().check_for_suspension, burst):
            self._pause(wait)
            if self._stop_requested:
                return
            wait = min(wait * 2, self.max_connection_wait_time)

    def run_maintenance_tasks(self) -> None:
        self._reached_redis("registry cleaning", super().run_maintenance_tasks)

    def set_state(self, state: str, pipeline=None) -> None:
        if pipeline is not None:  # queued on the pipeline: its execute() is what reaches Redis
            super().set_state(state, pipeline)
        else:
            self._reached_redis(f"recording the worker's state ({state})", super().set_state, state)

    def heartbeat(self, *args, **kwargs) -> None:
        self._reached_redis("the worker's heartbeat", super().heartbeat, *args, **kwargs)

    def maintain_heartbeats(self, *args, **kwargs) -> None:
        self._reached_redis("the job's heartbeat", super().maintain_heartbeats, *args, **kwargs)

    settings: dict = {}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._put_back_ids: set[str] = set()


MARKER = ".sae-studio-id"


def shared_storage_problem(data_dir: str) -> str | None:
    """Why this worker must not start with ``data_dir``, or None when it is the installation's shared one.

    The first worker writes a random id to ``DATA_DIR/.sae-studio-id`` and stores it in the
    database; every worker after it, on any machine, finds the same id in both. A DATA_DIR with no
    marker, or another one, is not the folder the other boxes write runs, checkpoints and sources to
    (a local folder where the shared mount was meant to be): a job run there would write where the
    web server and the other workers never look. Call with a database connection open.
    """
    import secrets

    from ..models import Installation

    folder = Path(data_dir)
    marker = folder / MARKER
    stored = Installation.select().order_by(Installation.id).first()

    def read() -> str | None:
        try:
            return marker.read_text().strip() or None
        except FileNotFoundError:
            return None

    found = read()
    if stored is None:  # the installation's first worker (or a database from before markers)
        if found is None:
            folder.mkdir(parents=True, exist_ok=True)
            try:
                with open(marker, "x") as fh:
                    fh.write(secrets.token_hex(16) + "\n")
            except FileExistsError:
                pass  # another worker wrote it first
            found = read()
        Installation.insert(data_id=found).on_conflict_ignore().execute()
        stored = Installation.select().order_by(Installation.id).first()
    if found == stored.data_id:
        return None
    fix = ("Every machine must mount the same shared DATA_DIR (see the README, \"Scaling out\"); "
           f"check the mount on this machine and DATA_DIR's value ({folder}).")
    if found is None:
        return (f"DATA_DIR has no {MARKER} marker, but this database's installation wrote one (id "
                f"{stored.data_id[:8]}…) in its DATA_DIR: this DATA_DIR is not the shared one. {fix}")
    return (f"DATA_DIR's {MARKER} marker holds id {found[:8]}… but this database's installation is "
            f"{stored.data_id[:8]}…: this DATA_DIR belongs to another installation. {fix}")


def record_of(job):
    """The record a job of ours was queued for (None when it is gone)."""
    kind = lifecycle.job_functions().get(job.func_name)
    if kind is None or not job.args:
        return None
    model = kind.model
    return lifecycle.retry_write(lambda: model.get_or_none(model.id == job.args[0]), what="find job")


# What a work-horse imports before its job's first step, whatever its data: torch and the trainer's
# modules for every job; torch._dynamo for the jobs that train (torch.optim imports it when the first
# optimizer is built: 2.3 s of CPU here, against 0.6 s for the rest of a 40-step run); transformers for
# the jobs that always run a model; scipy's matching for the feature statistics (the ground-truth MCC).
# What only some jobs of a kind import (a feature job's tokenizer on an extraction, the L0 finder's
# matching in a sweep) is left to their horses: a burst worker that never needs it would import it for
# nothing.
HORSE_MODULES = ("torch", "safetensors.torch", "app.sae.trainer", "app.sae.sources", "app.sae.metrics",
                 "app.sae.features", "app.quality", "app.validation")
TRAINS = ("torch._dynamo",)
JOB_MODULES = {"app.work.training": TRAINS, "app.work.sweeps": TRAINS, "app.work.tune": TRAINS,
               "app.work.extraction": ("transformers",), "app.work.downstream": ("transformers",),
               "app.work.features": ("scipy.optimize",)}


def horse_modules(function: str) -> tuple[str, ...]:
    """What the work-horse of a job running ``function`` (a dotted path) imports."""
    module = function.rsplit(".", 1)[0]
    return HORSE_MODULES + JOB_MODULES.get(module, ()) + (module,)


def make_worker(settings: dict, name: str | None = None) -> StudioWorker:
    redis = queue.connection({**settings, "REDIS_SOCKET_TIMEOUT_S": None})  # blocking dequeues wait for long
    worker = StudioWorker([queue.job_queue(settings, redis)], connection=redis, name=name,
                          serializer=queue.SERIALIZER)
    worker.settings = settings
    # a CPU worker's parent imports what its horses need (StudioWorker.fork_work_horse); a GPU
    # worker's never imports torch, so that CUDA is first set up in the horse that uses it
    from ..devices import worker_gpu

    worker.preload = worker_gpu(settings.get("SAE_DEVICE", "auto")) is None
    worker.placement_retry_s = float(settings.get("PLACEMENT_RETRY_S") or os.environ.get("PLACEMENT_RETRY_S", 2.0))
    return worker
