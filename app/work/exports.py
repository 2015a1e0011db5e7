"""SAEs in and out in the SAELens layout: a run's SAE as a zip (weights folded back to the
model's scale, its sparsity and metadata), and an imported SAE kept under DATA_DIR with its
feature statistics queued. What the features pages call; the formats are ``app.sae.export``'s."""
from __future__ import annotations

import uuid
from pathlib import Path

from ..errors import UserError
from ..models import ActivationSet, ImportedSAE, Training
from .training import sae_folder


class NoSAE(UserError):
    """The run has no saved SAE (yet): nothing to export."""


def saelens_zip(run: Training, settings: dict) -> tuple[str, bytes]:
    """(folder name, zip bytes) of the run's SAE in the SAELens layout (``NoSAE`` if there is none)."""
    from ..sae.export import zip_bytes

    folder = f"sae-studio-run-{run.id}"
    return folder, zip_bytes(run_sae_files(run, settings), folder)


def run_sae_files(run: Training, settings: dict) -> dict[str, bytes]:
    import numpy as np

    from ..sae.export import export_files, hook_name, read_checkpoint

    folder = sae_folder(run, settings)
    if folder is None:
        raise NoSAE("This run has no checkpoint to export yet.")
    sae = read_checkpoint(folder)
    frequencies = np.load(folder / "frequencies.npy") if (folder / "frequencies.npy").exists() else None
    from .streams import run_meta

    meta = run_meta(run)
    metadata = {
        "model_name": meta.get("model"), "hook_name": hook_name(meta.get("site"), meta.get("layer")),
        "hook_layer": meta.get("layer"), "site": meta.get("site"), "context_size": meta.get("context_length"),
        "dataset_path": meta.get("text_label") or run.source.name,
        "sae_studio": {"run_id": run.id, "source": run.source.name, "norm_scale_folded": sae.norm_scale,
                       "l1_alpha": run.l1_alpha, "steps": run.step, "special_tokens_excluded": meta.get("exclude_special"),
                       "held_out_l0_fraction": (run.summary or {}).get("l0_fraction"),
                       "held_out_fvu": (run.summary or {}).get("fvu"),
                       "architecture": run.architecture, "k": run.k, "target_l0": run.target_l0,
                       "downstream": downstream_metadata((run.summary or {}).get("downstream"))},
    }
    return export_files(sae, frequencies, metadata)


def downstream_metadata(result: dict | None) -> dict | None:
    """The downstream evaluation's figures as the export carries them (SAEBench's "core" names)."""
    if not result:
        return None
    keys = ("ce_clean", "ce_spliced", "ce_ablated", "ce_loss_score", "kl_spliced", "kl_ablated", "kl_score",
            "damage_spliced", "damage_ablated", "fidelity_score", "l2_ratio", "cosine", "relative_reconstruction_bias",
            "fvu", "tokens")
    return {key: result[key] for key in keys if key in result}


def read_upload(data: bytes, *, max_bytes: int):
    """(files, parsed SAE) of an uploaded SAELens zip, read in memory (``SAEFormatError`` if it is not one)."""
    from ..sae.export import files_from_zip, parse_saelens

    files = files_from_zip(data, max_bytes=max_bytes)
    sae, _ = parse_saelens(files)
    return files, sae


def store_imported_sae(settings: dict, files: dict[str, bytes], sae, *, name: str, source: ActivationSet, sample_tokens: int,
               created_by: int | None = None):
    """Keep an uploaded SAE under DATA_DIR/imported and queue its feature statistics; return the
    job. The import is its statistics: if the queue is unreachable (``QueueUnavailable``), nothing is kept."""
    from ..sae.export import CFG, WEIGHTS
    from . import deletion
    from .features import create_feature_job
    from .queue import QueueUnavailable

    folder = Path(settings["DATA_DIR"]) / "imported" / uuid.uuid4().hex
    folder.mkdir(parents=True)
    for file_name in (CFG, WEIGHTS):
        (folder / file_name).write_bytes(files[file_name])
    imported = ImportedSAE.create(name=name, created_by=created_by, architecture=sae.architecture, d_in=sae.d_in,
                                  d_sae=sae.d_sae, k=sae.k, cfg=sae.cfg, path=str(folder.relative_to(settings["DATA_DIR"])))
    try:
        return create_feature_job(settings, imported=imported, source=source, created_by=created_by,
                                  sample_tokens=sample_tokens)
    except QueueUnavailable:
        deletion.delete_imported(imported, settings)
        raise
