"""Queued work: one module per kind (training, auto-tune, extraction, feature statistics,
downstream evaluation, sweep; the L0 finder's plan and reading are in ``finder``).

Each module owns its record's whole life — create and enqueue (web side), run in the
worker, heartbeat, checkpoint, finish, fail, resume — on the shared ``lifecycle`` module,
and registers its kind there (``lifecycle.register``). ``queue`` is the only module that
talks to Redis; ``deletion`` removes records and their files; ``sources`` (uploads),
``exports`` (SAEs in and out) and ``templates`` are the other services the web calls to write
files and records; ``maintenance`` (sweeper, re-queue, janitor) runs beside the worker.

Nothing here imports torch at module level: the web process imports these modules to
create and cancel work, and only the worker's work-horse runs the functions that train.
"""
# Every kind registers itself with the lifecycle on import; importing any module of this
# package imports them all, so the registry is full wherever the lifecycle runs. The order is
# the order the sweeper and the re-queue visit the kinds in.
from . import training  # noqa: F401,I001
from . import tune  # noqa: F401
from . import extraction  # noqa: F401
from . import features  # noqa: F401
from . import downstream  # noqa: F401
from . import sweeps  # noqa: F401
