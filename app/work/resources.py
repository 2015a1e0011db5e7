"""Will it fit? The memory a job needs against what its device has free, and a model's size
against ``MAX_MODEL_GB``, checked when the job is started (at its field) and again in the worker."""
from __future__ import annotations

import datetime as dt
import re
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..devices import device_memory, list_gpus, worker_gpu
from ..errors import UserError
from ..models import utcnow
from .. import training_config
from ..validation import Room, memory_estimate_bytes

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf")


class TooLarge(UserError, ValueError):
    """The job would not fit; the message says what to change. Safe to show."""


def _fmt(n: float) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def check_memory(settings: dict, need_bytes: int, what: str, advice: str) -> None:
    """In a job, on the device it was placed on: the memory it needs against what is free there now."""
    memory = device_memory(settings.get("SAE_DEVICE", "auto"))
    if memory.free_bytes and need_bytes > memory.free_bytes:
        raise TooLarge(f"{what} needs about {_fmt(need_bytes)} but {memory.device} has {_fmt(memory.free_bytes)} "
                       f"free. {advice}")


def check_submission(settings: dict, need_bytes: int, what: str, advice: str) -> None:
    """When a job is submitted (in the web, which is pinned to no GPU): refuse only what no GPU
    could ever hold, a job larger than the largest one's total memory; a job that only lacks room
    now is accepted and waits in the queue for it (placement). With no GPU (``SAE_DEVICE=cpu``, or
    none anywhere), where placement does not wait for memory, the RAM free now (``check_memory``)."""
    room = submission_room(settings)
    if room is None:
        check_memory(settings, need_bytes, what, advice)
    elif need_bytes > room.total_bytes:
        raise TooLarge(f"{what} needs about {fmt_gib(need_bytes)} but the largest GPU, {room.total_on}, has "
                       f"{fmt_gib(room.total_bytes)} in all: no device could ever run it. {advice}")


def tune_bytes(d_in: int, latent_dim: int, batch_size: int) -> int:
    """An auto-tune pilot is a short training of the default architecture (``app/sae/tune.py``)."""
    return memory_estimate_bytes(d_in, latent_dim, batch_size, training_config.BY_NAME["architecture"].default)


def feature_bytes(d_in: int, d_sae: int, sample_tokens: int, top_n: int, chunk: int = 4096) -> int:
    """The feature job holds the sample, the SAE, a chunk's latents (a few copies) and the top examples."""
    return 4 * (sample_tokens * d_in + 2 * d_in * d_sae + 4 * chunk * d_sae) + 16 * d_sae * top_n


def model_bytes(path: str) -> int | None:
    """The size of a model's weight files: a local folder's, or a Hub model's from its metadata
    (None when it cannot be known here: offline and not cached)."""
    folder = Path(path)
    if folder.is_absolute():  # a folder resolved under the model roots; anything else is a Hub id
        if not folder.is_dir():
            return None
        return sum(p.stat().st_size for p in folder.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    try:
        from huggingface_hub import HfApi

        info = HfApi().model_info(path, files_metadata=True, timeout=10)
    except Exception:  # noqa: BLE001 - offline, unknown, or the Hub is unreachable: the loader will say
        return None
    sizes = [s.size or 0 for s in info.siblings or [] if Path(s.rfilename).suffix in WEIGHT_SUFFIXES]
    # a repo often holds the same weights in several formats: the largest format is what loads
    by_format: dict[str, int] = {}
    for sibling, size in zip([s for s in info.siblings or [] if Path(s.rfilename).suffix in WEIGHT_SUFFIXES], sizes,
                             strict=True):
        by_format[Path(sibling.rfilename).suffix] = by_format.get(Path(sibling.rfilename).suffix, 0) + size
    return max(by_format.values(), default=None)


def check_model_size(settings: dict, path: str) -> int | None:
    """The model's size (``model_bytes``) when it is within ``MAX_MODEL_GB``; ``TooLarge`` when it is over."""
    size = model_bytes(path)
    limit = settings["MAX_MODEL_GB"] * 2**30
    if size is not None and size > limit:
        raise TooLarge(f"Refused: the model's weights are {_fmt(size)}, over this app's limit of "
                       f"{settings['MAX_MODEL_GB']:g} GB (MAX_MODEL_GB). Nothing was downloaded.")
    return size


def model_need(size: int | None, model_dtype: str | None) -> int:
    """The memory a model of ``size`` bytes of weight files takes loaded at ``model_dtype``, with room
    for its activations (an extraction's, a downstream evaluation's)."""
    share = 0.5 if model_dtype in ("bfloat16", "float16") else 1.0
    return int(1.3 * (size or 0) * share)


# --- placement: which worker's device takes a job, by memory -----------------------------------
#
# Each worker trains on one device (the GPU it is pinned to, or the CPU). It takes a queued job
# only when the job's estimate fits what that device has free now, less what the jobs already
# running there have reserved (counted whole even once they have allocated part of it: a little
# slack, never an overcommit). The reservation is the running row's own ``placed_on`` and
# ``reserved_bytes``, written by the claim in one transaction behind a per-device lock, so two
# workers on one GPU cannot both take its last free gigabytes; it ends with the run (only running
# rows count). A job that fits nowhere waits on the queue with ``wait_reason`` on its row.

CPU_KEY = "cpu"


@dataclass(frozen=True)
class Place:
    """A worker's device as placement sees it now."""

    key: str  # the GPU's UUID, or "<host>:cpu"
    label: str  # "GPU 2 (NVIDIA H100) on box", "the CPU of box"
    names: frozenset  # what a job's ``requested_device`` may call it
    free_bytes: int | None  # None: the CPU, where every job fits
    total_bytes: int | None = None

    @property
    def is_gpu(self) -> bool:
        return self.free_bytes is not None


def host_name() -> str:
    return socket.gethostname().split(".")[0]


def this_device(settings: dict, environ=None) -> Place:
    """The device this process trains on (``SAE_DEVICE``, within its CUDA_VISIBLE_DEVICES pinning)."""
    host = host_name()
    gpu = worker_gpu(settings.get("SAE_DEVICE", "auto"), environ)
    if gpu is None:
        return Place(f"{host}:cpu", f"the CPU of {host}", frozenset({"cpu", f"{host}:cpu"}), None)
    return Place(gpu.uuid, f"{gpu.label} on {host}",
                 frozenset({gpu.uuid, f"cuda:{gpu.index}", f"{host}:cuda:{gpu.index}"}),
                 gpu.free_bytes, gpu.total_bytes)


DEVICE_NAME = re.compile(r"((?:[A-Za-z0-9][A-Za-z0-9._-]{0,62}:)?(?:cpu|cuda:\d{1,3})|GPU-[0-9a-fA-F-]{8,40})")
DEVICE_HELP = ("a device: cpu or cuda:N (GPU N as nvidia-smi numbers it, on any machine), <host>:cpu or "
               "<host>:cuda:N (on that machine), or a GPU's UUID (GPU-…)")


def device_name_problem(value) -> str | None:
    """Why ``value`` cannot name a device a job must run on (None when it can)."""
    if not isinstance(value, str) or not DEVICE_NAME.fullmatch(value.strip()):
        return f"Must be {DEVICE_HELP}."
    return None


def fmt_gib(n: float) -> str:
    if n >= 10 * 2**30:
        return f"{n / 2**30:.0f} GiB"
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.0f} MiB"


def need_bytes(record, settings: dict | None = None) -> int:
    """The memory a queued job needs on its device: each kind's own estimate (0 when unknown)."""
    kind = type(record).__name__
    try:
        if kind == "Training":
            return (memory_estimate_bytes(record.source.d_in, record.latent_dim, record.batch_size, record.architecture)
                    + resident_bytes(record.source))
        if kind == "Sweep":
            from .sweeps import need_bytes as sweep_bytes

            return sweep_bytes(record)
        if kind == "TuneJob":
            return tune_bytes(record.source.d_in, record.latent_dim, record.batch_size)
        if kind == "FeatureJob":
            d_sae = record.training.latent_dim if record.training_id else record.imported.d_sae
            return feature_bytes(record.source.d_in, d_sae, record.sample_tokens, record.top_n)
        if kind == "Extraction":
            size = record.model_size_bytes or _local_model_bytes(record.model_name)
            return model_need(size, record.model_dtype)
        if kind == "DownstreamEval":
            run = record.training
            meta = run.source.params or {}
            sae = 4 * (2 * run.source.d_in * run.latent_dim)
            size = record.model_size_bytes or _local_model_bytes(str(meta.get("model", "")))
            return model_need(size, meta.get("model_dtype")) + sae
    except Exception:  # noqa: BLE001 - a record whose parts are gone: the job itself will say why
        return 0
    return 0


def resident_bytes(source) -> int:
    """What a source itself holds on the training device: a streamed source's model and its mixing
    buffers, as recorded when it was made (0 for the others)."""
    return int((source.params or {}).get("resident_bytes") or 0) if source.kind == "streamed" else 0


def _model_name(record) -> str | None:
    """The model an extraction or a downstream evaluation loads, as its creator named it."""
    kind = type(record).__name__
    if kind == "Extraction":
        return record.model_name
    if kind == "DownstreamEval":
        return str((record.training.source.params or {}).get("model") or "")
    return None


def known_model_size(run) -> int | None:
    """The size of the model a downstream evaluation of ``run`` loads, from what is already known (no
    Hub call): the source's own metadata, or the record of the extraction that made it."""
    meta = run.source.params or {}
    if meta.get("model_size_bytes"):
        return int(meta["model_size_bytes"])
    from ..models import Extraction

    if meta.get("extraction_id"):
        extraction = Extraction.get_or_none(Extraction.id == meta["extraction_id"])
        if extraction is not None and extraction.model_size_bytes:
            return extraction.model_size_bytes
    return None


def measure_model(record, settings: dict) -> None:
    """In the job's own process, before its claim: the size of the model an extraction or a
    downstream evaluation loads, when its row does not have it yet (a Hub model the web could not
    size, a job queued before sizes were recorded). Written on the queued row, so that from now on
    every worker's placement counts it: the job then waits for a device with room instead of being
    claimed where the model does not fit. It may ask the Hub (up to 10 s), which is why the worker's
    own loop (``worker._put_back``) never calls it."""
    from .. import paths
    from ..extraction.capture_names import BUNDLED_MINILM
    from . import lifecycle

    if type(record).__name__ not in ("Extraction", "DownstreamEval") or record.model_size_bytes:
        return
    try:
        name = _model_name(record)
        if not name or name == BUNDLED_MINILM:
            return
        size = model_bytes(paths.resolve(name, settings, "model"))
    except Exception:  # noqa: BLE001 - a name refused or parts gone: the job itself will say why
        return
    if size:
        lifecycle.update_record(record, only_if=("queued",), what="model size", model_size_bytes=size)
        record.model_size_bytes = size


def _local_model_bytes(name: str) -> int:
    """A local model folder's weights (the Hub is never asked from here: placement must be quick)."""
    folder = Path(name)
    if not folder.is_absolute() or not folder.is_dir():
        return 0
    return model_bytes(str(folder)) or 0


def reserved_on(key: str, models=None) -> int:
    """What the jobs running on device ``key`` reserved."""
    from peewee import fn

    from .lifecycle import job_models

    total = 0
    for model in models or job_models():
        total += int(model.select(fn.COALESCE(fn.SUM(model.reserved_bytes), 0))
                     .where((model.status == "running") & (model.placed_on == key)).scalar() or 0)
    return total


def reserved_by_device(models=None) -> dict[str, int]:
    """What the running jobs reserved, by device: ``reserved_on`` for every device in one query a kind."""
    from peewee import fn

    from .lifecycle import job_models

    totals: dict[str, int] = {}
    for model in models or job_models():
        rows = (model.select(model.placed_on, fn.SUM(model.reserved_bytes))
                .where((model.status == "running") & model.placed_on.is_null(False))
                .group_by(model.placed_on).tuples())
        for key, total in rows:
            totals[key] = totals.get(key, 0) + int(total or 0)
    return totals


def admit(need: int, place: Place, reserved: int, requested: str | None = None) -> str | None:
    """Pure: None when a job needing ``need`` bytes may start on ``place`` now, else why not (short)."""
    if requested and requested.strip() not in place.names:
        return f"it must run on {requested.strip()}"
    if not place.is_gpu:
        return None
    available = place.free_bytes - reserved
    if need > available:
        return f"it needs {fmt_gib(need)} and {place.label} has {fmt_gib(max(available, 0))} free"
    return None


@contextmanager
def device_lock(key: str):
    """One transaction per device at a time: SQLite's write lock taken up front, or a PostgreSQL
    advisory lock on the device's name, held until the transaction ends."""
    from ..db import database, is_sqlite

    if is_sqlite():
        with database.atomic("IMMEDIATE"):
            yield
    else:
        with database.atomic():
            database.execute_sql("SELECT pg_advisory_xact_lock(72731, hashtext(%s))", (key,))
            yield


def claim_placed(record, place: Place, need: int) -> str | None:
    """Claim ``record`` on ``place`` with ``need`` bytes reserved, in one transaction behind the
    device's lock, if it fits; None when claimed, else why not (``"taken"`` when the row is no
    longer queued: another worker claimed it, or it was cancelled)."""
    from . import lifecycle

    def attempt():
        with device_lock(place.key):
            why = admit(need, place, reserved_on(place.key), record.requested_device)
            if why:
                return why
            entry = {"attempt": record.attempt + 1, "worker": lifecycle.worker_name(), "device": place.label,
                     "device_key": place.key, "reserved_bytes": need, "at": utcnow().isoformat(timespec="seconds")}
            claimed = lifecycle.claim(record, placed_on=place.key, reserved_bytes=need, wait_reason=None,
                                      attempts_log=[*(record.attempts_log or []), entry])
            return None if claimed else "taken"

    return lifecycle.retry_write(attempt, what="claim on a device")


def live_beats(settings: dict) -> list:
    """The beats of the workers alive now (each worker's device and memory as it last read them)."""
    from ..models import WorkerBeat

    limit = utcnow() - dt.timedelta(seconds=max(3 * float(settings.get("SWEEP_INTERVAL_S", 5)), 30))
    return list(WorkerBeat.select().where(WorkerBeat.last_seen >= limit))


def submission_room(settings: dict) -> Room | None:
    """The GPUs a job may be placed on, as the web sees them when it is submitted: this machine's
    (nvidia-smi, now) and every live worker's device (its beat), each one's free memory less what
    the jobs running there reserved. None where jobs train on no GPU (``SAE_DEVICE=cpu``, or no GPU
    anywhere): there the RAM is the check (``check_submission``, the validator's free memory)."""
    if settings.get("SAE_DEVICE", "auto") == "cpu":
        return None
    devices: dict[str, tuple[str, int, int]] = {}  # key -> (label, total, free)
    host = host_name()
    for gpu in list_gpus() or []:
        devices[gpu.uuid] = (f"{gpu.label} on {host}", gpu.total_bytes, gpu.free_bytes)
    try:
        for beat in live_beats(settings):
            if beat.device_key and beat.memory_total_bytes and beat.device_key not in devices:
                devices[beat.device_key] = (beat.device_label or beat.device_key, beat.memory_total_bytes,
                                            beat.memory_free_bytes or 0)
        reserved = reserved_by_device()
        free = {key: free - reserved.get(key, 0) for key, (_, _, free) in devices.items()}
    except Exception:  # noqa: BLE001 - the database did not answer: this machine's readings, unreserved
        free = {key: free for key, (_, _, free) in devices.items()}
    if not devices:
        return None
    total_key = max(devices, key=lambda k: devices[k][1])
    free_key = max(free, key=lambda k: free[k])
    return Room(devices[total_key][1], devices[total_key][0], max(free[free_key], 0), devices[free_key][0])


def wait_reason(record, need: int, settings: dict, here: Place, why_here: str) -> str:
    """What a job that fits no device now tells its page: what it waits for, and the best there is."""
    beats = live_beats(settings)
    devices = {here.key: (here.label, here.names, here.free_bytes)}
    for beat in beats:
        if beat.device_key and beat.device_key not in devices:
            names = frozenset((beat.device_names or "").split())
            devices[beat.device_key] = (beat.device_label or beat.device_key, names, beat.memory_free_bytes)
    requested = (record.requested_device or "").strip()
    if requested:
        matching = {k: v for k, v in devices.items() if requested in v[1]}
        if not matching:
            return (f"Waiting for {requested}: no worker runs on that device. It starts when a worker on it joins "
                    f"the queue.")
        devices = matching
    gpus = [(free - reserved_on(key), label) for key, (label, _, free) in devices.items() if free is not None]
    if not gpus:
        return f"Waiting: {why_here}."
    largest, where = max(gpus)
    return (f"Waiting for {fmt_gib(need)} on a GPU; the largest free is {fmt_gib(max(largest, 0))} ({where}). "
            "It starts when a device has room.")
