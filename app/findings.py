"""One finding: what the validator says about a config and what a runtime rule says about a run.

Pure Python; ``app.validation`` and ``app.quality`` both make them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Finding:
    """``level``: ``error`` (blocks a start, or ends a run), ``warning`` or ``info``. ``field``: the form
    field it concerns (validator) or the rule's code (runtime, also ``code``). ``suggestion``: the
    concrete change, ``suggested_value`` the value it names. ``stop``: the status a run must end with
    ("stopped_early" or "failed"), for a runtime finding that ends it."""

    level: str
    field: str
    message: str
    suggestion: str | None = None
    suggested_value: float | int | None = None
    stop: str | None = None

    @property
    def code(self) -> str:
        return self.field

    def to_dict(self) -> dict:
        out = asdict(self)
        if out["stop"] is None:
            del out["stop"]
        return out
