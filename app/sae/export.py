"""SAEs in the layout SAELens reads, both ways; numpy only, so the web process can do it.

A folder (or zip) holding::

    cfg.json                  d_in, d_sae, architecture, dtype, normalization, metadata
    sae_weights.safetensors   W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in]
    sparsity.safetensors      "sparsity": log10 of each latent's firing frequency

Our checkpoints live in normalized space (inputs scaled by ``c`` with E‖c·x‖² = d_in).
Export folds ``c`` into the weights so the SAE works on raw activations:
``f = act((x − b_dec/c)·(c·W_enc) + b_enc)`` and ``x̂ = f·(W_dec/c) + b_dec/c``,
which is exactly ``act((c·x − b_dec)·W_enc + b_enc)`` decoded and scaled back by ``1/c``.
"""
from __future__ import annotations

import io
import json
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load, save

from . import architectures
from ..errors import UserError

CFG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
SPARSITY = "sparsity.safetensors"
# TransformerLens hook names, which SAELens metadata uses, for our capture sites.
HOOK_NAMES = {"resid": "blocks.{layer}.hook_resid_post", "mlp": "blocks.{layer}.hook_mlp_out",
              "attn": "blocks.{layer}.hook_attn_out"}
MIN_FREQUENCY = 1e-10  # log10 density of a latent that never fired: -10, as SAELens' sparsity files do


class SAEFormatError(UserError, ValueError):
    """The files are not an SAE in the SAELens layout we can use; the message says why."""


@dataclass
class LoadedSAE:
    """Weights that act on raw activations (``norm_scale`` 1) or on c·x (our checkpoints)."""

    architecture: str
    d_in: int
    d_sae: int
    k: int | None
    weights: dict[str, np.ndarray]
    norm_scale: float
    cfg: dict


def read_checkpoint(folder: Path | str) -> LoadedSAE:
    """One of our run folders: ``sae.safetensors`` (normalized space) and ``cfg.json``."""
    folder = Path(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    weights = load((folder / "sae.safetensors").read_bytes())
    keep = architectures.get(cfg["architecture"]).exports_as.tensor_names()
    weights = {name: value for name, value in weights.items() if name in keep}
    return LoadedSAE(cfg["architecture"], int(cfg["d_in"]), int(cfg["latent_dim"]), cfg.get("k"), weights,
                     float(cfg["norm_scale"]), cfg)


def folded(sae: LoadedSAE) -> dict[str, np.ndarray]:
    """The weights with the normalization folded in, under SAELens's names: they act on raw activations."""
    return architectures.get(sae.architecture).exports_as.fold(sae.weights, sae.norm_scale)


def saelens_cfg(sae: LoadedSAE, metadata: dict) -> dict:
    arch = architectures.get(sae.architecture)
    if arch.exports_as is not arch:  # another architecture at inference: exported as what it then is
        metadata = {**metadata, "trained_as": sae.architecture}
    cfg = {"architecture": arch.exports_as.saelens, "d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "none", "metadata": {"sae_lens_version": "6.0.0", **metadata}}
    cfg.update(arch.exports_as.saelens_cfg(sae.k))
    return cfg


def export_files(sae: LoadedSAE, frequencies: np.ndarray | None, metadata: dict) -> dict[str, bytes]:
    """The three files of the SAELens layout, as bytes."""
    files = {CFG: json.dumps(saelens_cfg(sae, metadata), indent=2).encode(),
             WEIGHTS: save({k: np.ascontiguousarray(v) for k, v in folded(sae).items()})}
    if frequencies is not None:
        density = np.log10(np.maximum(np.asarray(frequencies, dtype=np.float64), MIN_FREQUENCY)).astype(np.float32)
        files[SPARSITY] = save({"sparsity": density})
    return files


def zip_bytes(files: dict[str, bytes], folder: str) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(f"{folder}/{name}", data)
    return out.getvalue()


MAX_INFLATION = 200  # float weights compress a few times at most; more is a bomb


def files_from_zip(data: bytes, *, max_bytes: int) -> dict[str, bytes]:
    """cfg.json, sae_weights.safetensors and (if there) sparsity.safetensors from a zip, in any one folder."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise SAEFormatError("not a zip file") from exc
    found: dict[str, bytes] = {}
    total = 0
    with zf:
        for info in zf.infolist():
            name = Path(info.filename).name
            if name in (CFG, WEIGHTS, SPARSITY) and not info.is_dir():
                if info.file_size > max_bytes:
                    raise SAEFormatError(f"{name} is larger than the limit of {max_bytes:,} bytes")
                if info.file_size > MAX_INFLATION * max(info.compress_size, 1) and info.file_size > 2**20:
                    raise SAEFormatError(f"{name} inflates more than {MAX_INFLATION}:1; a zip bomb is not an SAE")
                if name in found:
                    raise SAEFormatError(f"the zip holds more than one {name}; put one SAE in it")
                found[name] = _read_member(zf, info, min(info.file_size, max_bytes - total))
                total += len(found[name])
    return found


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """The member's bytes, read in chunks and never past ``limit`` (a zip's sizes can lie)."""
    out = io.BytesIO()
    try:
        with zf.open(info) as fh:
            while chunk := fh.read(2**20):
                out.write(chunk)
                if out.tell() > limit:
                    raise SAEFormatError(f"{Path(info.filename).name} is larger than it says or than the limit")
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
        raise SAEFormatError(f"the zip is damaged ({type(exc).__name__}: {str(exc)[:80]})") from exc
    return out.getvalue()


def parse_saelens(files: dict[str, bytes]) -> tuple[LoadedSAE, np.ndarray | None]:
    """Check an SAE in the SAELens layout and return it (acting on raw activations) and its log10 density."""
    for name in (CFG, WEIGHTS):
        if name not in files:
            raise SAEFormatError(f"{name} is missing (expected {CFG} and {WEIGHTS}, as SAELens writes them)")
    try:
        cfg = json.loads(files[CFG])
    except (ValueError, RecursionError) as exc:
        raise SAEFormatError(f"{CFG} is not valid JSON") from exc
    if not isinstance(cfg, dict):
        raise SAEFormatError(f"{CFG} is not a JSON object")
    named = cfg.get("architecture", architectures.saelens_default().saelens)
    arch = architectures.from_saelens(named) if isinstance(named, str) else None
    if arch is None:
        readable = [a.saelens for a in architectures.all() if a.saelens]
        raise SAEFormatError(f"architecture {named!r} is not supported; this app reads "
                             f"{', '.join(readable[:-1])} and {readable[-1]} SAEs")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise SAEFormatError(f"normalize_activations {cfg['normalize_activations']!r} is not supported; export "
                             "the SAE with the normalization folded into its weights")
    if cfg.get("apply_b_dec_to_input", True) is not True:
        raise SAEFormatError("apply_b_dec_to_input false is not supported")
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise SAEFormatError("reshape_activations (hook_z) SAEs are not supported")
    try:
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SAEFormatError(f"{CFG} needs integer d_in and d_sae") from exc
    try:
        k = arch.read_saelens(cfg, d_sae)
    except ValueError as exc:
        raise SAEFormatError(str(exc)) from exc
    try:
        weights = load(files[WEIGHTS])
    except Exception as exc:  # noqa: BLE001 - any parse failure is the user's file
        raise SAEFormatError(f"{WEIGHTS} is not a readable safetensors file") from exc
    shapes = arch.saelens_shapes(d_in, d_sae)
    for name, shape in shapes.items():
        if name not in weights:
            raise SAEFormatError(f"{WEIGHTS} has no tensor {name}")
        if tuple(weights[name].shape) != shape:
            raise SAEFormatError(f"{name} has shape {tuple(weights[name].shape)}; d_in {d_in} and d_sae {d_sae} "
                                 f"need {shape}")
        if not np.isfinite(weights[name]).all():
            raise SAEFormatError(f"{name} holds NaN or Inf")
    density = None
    if SPARSITY in files:
        try:
            density = load(files[SPARSITY]).get("sparsity")
        except Exception as exc:  # noqa: BLE001
            raise SAEFormatError(f"{SPARSITY} is not a readable safetensors file") from exc
    sae = LoadedSAE(arch.name, d_in, d_sae, k, {n: weights[n].astype(np.float32) for n in shapes}, 1.0, cfg)
    return sae, density


def hook_name(site: str | None, layer: int | None) -> str | None:
    if site in HOOK_NAMES and layer is not None:
        return HOOK_NAMES[site].format(layer=layer)
    return None

