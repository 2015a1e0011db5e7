"""The maintenance loop beside every worker: heartbeat sweep, lost-job re-queue, worker beat, janitor.

Run as its own process by ``worker.py`` (``python -m app.work.maintenance --parent PID``),
so the worker's parent never holds a database connection across the fork of a work-horse.
It exits when the worker it serves is gone.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time

from ..config import load_settings
from ..db import database, open_database
from ..models import WorkerBeat, utcnow
from . import lifecycle, queue

log = logging.getLogger("sae_studio.maintenance")


def beat(settings: dict, name: str, queue_error: str | None) -> None:
    """Record that this worker is alive, and whether it can reach Redis."""
    def write() -> None:
        updated = WorkerBeat.update(last_seen=utcnow(), queue_error=queue_error, pid=os.getpid(),
                                    host=socket.gethostname()).where(WorkerBeat.name == name).execute()
        if not updated:
            WorkerBeat.insert(name=name, host=socket.gethostname(), pid=os.getpid(), last_seen=utcnow(),
                              queue_error=queue_error).on_conflict_ignore().execute()

    lifecycle.retry_write(write, what="worker beat")


def run_once(settings: dict, name: str, *, janitor: bool) -> dict:
    """One round: sweep stale heartbeats, re-queue lost jobs (when Redis answers), beat, maybe clean."""
    from .janitor import clean

    report = {"swept": [r.id for r in lifecycle.sweep_stale(settings)]}
    queue_error = queue.ping(settings)
    if queue_error is None:
        try:
            report["requeued"] = [r.id for r in lifecycle.requeue_lost(settings)]
        except queue.QueueUnavailable as exc:
            queue_error = str(exc)
    beat(settings, name, queue_error)
    if janitor:
        report["cleaned"] = clean(settings)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--parent", type=int, required=True, help="exit once this process is gone")
    parser.add_argument("--name", required=True, help="the worker's name, for its beat")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s maintenance %(levelname)s %(message)s")
    settings = load_settings()
    open_database(settings["DATABASE_URL"])
    last_janitor = 0.0
    while os.getppid() == args.parent:
        try:
            with database.connection_context():
                due = time.monotonic() - last_janitor >= settings["JANITOR_INTERVAL_S"]
                report = run_once(settings, args.name, janitor=due)
                if due:
                    last_janitor = time.monotonic()
            if any(report.get(k) for k in ("swept", "requeued", "cleaned")):
                log.info("%s", report)
        except Exception:  # noqa: BLE001 - maintenance must outlive a bad round
            log.exception("maintenance round failed")
        time.sleep(settings["SWEEP_INTERVAL_S"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
