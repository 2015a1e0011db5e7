"""The L0 finder: a sweep in mode ``find_l0`` (app/work/sweeps.py) that trains a ladder of target L0s on
the architecture the finder uses, two seeds per rung, and reads the right L0 off the seeds' agreement
(``app.sae.l0_finder``) once its members have ended. The reading is stored on the sweep and on its
source, where the validator turns it into a hint at ``target_l0``."""
from __future__ import annotations

import logging
import math

from ..db import database
from ..models import Sweep, utcnow
from ..sae import architectures
from ..training_config import target_l0_count
from . import lifecycle
from .lifecycle import retry_write
from .sweeps import members_of

log = logging.getLogger(__name__)

FINDER_RUNGS = 5
FINDER_SEEDS = 2  # two seeds per rung: the finder's main reading is how well they agree (see _read_finding)


def finder_plan(base, raw_axes) -> tuple[dict | None, list | None, dict]:
    """The L0 finder's sweep: the base on the finder's architecture, a ladder of target L0s (the caller's
    own ``target_l0`` axis if it gives one, else ``l0_finder.ladder`` around the base's target, from a
    quarter of it to four times it) and two seeds per rung."""
    from ..sae import l0_finder

    if not isinstance(base, dict):
        return None, None, {"base": ["Send the base configuration as a JSON object of the training form's fields."]}
    if raw_axes is not None and not (isinstance(raw_axes, list) and len(raw_axes) == 1 and isinstance(raw_axes[0], dict)
                                     and raw_axes[0].get("param") == "target_l0"):
        return None, None, {"axes": ["The L0 finder sweeps the target L0 alone: give no axes (a ladder is chosen), "
                                     "or one target_l0 axis."]}
    try:
        latents, target = int(base.get("latent_dim")), float(base.get("target_l0"))
        if not 8 <= latents <= 10**8 or not 0 < target <= 1:
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        return None, None, {"latent_dim": ["The finder needs a width (latent_dim) and a target L0 to centre its "
                                           "ladder on: fix them in the form."]}
    base = {**base, "architecture": architectures.for_l0_finder().name, "l1_alpha": None}
    base.pop("k", None)
    rungs = l0_finder.ladder(max(1.0, target_l0_count(target, latents)), FINDER_RUNGS, latent_dim=latents)
    axes = raw_axes or [{"param": "target_l0", "values": [k / latents for k in rungs]}]
    try:
        seed = int(base.get("seed") or 0)
    except (TypeError, ValueError, OverflowError):
        seed = 0
    axes = list(axes) + [{"param": "seed", "values": [seed + i for i in range(FINDER_SEEDS)]}]
    return base, axes, {}


def record_finding(sweep: Sweep, settings: dict) -> None:
    """Read the right L0 off the finder's completed members and record it on the sweep and its source."""
    try:
        finding = read_finding(sweep, settings)
    except Exception:  # noqa: BLE001 - the members' results stand; the reading says it failed
        log.exception("sweep %s: the L0 finder's reading failed", sweep.id)
        finding = {"certainty": "The finder's reading failed (the worker's log says why); the members' own "
                                "results stand.", "curve": []}
    lifecycle.fenced_update(sweep, what="the L0 finder's reading", finding=finding)
    if finding.get("recommended_l0"):
        from ..models import ActivationSet

        def record() -> None:
            with database.atomic():
                source = ActivationSet.get_by_id(sweep.source_id)
                source.params = {**(source.params or {}), "l0_finding": {
                    "sweep_id": sweep.id, "l0_fraction": finding["recommended_l0"] / finding["latent_dim"],
                    "latent_dim": finding["latent_dim"], "reliable": finding["reliable"],
                    "at": utcnow().isoformat(timespec="seconds")}}
                source.save()

        retry_write(record, what="record the L0 finding on its source")


def read_finding(sweep: Sweep, settings: dict) -> dict:
    """The finder's curve and reading from the sweep's completed members (their saved decoders).

    Per rung (target L0): the held-out L0, c_dec (the paper's decoder cosine, lower is better) and,
    where two seeds trained at that rung, their agreement (the mean |cosine| of a one-to-one matching
    of their decoder rows, higher is better). The reading follows the agreement when there is one:
    on our ground-truth sources the paper's c_dec did not find the true L0
    (benchmarks/results/l0_finder.md), so it is shown, not followed."""
    from safetensors.torch import load_file

    from ..sae import l0_finder
    from .training import sae_folder

    runs = [m for m in members_of(sweep) if m.status == "completed" and m.summary and sae_folder(m, settings)]
    rungs: dict[float, list] = {}
    for run in runs:
        rungs.setdefault(run.target_l0, []).append(run)
    latent_dim = runs[0].latent_dim if runs else None
    curve = []
    for target, group in sorted(rungs.items()):
        decoders = [load_file(str(sae_folder(r, settings) / "sae.safetensors"))["W_dec"] for r in group]
        point = {"member_id": group[0].id, "members": [r.id for r in group], "target_l0": target,
                 "l0": sum(r.summary["l0"] for r in group) / len(group),
                 "l0_fraction": sum(r.summary["l0_fraction"] for r in group) / len(group),
                 "fvu": sum(r.summary["fvu"] for r in group) / len(group),
                 "c_dec": sum(l0_finder.decoder_cosine(d) for d in decoders) / len(decoders),
                 "consistency": l0_finder.seed_consistency(decoders[0], decoders[1]) if len(decoders) > 1 else None}
        curve.append(point)
    finding = {"curve": curve, "latent_dim": latent_dim, "recommended_l0": None, "reliable": False}
    use = "consistency" if sum(p["consistency"] is not None for p in curve) >= 3 else "c_dec"
    finding["metric"] = use
    finding["metric_name"] = l0_finder.METRICS.get(use, use)
    for p in curve:
        p["metric"] = p[use]
    usable = [(p["l0"], p["metric"]) for p in curve if p["metric"] is not None]
    if len(usable) < 3:
        finding["certainty"] = (f"Only {len(usable)} rung{'s' if len(usable) != 1 else ''} completed: the finder "
                                "needs at least three to read an L0.")
        return finding
    rec = l0_finder.recommend_l0(usable, metric=use)
    nearest = min(curve, key=lambda p: abs(math.log(p["l0"] / rec.estimate)))
    finding.update({
        "recommended_l0": rec.estimate, "rule": rec.rule, "certainty": rec.certainty, "at_edge": rec.at_edge,
        "shallow": rec.shallow, "bracket": list(rec.bracket), "member_id": nearest["member_id"],
        "reliable": use == "consistency" and rec.at_edge is None and not rec.shallow,
        "train_args": {"from": nearest["member_id"], "target_l0": round(rec.estimate / latent_dim, 6)},
    })
    if use == "c_dec":
        finding["certainty"] += (" This reading follows the paper's decoder cosine alone, which did not find the true "
                                 "L0 on our ground-truth sources: treat it as a hint.")
    return finding
