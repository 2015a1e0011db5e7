"""RQ entry points, run in the worker's work-horse: load the row, run the core, write back.

Everything the user should see is written to the database: status and reason, metric
points (in batches), events. An exception never leaves a run in ``running``.
"""
from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

from .config import load_settings
from .db import database, open_database
from .models import ActivationSet, Event, MetricPoint, Training, utcnow
from .quality import RunSpec, RuntimeMonitor, density_histogram, verdict


def _connect() -> dict:
    settings = load_settings()
    if database.obj is None or database.is_closed():
        open_database(settings["DATABASE_URL"])
    database.connect(reuse_if_open=True)
    return settings


def build_source(source: ActivationSet, data_dir: str):
    """The core's activation source for a stored ``ActivationSet``."""
    from .sae.files import ArrayInfo
    from .sae.sources import ArraySource, StoreSource, SyntheticSource

    if source.kind == "synthetic":
        p = source.params
        return SyntheticSource(source.d_in, int(p["n_features"]), float(p["mean_active"]), int(p["seed"]))
    if source.kind == "file":
        path = Path(data_dir) / source.path
        if not path.exists():
            raise FileNotFoundError(f"the activation file {source.path} is missing from the data folder")
        return ArraySource(path, ArrayInfo(**source.params["array"]))
    if source.kind == "extracted":
        return StoreSource(Path(data_dir) / source.path)
    raise ValueError(f"unknown source kind {source.kind!r}")


def train_config(run: Training, device: str):
    from .sae.trainer import TrainConfig

    return TrainConfig(
        latent_dim=run.latent_dim, architecture=run.architecture, l1_alpha=run.l1_alpha, k=run.k,
        learning_rate=run.learning_rate, batch_size=run.batch_size, total_steps=run.total_steps,
        lr_warmup_steps=run.lr_warmup_steps, l1_warmup_steps=run.l1_warmup_steps, seed=run.seed,
        log_every=run.log_every, dead_window_tokens=run.dead_window_tokens,
        dead_latent_remedy=run.dead_latent_remedy, eval_tokens=16_384, device=device)


class MetricWriter:
    """Buffers metric points and writes them in one transaction per flush.

    Flushes when ``max_rows`` points are waiting or ``max_age_s`` has passed, so the live
    page lags by about a second while the database sees a handful of writes per second.
    """

    def __init__(self, run: Training, *, max_rows: int = 50, max_age_s: float = 1.0) -> None:
        self.run, self.max_rows, self.max_age_s = run, max_rows, max_age_s
        self.rows: list[dict] = []
        self.events: list[dict] = []
        self.last_flush = time.monotonic()

    def add(self, point) -> None:
        self.rows.append({"training": self.run.id, **point.to_dict()})
        if len(self.rows) >= self.max_rows or time.monotonic() - self.last_flush >= self.max_age_s:
            self.flush()

    def event(self, level: str, code: str, message: str, *, step: int | None = None,
              suggestion: str | None = None) -> None:
        self.events.append({"training": self.run.id, "level": level, "code": code, "message": message,
                            "step": step, "suggestion": suggestion, "created_at": utcnow()})
        self.flush()

    def flush(self) -> None:
        if not self.rows and not self.events:
            return
        with database.atomic():
            if self.rows:
                MetricPoint.insert_many(self.rows).execute()
                last = self.rows[-1]
                Training.update(step=last["step"], tokens_seen=last["tokens"]).where(
                    Training.id == self.run.id).execute()
            if self.events:
                Event.insert_many(self.events).execute()
        self.rows, self.events = [], []
        self.last_flush = time.monotonic()


def cancel_requested(record) -> str | None:
    """The reason to stop if the user asked to cancel this run or job, read from its row now."""
    model = type(record)
    flag = model.select(model.cancel_requested).where(model.id == record.id).scalar()
    return "Cancelled by the user." if flag else None


def cancel_poller(record, interval_s: float = 0.5):
    """A ``should_stop`` that reads the record's cancel flag at most every ``interval_s``."""
    return _throttled(lambda: cancel_requested(record), interval_s)


class PreflightError(RuntimeError):
    """The validator, run again in the worker with the real source and device, found an error."""


def _preflight(run: Training, source, settings: dict, writer: MetricWriter) -> None:
    """Check the config again where it will run: errors stop the run, warnings become events."""
    from .devices import device_memory
    from .validation import SourceStats, validate_config

    memory = device_memory(settings["SAE_DEVICE"])
    findings = validate_config(run.config_dict(), SourceStats(source.d_in, source.n_tokens, run.source.name),
                               free_memory_bytes=memory.free_bytes, device=memory.device)
    errors = [f for f in findings if f.level == "error"]
    if errors:
        raise PreflightError("; ".join(f"{f.field}: {f.message}" for f in errors))
    for f in findings:
        writer.event(f.level, "preflight", f"{f.field}: {f.message}", step=0, suggestion=f.suggestion)


def _claim(record) -> bool:
    """Move a queued record to running; False when it is no longer queued (cancelled meanwhile)."""
    model = type(record)
    return bool(model.update(status="running", started_at=utcnow())
                .where((model.id == record.id) & (model.status == "queued")).execute())


def _fail(record, exc: Exception, user_errors: tuple[str, ...], note: str = "") -> str:
    """Record a failure on the row. The user's mistakes (``user_errors``, by class name) end
    there with their own message; anything else is re-raised so RQ records the traceback."""
    user_error = type(exc).__name__ in user_errors
    reason = (str(exc) if user_error else f"{type(exc).__name__}: {exc}")[:2000] + note
    model = type(record)
    model.update(status="failed", reason=reason, finished_at=utcnow()).where(model.id == record.id).execute()
    if not user_error:
        raise exc
    return "failed"


def _finish(run_id: int, **fields) -> None:
    Training.update(finished_at=utcnow(), **fields).where(Training.id == run_id).execute()


def run_training(training_id: int) -> str:
    """Train the SAE of one ``Training`` row; return its final status."""
    settings = _connect()
    run = Training.get_by_id(training_id)
    if not _claim(run):  # cancelled while it waited in the queue
        return run.status
    writer = MetricWriter(run)
    try:
        from .sae.trainer import train
        from .validation import recommended_l1_alpha

        source = build_source(run.source, settings["DATA_DIR"])
        _preflight(run, source, settings, writer)
        cfg = train_config(run, settings["SAE_DEVICE"])
        monitor = RuntimeMonitor(RunSpec(
            architecture=run.architecture, latent_dim=run.latent_dim, target_l0=run.target_l0,
            warmup_steps=max(run.l1_warmup_steps, run.lr_warmup_steps), l1_warmup_steps=run.l1_warmup_steps,
            early_stop=run.early_stop, early_stop_step=run.early_stop_step, early_stop_l0=run.early_stop_l0,
            plateau_window=run.plateau_window, steering=run.steer_l1_alpha,
            recommended_l1_alpha=recommended_l1_alpha(source.d_in, run.latent_dim, run.target_l0)))
        controller = None
        if run.steer_l1_alpha and run.architecture == "standard":
            from .sae.control import L0Controller

            controller = L0Controller(target=run.target_l0, alpha=run.l1_alpha, start_step=run.l1_warmup_steps)

        def on_start(info: dict) -> None:
            Training.update(device=info["device"], norm_scale=info["norm_scale"]).where(
                Training.id == run.id).execute()
            writer.event("info", "started", f"Training on {info['device']}; activations scaled by "
                                            f"c = {info['norm_scale']:.4g} so that E‖c·x‖² = d_in ({info['d_in']}).")

        def on_log(point) -> str | None:
            writer.add(point)
            for finding in monitor.observe(point):
                writer.event(finding.level, finding.code, finding.message, step=point.step,
                             suggestion=finding.suggestion)
            return monitor.stop.message if monitor.stop else None

        result, sae = train(source, cfg, on_start=on_start, on_log=on_log, should_stop=cancel_poller(run),
                            l1_alpha_control=controller)
        writer.flush()
        checkpoint = _save_checkpoint(sae, run, result, settings["DATA_DIR"])
        summary = _summary(result, run, checkpoint, monitor.spec.recommended_l1_alpha)
        done = {"summary": summary, "step": result.steps, "tokens_seen": result.tokens}
        if result.status == "completed":
            _finish(run.id, status="completed", **done)
            writer.event("info", "completed", f"Training completed. {summary['verdict']['headline']}",
                         step=result.steps, suggestion=summary["verdict"]["advice"])
            if settings["FEATURES_AFTER_TRAINING"]:
                _queue_features(run, settings, writer)
        elif monitor.stop is not None:
            stop = monitor.stop
            reason = f"{stop.message} {stop.suggestion or ''}".strip()
            if stop.stop == "failed":
                _finish(run.id, status="failed", reason=reason, failed_step=result.steps, **done)
            else:
                _finish(run.id, status="stopped_early", reason=reason, **done)
        else:
            _finish(run.id, status="cancelled", reason=result.reason, **done)
            writer.event("info", "cancelled", result.reason or "Stopped.", step=result.steps)
        return Training.get_by_id(run.id).status
    except Exception as exc:  # noqa: BLE001 - every failure ends on the row, then RQ sees it too
        step = getattr(exc, "step", None)
        if step is None:
            step = Training.get_by_id(run.id).step
        trainer = sys.modules.get("app.sae.trainer")
        if trainer is not None and isinstance(exc, trainer.NonFiniteLoss):
            reason = f"The loss became NaN or Inf at step {step}; the last good metrics are kept. " \
                     "Lower the learning rate."
        else:
            reason = f"{type(exc).__name__}: {exc}"
        try:
            writer.flush()
        except Exception:  # noqa: BLE001 - the failure below matters more than buffered points
            pass
        _finish(run.id, status="failed", reason=reason, failed_step=step)
        Event.create(training=run.id, step=step, level="error", code="failed", message=reason,
                     suggestion=None)
        traceback.print_exc()
        raise
    finally:
        database.close()


def _summary(result, run: Training, checkpoint: str, recommended: float | None) -> dict:
    """The held-out evaluation, its density histogram and the verdict, as stored on the row."""
    summary = {k: v for k, v in result.eval.items() if k != "frequencies"}
    summary["density_histogram"] = density_histogram(result.eval["frequencies"])
    summary["checkpoint"] = checkpoint
    summary["final_l1_alpha"] = result.last.l1_alpha if result.last else run.l1_alpha
    summary["verdict"] = verdict(summary, architecture=run.architecture, latent_dim=run.latent_dim,
                                 target_l0=run.target_l0, l1_alpha=summary["final_l1_alpha"] or None,
                                 recommended=recommended)
    return summary


def _save_checkpoint(sae, run: Training, result, data_dir: str) -> str:
    """Save the SAE's weights (normalized space) and what is needed to use them."""
    import json

    import numpy as np
    from safetensors.torch import save_file

    folder = Path(data_dir) / "runs" / str(run.id)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "sae.safetensors.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}, str(tmp))
    tmp.replace(folder / "sae.safetensors")
    # each latent's firing frequency on the held-out tokens: the export's sparsity file
    np.save(folder / "frequencies.npy", np.asarray(result.eval["frequencies"], dtype=np.float32))
    (folder / "cfg.json").write_text(json.dumps({
        **run.config_dict(), "d_in": sae.d_in, "norm_scale": result.norm_scale, "steps_trained": result.steps}, indent=2))
    return str((folder / "sae.safetensors").relative_to(data_dir))


def run_tune(tune_id: int) -> str:
    """Run an auto-tune's pilots, recording each on the row as it finishes."""
    from .models import TuneJob

    settings = _connect()
    tune = TuneJob.get_by_id(tune_id)
    if not _claim(tune):  # cancelled while it waited in the queue
        return tune.status
    try:
        from .sae.tune import tune_l1_alpha
        from .validation import recommended_l1_alpha

        source = build_source(tune.source, settings["DATA_DIR"])
        pilots: list[dict] = []

        def on_pilot(pilot, index: int) -> None:
            pilots.append(pilot.to_dict())
            TuneJob.update(pilots=pilots).where(TuneJob.id == tune.id).execute()

        best, _, outcome = tune_l1_alpha(
            source, latent_dim=tune.latent_dim, target=tune.target_l0,
            start=recommended_l1_alpha(source.d_in, tune.latent_dim, tune.target_l0),
            learning_rate=tune.learning_rate, batch_size=tune.batch_size, pilot_steps=tune.pilot_steps,
            max_pilots=tune.max_pilots, seed=tune.seed, device=settings["SAE_DEVICE"],
            on_pilot=on_pilot, should_stop=cancel_poller(tune))
        if outcome == "found":
            TuneJob.update(status="completed", result_l1_alpha=best.l1_alpha, finished_at=utcnow()).where(
                TuneJob.id == tune.id).execute()
        elif outcome in ("exhausted", "edge"):
            why = (f"in {tune.max_pilots} pilots" if outcome == "exhausted"
                   else "before reaching the edge of the valid range")
            reason = (f"No pilot landed within ±20% of the target {why}; the closest gave "
                      f"L0 {100 * best.l0_fraction:.2f}% (FVU {best.fvu:.2f}) at l1_alpha {best.l1_alpha:.3g}.")
            TuneJob.update(status="completed", result_l1_alpha=best.l1_alpha, reason=reason,
                           finished_at=utcnow()).where(TuneJob.id == tune.id).execute()
        else:
            TuneJob.update(status="cancelled", reason=outcome, finished_at=utcnow()).where(
                TuneJob.id == tune.id).execute()
        return TuneJob.get_by_id(tune.id).status
    except Exception as exc:  # noqa: BLE001 - recorded on the row, then re-raised for RQ
        TuneJob.update(status="failed", reason=f"{type(exc).__name__}: {exc}", finished_at=utcnow()).where(
            TuneJob.id == tune.id).execute()
        raise
    finally:
        database.close()


def run_extraction(extraction_id: int) -> str:
    """Capture a model's activations over a corpus into a store; on success it becomes a source.

    The store is written under a temporary name and renamed into place at the end; a failed
    or cancelled extraction removes it, so nothing half-written is ever left under its name.
    """
    from .models import Extraction

    settings = _connect()
    job = Extraction.get_by_id(extraction_id)
    if not _claim(job):  # cancelled while it waited in the queue
        return job.status
    writer = None
    try:
        from .extraction.capture import SITES, extract, find_site, load_model
        from .extraction.store import ShardWriter
        from .extraction.text import TextSpec, check_corpus, documents
        from .sae.trainer import resolve_device

        spec = TextSpec(**job.text)
        check_corpus(spec)  # a bad corpus fails before the model is loaded
        device = resolve_device(settings["SAE_DEVICE"])
        Extraction.update(device=str(device)).where(Extraction.id == job.id).execute()
        tokenizer, model = load_model(job.model_name, device, job.model_dtype)
        _, layout, n_layers = find_site(model, job.layer, job.site)
        d_in = int(model.config.hidden_size)
        writer = ShardWriter(Path(settings["DATA_DIR"]) / "activations" / str(job.id), d_in, job.dtype)

        def on_progress(p) -> None:
            Extraction.update(tokens_done=p.tokens, documents_done=p.documents, tokens_per_s=p.tokens_per_s).where(
                Extraction.id == job.id).execute()

        tokens, docs, stopped = extract(
            model, tokenizer, documents(spec), writer, layer=job.layer, site=job.site, token_budget=job.token_budget,
            context_length=job.context_length, batch_size=job.batch_size, exclude_special=job.exclude_special,
            device=device, on_progress=on_progress, should_stop=cancel_poller(job))
        if stopped:
            writer.abort()
            Extraction.update(status="cancelled", reason=stopped + " Nothing was kept.", finished_at=utcnow()).where(
                Extraction.id == job.id).execute()
            return "cancelled"
        meta = writer.commit({
            "model": job.model_name, "model_path": getattr(model, "name_or_path", "") or job.model_name,
            "architecture": type(model).__name__, "layout": layout.name, "n_layers": n_layers, "layer": job.layer,
            "site": job.site, "site_label": SITES[job.site], "context_length": job.context_length,
            "model_dtype": job.model_dtype,
            "exclude_special": job.exclude_special, "text": spec.to_dict(), "text_label": spec.describe(),
            "documents": docs, "extraction_id": job.id})
        from .sae.files import holdout_rows

        name = job.name or f"{Path(job.model_name).name} layer {job.layer} {SITES[job.site]}, {spec.describe()}"
        with database.atomic():
            source = ActivationSet.create(name=name, kind="extracted", d_in=d_in,
                                          n_tokens=tokens - holdout_rows(tokens), params=meta,
                                          path=f"activations/{job.id}")
            Extraction.update(status="completed", activation_set=source, tokens_done=tokens, documents_done=docs,
                              finished_at=utcnow()).where(Extraction.id == job.id).execute()
        return "completed"
    except Exception as exc:  # noqa: BLE001 - recorded on the row; user errors are not re-raised
        if writer is not None:
            writer.abort()
        return _fail(job, exc, ("ExtractionError", "TextSourceError", "StoreError"), " Nothing was kept.")
    finally:
        database.close()


def _queue_features(run: Training, settings: dict, writer: MetricWriter) -> None:
    """Queue the feature statistics of a finished run; a queue failure is noted, not fatal."""
    from .jobqueue import create_feature_job

    try:
        create_feature_job(settings, training=run, source=run.source)
    except Exception as exc:  # noqa: BLE001 - the run itself completed
        writer.event("warning", "features", f"Could not queue the feature statistics: {exc}")


def _sample_rows(source, n: int, device):
    """The evaluation sample and, for an extracted store, each row's token, document and position.

    A file or store gives its first ``n`` rows (whole context windows, in order, so
    examples have their context); the synthetic stream gives ``n`` fresh rows.
    """
    from .sae.sources import ShardedArraySource, StoreSource

    if not isinstance(source, ShardedArraySource):
        return source.eval_rows(n, device=device), None
    x = source.head(n, device=device)
    return x, source.head_index(len(x)) if isinstance(source, StoreSource) else None


def _token_texts(model_name: str, ids) -> dict[int, str]:
    """Each token id's text as it reads after a word, by the extraction's own tokenizer.

    Decoding a token alone loses how it joins its neighbour (WordPiece's "##ing" glues on,
    "task" follows a space), so each is decoded after a reference word and the reference
    cut off: concatenated, the pieces read as the text did.
    """
    from transformers import AutoTokenizer

    from .extraction.capture import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model_name))
    anchor = tokenizer("the", add_special_tokens=False)["input_ids"][:1]
    prefix = tokenizer.decode(anchor)
    texts = {}
    for i in map(int, ids):
        joined = tokenizer.decode(anchor + [i])
        texts[i] = joined[len(prefix):] if anchor and joined.startswith(prefix) else tokenizer.decode([i])
    return texts


def run_features(job_id: int) -> str:
    """Statistics, top examples with context, neighbours and ground-truth recovery of an SAE's latents."""
    import numpy as np

    from .models import FeatureJob, FeatureStat

    settings = _connect()
    job = FeatureJob.get_by_id(job_id)
    if not _claim(job):  # cancelled while it waited in the queue
        return job.status
    try:
        from .sae import features as F
        from .sae.export import parse_saelens, read_checkpoint
        from .sae.trainer import resolve_device

        data_dir = Path(settings["DATA_DIR"])
        device = resolve_device(settings["SAE_DEVICE"])
        if job.training_id:
            loaded = read_checkpoint(data_dir / "runs" / str(job.training_id))
        else:
            folder = data_dir / job.imported.path
            loaded, _ = parse_saelens({p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()})
        source = build_source(job.source, settings["DATA_DIR"])
        if source.d_in != loaded.d_in:
            raise F.FeatureError(f"the SAE reads d_in {loaded.d_in} but the source {job.source.name!r} has d_in "
                                 f"{source.d_in}")
        sae = F.to_module(loaded, device)
        x, index = _sample_rows(source, job.sample_tokens, device)
        x = x * loaded.norm_scale

        def progress(fraction: float) -> None:
            FeatureJob.update(progress=fraction).where(FeatureJob.id == job.id).execute()

        stats = F.latent_stats(sae, x, top_n=job.top_n, should_stop=cancel_poller(job),
                               on_progress=_throttled_progress(lambda f: progress(0.8 * f)))
        neighbour_idx, neighbour_cos = F.decoder_neighbours(sae)
        progress(0.85)
        recovery = F.ground_truth_recovery(sae, source.features) if hasattr(source, "features") else None
        context_acts = context = None
        texts: dict[int, str] = {}
        if index is not None:
            context = F.context_rows(stats.top_rows, index[:, 1], index[:, 2], job.context)
            flat = context.reshape(loaded.d_sae, -1)
            context_acts = F.latent_activations_at(sae, x, np.arange(loaded.d_sae), flat, stats.thresholds)
            context_acts = context_acts.reshape(context.shape)
            used = np.unique(index[np.unique(context[context >= 0]), 0])
            texts = _token_texts(job.source.params["model"], used)
        if (reason := cancel_requested(job)):
            raise InterruptedError(reason)
        progress(0.9)
        rows = []
        for j in range(loaded.d_sae):
            examples, words = [], []
            for e in range(job.top_n):
                r = int(stats.top_rows[j, e])
                if r < 0:
                    break
                example = {"row": r, "act": float(stats.top_acts[j, e])}
                if context is not None:
                    ctx = context[j, e]
                    example["tokens"] = [[texts[int(index[c, 0])], float(a)]
                                         for c, a in zip(ctx, context_acts[j, e], strict=True) if c >= 0]
                    example["at"] = int((ctx[:job.context] >= 0).sum())
                    example["document"], example["position"] = int(index[r, 1]), int(index[r, 2])
                    words.append(texts[int(index[r, 0])].strip())
                examples.append(example)
            rows.append({
                "job": job.id, "latent": j, "frequency": float(stats.frequency[j]),
                "mean_active": float(stats.mean_active[j]), "max_active": float(stats.max_active[j]),
                "match_feature": None if recovery is None else int(recovery.best_feature[j]),
                "match_cosine": None if recovery is None else float(recovery.best_cosine[j]),
                "top_tokens": " ".join(dict.fromkeys(w for w in words if w)), "examples": examples,
                "neighbours": [[int(a), round(float(b), 4)]
                               for a, b in zip(neighbour_idx[j], neighbour_cos[j], strict=True)]})
        summary = {"n_tokens": stats.n_tokens, "never_fired": int((stats.frequency == 0).sum()),
                   "density_histogram": density_histogram(stats.frequency.tolist())}
        if recovery is not None:
            summary["ground_truth"] = {"mmcs": recovery.mmcs, "recovered": recovery.recovered,
                                       "n_features": recovery.n_features, "threshold": F.RECOVERED_COSINE}
        with database.atomic():
            FeatureStat.delete().where(FeatureStat.job == job.id).execute()
            for start in range(0, len(rows), 200):
                FeatureStat.insert_many(rows[start:start + 200]).execute()
            FeatureJob.update(status="completed", summary=summary, progress=1.0, finished_at=utcnow()).where(
                FeatureJob.id == job.id).execute()
            if job.training_id and recovery is not None:
                run = Training.get_by_id(job.training_id)
                Training.update(summary={**(run.summary or {}), "ground_truth": summary["ground_truth"]}).where(
                    Training.id == run.id).execute()
        return "completed"
    except InterruptedError as exc:
        FeatureJob.update(status="cancelled", reason=str(exc), finished_at=utcnow()).where(
            FeatureJob.id == job.id).execute()
        return "cancelled"
    except Exception as exc:  # noqa: BLE001 - recorded on the row; user errors are not re-raised
        return _fail(job, exc, ("FeatureError", "SAEFormatError", "StoreError"))
    finally:
        database.close()


def _throttled_progress(report, interval_s: float = 1.0):
    state = {"next": 0.0}

    def wrapper(fraction: float) -> None:
        now = time.monotonic()
        if now >= state["next"] or fraction >= 1.0:
            state["next"] = now + interval_s
            report(fraction)

    return wrapper


def _throttled(check, interval_s: float):
    """Call ``check`` at most every ``interval_s``; in between report no stop."""
    state = {"next": 0.0}

    def wrapper():
        now = time.monotonic()
        if now < state["next"]:
            return None
        state["next"] = now + interval_s
        return check()

    return wrapper
