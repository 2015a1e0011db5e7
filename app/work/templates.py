"""Templates from the web: create, edit, duplicate and import the user's own (validated by the
caller's form). The built-in presets are written by migrations only (``app/migration_rows.py``)."""
from __future__ import annotations

import math

from ..db import database
from ..errors import UserError
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
                           config=template.config, provenance=template.provenance, builtin=False,
                           sweep=template.sweep)


def import_templates(rows: list[dict], *, created_by: int | None = None) -> None:
    """Create every validated row, or none."""
    with database.atomic():
        for row in rows:
            Template.create(**row, created_by=created_by)


def check_sweep_part(raw, settings: dict) -> tuple[dict | None, list[str]]:
    """A template's sweep (an import, or an API body) checked for shape: ``{"mode": "grid", "axes":
    [...]}`` with axes a sweep accepts, or ``{"mode": "find_l0", "axes": null}``. Returns (the part, errors).
    The values themselves are checked member by member when a sweep starts from it, on its source."""
    from .sweeps import MODES, parse_axes

    if not isinstance(raw, dict) or set(raw) - {"mode", "axes"}:
        return None, ['A sweep is {"mode": "grid", "axes": [{"param": ..., "values": [...]}, ...]} or '
                      '{"mode": "find_l0", "axes": null}.']
    mode = raw.get("mode", "grid")
    if mode not in MODES:
        return None, [f"mode: one of {', '.join(MODES)}."]
    if mode == "find_l0":
        if raw.get("axes") is not None:
            return None, ["axes: the L0 finder's template holds no axes (the finder picks its ladder around the "
                          "target L0 of the form)."]
        return {"mode": mode, "axes": None}, []
    axes, errors = parse_axes(raw.get("axes"), settings)
    if errors:
        return None, [f"{k}: {m}" for k, ms in errors.items() for m in ms]
    for axis in axes:  # JSON lets NaN and Infinity through; no setting takes them, and strict JSON has none
        if any(isinstance(v, float) and not math.isfinite(v) for v in axis["values"]):
            return None, [f"axes: the values of {axis['param']} must be finite numbers."]
    return {"mode": mode, "axes": axes}, []


def describe_sweep_part(part: dict | None) -> str:
    """A sweep template's sweep in words, for its provenance, the template list and the form's note."""
    if not part:
        return ""
    if part.get("mode") == "find_l0":
        return "the L0 finder (a ladder of target L0s around this target, at this width)"
    return "a sweep of " + " × ".join(f"{a['param']} over {', '.join(str(v) for v in a['values'])}"
                                      for a in part.get("axes") or [])


class NoMemberLeft(UserError, ValueError):
    """A sweep whose member runs were all deleted: there is no validated configuration to save."""


def template_from_sweep(sweep, *, name: str, created_by: int | None = None) -> Template:
    """A sweep saved as a template: its base configuration (read from a member's validated configuration:
    the swept settings stand at that member's values, which the axes replace when the sweep starts again),
    its axes and its mode. The L0 finder's template keeps the base's target L0, which its ladder is centred
    on (k with it, where k sets the L0), and no axes: started again on another source or width, the finder
    picks its ladder there."""
    from ..models import TEMPLATE_FIELDS, complete
    from ..sae import architectures

    from .sweeps import group_members, group_of

    sweep = group_of(sweep)[0]  # a sweep split over devices: the sweep as a whole, named by its first part
    member = next(iter(group_members(sweep)), None)
    if member is None:
        raise NoMemberLeft(f"Sweep #{sweep.id} has no member run left to read its configuration from.")
    values = member.config_dict()
    config = {k: values.get(k) for k in TEMPLATE_FIELDS}
    part = {"mode": sweep.mode, "axes": sweep.axes}
    if sweep.mode == "find_l0":
        try:
            target = float(sweep.base.get("target_l0"))
        except (TypeError, ValueError):
            target = None  # the member's target stands; the finder's plan refused anything unreadable
        if target is not None and 0 < target <= 1:
            config["target_l0"] = target
            arch = architectures.find(config.get("architecture"))
            if arch is not None and arch.by_k and config.get("latent_dim"):
                config["k"] = max(1, round(target * config["latent_dim"]))
        part["axes"] = None
    what = "the L0 finder" if sweep.mode == "find_l0" else describe_sweep_part({"mode": sweep.mode, "axes": sweep.axes})
    return Template.create(name=name, created_by=created_by, d_in=sweep.source.d_in, config=complete(config),
                           provenance=f"Saved from sweep #{sweep.id} ({what}) on {sweep.source.name}.", sweep=part)
