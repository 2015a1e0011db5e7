"""Queued work: one module per kind (training, auto-tune, extraction, feature statistics).

Each module owns its record's whole life — create and enqueue (web side), run in the
worker, heartbeat, checkpoint, finish, fail, resume — on the shared ``lifecycle`` module.
``queue`` is the only module that talks to Redis; ``deletion`` removes records and their
files; ``maintenance`` (sweeper, re-queue, janitor) runs beside the worker.

Nothing here imports torch at module level: the web process imports these modules to
create and cancel work, and only the worker's work-horse runs the functions that train.
"""
