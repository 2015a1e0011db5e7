"""Training runs: create, run in the worker, checkpoint, finish, fail, resume.

A run's files live in ``DATA_DIR/runs/<id>/``: checkpoints (the trainer's whole state, saved
every checkpoint interval and when the run stops early; removed when it completes) and, once
it has ended, its final SAE: ``sae.safetensors``, ``frequencies.npy`` and ``cfg.json`` in a
folder of the attempt that wrote them, ``final-a<attempt>-<nonce>/``.

A checkpoint file is named by the attempt and step that wrote it (``checkpoint-a3-s1200-<nonce>.pt``)
and is never written twice. It is in force once the run's row names it, which only a write
conditional on the writer's attempt does (``lifecycle.current``): a process that lost its
claim may leave a file behind, never the checkpoint a resume reads. The final SAE is fenced the
same way: its folder is named on the row (``final_name``) only by the run's end (``finish``,
conditional on the attempt), and a process whose end is refused removes its folder; every reader
finds the files through ``sae_folder``. Metric points are
flushed before each checkpoint is committed, and a resumed run first drops the points after
its checkpoint's step, so the series has no duplicates and no gap beyond what the crash lost.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import sys
import time
import traceback
from pathlib import Path

from .. import training_config
from ..chart_series import ChartSeries
from ..db import database
from ..sae import architectures
from ..errors import UserError
from ..models import RESUMABLE_STATUSES, ActivationSet, Event, MetricPoint, Training, utcnow
from . import lifecycle
from .lifecycle import Superseded, add_event, current, retry_write, update_record

LEGACY_CHECKPOINT = "checkpoint.pt"  # before checkpoints were named by attempt (with checkpoint.json beside it)
CHECKPOINT_NAME = re.compile(r"checkpoint-a(\d+)-s(\d+)-([0-9a-f]{8})\.pt")
FINAL_FILES = ("sae.safetensors", "frequencies.npy", "cfg.json")  # a run's final SAE, in its final folder
FINAL_NAME = re.compile(r"final-a(\d+)-([0-9a-f]{8})")


def run_folder(run: Training | int, settings: dict) -> Path:
    """``DATA_DIR/runs/<id>``: a run's checkpoints and, once it has ended, its SAE (the one spelling of it)."""
    return Path(settings["DATA_DIR"]) / "runs" / str(run if isinstance(run, int) else run.id)


def sae_folder(run: Training, settings: dict) -> Path | None:
    """The folder holding the run's final SAE (``FINAL_FILES``) as ``run`` was read, or None when it
    has none (yet): the folder its row names (``final_name``, written by the end of the attempt that
    saved it), or, for a run that ended before final folders (no name on the row), the run folder
    itself. Every reader of a run's SAE (pages, export, features, downstream, the finder) asks here."""
    folder = run_folder(run, settings)
    if run.final_name:
        if not FINAL_NAME.fullmatch(run.final_name):
            return None
        folder = folder / run.final_name
    return folder if (folder / "sae.safetensors").is_file() else None


def checkpoint_path(run: Training, settings: dict) -> Path | None:
    """The checkpoint file in force for the run as ``run`` was read (None if there is none)."""
    folder = run_folder(run, settings)
    if run.checkpoint_name:
        path = folder / run.checkpoint_name
        return path if path.exists() else None
    legacy = folder / LEGACY_CHECKPOINT
    return legacy if legacy.exists() and (folder / "checkpoint.json").exists() else None


def checkpoint_step(run: Training, settings: dict) -> int | None:
    """The step of the run's checkpoint in force (None if there is none), read without torch."""
    path = checkpoint_path(run, settings)
    if path is None:
        return None
    if run.checkpoint_name:
        return run.checkpoint_at
    try:
        return int(json.loads((path.parent / "checkpoint.json").read_text())["step"])
    except (ValueError, KeyError, OSError):
        return None


# --- web side ---------------------------------------------------------------------------

def create_training(fields: dict, settings: dict) -> Training:
    """Store a validated configuration as a queued run and enqueue it (``QueueUnavailable`` if it can't be)."""
    return lifecycle.create_and_enqueue(Training, fields, settings)


class NotResumable(UserError, ValueError):
    """Why this run cannot be resumed (its status, or no checkpoint); safe to show."""


def resume_training(run: Training, settings: dict, *, learning_rate: float | None = None,
                    enqueue: bool = True) -> Training:
    """Queue an interrupted, failed or cancelled run again on the same record.

    It continues from its checkpoint (from step 0 when none was saved), keeping its metric
    points and events. ``learning_rate`` replaces the run's own, e.g. after a non-finite loss.
    A member of a sweep resumes with its sweep (``sweeps.resume_sweep``, which calls this with
    ``enqueue=False``: the sweep's job trains it).
    """
    if run.sweep_id is not None and enqueue:
        from .sweeps import resume_sweep

        if learning_rate is not None:
            raise NotResumable("A member of a sweep resumes with its sweep, at its own learning rate.")
        from .sweeps import SweepRefused

        try:
            resume_sweep(run.sweep, settings, only=run)
        except SweepRefused as exc:
            raise NotResumable(str(exc)) from exc
        return Training.get_by_id(run.id)
    if run.status not in RESUMABLE_STATUSES:
        raise NotResumable(f"Only an interrupted, failed or cancelled run can be resumed; this one is {run.status}.")
    saved = checkpoint_step(run, settings)
    if run.status != "interrupted" and saved is None:
        raise NotResumable("This run has no checkpoint to resume from; start a new run from its config instead.")
    before = {"status": run.status, "reason": run.reason, "finished_at": run.finished_at,
              "cancel_requested": run.cancel_requested, "failed_step": run.failed_step, "learning_rate": run.learning_rate}
    changes = {"status": "queued", "reason": None, "finished_at": None, "cancel_requested": False, "failed_step": None,
               "queued_at": utcnow()}
    if learning_rate is not None:
        changes["learning_rate"] = learning_rate
    if not update_record(run, only_if=RESUMABLE_STATUSES, what="resume", **changes):
        raise NotResumable("The run changed meanwhile; reload the page.")
    try:
        if enqueue:
            lifecycle.enqueue(Training.get_by_id(run.id), settings)
    except lifecycle.queue.QueueUnavailable:
        update_record(run, what="undo resume", **before)
        raise
    where = f"its checkpoint at step {saved:,}" if saved is not None else "step 0 (no checkpoint was saved)"
    lr = f" with learning rate {learning_rate:g} (was {before['learning_rate']:g})" if learning_rate is not None else ""
    add_event(run.id, "info", "resume", f"Resume requested: continues from {where}{lr}.", step=saved)
    return Training.get_by_id(run.id)


# --- in the worker ----------------------------------------------------------------------

def build_source(source: ActivationSet, data_dir: str, settings: dict | None = None):
    """The core's activation source for a stored ``ActivationSet`` (a streamed one loads its model
    on the training device, and needs the settings for its roots)."""
    from ..sae.files import ArrayInfo
    from ..sae.sources import ArraySource, HierarchicalSource, StoreSource, SyntheticSource

    if source.kind == "synthetic":
        p = source.params
        kind = HierarchicalSource if p.get("structure") == "hierarchical" else SyntheticSource
        return kind(source.d_in, int(p["n_features"]), float(p["mean_active"]), int(p["seed"]))
    if source.kind == "file":
        path = Path(data_dir) / source.path
        if not path.exists():
            raise FileNotFoundError(f"the activation file {source.path} is missing from the data folder")
        return ArraySource(path, ArrayInfo(**source.params["array"]))
    if source.kind == "extracted":
        return StoreSource(Path(data_dir) / source.path)
    if source.kind == "streamed":
        from ..sae.trainer import resolve_device
        from .streams import build_streamed

        if settings is None:
            raise ValueError("a streamed source needs the settings")
        return build_streamed(source, settings, device=resolve_device(settings["SAE_DEVICE"]))
    raise ValueError(f"unknown source kind {source.kind!r}")


def train_config(run: Training, device: str):
    """The core's config: every hyper-parameter the core uses, from the run's row."""
    from ..sae.trainer import TrainConfig

    return TrainConfig(**{name: getattr(run, name) for name in training_config.CORE_FIELDS},
                       eval_tokens=16_384, device=device)


class MetricWriter:
    """Buffers metric points and writes them in one short transaction per flush.

    Flushes when ``max_rows`` points are waiting or ``max_age_s`` has passed, so the live
    page lags by about a second while the database sees a handful of writes per second. A
    flush waits out a locked database (``retry_write``) and is idempotent: a point already
    stored for its step is not stored twice.
    """

    def __init__(self, run: Training, *, max_rows: int = 50, max_age_s: float = 1.0) -> None:
        self.run, self.max_rows, self.max_age_s = run, max_rows, max_age_s
        # the live page's charts, kept on the run's row: bounded, whatever the run's length
        self.series = ChartSeries()
        self.rows: list[dict] = []
        self.events: list[dict] = []
        self.last_flush = time.monotonic()

    def add(self, point) -> None:
        self.rows.append({"training": self.run.id, **point.to_dict()})
        self.series.add(point)
        if len(self.rows) >= self.max_rows or time.monotonic() - self.last_flush >= self.max_age_s:
            self.flush()

    def event(self, level: str, code: str, message: str, *, step: int | None = None,
              suggestion: str | None = None) -> None:
        self.events.append({"training": self.run.id, "level": level, "code": code, "message": message,
                            "step": step, "suggestion": suggestion, "created_at": utcnow()})
        self.flush()

    def flush(self) -> None:
        """Write the waiting points and events, if this process still holds the run; ``Superseded`` if not."""
        if not self.rows and not self.events:
            return
        rows, events, run = self.rows, self.events, self.run
        for row in rows:
            row["attempt"] = run.attempt
        for event in events:
            event["attempt"] = run.attempt

        def write() -> None:
            with database.atomic():
                # the guard comes first, so it also holds the row against a sweep until the commit
                changes = ({"step": rows[-1]["step"], "tokens_seen": rows[-1]["tokens"], "chart": self.series.state()}
                           if rows else {"heartbeat_at": utcnow()})
                if not Training.update(**changes).where(current(run)).execute():
                    raise lifecycle.superseded(run, f"{len(rows)} metric points and {len(events)} events")
                if rows:
                    MetricPoint.insert_many(rows).on_conflict_ignore().execute()
                if events:
                    Event.insert_many(events).execute()

        self.rows, self.events = [], []
        retry_write(write, what="metrics")
        self.last_flush = time.monotonic()


class PreflightError(RuntimeError):
    """The validator, run again in the worker with the real source and device, found an error."""


def _preflight(run: Training, settings: dict, writer: MetricWriter) -> None:
    """Check the config again where it will run: errors stop the run, warnings become events."""
    from ..devices import device_memory, disk_free
    from ..validation import validate_config

    memory = device_memory(settings["SAE_DEVICE"])
    findings = validate_config(run.config_dict(), run.source.stats(), free_memory_bytes=memory.free_bytes,
                               device=memory.device, free_disk_bytes=disk_free(settings["DATA_DIR"]))
    errors = [f for f in findings if f.level == "error"]
    if errors:
        raise PreflightError("; ".join(f"{f.field}: {f.message}" for f in errors))
    for f in findings:
        writer.event(f.level, "preflight", f"{f.field}: {f.message}", step=0, suggestion=f.suggestion)


def save_checkpoint(state: dict, run: Training, settings: dict) -> None:
    """Write the trainer's state to a file of this attempt's own (a temporary file, fsync, rename),
    then commit it on the row by a write conditional on the attempt. A process that no longer
    holds the run removes its file and gets ``Superseded``; the live one removes the older files."""
    import torch

    folder = run_folder(run, settings)
    folder.mkdir(parents=True, exist_ok=True)
    step = int(state["step"])
    # unique even when a stale process of the same attempt saves the same step again: removing its
    # own file must never remove the one in force
    name = f"checkpoint-a{run.attempt}-s{step}-{secrets.token_hex(4)}.pt"
    tmp = folder / f"{name}.tmp"
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(folder / name)
    try:
        lifecycle.fenced_update(run, what=f"checkpoint at step {step}", checkpoint_name=name, checkpoint_at=step,
                                heartbeat_at=utcnow())
    except Superseded:
        (folder / name).unlink(missing_ok=True)
        raise
    run.checkpoint_name, run.checkpoint_at = name, step
    _remove_checkpoints(folder, up_to_attempt=run.attempt, keep=name)


def _remove_checkpoints(folder: Path, *, up_to_attempt: int, keep: str | None = None) -> None:
    """Remove checkpoint files of attempts up to ``up_to_attempt`` (never a later attempt's) but ``keep``."""
    for path in folder.glob("checkpoint*"):
        match = CHECKPOINT_NAME.fullmatch(path.name.removesuffix(".tmp"))
        if path.name == keep or (match is None and path.name not in (LEGACY_CHECKPOINT, "checkpoint.json")):
            continue
        if match is None or int(match.group(1)) <= up_to_attempt:
            path.unlink(missing_ok=True)


def drop_checkpoint(run: Training, settings: dict) -> None:
    """Forget the checkpoint of a run this process ended (completed or stopped early) and remove its files."""
    lifecycle.fenced_update(run, what="drop checkpoint", checkpoint_name=None, checkpoint_at=None)
    run.checkpoint_name = run.checkpoint_at = None
    _remove_checkpoints(run_folder(run, settings), up_to_attempt=run.attempt)


def load_checkpoint(run: Training, settings: dict) -> dict | None:
    import torch

    path = checkpoint_path(run, settings)
    if path is None:
        return None
    # weights_only: the file holds tensors, numbers, strings and containers of them, nothing else
    return torch.load(path, map_location="cpu", weights_only=True)


def run_training(training_id: int) -> str:
    """Train the SAE of one ``Training`` row (from its checkpoint if it has one); return its final status."""
    return lifecycle.run_job(Training, training_id, _train)


def _train(run: Training, settings: dict, stop_check: lifecycle.StopCheck) -> str:
    from ..sae.trainer import train_many

    from .streams import keeping_for

    session = RunSession(run, settings, stop_check)
    with session.keeping_points():
        source = build_source(run.source, settings["DATA_DIR"], settings)
        member = session.member(source)
        keeping = keeping_for(run, [run], settings, source, notify=lambda hook, level, code, message, suggestion:
                              lifecycle.add_event(run.id, level, code, message, suggestion=suggestion,
                                                  attempt=run.attempt))
        train_many(source, [member])
    if keeping is not None:
        keeping.settle(session.status)
    return session.status


class RunSession:
    """One run's side of its training, whether it trains alone or as a member of a sweep: its
    metric writer, runtime rules and l1_alpha controller, its checkpoints, and how it ends.
    ``member(source)`` prepares it (checkpoint, rewind, preflight) and returns the trainer's
    ``Member``; the trainer calls back ``conclude`` when the run ends, and ``status`` then says how."""

    def __init__(self, run: Training, settings: dict, stop_check) -> None:
        self.run, self.settings, self.stop_check = run, settings, stop_check
        self.writer = MetricWriter(run)
        self.status: str | None = None

    @contextlib.contextmanager
    def keeping_points(self):
        """On an error, flush the points already buffered (the last good metrics are kept; the failure
        itself is recorded by the lifecycle). A superseded process writes nothing more."""
        try:
            yield
        except Superseded:
            raise  # another attempt holds the run: its points are not this process's to write
        except Exception:
            try:
                self.writer.flush()
            except Exception:  # noqa: BLE001 - the failure matters more than buffered points
                pass
            raise

    def member(self, source):
        from ..quality import RunSpec, RuntimeMonitor
        from ..sae.trainer import Checkpointing, Member
        from ..validation import recommended_l1_alpha

        run, settings, writer = self.run, self.settings, self.writer
        self.source_d_in = source.d_in
        resume = load_checkpoint(run, settings)
        if resume is None:
            _rewind(run, 0, 0)  # a run started again from nothing keeps no earlier points
            _preflight(run, settings, writer)
        cfg = train_config(run, settings["SAE_DEVICE"])
        offset = run.source.stats().l0_offset  # what this source's earlier runs taught the L0 model
        monitor = self.monitor = RuntimeMonitor(RunSpec.of_run(
            run, recommended_l1_alpha(source.d_in, run.latent_dim, run.target_l0, run.total_steps, run.batch_size,
                                      offset), d_in=source.d_in, l0_offset=offset))
        controller = None
        if run.steer_l1_alpha and architectures.get(run.architecture).by_penalty:
            from ..sae.control import L0Controller

            controller = L0Controller(target=run.target_l0, alpha=run.l1_alpha, start_step=run.l1_warmup_steps)
        if resume is not None:
            _restore(run, resume, monitor, controller)
            if resume.get("chart"):
                writer.series = ChartSeries(state=resume["chart"])

        def on_start(info: dict) -> None:
            lifecycle.fenced_update(run, what="start", device=info["device"], norm_scale=info["norm_scale"])
            if info["resumed_from"]:
                writer.event("info", "resumed", f"Resumed on {info['device']} from the checkpoint at step "
                                                f"{info['resumed_from']:,}.", step=info["resumed_from"])
            else:
                window = ("" if info["dead_window"] >= run.dead_window_tokens else
                          f" The run sees fewer than twice the dead-latent window's {run.dead_window_tokens:,} "
                          f"tokens: a latent counts as dead after {info['dead_window']:,} tokens without firing "
                          "(half the run).")
                shared = (f" It is one of the members of sweep {run.sweep_id}, which train on the same batches."
                          if getattr(run, "sweep_id", None) else "")
                writer.event("info", "started", f"Training on {info['device']} in {info['precision']}; activations "
                                                f"scaled by c = {info['norm_scale']:.4g} so that E‖c·x‖² = d_in "
                                                f"({info['d_in']})." + window + shared)

        def on_log(point) -> str | None:
            writer.add(point)
            for finding in monitor.observe(point):
                writer.event(finding.level, finding.code, finding.message, step=point.step,
                             suggestion=finding.suggestion)
            return monitor.stop.message if monitor.stop else None

        def save(state: dict) -> None:
            writer.flush()  # the points up to this step are stored before the checkpoint claims them
            state["monitor"] = monitor.state_dict()
            state["chart"] = writer.series.state()
            state["controller"] = controller.state_dict() if controller is not None else None
            save_checkpoint(state, run, settings)

        hook = None
        if getattr(source, "hooks", None):  # a streamed source: this run reads one of its hook points
            hook = run.hook_point or source.hooks[0]
            on_log = self._streamed(source, on_log)
        checkpointing = Checkpointing(save, run.checkpoint_every_steps, run.checkpoint_every_minutes * 60)
        return Member(cfg, on_start=on_start, on_log=on_log, should_stop=self.stop_check,
                      l1_alpha_control=controller, checkpointing=checkpointing, resume=resume,
                      on_end=self.conclude, hook=hook)

    def _streamed(self, source, on_log):
        """A streamed run's log also records the model's side (its tokens/s, the next round's fill)
        and warns, once per pass, when the corpus has run out and is read again."""
        run, writer = self.run, self.writer
        seen = {"epochs": 1, "at": 0.0}

        def logged(point) -> str | None:
            stats = source.stats()
            if stats["epochs"] > seen["epochs"]:
                seen["epochs"] = stats["epochs"]
                writer.event("warning", "corpus_repeated",
                             f"The corpus ran out after {stats['model_tokens']:,} tokens through the model: the stream "
                             f"reads it again (pass {stats['epochs']}), so the SAE sees its tokens more than once.",
                             step=point.step, suggestion="Stream a longer corpus, or train fewer steps.")
            now = time.monotonic()
            if now - seen["at"] >= 1.0:
                seen["at"] = now
                lifecycle.fenced_update(run, what="stream stats", stream_stats={
                    **stats, "sae_tokens_per_s": point.tokens_per_s, "step": point.step})
            return on_log(point)

        return logged

    def conclude(self, result, sae) -> None:
        """Record how the run ended (its files, summary, status and closing event); sets ``status``."""
        run, settings, writer, monitor, stop_check = self.run, self.settings, self.writer, self.monitor, self.stop_check
        with self.keeping_points():
            writer.flush()
            self.status = self._conclude(result, sae, run, settings, writer, monitor, stop_check)

    def _conclude(self, result, sae, run, settings, writer, monitor, stop_check) -> str:
        done = {"step": result.steps, "tokens_seen": result.tokens}
        if stop_check.interrupted:
            reason = (f"{stop_check.interrupted} A checkpoint was saved at step {result.steps:,}: press Resume to "
                      "continue from it.")
            lifecycle.finish(run, "interrupted", reason=reason, **done,
                             event=closing_event("warning", "interrupted", reason, step=result.steps))
            return "interrupted"
        # no use saving weights for a run this process no longer holds (a cheap early check; what
        # fences the files is that only this attempt's end below names their folder on the row)
        lifecycle.fenced_update(run, what="the final weights", heartbeat_at=utcnow())
        final = _save_sae(sae, run, result, settings)
        summary = _summary(result, run, str((run_folder(run, settings) / final / "sae.safetensors")
                                            .relative_to(settings["DATA_DIR"])),
                           monitor.spec.recommended_l1_alpha, self.source_d_in, monitor.spec.l0_offset)
        done["summary"] = summary
        done["final_name"] = final
        if result.status == "completed":
            ended = lifecycle.finish(run, "completed", **done, event=closing_event(
                "info", "completed", f"Training completed. {summary['verdict']['headline']}", step=result.steps,
                suggestion=summary["verdict"]["advice"]))
        elif monitor.stop is not None:
            stop = monitor.stop
            reason = f"{stop.message} {stop.suggestion or ''}".strip()
            if stop.stop == "failed":
                ended = lifecycle.fail(run, reason, failed_step=result.steps, **done)
            else:
                ended = lifecycle.finish(run, "stopped_early", reason=reason, **done)
        else:
            ended = lifecycle.finish(run, "cancelled", reason=result.reason, **done, event=closing_event(
                "info", "cancelled", f"{result.reason or 'Stopped.'} A checkpoint is kept: Resume continues the run.",
                step=result.steps))
        if not settle_final(run, settings, final, ended):
            return "superseded"
        if lifecycle.ended_as(run) == "completed":
            drop_checkpoint(run, settings)
            if settings["FEATURES_AFTER_TRAINING"]:
                _queue_features(run, settings, writer)
                if run.source.kind in ("extracted", "streamed"):
                    _queue_downstream(run, settings, writer)
        elif lifecycle.ended_as(run) == "stopped_early":
            drop_checkpoint(run, settings)  # not resumable: "Restart with …" is the way on
        return lifecycle.ended_as(run) or "superseded"


def closing_event(level: str, code: str, message: str, *, step: int | None = None,
                  suggestion: str | None = None) -> dict:
    """The event written with a run's end, in the same transaction."""
    return {"level": level, "code": code, "message": message, "step": step, "suggestion": suggestion}


def _restore(run: Training, state: dict, monitor, controller) -> None:
    """Put the app's side of a checkpoint back: the rules' memory, the controller, the stored series."""
    if state.get("monitor"):
        monitor.load_state_dict(state["monitor"])
    if controller is not None and state.get("controller"):
        controller.load_state_dict(state["controller"])
    _rewind(run, int(state["step"]), int(state["tokens"]))


def _rewind(run: Training, step: int, tokens: int) -> None:
    """Drop the stored points after ``step``: the resumed run writes them again, once."""

    def rewind() -> None:
        with database.atomic():
            changes = {"step": step, "tokens_seen": tokens}
            if step == 0:
                changes["chart"] = None
            if not Training.update(**changes).where(current(run)).execute():
                raise lifecycle.superseded(run, "the rewind of its metrics")
            MetricPoint.delete().where((MetricPoint.training == run.id) & (MetricPoint.step > step)).execute()

    retry_write(rewind, what="rewind metrics")


def _failure(run: Training, exc: Exception, reason: str, settings: dict) -> dict:
    """What a run's failure writes: the step it failed at, the reason (a non-finite loss says how
    to go on) and its closing event."""
    step = getattr(exc, "step", None)
    if step is None:
        step = retry_write(lambda: Training.get_by_id(run.id).step, what="load step")
    trainer = sys.modules.get("app.sae.trainer")
    if trainer is not None and isinstance(exc, trainer.NonFiniteLoss):
        saved = checkpoint_step(run, settings)
        reason = f"The loss became NaN or Inf at step {step}; the last good metrics are kept. Lower the learning rate"
        reason += (f": Resume continues from the last finite checkpoint (step {saved:,}) at a learning rate you "
                   "choose." if saved is not None else " and start again.")
    traceback.print_exc()
    return {"reason": reason, "failed_step": step, "event": closing_event("error", "failed", reason, step=step)}


def _interrupt(run: Training, reason: str, settings: dict) -> lifecycle.Interrupt:
    """An interrupted run says how to resume, keeps the step it reached, and is marked only while
    its row names the checkpoint the reason names (one committed since leaves the row alone)."""
    saved = checkpoint_step(run, settings)
    reason += (f" The checkpoint at step {saved:,} is kept: press Resume to continue from it."
               if saved is not None else " No checkpoint was saved yet: Resume starts it again from step 0.")
    where = (Training.checkpoint_at.is_null() if run.checkpoint_at is None
             else Training.checkpoint_at == run.checkpoint_at)
    return lifecycle.Interrupt(reason, {"failed_step": run.step}, where)


def _interrupted(run: Training, reason: str, settings: dict) -> None:
    add_event(run.id, "error", "interrupted", reason, step=run.step, attempt=run.attempt)


lifecycle.register(lifecycle.JobKind(Training, "training", "app.work.training.run_training", events=True,
                                     failure=_failure, interrupt=_interrupt, interrupted=_interrupted,
                                     queued_alone=lambda run: run.sweep_id is None))  # a member: its sweep's job


def _summary(result, run: Training, checkpoint: str, recommended: float | None, d_in: int,
             l0_offset: float = 0.0) -> dict:
    """The held-out evaluation, its density histogram and the verdict, as stored on the row."""
    from ..quality import RunProgress, density_histogram, verdict

    summary = {k: v for k, v in result.eval.items() if k != "frequencies"}
    summary["density_histogram"] = density_histogram(result.eval["frequencies"])
    summary["checkpoint"] = checkpoint
    summary["final_l1_alpha"] = result.last.l1_alpha if result.last else run.l1_alpha
    summary["verdict"] = verdict(summary, architecture=run.architecture, latent_dim=run.latent_dim,
                                 target_l0=run.target_l0, l1_alpha=summary["final_l1_alpha"] or None,
                                 recommended=recommended, progress=RunProgress(
                                     steps_done=result.steps, total_steps=run.total_steps, d_in=d_in,
                                     batch_size=run.batch_size, l0_offset=l0_offset,
                                     warmup_steps=run.l1_warmup_steps
                                     if architectures.get(run.architecture).warmup == "sparsity"
                                     else run.lr_warmup_steps))
    return summary


def _save_sae(sae, run: Training, result, settings: dict) -> str:
    """Save the SAE's weights (normalized space) and what is needed to use them in a new folder of
    this attempt's own, ``runs/<id>/final-a<attempt>-<nonce>/`` (each file and the folder fsynced);
    return its name. Nothing reads it until the run's end names it on the row (``settle_final``)."""
    import numpy as np
    from safetensors.torch import save_file

    folder = run_folder(run, settings)
    # unique even when a stale process of the same attempt saves again: removing its own folder
    # must never remove the one in force
    name = f"final-a{run.attempt}-{secrets.token_hex(4)}"
    final = folder / name
    final.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}, str(final / "sae.safetensors"))
    # each latent's firing frequency on the held-out tokens: the export's sparsity file
    np.save(final / "frequencies.npy", np.asarray(result.eval["frequencies"], dtype=np.float32))
    (final / "cfg.json").write_text(json.dumps({
        **run.config_dict(), "d_in": sae.d_in, "norm_scale": result.norm_scale, "steps_trained": result.steps}, indent=2))
    for path in [*(final / f for f in FINAL_FILES), final, folder]:
        _fsync(path)
    return name


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') writes to disk before the row names them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # a folder some file systems cannot fsync: its files are synced
        pass
    finally:
        os.close(fd)


def settle_final(run: Training, settings: dict, final: str, ended: bool) -> bool:
    """After the end that was to name ``final`` (the folder this attempt saved): an end that was
    refused (another attempt holds the run) removes that folder, which no row names; an accepted
    one removes the final files it replaces (earlier attempts' folders, the run folder's own files
    from before final folders). Returns ``ended``."""
    folder = run_folder(run, settings)
    if not ended:
        shutil.rmtree(folder / final, ignore_errors=True)
        return False
    _remove_finals(folder, up_to_attempt=run.attempt, keep=final)
    return True


def _remove_finals(folder: Path, *, up_to_attempt: int, keep: str) -> None:
    """Remove the final folders of attempts up to ``up_to_attempt`` (never a later attempt's) but
    ``keep``, and the final files of the old layout (directly in the run folder)."""
    for path in folder.glob("final-a*"):
        match = FINAL_NAME.fullmatch(path.name)
        if match is not None and path.name != keep and int(match.group(1)) <= up_to_attempt:
            shutil.rmtree(path, ignore_errors=True)
    for name in (*FINAL_FILES, "sae.safetensors.tmp"):
        (folder / name).unlink(missing_ok=True)


def _queue_downstream(run: Training, settings: dict, writer: MetricWriter) -> None:
    """Queue the downstream evaluation of a finished run on an extraction; a queue failure is noted."""
    from .downstream import create_downstream

    try:
        create_downstream(settings, run)
    except lifecycle.queue.QueueUnavailable as exc:
        writer.event("warning", "downstream", f"Could not queue the downstream evaluation: {exc}")


def _queue_features(run: Training, settings: dict, writer: MetricWriter) -> None:
    """Queue the feature statistics of a finished run; a queue failure is noted, not fatal."""
    from .features import create_feature_job

    try:
        create_feature_job(settings, training=run, source=run.source)
    except lifecycle.queue.QueueUnavailable as exc:
        writer.event("warning", "features", f"Could not queue the feature statistics: {exc}")
