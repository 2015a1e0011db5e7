"""Sweeps: many SAEs trained together on one pass over the data.

A sweep is a base configuration and one or two axes, each a list of values for one setting
(``SWEEPABLE``). Its members, one per combination, are ordinary ``Training`` rows linked to it:
each has its own page, chart, verdict, checkpoints, features, export and downstream evaluation.
They are never queued alone: one job (``run_sweep``) claims every queued member and trains them
on the same batches (``app.sae.trainer.train_many``), each with its own heartbeat, stop check,
checkpoints and end, so a member may stop early, fail or be cancelled while the rest train on.

Every member passes the same form validation as a run of its own before anything is created;
an error in any member refuses the whole sweep, and a warning is acknowledged once for all.
Members share the batch size and the data order (the base configuration's seed); a seed axis
varies each member's initial weights.

The L0 finder is a sweep in mode ``find_l0``: its plan and its reading are ``app/work/finder.py``.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import math
from dataclasses import dataclass, field

from ..db import database
from ..errors import UserError
from ..models import RESUMABLE_STATUSES, Sweep, Training, utcnow
from ..sae import architectures
from . import lifecycle
from .lifecycle import Superseded, retry_write, update_record

log = logging.getLogger(__name__)

# the settings a sweep may vary; everything else is the base configuration's
SWEEPABLE = ("target_l0", "k", "l1_alpha", "latent_dim", "architecture", "learning_rate", "seed", "hook_point")
MAX_AXES = 2
MAX_VALUES = 12
MODES = ("grid", "find_l0")


class SweepRefused(UserError, ValueError):
    """A sweep that cannot be created or changed as asked; the message says why."""


@dataclass
class MemberCheck:
    """One member's configuration and what the form's validation said about it."""

    label: str  # "target_l0 = 0.01, latent_dim = 1024"
    payload: dict
    fields: dict | None = None  # the validated run fields, when valid
    errors: dict = field(default_factory=dict)
    findings: list = field(default_factory=list)


@dataclass
class SweepCheck:
    axes: list[dict]
    members: list[MemberCheck]
    errors: dict = field(default_factory=dict)  # the sweep's own fields: axes, values, size, memory
    findings: list = field(default_factory=list)  # the sweep's own (memory of all members together)
    base: dict = field(default_factory=dict)  # the configuration every member starts from
    parts: list[list[int]] | None = None  # members (by index) per part, when no one GPU holds them all

    @property
    def ok(self) -> bool:
        return not self.errors and all(m.fields is not None for m in self.members)


def max_members(settings: dict) -> int:
    return int(settings.get("SWEEP_MAX_MEMBERS", 16))


def axes_from_text(pairs: list[tuple[str, str]]) -> tuple[list[dict], dict[str, list[str]]]:
    """The browser's axes: (setting, "v1, v2, v3") pairs, blank pairs skipped; numbers where they parse."""
    axes, errors = [], {}
    for i, (param, text) in enumerate(pairs, start=1):
        param, text = (param or "").strip(), (text or "").strip()
        if not param and not text:
            continue
        if not param or not text:
            errors[f"sweep_values_{i}"] = ["Choose a setting and give its values, separated by commas."]
            continue
        values = [v.strip() for v in text.replace(";", ",").split(",") if v.strip()]
        axes.append({"param": param, "values": [_number(v) for v in values]})
    if not axes and not errors:
        errors["sweep_values_1"] = ["Choose a setting to sweep and give two or more values, separated by commas."]
    return axes, errors


def _number(text: str):
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if number.is_integer() and "." not in text and "e" not in text.lower() else number


def parse_axes(raw, settings: dict) -> tuple[list[dict], dict[str, list[str]]]:
    """``[{"param": name, "values": [...]}, ...]`` checked: known settings, one or two axes, distinct
    settings, a bounded list of values each. Values are left as given (the form checks each)."""
    errors: dict[str, list[str]] = {}
    if not isinstance(raw, list) or not raw:
        return [], {"axes": [f"Give one or two axes: a list of {{\"param\": one of {', '.join(SWEEPABLE)}, "
                             "\"values\": [...]}}."]}
    if len(raw) > MAX_AXES:
        return [], {"axes": [f"A sweep has at most {MAX_AXES} axes; this one has {len(raw)}."]}
    axes = []
    for i, axis in enumerate(raw):
        key = f"axes.{i}"
        if not isinstance(axis, dict) or set(axis) - {"param", "values"}:
            errors[key] = ['Each axis is {"param": <setting>, "values": [<value>, ...]}.']
            continue
        param, values = axis.get("param"), axis.get("values")
        if param not in SWEEPABLE:
            errors[key] = [f"{param!r} cannot be swept; choose one of {', '.join(SWEEPABLE)}."]
            continue
        if not isinstance(values, list) or not values:
            errors[key] = [f"Give {param} a list of values."]
            continue
        if len(values) > MAX_VALUES:
            errors[key] = [f"At most {MAX_VALUES} values per axis; {param} has {len(values)}."]
            continue
        if any(isinstance(v, (list, dict)) or v is None for v in values):
            errors[key] = [f"Each value of {param} is a single number or name."]
            continue
        if len({str(v) for v in values}) != len(values):
            errors[key] = [f"The values of {param} repeat one another."]
            continue
        if any(a["param"] == param for a in axes):
            errors[key] = [f"{param} is already an axis."]
            continue
        axes.append({"param": param, "values": list(values)})
    if not errors:
        size = math.prod(len(a["values"]) for a in axes)
        if size < 2:
            errors["axes"] = ["A sweep has at least two members; give an axis two or more values."]
        elif size > max_members(settings):
            errors["axes"] = [f"This sweep would have {size} members; the limit is {max_members(settings)} "
                              "(SWEEP_MAX_MEMBERS). Use fewer values."]
    return axes, errors


def member_payloads(base: dict, axes: list[dict]) -> list[tuple[str, dict]]:
    """One configuration per combination of the axes' values (the first axis varies slowest), each
    with its sparsity knobs kept consistent (``align``) and named for what it varies."""
    out = []
    for combo in itertools.product(*[a["values"] for a in axes]):
        changes = {a["param"]: v for a, v in zip(axes, combo, strict=True)}
        payload = align({**base, **changes}, set(changes))
        label = ", ".join(f"{k} = {v}" for k, v in changes.items())
        payload["name"] = f"{base.get('name') or 'sweep'} · {label}"[:200]
        out.append((label, payload))
    return out


def align(payload: dict, varied: set[str]) -> dict:
    """Keep a member's k and target L0 in step when the sweep varies one of them (or the width, or the
    architecture): an architecture that sets its L0 by k gets k = target × latents (or the target from
    a swept k); one that does not gets no k."""
    try:
        arch = architectures.get(str(payload.get("architecture")))
    except KeyError:
        return payload  # the form names the bad architecture
    try:
        latents = int(payload["latent_dim"])
        if not 1 <= latents <= 10**8:
            return payload  # the form names the bad width
    except (KeyError, TypeError, ValueError, OverflowError):
        return payload
    if arch.by_k:
        if "k" in varied:
            try:
                payload["target_l0"] = float(payload["k"]) / latents
            except (TypeError, ValueError, OverflowError):
                pass
        elif varied & {"target_l0", "latent_dim", "architecture"}:
            try:
                payload["k"] = max(1, round(float(payload["target_l0"]) * latents))
            except (TypeError, ValueError, KeyError, OverflowError):
                pass
    return payload


def check_sweep(base: dict, raw_axes, settings: dict, *, to_formdata=None, mode: str = "grid",
                device: str | None = None) -> SweepCheck:
    """Validate every member with the training form (the one validation path), and the sweep's size
    and memory: nothing is created here. ``to_formdata`` maps a member's configuration onto the form
    (the API's JSON mapping by default; the browser's form posts its own fields)."""
    from ..forms import TrainingForm, json_to_formdata

    to_formdata = to_formdata or json_to_formdata

    axes, errors = parse_axes(raw_axes, settings)
    check = SweepCheck(axes, [], errors)
    if errors:
        return check
    if not isinstance(base, dict):
        check.errors["base"] = ["Send the base configuration as a JSON object of the training form's fields."]
        return check
    if base.get("name") is not None and not isinstance(base["name"], str):
        check.errors["name"] = ["The name is text."]
        return check
    check.base = {k: v for k, v in base.items() if k not in ("acknowledge_warnings", "csrf_token")}
    for label, payload in member_payloads(base, axes):
        member = MemberCheck(label, payload)
        formdata, errors = to_formdata(payload)
        if formdata is None:
            member.errors = errors
        else:
            form = TrainingForm(formdata=formdata, meta={"csrf": False})
            valid = form.validate()
            for name, messages in form.errors.items():
                errors.setdefault(name, messages)
            member.errors = errors
            member.findings = list(form.findings)
            if valid and not errors:
                member.fields = form.training_fields()
        check.members.append(member)
    if check.ok:
        check.findings = memory_findings(check, settings, mode=mode, device=device)
        if any(f.level == "error" for f in check.findings):
            check.errors["axes"] = [f.message for f in check.findings if f.level == "error"]
    return check


def split(needs: list[int], capacity: int) -> list[list[int]] | None:
    """Members (by index, each needing ``needs[i]``) in few parts whose needs each fit ``capacity``: from
    the fewest the total allows, the first count of parts at which the largest-first balance (each member
    into the part holding least so far) fits, or else first-fit (each into the first part with room).
    None if one member alone does not fit. Each part lists its members in order."""
    if any(n > capacity for n in needs):
        return None
    order = sorted(range(len(needs)), key=lambda i: (-needs[i], i))
    k = max(1, math.ceil(sum(needs) / capacity))
    while True:  # with one member per part everything fits, so this ends
        parts: list[list[int]] = [[] for _ in range(k)]
        load = [0] * k
        for i in order:  # balanced
            j = min(range(k), key=lambda j: (load[j], j))
            parts[j].append(i)
            load[j] += needs[i]
        if max(load) > capacity:
            parts, load = [[] for _ in range(k)], [0] * k
            for i in order:  # first fit
                j = next((j for j in range(k) if load[j] + needs[i] <= capacity), None)
                if j is None:
                    break
                parts[j].append(i)
                load[j] += needs[i]
            else:
                return [sorted(p) for p in parts if p]
            k += 1
            continue
        return [sorted(p) for p in parts if p]


# A part is sized to this share of the largest GPU's total memory: a GPU never has all of it free
# (the CUDA context, the driver), and placement admits a job only against what is free.
PART_SHARE = 0.9


def memory_findings(check: SweepCheck, settings: dict, *, mode: str = "grid", device: str | None = None) -> list:
    """Every member's estimate added up (the sweep trains them together on one device), against the
    GPUs (``resources.submission_room``). When no GPU could ever hold them all, a grid sweep is split
    into parts that each fit ``PART_SHARE`` of the largest GPU (``check.parts``), each trained by its own
    job on a device with room; refused when one member alone (with the source's model, for a streamed
    source) fits no GPU, for the L0 finder (its reading needs its ladder in one job), and for a sweep
    that names its device (its parts would all wait for that one). When none has room now, the sweep
    (or each part) waits in the queue for one."""
    from ..findings import Finding
    from ..models import ActivationSet
    from ..validation import memory_estimate_bytes

    first = check.members[0].fields
    source = ActivationSet.get_or_none(ActivationSet.id == first["source_id"]) if first.get("source_id") else None
    if source is None:
        return []
    needs = [memory_estimate_bytes(source.d_in, m.fields["latent_dim"], m.fields["batch_size"],
                                   m.fields["architecture"]) for m in check.members]
    from .resources import resident_bytes, submission_room

    resident = resident_bytes(source)
    need = sum(needs) + resident
    disk = _store_findings(check, source, settings)
    if disk:
        return disk

    room = submission_room(settings)
    gib = need / 2**30
    members = len(check.members)
    if room is not None and need > room.total_bytes:
        unsplit = {"find_l0": " The L0 finder trains its ladder in one job, so it is not split over devices.",
                   "device": " A sweep that names its device is not split over devices: name none to let it be."}
        why = unsplit["find_l0"] if mode == "find_l0" else unsplit["device"] if device else None
        if why:
            return [Finding("error", "axes", f"The {members} members together need about {gib:.1f} GiB on one GPU, "
                                             f"but the largest GPU, {room.total_on}, has "
                                             f"{room.total_bytes / 2**30:.1f} GiB in all: no device could ever run "
                                             "them together." + why, "Use fewer or narrower members, or a smaller "
                                                                    "batch.")]
        usable = int(PART_SHARE * room.total_bytes) - resident
        parts = split(needs, usable) if usable > 0 else None
        if parts is None:
            widest = max(needs) + resident
            return [Finding("error", "axes", f"A member alone needs about {widest / 2**30:.1f} GiB"
                                             + (f" with the source's model ({resident / 2**30:.1f} GiB)" if resident
                                                else "") + f", but the largest GPU, {room.total_on}, has "
                                             f"{room.total_bytes / 2**30:.1f} GiB in all: no device could ever run it.",
                            "Use narrower members, or a smaller batch.")]
        check.parts = parts
        part_needs = [sum(needs[i] for i in p) + resident for p in parts]
        sizes = ", ".join(f"{n / 2**30:.1f}" for n in part_needs)
        wait = (f" No GPU has room for the largest part now (the most free is {room.free_bytes / 2**30:.1f} GiB, on "
                f"{room.free_on}): a part waits in the queue until one has." if max(part_needs) > room.free_bytes
                else "")
        return [Finding("info", "axes", f"The {members} members together need about {gib:.1f} GiB, more than the "
                                        f"largest GPU, {room.total_on}, holds ({room.total_bytes / 2**30:.1f} GiB): "
                                        f"the sweep is split into {len(parts)} parts ({sizes} GiB), each trained by "
                                        "its own job on a GPU with room, reading the data itself"
                                        + (" (each runs the source's model)" if resident else "") + ". Members of "
                                        "one part share each batch; the parts see the same batches in the same "
                                        "order." + wait)]
    if room is not None and need > room.free_bytes:
        return [Finding("info", "axes", f"The {members} members together need about {gib:.2f} GiB on one GPU; none "
                                        f"has that free now (the most is {room.free_bytes / 2**30:.1f} GiB, on "
                                        f"{room.free_on}). The sweep will wait in the queue until one has room.")]
    return [Finding("info", "axes", f"The {members} members together need about {gib:.2f} GiB "
                                    f"({'GPU' if room is not None else 'memory'}).")]


def kept_hooks(members, source) -> dict[str, str]:
    """The stores a sweep keeps while streaming: one per hook point that a member keeping one reads
    (members on one hook point share it), with its dtype."""
    hooks: dict[str, str] = {}
    first = (source.params or {}).get("hooks") or [""]
    for m in members:
        dtype = m.get("keep_store") if isinstance(m, dict) else m.keep_store
        hook = (m.get("hook_point") if isinstance(m, dict) else m.hook_point) or first[0]
        if dtype and dtype != "no":
            hooks.setdefault(hook, dtype)
    return hooks


def _store_findings(check: SweepCheck, source, settings: dict) -> list:
    """The stores a streamed sweep keeps, together, against the data folder's free disk (each member's
    own check counted its own)."""
    from ..devices import disk_free
    from ..findings import Finding
    from ..validation import kept_store_bytes, kept_tokens

    hooks = kept_hooks([m.fields for m in check.members], source)
    if not hooks or source.kind != "streamed":
        return []
    first = check.members[0].fields
    tokens = kept_tokens(first["total_steps"], first["batch_size"], source.stats())
    need = sum(kept_store_bytes(tokens, source.d_in, dtype) for dtype in hooks.values())
    free = disk_free(settings["DATA_DIR"])
    if free is not None and need > free:
        return [Finding("error", "axes", f"The sweep keeps {len(hooks)} stores while streaming ({', '.join(hooks)}): "
                                         f"about {need / 2**30:.2f} GiB, but the data folder has "
                                         f"{free / 2**30:.2f} GiB free.",
                        "Keep none, keep them in float16, or train fewer steps.")]
    return []


def create_sweep(check: SweepCheck, *, name: str, mode: str, settings: dict, created_by: int | None,
                 requested_device: str | None = None) -> Sweep:
    """Store a checked sweep and its members (queued, in one transaction) and put its one job on the queue;
    split into parts (``check.parts``), one sweep and one job per part. Returns the sweep (its first part)."""
    assert check.ok
    first = check.members[0].fields
    parts = check.parts or [list(range(len(check.members)))]

    def write() -> list[Sweep]:
        with database.atomic():
            made: list[Sweep] = []
            for number, indices in enumerate(parts, start=1):
                sweep = Sweep.create(name=name or "sweep", source=first["source_id"], base=check.base,
                                     axes=check.axes, mode=mode, created_by=created_by, status="queued",
                                     queued_at=utcnow(), requested_device=requested_device,
                                     part_of=made[0].id if made else None, part=number, parts=len(parts))
                for i in indices:
                    Training.create(**{**check.members[i].fields, "created_by": created_by, "sweep": sweep.id,
                                       "status": "queued", "queued_at": utcnow()})
                made.append(sweep)
            return made

    made = retry_write(write, what="create sweep")
    try:
        for sweep in made:
            lifecycle.enqueue(sweep, settings)
    except lifecycle.queue.QueueUnavailable:
        def undo() -> None:
            # a part already queued may have been claimed meanwhile: it is cancelled instead (its job,
            # and the job of a part deleted here, find their row gone or ended and do nothing)
            with database.atomic():
                for sweep in made:
                    if Sweep.delete().where((Sweep.id == sweep.id) & (Sweep.status == "queued")).execute():
                        Training.delete().where(Training.sweep == sweep.id).execute()

        retry_write(undo, what="undo create sweep")
        for sweep in made:
            if Sweep.get_or_none(Sweep.id == sweep.id) is not None:
                cancel_sweep(sweep)
        raise
    return made[0]


def members_of(sweep: Sweep) -> list[Training]:
    """The members this sweep's own job trains (one part's, for a split sweep)."""
    return list(Training.select().where(Training.sweep == sweep.id).order_by(Training.id))


def group_of(sweep: Sweep) -> list[Sweep]:
    """Every part of the sweep ``sweep`` belongs to, in order (itself alone when it was not split)."""
    if (sweep.parts or 1) <= 1:
        return [sweep]
    head = sweep.part_of or sweep.id
    return list(Sweep.select().where((Sweep.id == head) | (Sweep.part_of == head)).order_by(Sweep.part, Sweep.id))


def group_members(sweep: Sweep) -> list[Training]:
    """The members of every part: the whole sweep, as its page and the API show it."""
    ids = [part.id for part in group_of(sweep)]
    return list(Training.select().where(Training.sweep.in_(ids)).order_by(Training.id))


def group_status(parts: list[Sweep]) -> str:
    """One status for a split sweep: running while any part runs, queued while any waits, and once all
    have ended the worst of their ends (failed, interrupted, cancelled) or completed."""
    statuses = {p.status for p in parts}
    for status in ("running", "queued", "failed", "interrupted", "cancelled", "stopped_early"):
        if status in statuses:
            return status
    return "completed"


def cancel_sweep(sweep: Sweep) -> None:
    """Cancel the sweep (every part of it) and every member still queued or running (a database write only)."""
    parts = group_of(sweep)
    for part in parts:  # every part first: none is claimed afterwards to train members already cancelled
        part = Sweep.get_by_id(part.id)
        if part.is_active:
            lifecycle.request_cancel(part)
    for part in parts:
        for run in members_of(part):
            if run.is_active:
                lifecycle.request_cancel(run)


def resume_group(sweep: Sweep, settings: dict) -> Sweep:
    """Resume every part of the sweep that has ended with members to resume (``resume_sweep`` on each);
    a part still queued or running is left as it is. Refused when no part can be resumed."""
    parts = group_of(sweep)
    if len(parts) == 1:
        return resume_sweep(sweep, settings)
    resumed, refusal, unqueued = [], None, None
    for part in parts:
        if part.is_active:
            continue
        try:
            resume_sweep(part, settings)
            resumed.append(part.part)
        except SweepRefused as exc:
            refusal = exc
        except lifecycle.queue.QueueUnavailable as exc:
            unqueued = exc
    if unqueued is not None:
        if not resumed:
            raise unqueued
        raise SweepRefused(f"Parts {', '.join(map(str, resumed))} were resumed, but the queue was unavailable for the "
                           f"others ({unqueued}): resume the sweep again once the queue is back.")
    if not resumed:
        raise refusal or SweepRefused(f"Every part of sweep {parts[0].id} is queued or running; resume it once "
                                      "a part has ended.")
    return Sweep.get_by_id(sweep.id)


def resume_sweep(sweep: Sweep, settings: dict, *, only: Training | None = None) -> Sweep:
    """Queue the sweep's job again for its resumable members (or ``only`` that one): each continues from
    its own checkpoint on the sweep's batches; members that ended stay as they are."""
    from .training import NotResumable, resume_training

    if sweep.is_active:
        raise SweepRefused(f"Sweep {sweep.id} is {sweep.status}; resume it once it has ended.")
    candidates = [only] if only is not None else [m for m in members_of(sweep) if m.status in RESUMABLE_STATUSES]
    resumed = []
    for run in candidates:
        try:
            resume_training(run, settings, enqueue=False)
            resumed.append(run)
        except NotResumable as exc:
            if only is not None:
                raise
            log.info("sweep %s: member %s is not resumed: %s", sweep.id, run.id, exc)
    if not resumed:
        raise SweepRefused("No member of this sweep can be resumed (none was interrupted, or none has a checkpoint).")

    def undo(why: str) -> None:
        for run in resumed:
            update_record(run, only_if=("queued",), what="undo resume", status="interrupted", reason=why)

    before = {"status": sweep.status, "reason": sweep.reason, "finished_at": sweep.finished_at,
              "cancel_requested": sweep.cancel_requested}
    if not update_record(sweep, only_if=RESUMABLE_STATUSES + ("completed",), what="resume sweep", status="queued",
                         reason=None, finished_at=None, cancel_requested=False, queued_at=utcnow()):
        undo("The sweep changed while it was being resumed: resume it again.")
        raise SweepRefused("The sweep changed meanwhile; reload the page.")
    try:
        lifecycle.enqueue(Sweep.get_by_id(sweep.id), settings)
    except lifecycle.queue.QueueUnavailable:
        update_record(sweep, what="undo resume sweep", **before)
        undo("The queue was unavailable when the sweep was resumed: resume it again.")
        raise
    return Sweep.get_by_id(sweep.id)


# --- what the sweep page and the API show -----------------------------------------------

SUGGESTION_RULE = ("Among the members that completed on target (held-out L0 within ±25% of the target) with a green "
                   "grade, the one with the lowest FVU on held-out activations.")
SPARSITY_CAVEAT = (" This sweep varies the sparsity, and reconstruction alone always favours the densest member: "
                   "a lower FVU at a higher L0 does not mean better features. The L0 finder says which L0 is right.")


def member_rows(sweep: Sweep) -> list[dict]:
    """One row per member: what it varies, its status, L0 against its target, FVU, dead latents, grade,
    downstream score and, on a synthetic source, its MCC (from its feature statistics)."""
    from ..models import FeatureJob
    from ..quality import grade

    rows = []
    part_of = {p.id: p.part for p in group_of(sweep)}
    for run in group_members(sweep):
        summary = run.summary or {}
        latest = run.latest_metric() if summary.get("l0_fraction") is None else None
        l0_fraction = summary.get("l0_fraction", latest.l0_fraction if latest else None)
        fvu = summary.get("fvu", latest.fvu if latest else None)
        dead = summary.get("dead", latest.dead if latest else None)
        gt = None
        job = (run.feature_jobs.where(FeatureJob.status == "completed").order_by(FeatureJob.id.desc()).first())
        if job is not None:
            gt = ((job.summary or {}).get("ground_truth") or {}).get("mcc")
        downstream = summary.get("downstream") or {}
        rows.append({
            "id": run.id, "name": run.name, "status": run.status, "label": _label(sweep, run),
            "values": {a["param"]: getattr(run, a["param"]) for a in sweep.axes}, "step": run.step,
            "total_steps": run.total_steps, "architecture": run.architecture, "latent_dim": run.latent_dim,
            "target_l0": run.target_l0, "l0_fraction": l0_fraction, "fvu": fvu, "dead": dead,
            "grade": grade(l0_fraction, dead, run.latent_dim) if l0_fraction is not None else None,
            "downstream_score": downstream.get("score"), "downstream_name": downstream.get("score_name"),
            "mcc": gt, "final": summary.get("l0_fraction") is not None, "reason": run.reason,
            "part": part_of.get(run.sweep_id, 1),
        })
    return rows


def _label(sweep: Sweep, run: Training) -> str:
    return ", ".join(f"{a['param']} = {getattr(run, a['param'])}" for a in sweep.axes)


def suggestion(sweep: Sweep, rows: list[dict]) -> dict | None:
    """The member the page suggests and why (``SUGGESTION_RULE``); None while no member qualifies."""
    if sweep.finding and sweep.finding.get("member_id"):
        chosen = next((r for r in rows if r["id"] == sweep.finding["member_id"]), None)
        if chosen is not None:
            return {"row": chosen, "why": sweep.finding.get("rule", "the L0 finder's reading")}
    on_target = [r for r in rows if r["final"] and r["status"] == "completed" and r["grade"] == "green"
                 and r["l0_fraction"] and abs(r["l0_fraction"] / r["target_l0"] - 1) <= 0.25]
    if not on_target:
        return None
    best = min(on_target, key=lambda r: (r["fvu"], r["l0_fraction"]))
    varies_sparsity = any(a["param"] in ("target_l0", "k", "l1_alpha") for a in sweep.axes)
    return {"row": best, "why": SUGGESTION_RULE + (SPARSITY_CAVEAT if varies_sparsity else "")}


def status_counts(sweep_ids: list[int]) -> dict[int, dict[str, int]]:
    """How many members of each sweep are in each status (one query)."""
    from peewee import fn

    counts: dict[int, dict[str, int]] = {}
    if not sweep_ids:
        return counts
    query = (Training.select(Training.sweep, Training.status, fn.COUNT(Training.id).alias("n"))
             .where(Training.sweep.in_(sweep_ids)).group_by(Training.sweep, Training.status).tuples())
    for sweep_id, status, n in query:
        counts.setdefault(sweep_id, {})[status] = n
    return counts


# --- in the worker ----------------------------------------------------------------------

def run_sweep(sweep_id: int) -> str:
    """Train every queued member of one sweep on shared batches; return the sweep's final status."""
    return lifecycle.run_job(Sweep, sweep_id, _train_sweep)


def _train_sweep(sweep: Sweep, settings: dict, stop_check: lifecycle.StopCheck) -> str:
    from ..sae.trainer import train_many
    from .streams import keeping_for
    from .training import RunSession, build_source

    source = build_source(sweep.source, settings["DATA_DIR"], settings)
    members = []
    with contextlib.ExitStack() as beats:
        for run in retry_write(lambda: [m for m in members_of(sweep) if m.status == "queued"], what="members"):
            entry = {"attempt": run.attempt + 1, "worker": lifecycle.worker_name(), "device": sweep.placed_on,
                     "device_key": sweep.placed_on, "reserved_bytes": 0, "sweep": sweep.id,
                     "at": utcnow().isoformat(timespec="seconds")}
            if not lifecycle.claim(run, placed_on=sweep.placed_on, reserved_bytes=0, wait_reason=None,
                                   attempts_log=(run.attempts_log or []) + [entry]):
                continue  # cancelled (or deleted) while the sweep waited
            heartbeat = beats.enter_context(lifecycle.Heartbeat(run, settings["HEARTBEAT_S"]))
            own = lifecycle.StopCheck(run, heartbeat)
            session = RunSession(run, settings, own)
            try:
                with session.keeping_points():
                    member = session.member(source)
            except Exception as exc:  # noqa: BLE001 - this member fails alone
                _member_failed(run, settings, exc)
                continue
            member.should_stop = _either(stop_check, own)
            member.on_error = lambda exc, run=run, session=session: _member_error(run, session, settings, exc)
            members.append(member)
        keeping = None
        if members:
            keepers = [m for m in members_of(sweep) if m.keep_store != "no"]  # ended ones too: their stores go on
            # a sweep split into parts keeps each hook point's store once: in the first part that reads it
            earlier = [m for p in group_of(sweep) if p.part < sweep.part for m in members_of(p) if m.keep_store != "no"]
            keeping = keeping_for(sweep, keepers, settings, source, skip=set(kept_hooks(earlier, sweep.source)),
                                  notify=lambda hook, *event: _tell(keepers, sweep.source, hook, *event))
            train_many(source, members, data_seed=int(sweep.base.get("seed") or 0))
    if sweep.mode == "find_l0":
        from .finder import record_finding

        record_finding(sweep, settings)
    if stop_check.interrupted:
        lifecycle.finish(sweep, "interrupted", reason=f"{stop_check.interrupted} Each member kept its checkpoint: "
                                                      "Resume continues the sweep.")
    elif retry_write(lambda: Sweep.get_by_id(sweep.id).cancel_requested, what="cancel check"):
        lifecycle.finish(sweep, "cancelled", reason="Cancelled by the user.")
    else:
        lifecycle.finish(sweep, "completed")
    if keeping is not None:
        keeping.settle(lifecycle.ended_as(sweep))
    return lifecycle.ended_as(sweep) or "superseded"


def _tell(members: list[Training], source, hook: str | None, level: str, code: str, message: str,
          suggestion: str | None) -> None:
    """An event about a store the sweep kept, on each member that reads its hook point (all, for ``None``)."""
    first = ((source.params or {}).get("hooks") or [""])[0]
    for run in members:
        if hook is None or (run.hook_point or first) == hook:
            lifecycle.add_event(run.id, level, code, message, suggestion=suggestion, attempt=run.attempt)


def _either(sweep_stop, own_stop):
    """A member stops when its sweep does (shutdown, the sweep cancelled) or when it alone is cancelled."""
    def should_stop() -> str | None:
        why = sweep_stop()
        if why:
            own_stop.interrupted = sweep_stop.interrupted
            return why
        return own_stop()

    return should_stop


def _member_error(run: Training, session, settings: dict, exc: BaseException) -> None:
    if not isinstance(exc, Superseded):
        try:
            session.writer.flush()  # the last good points are kept
        except Exception:  # noqa: BLE001
            pass
    _member_failed(run, settings, exc)


def _member_failed(run: Training, settings: dict, exc: BaseException) -> None:
    """Record one member's failure as a run of its own would be (``lifecycle.outcome``); the sweep goes on."""
    def again():
        raise exc

    try:
        lifecycle.outcome(run, settings, again)
    except Exception:  # noqa: BLE001 - outcome raises it again for RQ; in a sweep it ends this member only
        log.exception("sweep member %s failed", run.id)


def need_bytes(sweep: Sweep) -> int:
    """The memory of every queued member together (what the sweep reserves on its device)."""
    from ..validation import memory_estimate_bytes

    from .resources import resident_bytes

    d_in = sweep.source.d_in
    return resident_bytes(sweep.source) + sum(memory_estimate_bytes(d_in, m.latent_dim, m.batch_size, m.architecture)
                                              for m in members_of(sweep) if m.status == "queued")


def _interrupted(sweep: Sweep, reason: str, settings: dict) -> None:
    """A sweep marked interrupted (its worker died or stalled) takes its running members with it: their
    heartbeats share its process, so they are as dead as its own."""
    for run in members_of(sweep):
        if run.status == "running":
            lifecycle.mark_interrupted(run, f"{reason} (It was a member of sweep {sweep.id}.)", settings)


lifecycle.register(lifecycle.JobKind(Sweep, "sweep", "app.work.sweeps.run_sweep", interrupted=_interrupted))
