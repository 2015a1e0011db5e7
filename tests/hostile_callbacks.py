"""A function a hostile job names as its callback: it writes the file named by CALLBACK_MARKER,
so a test can tell whether the worker ever called it. Importable by the worker under test only
because that test puts this folder on its PYTHONPATH."""
from __future__ import annotations

import os
from pathlib import Path


def mark(*args, **kwargs) -> None:
    Path(os.environ["CALLBACK_MARKER"]).write_text("the callback ran")
