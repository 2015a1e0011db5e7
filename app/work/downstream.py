"""Downstream evaluation: a run's SAE spliced into the model it was trained on, on held-out
text (create, run, finish). The metrics are ``app.extraction.splice``'s."""
from __future__ import annotations

import itertools
import math
from dataclasses import replace

from .. import paths
from ..errors import UserError
from ..extraction.capture_names import BUNDLED_MINILM, SITES
from ..models import DownstreamEval, Training
from . import lifecycle
from .training import sae_folder

class DownstreamError(UserError, ValueError):
    """The evaluation cannot run; the message is for the user."""


def why_not(run: Training, settings: dict) -> str | None:
    """Why this run cannot be evaluated downstream (None: it can)."""
    if run.source.kind not in ("extracted", "streamed"):
        return ("Downstream evaluation splices the SAE into the model its activations came from: it needs a run "
                "trained on an extraction or streamed from a model, and this run's source is "
                + ("synthetic." if run.source.kind == "synthetic" else "an uploaded file with no model behind it."))
    if sae_folder(run, settings) is None:
        return "This run has no saved SAE yet: evaluate it once it has finished."
    return None


def create_downstream(settings: dict, run: Training, *, token_budget: int | None = None,
                      created_by: int | None = None) -> DownstreamEval:
    """Record and queue an evaluation of ``run`` (``QueueUnavailable`` if it can't be), with its model's
    size where its extraction recorded one (placement's estimate; the job measures it otherwise)."""
    from .resources import known_model_size

    return lifecycle.create_and_enqueue(DownstreamEval, {
        "created_by": created_by, "training": run, "model_size_bytes": known_model_size(run),
        "token_budget": token_budget or settings["DOWNSTREAM_TOKENS"]}, settings)


def run_downstream(job_id: int) -> str:
    """Splice the run's SAE into its model on held-out text and score what survives."""
    return lifecycle.run_job(DownstreamEval, job_id, _evaluate)


def _evaluate(job: DownstreamEval, settings: dict, stop_check) -> str:
    from ..extraction.capture import ExtractionError
    from ..extraction.splice import downstream_eval, load_for_eval
    from ..extraction.text import TextSpec, documents
    from ..sae.export import read_checkpoint
    from ..sae.features import to_module
    from ..sae.trainer import resolve_device

    run = Training.get_by_id(job.training_id)
    if (reason := why_not(run, settings)) is not None:
        raise DownstreamError(reason)
    from .streams import run_meta

    meta = run_meta(run)
    device = resolve_device(settings["SAE_DEVICE"])
    sae = to_module(read_checkpoint(sae_folder(run, settings)), device)
    spec = TextSpec(**meta["text"])
    if spec.kind == "hf":
        spec = replace(spec, dataset=paths.resolve(spec.dataset, settings, "dataset"))
    model_name = meta["model"] if meta["model"] == BUNDLED_MINILM else paths.resolve(meta["model"], settings, "model")
    tokenizer, model, causal = load_for_eval(model_name, device, meta.get("model_dtype", "float32"))
    used = int(meta.get("documents", 0))
    budget = job.token_budget
    if run.source.kind == "streamed":  # a stream trains on all but its corpus's head: evaluate there only
        budget = min(budget, int(meta.get("holdout_tokens") or budget))
    held_out = itertools.islice(documents(spec), used, None)  # never the documents the extraction read
    seen = {"documents": 0}

    def counted():
        for doc in held_out:
            seen["documents"] += 1
            yield doc

    def progress(fraction: float) -> None:
        lifecycle.fenced_update(job, what="progress", progress=fraction)

    try:
        result = downstream_eval(model, tokenizer, causal, sae, norm_scale=run.norm_scale, layer=int(meta["layer"]),
                                 site=meta["site"], docs=counted(), token_budget=budget,
                                 context_length=int(meta["context_length"]), batch_size=16,
                                 exclude_special=bool(meta.get("exclude_special", True)), device=device,
                                 should_stop=stop_check, on_progress=progress)
    except ExtractionError as exc:
        if seen["documents"] == 0:
            raise DownstreamError(f"The corpus holds no documents beyond the {used:,} the extraction read, so there "
                                  "is no held-out text to evaluate on: extract from a larger corpus.") from exc
        raise
    result = {key: None if isinstance(value, float) and not math.isfinite(value) else value
              for key, value in result.items()}  # JSON has no NaN
    result.update(documents=seen["documents"], held_out_after=used, model=meta["model"], layer=int(meta["layer"]),
                  site=meta["site"])
    result["headline"] = headline(result)

    def copy_to_run() -> None:
        fresh = Training.get_by_id(run.id)
        summary = dict(fresh.summary or {})
        summary["downstream"] = result
        if summary.get("verdict"):
            summary["verdict"] = {**summary["verdict"], "downstream": result["headline"]}
        Training.update(summary=summary).where(Training.id == run.id).execute()

    # the run's copy in the end's own transaction, behind its guard: whoever sees the job completed
    # finds its result on the run, and a stale evaluation never rewrites the run's summary. Only the
    # run's own and its owner's evaluations have one; another user's stays on the job's record.
    lifecycle.finish(job, "completed", summary=result, progress=1.0, then=copy_to_run if job.on_run else None)
    return lifecycle.ended_as(job) or "superseded"


lifecycle.register(lifecycle.JobKind(DownstreamEval, "downstream evaluation", "app.work.downstream.run_downstream"))


def headline(r: dict) -> str:
    """One sentence for the verdict: how much of the model survives the splice."""
    where = f"layer {r['layer']} {SITES.get(r['site'], r['site'])}"
    if r["score"] is None:
        return (f"Spliced into the model at {where}: zeroing the activation does not change the model's output on "
                "the held-out text, so no score can be computed.")
    if r["causal"]:
        return (f"Spliced into the model at {where}, it keeps {100 * r['ce_loss_score']:.0f}% of what the activation "
                f"is worth to the next-token loss (CE-loss score {r['ce_loss_score']:.3f}: CE {r['ce_clean']:.3f} "
                f"clean, {r['ce_spliced']:.3f} spliced, {r['ce_ablated']:.3f} zero-ablated"
                + (f"; KL score {r['kl_score']:.3f})." if r["kl_score"] is not None else ")."))
    return (f"Spliced into the encoder at {where}, it avoids {100 * r['fidelity_score']:.0f}% of the damage zeroing "
            f"the activation does to the final hidden states (fidelity score {r['fidelity_score']:.3f}).")
