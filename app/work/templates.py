"""Templates from the web: create, edit, duplicate and import the user's own (validated by the
caller's form). The built-in presets are written by migrations only (``app/migration_rows.py``)."""
from __future__ import annotations

from ..db import database
from ..models import Template


def create_template(*, name: str, d_in: int | None, config: dict, provenance: str,
                    created_by: int | None = None) -> Template:
    return Template.create(name=name, created_by=created_by, d_in=d_in, config=config, provenance=provenance)


def update_template(template: Template, *, name: str, d_in: int | None, config: dict, provenance: str) -> None:
    """Write an edit; an edited preset is the user's own from then on (no longer built in)."""
    Template.update(name=name, d_in=d_in, provenance=provenance, config=config, builtin=False).where(
        Template.id == template.id).execute()


def duplicate_template(template: Template, *, created_by: int | None = None) -> Template:
    return Template.create(name=f"{template.name} (copy)", created_by=created_by, d_in=template.d_in,
                           config=template.config, provenance=template.provenance, builtin=False)


def import_templates(rows: list[dict], *, created_by: int | None = None) -> None:
    """Create every validated row, or none."""
    with database.atomic():
        for row in rows:
            Template.create(**row, created_by=created_by)
