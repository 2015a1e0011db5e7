"""Feature statistics: per-latent frequency, strength, top examples in context, neighbours and
ground-truth recovery of a run's SAE or an imported one (create, run, finish)."""
from __future__ import annotations

import time
from pathlib import Path

from ..db import database
from ..models import FeatureJob, FeatureStat, Training
from ..quality import density_histogram
from . import lifecycle
from .lifecycle import retry_write
from .resources import check_memory, feature_bytes

INSERT_BATCH = 200


def create_feature_job(settings: dict, *, source, training=None, imported=None,
                       sample_tokens: int | None = None, created_by: int | None = None) -> FeatureJob:
    """Create and queue a feature-statistics job for a run's SAE or an imported one."""
    if sample_tokens is None:
        sample_tokens = settings["FEATURE_SAMPLE_TOKENS"]
    if source.total_rows is not None:
        sample_tokens = min(sample_tokens, source.total_rows)
    return lifecycle.create_and_enqueue(FeatureJob, {"created_by": created_by, "training": training, "imported": imported, "source": source,
                                                     "sample_tokens": sample_tokens}, settings)


def run_features(job_id: int) -> str:
    """Statistics, top examples with context, neighbours and ground-truth recovery of an SAE's latents."""
    return lifecycle.run_job(FeatureJob, job_id, _run)


def _run(job: FeatureJob, settings: dict, stop_check: lifecycle.StopCheck) -> str:
    """Compute the statistics; a job that stops before its end drops the rows it wrote (the
    lifecycle records why). Rows of a superseded job are another attempt's: they stay."""
    try:
        return _features(job, settings, stop_check)
    except lifecycle.Superseded:
        raise
    except Exception:
        if not lifecycle.ended_as(job):
            retry_write(FeatureStat.delete().where(FeatureStat.job == job.id).execute, what="drop partial stats")
        raise


def _features(job: FeatureJob, settings: dict, stop_check) -> str:
    import numpy as np

    from ..sae import features as F
    from ..sae.export import parse_saelens, read_checkpoint
    from ..sae.trainer import resolve_device
    from .training import build_source, sae_folder

    data_dir = Path(settings["DATA_DIR"])
    device = resolve_device(settings["SAE_DEVICE"])
    if job.training_id:
        folder = sae_folder(Training.get_by_id(job.training_id), settings)
        if folder is None:
            raise F.FeatureError("the run has no saved SAE (it was removed, or the run has not ended)")
        loaded = read_checkpoint(folder)
    else:
        folder = data_dir / job.imported.path
        loaded, _ = parse_saelens({p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()})
    source = build_source(job.source, settings["DATA_DIR"], settings)
    if source.d_in != loaded.d_in:
        raise F.FeatureError(f"the SAE reads d_in {loaded.d_in} but the source {job.source.name!r} has d_in "
                             f"{source.d_in}")
    check_memory(settings, feature_bytes(loaded.d_in, loaded.d_sae, job.sample_tokens, job.top_n),
                 "The feature statistics", "Sample fewer tokens.")
    sae = F.to_module(loaded, device)
    x, index = _sample_rows(source, job.sample_tokens, device, job)
    x = x * loaded.norm_scale

    def progress(fraction: float) -> None:
        lifecycle.fenced_update(job, what="progress", progress=fraction)

    stats = F.latent_stats(sae, x, top_n=job.top_n, should_stop=stop_check,
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
    if (reason := stop_check()):
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
        summary["ground_truth"] = {"mmcs": recovery.mmcs, "mcc": recovery.mcc, "recovered": recovery.recovered,
                                   "n_features": recovery.n_features, "threshold": F.RECOVERED_COSINE}
    # Short transactions, one batch of rows each, so a run writing beside this job never waits
    # long for the lock. The browser shows a job's rows only once it is completed.
    # Each batch behind the job's own guard (docs/design.md, "One writer per record").
    def held(write):
        def guarded_write() -> None:
            with database.atomic():
                if not FeatureJob.update(heartbeat_at=lifecycle.utcnow()).where(lifecycle.current(job)).execute():
                    raise lifecycle.superseded(job, "its statistics")
                write()
        return guarded_write

    retry_write(held(FeatureStat.delete().where(FeatureStat.job == job.id).execute), what="clear stats")
    for start in range(0, len(rows), INSERT_BATCH):
        batch = rows[start:start + INSERT_BATCH]
        retry_write(held(lambda b=batch: FeatureStat.insert_many(b).on_conflict_ignore().execute()),
                    what="feature stats")
    if not lifecycle.finish(job, "completed", summary=summary, progress=1.0):
        return "superseded"
    # Another user's job keeps its recovery on its own record (the run page lists it by job).
    if recovery is not None and job.on_run:
        def note_recovery() -> None:
            with database.atomic():
                if not FeatureJob.select().where(lifecycle.current(job)).exists():
                    return  # the job's end was undone meanwhile (a resume of its run does not do that; a delete does)
                run = Training.get_by_id(job.training_id)
                Training.update(summary={**(run.summary or {}), "ground_truth": summary["ground_truth"]}).where(
                    Training.id == run.id).execute()

        retry_write(note_recovery, what="ground truth")
    return "completed"


lifecycle.register(lifecycle.JobKind(FeatureJob, "feature job", "app.work.features.run_features"))


def _sample_rows(source, n: int, device, job=None):
    """The evaluation sample and, for an extracted store or a model's stream, each row's token,
    document and position.

    A file or store gives its first ``n`` rows (whole context windows, in order, so examples have
    their context), and so does a streamed source (its corpus's first tokens, at the run's hook
    point); the synthetic stream gives ``n`` fresh rows.
    """
    from ..sae.sources import ShardedArraySource, StoreSource
    from ..sae.stream import StreamedSource

    if isinstance(source, StreamedSource):
        run = job.training if job is not None and job.training_id else None
        return source.head(n, device=device, hook=(run.hook_point if run is not None else "") or source.hooks[0])

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

    from ..extraction.capture import resolve_model

    from .. import paths
    from ..config import load_settings
    from ..extraction.capture_names import BUNDLED_MINILM

    if model_name != BUNDLED_MINILM:
        model_name = paths.resolve(model_name, load_settings(), "model")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model_name))
    anchor = tokenizer("the", add_special_tokens=False)["input_ids"][:1]
    prefix = tokenizer.decode(anchor)
    texts = {}
    for i in map(int, ids):
        joined = tokenizer.decode(anchor + [i])
        texts[i] = joined[len(prefix):] if anchor and joined.startswith(prefix) else tokenizer.decode([i])
    return texts


def _throttled_progress(report, interval_s: float = 1.0):
    state = {"next": 0.0}

    def wrapper(fraction: float) -> None:
        now = time.monotonic()
        if now >= state["next"] or fraction >= 1.0:
            state["next"] = now + interval_s
            report(fraction)

    return wrapper
