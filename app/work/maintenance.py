"""The maintenance loop beside every worker: heartbeat sweep, lost-job re-queue, worker beat, janitor.

Run as its own process by ``worker.py`` (``python -m app.work.maintenance --parent PID``),
so the worker's parent never holds a database connection across the fork of a work-horse.
It exits when the worker it serves is gone.

Each part of a round runs on its own: one that raises is logged and the others still run.
A part that keeps failing is recorded on the worker's beat (``maintenance_error``), and
admins see it in the banner once it has failed ``MAINTENANCE_FAILURES_SHOWN`` rounds in a row.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
from collections.abc import Callable

from ..config import load_settings
from ..db import database, open_database
from ..errors import redact
from ..models import WorkerBeat, utcnow
from . import lifecycle, queue

log = logging.getLogger("sae_studio.maintenance")


class Failures:
    """The parts of the loop that are failing now: how many rounds in a row, and the last error."""

    def __init__(self) -> None:
        self.parts: dict[str, tuple[int, str]] = {}

    def run(self, part: str, step: Callable[[], object]):
        """Run one part; on an exception log it, count it and return None. Success clears the count."""
        try:
            result = step()
        except Exception as exc:  # noqa: BLE001 - one part must not stop the others
            self.record(part, exc)
            return None
        self.parts.pop(part, None)
        return result

    def record(self, part: str, exc: Exception) -> None:
        """Count one more failed round of ``part`` and log it, with its traceback."""
        count = self.parts.get(part, (0, ""))[0] + 1
        self.parts[part] = (count, redact(f"{type(exc).__name__}: {exc}")[:500])  # no passwords or paths
        log.error("maintenance part %r failed (%d round(s) in a row)", part, count, exc_info=exc)

    @property
    def rounds(self) -> int:
        """The longest run of failed rounds among the failing parts (0 when all is well)."""
        return max((count for count, _ in self.parts.values()), default=0)

    @property
    def error(self) -> str | None:
        if not self.parts:
            return None
        return "; ".join(f"{part}: {error} ({count} in a row)" for part, (count, error) in sorted(self.parts.items()))


def beat(settings: dict, name: str, queue_error: str | None, failures: Failures | None = None) -> None:
    """Record that this worker is alive, whether it can reach Redis, what of its maintenance fails,
    and its device with the memory free there now (the Workers page, and placement's wait reasons)."""
    from .resources import this_device

    place = this_device(settings)
    fields = {"last_seen": utcnow(), "queue_error": queue_error, "pid": os.getpid(), "host": socket.gethostname(),
              "maintenance_error": failures.error if failures else None,
              "maintenance_failures": failures.rounds if failures else 0,
              "device_key": place.key, "device_label": place.label, "device_names": " ".join(sorted(place.names)),
              "memory_free_bytes": place.free_bytes, "memory_total_bytes": place.total_bytes}

    def write() -> None:
        updated = WorkerBeat.update(**fields).where(WorkerBeat.name == name).execute()
        if not updated:
            WorkerBeat.insert(name=name, **fields).on_conflict_ignore().execute()

    lifecycle.retry_write(write, what="worker beat")


def run_once(settings: dict, name: str, *, janitor: bool, failures: Failures | None = None) -> dict:
    """One round: sweep stale heartbeats, re-queue lost jobs (when Redis answers), beat, maybe clean.

    Each part is isolated (see ``Failures``); the beat is written after the others, so it
    records how they went, and again after the janitor when that ran.
    """
    from .janitor import clean

    failures = failures if failures is not None else Failures()
    report: dict = {}
    swept = failures.run("sweep", lambda: lifecycle.sweep_stale(settings))
    report["swept"] = [r.id for r in swept or []]
    queue_error = queue.ping(settings)
    if queue_error is None:
        def requeue():
            try:
                return lifecycle.requeue_lost(settings), None
            except queue.QueueUnavailable as exc:
                return [], str(exc)

        requeued, queue_error = failures.run("re-queue", requeue) or ([], None)
        report["requeued"] = [r.id for r in requeued]
    failures.run("beat", lambda: beat(settings, name, queue_error, failures))
    if janitor:
        report["cleaned"] = failures.run("janitor", lambda: clean(settings)) or []
        failures.run("beat", lambda: beat(settings, name, queue_error, failures))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--parent", type=int, required=True, help="exit once this process is gone")
    parser.add_argument("--name", required=True, help="the worker's name, for its beat")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s maintenance %(levelname)s %(message)s")
    settings = load_settings()
    open_database(settings["DATABASE_URL"], settings["SQLITE_BUSY_TIMEOUT_MS"])
    failures = Failures()
    last_janitor = 0.0
    while os.getppid() == args.parent:
        try:
            with database.connection_context():
                failures.parts.pop("round", None)  # connected: this round's beat can say so
                due = time.monotonic() - last_janitor >= settings["JANITOR_INTERVAL_S"]
                report = run_once(settings, args.name, janitor=due, failures=failures)
                if due:
                    last_janitor = time.monotonic()
            if any(report.get(k) for k in ("swept", "requeued", "cleaned")):
                log.info("%s", report)
        except Exception as exc:  # noqa: BLE001 - maintenance must outlive a bad round (e.g. no connection)
            failures.record("round", exc)  # counted and logged like any part
        time.sleep(settings["SWEEP_INTERVAL_S"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
