"""Finding a record or answering 404: shared by the blueprints (this module holds no routes)."""
from __future__ import annotations

from flask import abort


def get_or_404(model, record_id: int, what: str):
    """The ``model`` row with ``record_id``, or a 404 that names ``what`` was looked for."""
    record = model.get_or_none(model.id == record_id)
    if record is None:
        abort(404, description=f"There is no {what} #{record_id}.")
    return record
