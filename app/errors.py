"""What a user may be shown: errors they caused, and text with secrets and server paths removed.

Pure Python with no imports from the rest of the app, so every layer (the ML core included)
can raise a ``UserError`` and every layer can ``redact`` a message before it is stored or shown.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the app's folder (as app.config names it)


class UserError(Exception):
    """An error the user caused (a bad input, a file in the wrong format, a request too large
    for the machine). Its message is written for them: a job that meets one fails with the
    message as it is (no exception type, no traceback) and does not re-raise it."""


def redact(text: str | None) -> str | None:
    """A message as shown to users: every URL's password masked (``redis://:secret@host`` →
    ``redis://:***@host``) and no absolute server paths (``DATA_DIR``, the app's folder, home)."""
    if not text:
        return text
    text = re.sub(r"(//[^:/@\s]*:)[^@/\s]*@", r"\1***@", text)
    for path, label in ((os.environ.get("DATA_DIR"), "DATA_DIR"), (str(ROOT), "<app>"),
                        (os.path.expanduser("~"), "~")):
        if path and len(path) > 1:
            text = text.replace(path, label)
    return text
