"""Which models and datasets a user may name: a Hub id, or a folder under the configured roots.

A model or dataset is named either as on the Hugging Face Hub (``name`` or ``namespace/name``,
by the Hub's own rules) or as a folder under one of this app's roots (``MODEL_ROOTS``,
``DATASET_ROOTS``; the Hugging Face cache is always one). A folder is resolved (symlinks and
``..`` followed) and must lie inside a root. A Hub id is never opened as a local path: the
loaders take anything that is not absolute for a Hub id, and ``hub_only`` refuses one that a
loader would find on disk relative to the working directory (Transformers and Datasets look
there first), or that names one of Datasets' file-format builders (``json``, ``csv`` …), which
read files from that directory. Every refusal has the same message, which names no server path.
The web process and the worker make the same checks.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import UserError

# The Hub's rules (huggingface_hub.utils.validate_repo_id, in ASCII): each part 1 to 96
# characters of letters, digits, "_", "-" and ".", starting and ending with a letter, digit
# or "_"; no "--" or ".."; not ending in ".git".
_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
HUB_NAME = re.compile(rf"{_PART}(?:/{_PART})?")
HUB_PART_MAX = 96
PATH_PART_MAX = 255  # bytes, as file systems count them

# Datasets' packaged builders: ``load_dataset("json")`` reads the working directory's files.
DATASET_BUILDERS = frozenset({
    "arrow", "audiofolder", "cache", "conll", "csv", "eval", "fasta", "fastq", "genbank", "generator", "harbor",
    "hdf5", "iceberg", "imagefolder", "json", "lance", "meshfolder", "mmcif", "niftifolder", "pandas", "parquet",
    "pdb", "pdffolder", "spark", "sql", "text", "tsfile", "videofolder", "vortex", "webdataset", "xml"})


class PathRefused(UserError, ValueError):
    """The name is neither a Hub name nor a folder under the roots; safe to show."""


def hf_cache(kind: str) -> str:
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - comes with transformers
        return ""
    return constants.HF_HUB_CACHE if kind == "model" else str(Path(constants.HF_HOME) / "datasets")


def roots(settings: dict, kind: str) -> list[Path]:
    configured = settings["MODEL_ROOTS"] if kind == "model" else settings["DATASET_ROOTS"]
    return [Path(r).expanduser().resolve() for r in [*configured, hf_cache(kind)] if r]


def refusal(kind: str) -> PathRefused:
    env = "MODEL_ROOTS" if kind == "model" else "DATASET_ROOTS"
    return PathRefused(f"Refused: this is neither a Hugging Face Hub name (like org/name) nor a folder under "
                       f"this app's {kind} folders ({env}).")


def too_long(name: str) -> PathRefused | None:
    """The refusal for a name with a part longer than any Hub id or file name can be, if it has one."""
    parts = name.replace("\\", "/").split("/")
    if len(name) > 4096 or any(len(p.encode("utf-8", "surrogatepass")) > PATH_PART_MAX for p in parts):
        return PathRefused(f"Too long: a Hub name has at most {HUB_PART_MAX} characters on each side of its /, "
                           f"and a folder name at most {PATH_PART_MAX}.")
    return None


def is_hub_name(name: str) -> bool:
    return bool(HUB_NAME.fullmatch(name)) and "--" not in name and ".." not in name and not name.endswith(".git")


def hub_only(name: str, kind: str) -> str:
    """``name`` as a Hub id that no loader will open as a local path; ``PathRefused`` otherwise."""
    if not is_hub_name(name):
        raise refusal(kind)
    if kind == "dataset" and (name.lower() in DATASET_BUILDERS or name.lower().endswith(".py")):
        raise refusal(kind)
    # Transformers and Datasets try the name as a path in the working directory first.
    if os.path.lexists(name) or (kind == "dataset" and os.path.lexists(name + ".py")):
        raise refusal(kind)
    return name


def _under_a_root(candidate: Path, allowed: list[Path]) -> str | None:
    try:
        folder = candidate.resolve()
        inside = any(root in folder.parents for root in allowed)  # a folder inside a root, never the root
        return str(folder) if inside and folder.is_dir() else None
    except (OSError, RuntimeError, ValueError):  # too long, a symlink loop, …: not a usable folder
        return None


def resolve(name: str, settings: dict, kind: str) -> str:
    """The resolved folder (absolute) for ``name`` under a root, or ``name`` itself when it is a Hub id.

    Raises ``PathRefused`` with a message that is safe to show: the same one for every refused
    name, whatever exists on the server, or one that says the name is too long."""
    name = (name or "").strip()
    if not name or any(ord(c) < 32 or c == "\x7f" for c in name):
        raise refusal(kind)
    if (long := too_long(name)) is not None:
        raise long
    allowed = roots(settings, kind)
    try:
        given = Path(name).expanduser() if name.startswith("~") else Path(name)
    except RuntimeError:  # ~someone who has no home here
        raise refusal(kind) from None
    if given.is_absolute():
        folder = _under_a_root(given, allowed)
        if folder is None:
            raise refusal(kind)
        return folder
    if ".." in Path(name).parts:
        raise refusal(kind)
    for root in allowed:
        folder = _under_a_root(root / name, allowed)
        if folder is not None:
            return folder
    return hub_only(name, kind)
