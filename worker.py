"""Start an RQ worker on SAE Studio's queue.

The parent process only talks to Redis; each job runs in a forked work-horse, which is
where torch (and CUDA) is first imported. Usage: ``python worker.py [--burst]``.
"""
from __future__ import annotations

import argparse
import sys

from redis import Redis
from rq import Queue, Worker

from app.config import load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    parser.add_argument("--name", default=None, help="worker name (default: host and pid)")
    args = parser.parse_args(argv)
    settings = load_settings()
    if "torch" in sys.modules:  # pragma: no cover - a guard for future edits
        raise RuntimeError("the worker's parent process must not import torch")
    connection = Redis.from_url(settings["REDIS_URL"])
    queue = Queue(settings["QUEUE_NAME"], connection=connection)
    worker = Worker([queue], connection=connection, name=args.name)
    worker.work(burst=args.burst, with_scheduler=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
