"""Start an RQ worker on SAE Studio's queue, with its maintenance process beside it.

The parent process only talks to Redis; each job runs in a forked work-horse. On a GPU, the
horse is where torch (and CUDA) is first imported; a worker that trains on the CPU imports torch
once, before its first horse, for all of them (``StudioWorker.fork_work_horse``). Before it takes
work the worker sweeps once (jobs whose heartbeat stopped become ``interrupted``); a maintenance child process keeps
sweeping, re-queues jobs Redis lost, records the worker's beat and runs the janitor.
It refuses to start when DATA_DIR is not the installation's shared one (its
``.sae-studio-id`` marker differs from the database's). Usage: ``python worker.py [--burst] [--name NAME]``; pin it to one GPU with
``CUDA_VISIBLE_DEVICES=N`` (``make run`` starts one such worker per GPU). SIGTERM is a warm shutdown: a running
training saves a checkpoint and is left resumable.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

from app.config import data_dir_exposure, load_settings
from app.db import database, migrate, open_database
from app.devices import worker_gpu
from app.work import lifecycle
from app.work.worker import make_worker, shared_storage_problem


def release_stale_name(worker) -> str | None:
    """A worker keeps its name across restarts (``make run`` names it for its host and GPU), but RQ
    refuses a name whose registration is still there: a worker killed outright leaves it for a
    few minutes. Drop it when it was this machine's and its process is gone; return why not to start
    when a live worker holds the name."""
    from redis.exceptions import RedisError
    from rq import worker_registration

    try:
        connection = worker.connection
        if not connection.exists(worker.key) or connection.hexists(worker.key, "death"):
            return None
        host = (connection.hget(worker.key, "hostname") or b"").decode()
        pid = int(connection.hget(worker.key, "pid") or 0)
        if host == socket.gethostname() and pid and not _alive(pid):
            with connection.pipeline() as pipeline:
                worker_registration.unregister(worker, pipeline)
                pipeline.delete(worker.key)
                pipeline.execute()
            return None
    except RedisError:
        return None  # RQ's own start-up waits for Redis and checks again
    return f"a worker named {worker.name!r} is already running (pid {pid} on {host or 'an unknown host'})."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    parser.add_argument("--name", default=None, help="worker name (default: host and pid)")
    args = parser.parse_args(argv)
    settings = load_settings()
    if "torch" in sys.modules and worker_gpu(settings["SAE_DEVICE"]) is not None:  # pragma: no cover - a guard
        # for future edits: a CPU worker imports torch before its first horse anyway (the tests' fork server
        # starts one with it imported), but a GPU worker's parent never does, so its modules must not
        raise RuntimeError("a GPU worker's parent must not import torch: CUDA is first set up in its horses")
    name = args.name or f"{socket.gethostname()}.{os.getpid()}"
    exposed = data_dir_exposure(settings["DATA_DIR"])
    if exposed:  # a warning, not a refusal: see data_dir_exposure
        print(f"WARNING: {exposed}", file=sys.stderr, flush=True)
    open_database(settings["DATABASE_URL"], settings["SQLITE_BUSY_TIMEOUT_MS"])
    with database.connection_context():  # closed again before any work-horse is forked
        migrate()
        problem = shared_storage_problem(settings["DATA_DIR"])
        if problem:
            print(f"Refusing to start: {problem}", file=sys.stderr, flush=True)
            return 2
        lifecycle.sweep_stale(settings)
    maintenance = None
    if not args.burst:
        maintenance = subprocess.Popen([sys.executable, "-m", "app.work.maintenance", "--parent", str(os.getpid()),
                                        "--name", name], cwd=os.path.dirname(os.path.abspath(__file__)))
    worker = make_worker(settings, name)
    taken = release_stale_name(worker)
    if taken:
        print(f"Refusing to start: {taken}", file=sys.stderr, flush=True)
        return 2
    try:
        worker.work(burst=args.burst, with_scheduler=False)
    finally:
        if maintenance is not None:
            maintenance.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
