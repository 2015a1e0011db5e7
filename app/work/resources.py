"""Will it fit? The memory a job needs against what its device has free, and a model's size
against ``MAX_MODEL_GB``, checked when the job is started (at its field) and again in the worker."""
from __future__ import annotations

from pathlib import Path

from ..devices import device_memory
from ..validation import memory_estimate_bytes

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf")


class TooLarge(ValueError):
    """The job would not fit; the message says what to change. Safe to show."""


def _fmt(n: float) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def check_memory(settings: dict, need_bytes: int, what: str, advice: str) -> None:
    memory = device_memory(settings.get("SAE_DEVICE", "auto"))
    if memory.free_bytes and need_bytes > memory.free_bytes:
        raise TooLarge(f"{what} needs about {_fmt(need_bytes)} but {memory.device} has {_fmt(memory.free_bytes)} "
                       f"free. {advice}")


def tune_bytes(d_in: int, latent_dim: int, batch_size: int) -> int:
    """An auto-tune pilot is a short standard training."""
    return memory_estimate_bytes(d_in, latent_dim, batch_size, "standard")


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


def check_model_size(settings: dict, path: str) -> None:
    size = model_bytes(path)
    limit = settings["MAX_MODEL_GB"] * 2**30
    if size is not None and size > limit:
        raise TooLarge(f"Refused: the model's weights are {_fmt(size)}, over this app's limit of "
                       f"{settings['MAX_MODEL_GB']:g} GB (MAX_MODEL_GB). Nothing was downloaded.")
