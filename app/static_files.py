"""Static files (style.css, htmx, app.js) under URLs that name their content, cached for a year.

Every page links its scripts and style sheet through ``url_for('static', ...)``, which adds ``v=`` (the
first 12 hex digits of the file's SHA-256). A response to a URL whose ``v`` is the file's current hash
may be kept a year; any other (no ``v``, an old one, a file no page links) is revalidated on every use,
as Flask serves static files by default. So a browser fetches the three files once, not on every page
it opens, and a new release is fetched at once, since its files' URLs change.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from flask import Flask, request
from werkzeug.security import safe_join

YEAR_S = 365 * 24 * 3600


def install(app: Flask) -> None:
    versions: dict[str, str | None] = {}  # only the files that pages link: url_for fills it, never a request

    def version(filename: str) -> str | None:
        if filename not in versions or app.debug:  # debug: the files may change under a running server
            path = safe_join(str(app.static_folder), filename)
            try:
                versions[filename] = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12] if path else None
            except OSError:
                versions[filename] = None
        return versions[filename]

    @app.url_defaults
    def _static_version(endpoint, values):
        if endpoint == "static" and "filename" in values and "v" not in values:
            v = version(values["filename"])
            if v:
                values["v"] = v

    def max_age(filename: str | None) -> int | None:
        given = request.args.get("v")
        if filename and given and versions.get(filename) == given:
            return YEAR_S
        return None  # Flask's default: revalidate

    app.get_send_file_max_age = max_age
