"""The life every queued record shares: create → enqueue → claim → heartbeat → finish or fail.

The database row is the truth; Redis only carries the job. So:

- a record is created, then enqueued; if the queue is unreachable the row is deleted again
  and the caller gets ``QueueUnavailable``: nothing half-written is left;
- a worker ``claim``s a queued row (one worker wins), then a ``Heartbeat`` thread stamps
  ``heartbeat_at`` every few seconds while it runs;
- ``sweep_stale`` (run by the maintenance process beside every worker, and at start-up)
  marks a running row whose heartbeat has stopped ``interrupted``, whatever RQ thinks;
- cancelling is a database write: a queued row ends at once, a running job sees the flag;
- every write a worker makes goes through ``retry_write``, so a busy database delays a
  run but never fails it;
- one writer per record: each claim adds one to the row's ``attempt`` (a fencing token), and
  every write a job makes (heartbeat, progress, metrics, events, checkpoint, its end) is
  conditional on that attempt still being the row's, and the row still running, in the same
  statement or transaction. A process that was stopped, swept and woke up after another
  worker resumed its record finds itself ``Superseded`` and stops without writing;
- a job's end is recorded one way (``run_job`` → ``finish``/``fail``): a failure, an interrupt
  and a stop all go through ``outcome``, whatever the kind.

This module knows no kind of work by name: each job module ``register``s a ``JobKind`` (its
model, its label, its job function, what its failure and its interrupt write), and importing
``app.work`` imports every job module, so the registry is full wherever the lifecycle runs.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from peewee import InterfaceError, OperationalError

from ..db import database
from ..errors import UserError, redact
from ..models import Event, JobRecord, utcnow
from . import queue

log = logging.getLogger(__name__)


# --- the kinds of work, as each job module registers its own -----------------------------

@dataclass(frozen=True)
class Interrupt:
    """What marking a record interrupted writes besides its status: the reason as it is shown,
    more fields, and a further condition for the UPDATE (None: the attempt and status suffice)."""

    reason: str
    fields: dict
    where: object = None


@dataclass(frozen=True)
class JobKind:
    """What the lifecycle needs to know about one kind of record."""

    model: type[JobRecord]
    label: str  # the reader's name for it: "training", "auto-tune"
    function: str  # its job function's dotted path, as the queue carries it (the web never imports it)
    events: bool = False  # it keeps an event log (``Event`` rows): a cancel before it started is noted there
    # the fields its failure writes, given the exception and the default reason (at least ``reason``)
    failure: Callable[[JobRecord, Exception, str, dict], dict] | None = None
    # what marking it interrupted writes (the reason given, settings) ...
    interrupt: Callable[[JobRecord, str, dict], Interrupt] | None = None
    # ... and what follows once the row is marked (an event, removing partial files)
    interrupted: Callable[[JobRecord, str, dict], None] | None = None
    # whether a queued record has a queue job of its own (False: another record's job runs it, as a
    # sweep's job runs its members), so the re-queue leaves it alone
    queued_alone: Callable[[JobRecord], bool] = lambda record: True


KINDS: dict[type[JobRecord], JobKind] = {}


def register(kind: JobKind) -> JobKind:
    """Make a kind of work known to the lifecycle (each job module does, on import)."""
    KINDS[kind.model] = kind
    return kind


def kind_of(record: JobRecord | type[JobRecord]) -> JobKind:
    return KINDS[record if isinstance(record, type) else type(record)]


def job_models() -> list[type[JobRecord]]:
    return [kind.model for kind in KINDS.values()]


def job_functions() -> dict[str, JobKind]:
    """Every job function the worker may run, by dotted path."""
    return {kind.function: kind for kind in KINDS.values()}


def label(record: JobRecord) -> str:
    kind = KINDS.get(type(record))
    return kind.label if kind is not None else "job"


# --- writes that wait out a busy database ---------------------------------------------

RETRYABLE = (OperationalError, InterfaceError)


def retry_write(write: Callable[[], object], *, what: str = "write", max_wait_s: float = 900.0):
    """Run ``write`` until it succeeds, backing off while the database is locked or away.

    SQLite answers "database is locked" after its busy timeout; PostgreSQL may drop the
    connection. Either way the write is tried again (reconnecting if need be) for up to
    ``max_wait_s``: a healthy run waits for the database instead of failing.
    """
    delay, deadline = 0.05, time.monotonic() + max_wait_s
    while True:
        try:
            return write()
        except RETRYABLE as exc:
            if time.monotonic() >= deadline:
                raise
            log.warning("database busy during %s (%s); retrying in %.2fs", what, exc, delay)
            _reset_connection()
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def _reset_connection() -> None:
    """Drop a connection that may be broken; the next query opens a fresh one.

    Closing and connecting reset peewee's per-thread state, including the stack of open
    ``connection_context()`` blocks; the stack is put back, so an enclosing block still
    closes its connection on the way out (it raised ``IndexError`` there instead)."""
    contexts = list(database._state.ctx)
    try:
        if not database.is_closed() and not database.in_transaction():
            database.close()
    except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is dropped either way
        pass
    try:
        database.connect(reuse_if_open=True)
    finally:
        database._state.ctx[:] = contexts


def update_record(record: JobRecord, *, only_if: tuple[str, ...] | None = None, what: str = "update",
                  **fields) -> bool:
    """Write ``fields`` to the record's row (when its status is in ``only_if``); True if a row changed."""
    model = type(record)
    query = model.update(**fields).where(model.id == record.id)
    if only_if is not None:
        query = query.where(model.status.in_(only_if))
    return bool(retry_write(query.execute, what=what))


def add_event(training_id: int, level: str, code: str, message: str, *, step: int | None = None,
              suggestion: str | None = None, attempt: int | None = None) -> None:
    """An event written from the web or by the sweeper (a job writes its own through ``MetricWriter``)."""
    message = redact(message)
    retry_write(lambda: Event.create(training=training_id, level=level, code=code, message=message, step=step,
                                     suggestion=suggestion, attempt=attempt), what="event")


# --- one writer per record --------------------------------------------------------------

class Superseded(RuntimeError):
    """This process's claim of a record is no longer the current one (it was swept, resumed
    elsewhere, deleted, or it already ended): it must stop at once and write nothing more."""


def current(record: JobRecord):
    """The condition every write of a job carries: its row, its attempt, and the row as the job
    last left it — ``running`` until the job ends the record; after that, the end it wrote (its
    status and the moment, so that a resume and a cancel in between make it someone else's)."""
    model = type(record)
    ended = getattr(record, "_ended", None)
    if ended is None:
        return (model.id == record.id) & (model.attempt == record.attempt) & (model.status == "running")
    status, at = ended
    return ((model.id == record.id) & (model.attempt == record.attempt) & (model.status == status)
            & (model.finished_at == at))


def fenced_update(record: JobRecord, *, what: str = "write", **fields) -> None:
    """Write ``fields`` to the row if this process still holds it; else raise ``Superseded``."""
    model = type(record)
    if not retry_write(model.update(**fields).where(current(record)).execute, what=what):
        raise superseded(record, what)


def superseded(record: JobRecord, what: str) -> Superseded:
    message = (f"{label(record)} {record.id}: attempt {record.attempt} is no longer the record's current one; "
               f"{what} not written, the job stops here")
    log.warning(message)
    return Superseded(message)


# --- creating and queueing -------------------------------------------------------------

def create_and_enqueue(model: type[JobRecord], fields: dict, settings: dict) -> JobRecord:
    """Create a queued record and put its job on the queue.

    If the queue cannot be reached the row is deleted again and ``QueueUnavailable`` is
    raised, so the caller can say why and nothing half-written stays behind. A row whose
    job is lost later (the web process dies between the two steps, Redis loses its data)
    is put back on the queue by ``requeue_lost``.
    """
    record = retry_write(lambda: model.create(**fields, status="queued", queued_at=utcnow()), what="create")
    try:
        enqueue(record, settings)
    except queue.QueueUnavailable:
        retry_write(lambda: model.delete_by_id(record.id), what="undo create")
        raise
    return record


def enqueue(record: JobRecord, settings: dict) -> None:
    """Put a queued record's job on the queue and note its RQ job id on the row."""
    name = type(record).__name__
    job_id = queue.enqueue(settings, kind_of(record).function, record.id, f"{name} {record.id}")
    update_record(record, rq_job_id=job_id, what="note job id")
    record.rq_job_id = job_id


# --- in the worker ---------------------------------------------------------------------

def connect() -> dict:
    """In a job: the settings, with this process's database connection open."""
    from ..config import load_settings
    from ..db import open_database

    settings = load_settings()
    if database.obj is None or database.is_closed():
        open_database(settings["DATABASE_URL"], settings["SQLITE_BUSY_TIMEOUT_MS"])
    database.connect(reuse_if_open=True)
    return settings


def run_job(model: type[JobRecord], record_id: int, body: Callable[[JobRecord, dict, StopCheck], str]) -> str:
    """The one way a job runs: claim its queued row, stamp heartbeats while ``body`` works,
    record how it ended (``outcome``), close the connection whatever happens.
    ``body(record, settings, stop_check)`` ends the record itself when it comes to an end
    (``finish``) and returns the final status; an exception it raises ends it through
    ``outcome``. A row deleted or cancelled while it waited is left alone."""
    settings = connect()
    try:
        record = load(model, record_id)
        if record is None:
            return "deleted"
        if record.status != "queued":
            return record.status
        from .resources import claim_placed, measure_model, need_bytes, this_device

        measure_model(record, settings)  # a model's size the row does not have yet: placement counts it
        need = need_bytes(record, settings)
        why = claim_placed(record, this_device(settings), need)
        if why == "taken":
            fresh = load(model, record_id)
            return fresh.status if fresh else "deleted"
        if why is not None:  # it no longer fits here (another worker took the room meanwhile): back in line
            log.info("%s %s does not fit here (%s): queued again", label(record), record.id, why)
            enqueue(record, settings)
            return "waiting"
        with Heartbeat(record, settings["HEARTBEAT_S"]) as heartbeat:
            return outcome(record, settings, lambda: body(record, settings, StopCheck(record, heartbeat)))
    finally:
        database.close()


def worker_name() -> str:
    return os.environ.get("RQ_WORKER_ID") or f"{socket.gethostname()}.{os.getpid()}"


def load(model: type[JobRecord], record_id: int) -> JobRecord | None:
    """The row a job was queued for (None when it was deleted meanwhile)."""
    return retry_write(lambda: model.get_or_none(model.id == record_id), what="load")


def claim(record: JobRecord, **extra) -> bool:
    """Move a queued record to running for this worker under the next attempt number (writing
    ``extra`` too: placement's reservation); False when it is no longer queued (or another claim
    came first)."""
    model = type(record)
    now = utcnow()
    fields = {"status": "running", "heartbeat_at": now, "worker_name": worker_name(), "attempt": record.attempt + 1,
              **extra}
    if record.started_at is None:
        fields["started_at"] = now
    query = model.update(**fields).where((model.id == record.id) & (model.status == "queued")
                                         & (model.attempt == record.attempt))
    claimed = bool(retry_write(query.execute, what="claim"))
    if claimed:
        for key, value in fields.items():
            setattr(record, key, value)
        record._ended = None
    return claimed


def outcome(job: JobRecord, settings: dict, work: Callable[[], str]) -> str:
    """Run a job's ``work`` and record how it ended, the same way for every kind:

    - ``Superseded``: another attempt holds the record; nothing is written;
    - ``InterruptedError`` (a stop check said so): ended interrupted (on shutdown) or cancelled;
    - a ``UserError``: failed with its message as it is, not raised again;
    - any other exception: failed with its type and message, then raised again for RQ.

    A kind's ``failure`` hook says what its failure writes (its reason, more fields, an event).
    An exception after the job ended its record leaves that end (and its results) standing."""
    try:
        return work()
    except Superseded:
        return "superseded"  # logged where it was found; the record is another attempt's now
    except InterruptedError as exc:
        status = "interrupted" if SHUTDOWN.is_set() else "cancelled"
        return status if finish(job, status, reason=str(exc)) else "superseded"
    except Exception as exc:  # noqa: BLE001 - recorded on the row; user errors are not re-raised
        if ended_as(job):  # it broke after it ended its record: that end stands, and so do its results
            log.exception("%s %s failed after it ended %s", label(job), job.id, ended_as(job))
            return ended_as(job)
        user_error = isinstance(exc, UserError)
        reason = str(exc) if user_error else f"{type(exc).__name__}: {exc}"
        kind = KINDS.get(type(job))
        fields = kind.failure(job, exc, reason, settings) if kind is not None and kind.failure else {"reason": reason}
        fail(job, **fields)
        if not user_error:
            raise
        return "failed"


def finish(record: JobRecord, status: str, *, event: dict | None = None, then: Callable[[], None] | None = None,
           **fields) -> bool:
    """End the record this process holds with ``status``; False, with nothing written, if the
    process no longer holds it (swept, resumed elsewhere, deleted). In the same transaction,
    after the conditional UPDATE (which holds the row until the commit): its closing ``event``
    (kinds with an event log) and ``then``, the writes that go with the end (a new source, a
    result copied onto a run)."""
    if "reason" in fields:
        fields["reason"] = redact(fields["reason"])
    model = type(record)
    if getattr(record, "_ended", None) is not None:  # a record is ended once (a failure after the end is not its end)
        log.warning("%s %s: already ended %s; not ended again as %s", label(record), record.id, record._ended[0],
                    status)
        return False
    at = utcnow()

    def write() -> bool:
        with database.atomic():
            if not model.update(status=status, finished_at=at, **fields).where(current(record)).execute():
                return False
            if event is not None:
                Event.create(training=record.id, attempt=record.attempt, **{**event, "message": redact(event["message"])})
            if then is not None:
                then()
            return True

    ended = retry_write(write, what=f"finish {status}")
    if ended:
        record._ended = (status, at)
    else:
        superseded(record, f"its end ({status})")
    return ended


def ended_as(record: JobRecord) -> str | None:
    """The status this process ended the record with (None while it has not)."""
    ended = getattr(record, "_ended", None)
    return ended[0] if ended else None


def fail(record: JobRecord, reason: str, **fields) -> bool:
    return finish(record, "failed", reason=reason[:4000], **fields)


class Heartbeat:
    """A thread that stamps the record's ``heartbeat_at`` every ``interval_s`` while it runs.

    If the row is no longer ``running`` (a sweeper marked it interrupted, or it was
    deleted), ``lost`` is set and the job stops at its next check instead of writing over
    the row. A beat that fails on a busy database is simply skipped.
    """

    def __init__(self, record: JobRecord, interval_s: float) -> None:
        self.record, self.interval_s = record, interval_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        model = type(self.record)
        try:
            while not self._stop.wait(self.interval_s):
                if ended_as(self.record):
                    return  # the job ended its record; nothing is left to stamp
                try:
                    alive = model.update(heartbeat_at=utcnow()).where(current(self.record)).execute()
                except RETRYABLE as exc:
                    log.warning("heartbeat skipped: %s", exc)
                    _reset_connection()
                    continue
                if not alive:
                    self.lost.set()
                    return
        finally:
            if not database.is_closed():
                database.close()


# The work-horse's SIGTERM (a warm shutdown of the worker, or its parent dying) sets this;
# every job's stop check reads it, saves what it can, and leaves its record resumable.
SHUTDOWN = threading.Event()
SHUTDOWN_REASON = "The worker was shut down"


def install_shutdown_handler() -> None:
    """In the work-horse: SIGTERM asks the job to stop cleanly; the horse also gets SIGTERM
    when its worker process dies (Linux), so an orphaned job never runs on unsupervised."""
    signal.signal(signal.SIGTERM, lambda signum, frame: SHUTDOWN.set())
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the heartbeat's parent check still stops it
        pass


def cancel_requested(record: JobRecord) -> str | None:
    """The reason to stop if the user asked to cancel this record, read from its row now."""
    model = type(record)
    flag = retry_write(model.select(model.cancel_requested).where(model.id == record.id).scalar, what="cancel check")
    return "Cancelled by the user." if flag else None


class StopCheck:
    """A job's ``should_stop``: shutdown, a lost heartbeat, or the user's cancel (read at most
    every ``interval_s``). ``interrupted`` tells the first two (resumable) from a cancel."""

    def __init__(self, record: JobRecord, heartbeat: Heartbeat | None = None, interval_s: float = 0.5) -> None:
        self.record, self.heartbeat, self.interval_s = record, heartbeat, interval_s
        self.parent = os.getppid()
        self.interrupted: str | None = None
        self._next = 0.0

    def __call__(self) -> str | None:
        if SHUTDOWN.is_set() or os.getppid() != self.parent:
            self.interrupted = f"{SHUTDOWN_REASON} while it ran."
            return self.interrupted
        if self.heartbeat is not None and self.heartbeat.lost.is_set():
            raise superseded(self.record, "the heartbeat")
        now = time.monotonic()
        if now < self._next:
            return None
        self._next = now + self.interval_s
        return cancel_requested(self.record)


# --- from the web or the API -----------------------------------------------------------

def request_cancel(record: JobRecord) -> None:
    """Cancel a queued record at once; ask a running one to stop at its next check.

    A database write only: a cancelled row's job, when a worker takes it, finds the row no
    longer queued and does nothing. So cancelling works while Redis is down.
    """
    model = type(record)
    if record.status == "queued":
        ended = update_record(record, only_if=("queued",), what="cancel", status="cancelled", cancel_requested=True,
                              reason="Cancelled before it started.", finished_at=utcnow())
        if ended:
            if kind_of(record).events:
                add_event(record.id, "info", "cancelled", "Cancelled before it started.")
            return
        record = model.get_by_id(record.id)
    if record.is_active:
        update_record(record, only_if=("running",), what="cancel", cancel_requested=True)


# --- sweeping ---------------------------------------------------------------------------

def sweep_stale(settings: dict) -> list[JobRecord]:
    """Mark every running record whose heartbeat is older than ``HEARTBEAT_STALE_S`` interrupted.

    Whatever RQ thinks of the job (a killed worker, a lost Redis, a rebooted machine), a
    job that has not stamped its row for that long is not running. A training keeps its
    last checkpoint and can be resumed; an extraction's partial store is removed.
    """
    import datetime as dt

    swept = []
    for model in job_models():
        limit = utcnow() - dt.timedelta(seconds=settings["HEARTBEAT_STALE_S"])
        silent = (model.heartbeat_at < limit) | (model.heartbeat_at.is_null() & (model.started_at < limit))
        stale = model.select().where((model.status == "running") & silent)
        for record in retry_write(lambda q=stale: list(q), what="stale-job scan"):
            age = (utcnow() - (record.heartbeat_at or record.started_at)).total_seconds()
            reason = (f"Interrupted: the {label(record)}'s worker ({record.worker_name or 'unknown'}) stopped "
                      f"sending heartbeats {age:.0f} s ago (killed, crashed, stopped or its machine restarted).")
            # the heartbeat is read again in the UPDATE itself: a job that beat since the select stays running
            if mark_interrupted(record, reason, settings, only_if_silent=silent):
                swept.append(record)
    return swept


def mark_interrupted(record: JobRecord, reason: str, settings: dict, *, only_if_silent=None) -> bool:
    """End the attempt of a running record that ``record`` was read with as ``interrupted`` (only
    while its heartbeat is still silent, when ``only_if_silent`` says what silent is). The kind's
    ``interrupt`` hook adds to the reason, the fields and the condition (a training names its
    checkpoint); its ``interrupted`` hook runs once the row is marked (an event, partial files)."""
    model, kind = type(record), KINDS.get(type(record))
    plan = (kind.interrupt(record, reason, settings) if kind is not None and kind.interrupt
            else Interrupt(reason, {}))
    where = (model.id == record.id) & (model.status == "running") & (model.attempt == record.attempt)
    if plan.where is not None:
        where &= plan.where
    if only_if_silent is not None:
        where &= only_if_silent
    query = model.update(status="interrupted", reason=plan.reason, finished_at=utcnow(), **plan.fields).where(where)
    if not retry_write(lambda: _without_waiting_long(query), what="interrupt"):
        return False
    if kind is not None and kind.interrupted is not None:
        kind.interrupted(record, plan.reason, settings)
    return True


class _RowLocked(Exception):
    pass


def _without_waiting_long(query) -> int:
    """Run the sweep's UPDATE; 0 when its row stays locked for long. On PostgreSQL a job frozen
    inside its own short write transaction holds the row: the sweeper tries it again next round
    instead of stalling every other part of maintenance behind it. (On SQLite the busy timeout
    and ``retry_write`` bound the wait.)"""
    from ..db import is_sqlite

    if is_sqlite():
        return query.execute()
    try:
        with database.atomic():
            database.execute_sql("SET LOCAL lock_timeout = '2s'")
            try:
                return query.execute()
            except OperationalError as exc:
                if "lock timeout" not in str(exc):
                    raise
                raise _RowLocked from exc  # leaves the transaction, which rolls back
    except _RowLocked:
        log.warning("sweep: the row is locked by its job; trying again next round")
        return 0


def requeue_lost(settings: dict, grace_s: float = 30.0) -> list[JobRecord]:
    """Put back on the queue every queued record whose job Redis no longer holds.

    Covers a Redis that restarted without its data and a web process that died between
    creating a row and enqueueing it. Rows younger than ``grace_s`` are left alone: their
    creator may still be enqueueing them.
    """
    import datetime as dt

    redis = queue.connection(settings)
    limit = utcnow() - dt.timedelta(seconds=grace_s)
    requeued = []
    for model in job_models():
        waiting = retry_write(lambda m=model: list(m.select().where((m.status == "queued") & (m.created_at < limit))),
                              what="requeue scan")
        for record in waiting:
            if record.rq_job_id and queue.job_exists(settings, record.rq_job_id, redis):
                continue
            if not kind_of(record).queued_alone(record):
                continue
            enqueue(record, settings)
            requeued.append(record)
    return requeued
