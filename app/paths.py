"""Which local folders a user may name: only those under the configured roots.

A model or dataset is named either as on the Hugging Face Hub (``org/name``) or as a folder
under one of this app's roots (``MODEL_ROOTS``, ``DATASET_ROOTS``; the Hugging Face cache is
always one). A folder name is resolved (symlinks and ``..`` followed) before the check, and
every refusal has the same message, so the answers do not tell which paths exist on the
server. The web process and the worker make the same check.
"""
from __future__ import annotations

import re
from pathlib import Path

HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?")


class PathRefused(ValueError):
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


def resolve(name: str, settings: dict, kind: str) -> str:
    """The resolved folder for ``name`` under a root, or ``name`` itself when it is a Hub name."""
    name = (name or "").strip()
    env = "MODEL_ROOTS" if kind == "model" else "DATASET_ROOTS"
    refused = PathRefused(f"Refused: this is neither a Hugging Face Hub name (like org/name) nor a folder under "
                          f"this app's {kind} folders ({env}).")
    if not name or "\x00" in name or len(name) > 500:
        raise refused
    allowed = roots(settings, kind)
    given = Path(name).expanduser()
    candidates = [given] if given.is_absolute() else [root / name for root in allowed]
    for candidate in candidates:
        try:
            folder = candidate.resolve()
        except (OSError, RuntimeError):
            continue
        if any(folder == root or root in folder.parents for root in allowed) and folder.is_dir():
            return str(folder)
    if not given.is_absolute() and HUB_NAME.fullmatch(name) and ".." not in name:
        return name
    raise refused
