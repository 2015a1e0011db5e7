"""Extraction: capture a model's activations over a corpus into a store (create, run, finish).

The store is written under ``activations/.partial-<id>`` and renamed into place only when
complete; a failed, cancelled or interrupted extraction removes it (the sweeper and the
janitor remove one whose worker died), so nothing half-written is ever left under its name.
"""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from .. import paths
from ..extraction.capture_names import BUNDLED_MINILM
from ..models import ActivationSet, Extraction
from . import lifecycle
from .resources import check_memory, check_model_size, model_need

def named_text_spec(d: dict):
    """The corpus a validated form names without an upload: a Hugging Face dataset or the stdlib."""
    from ..extraction.text import TextSpec

    if d["text_kind"] == "hf":
        return TextSpec("hf", dataset=d["dataset_name"].strip(), split=(d["dataset_split"] or "train").strip(),
                        column=d["text_column"].strip())
    return TextSpec("stdlib")


def create_extraction(settings: dict, d: dict, spec, *, created_by: int | None = None,
                      model_size_bytes: int | None = None) -> Extraction:
    """Record a validated extraction (the form's data ``d``, its corpus ``spec``, the model's size as
    the form measured it: placement's estimate) and queue it (``QueueUnavailable`` if it can't be)."""
    return lifecycle.create_and_enqueue(Extraction, {
        "model_size_bytes": model_size_bytes,
        "created_by": created_by, "name": (d["name"] or "").strip(), "model_name": d["model_name"].strip(), "layer": d["layer"],
        "site": d["site"], "text": spec.to_dict(), "token_budget": d["token_budget"],
        "context_length": d["context_length"], "batch_size": d["batch_size"], "dtype": d["dtype"],
        "model_dtype": d["model_dtype"], "exclude_special": bool(d["exclude_special"])}, settings)


def run_extraction(extraction_id: int) -> str:
    """Capture a model's activations over a corpus into a store; on success it becomes a source."""
    return lifecycle.run_job(Extraction, extraction_id, _extract)


def _extract(job: Extraction, settings: dict, stop_check: lifecycle.StopCheck) -> str:
    """Run the extraction; whatever stops it removes what it wrote (the lifecycle records why)."""
    writer: list = []  # the store's writer, once it exists
    try:
        return _capture(job, settings, stop_check, writer)
    except Exception as exc:
        if writer:
            writer[0].abort()
            if isinstance(exc, lifecycle.Superseded):  # committed to its final folder, which no source now names
                shutil.rmtree(writer[0].final_dir, ignore_errors=True)
        raise


def _capture(job: Extraction, settings: dict, stop_check: lifecycle.StopCheck, writers: list) -> str:
    from ..extraction.capture import SITES, extract, find_site, load_model
    from ..extraction.store import ShardWriter
    from ..extraction.text import TextSpec, check_corpus, documents
    from ..sae.files import holdout_rows
    from ..sae.trainer import resolve_device

    spec = TextSpec(**job.text)
    if spec.kind == "hf":  # the web checked the name; the worker checks again where it reads
        spec = replace(spec, dataset=paths.resolve(spec.dataset, settings, "dataset"))
    model_name = job.model_name if job.model_name == BUNDLED_MINILM else paths.resolve(job.model_name, settings,
                                                                                        "model")
    if model_name != BUNDLED_MINILM:
        size = check_model_size(settings, model_name)  # before anything is downloaded
        if size:  # the weights at the chosen precision, and room for the activations (placement counted
            # the size measured before the claim: this only catches memory other programs took since)
            check_memory(settings, model_need(size, job.model_dtype), "The model",
                         "Choose bfloat16, or a smaller model.")
    check_corpus(spec)  # a bad corpus fails before the model is loaded
    device = resolve_device(settings["SAE_DEVICE"])
    lifecycle.fenced_update(job, what="device", device=str(device))
    tokenizer, model = load_model(model_name, device, job.model_dtype)
    _, layout, n_layers = find_site(model, job.layer, job.site)
    d_in = int(model.config.hidden_size)
    writer = ShardWriter(Path(settings["DATA_DIR"]) / "activations" / str(job.id), d_in, job.dtype)
    writers.append(writer)

    def on_progress(p) -> None:
        lifecycle.fenced_update(job, what="progress", tokens_done=p.tokens, documents_done=p.documents,
                                tokens_per_s=p.tokens_per_s)

    tokens, docs, stopped = extract(
        model, tokenizer, documents(spec), writer, layer=job.layer, site=job.site,
        token_budget=job.token_budget, context_length=job.context_length, batch_size=job.batch_size,
        exclude_special=job.exclude_special, device=device, on_progress=on_progress, should_stop=stop_check)
    if stopped:
        writer.abort()
        status = "interrupted" if stop_check.interrupted else "cancelled"
        lifecycle.finish(job, status, reason=stopped + " Nothing was kept.")
        return lifecycle.ended_as(job) or "superseded"
    meta = writer.commit({
        "model": job.model_name, "model_path": getattr(model, "name_or_path", "") or job.model_name,
        "architecture": type(model).__name__, "layout": layout.name, "n_layers": n_layers,
        "layer": job.layer, "site": job.site, "site_label": SITES[job.site],
        "context_length": job.context_length, "model_dtype": job.model_dtype,
        "exclude_special": job.exclude_special, "text": spec.to_dict(), "text_label": spec.describe(),
        "documents": docs, "extraction_id": job.id, "model_size_bytes": job.model_size_bytes})
    name = job.name or f"{Path(job.model_name).name} layer {job.layer} {SITES[job.site]}, {spec.describe()}"

    def become_a_source() -> None:  # in the end's transaction: a superseded end rolls nothing in
        source = ActivationSet.create(name=name, kind="extracted", d_in=d_in, n_tokens=tokens - holdout_rows(tokens),
                                      params=meta, path=f"activations/{job.id}")
        Extraction.update(activation_set=source).where(Extraction.id == job.id).execute()

    if not lifecycle.finish(job, "completed", tokens_done=tokens, documents_done=docs, then=become_a_source):
        raise lifecycle.Superseded(f"extraction {job.id}: its completion")  # its committed store is removed
    return "completed"


def _failure(job: Extraction, exc: Exception, reason: str, settings: dict) -> dict:
    return {"reason": reason + " Nothing was kept."}


def _interrupted(job: Extraction, reason: str, settings: dict) -> None:
    """An extraction whose worker stopped leaves its partial store: it is removed."""
    shutil.rmtree(Path(settings["DATA_DIR"]) / "activations" / f".partial-{job.id}", ignore_errors=True)


lifecycle.register(lifecycle.JobKind(Extraction, "extraction", "app.work.extraction.run_extraction",
                                     failure=_failure, interrupted=_interrupted))
