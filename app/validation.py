"""The pre-training validator: pure functions, a config and source statistics in, findings out.

Each finding has a level — ``error`` blocks the start, ``warning`` must be acknowledged
("start anyway"), ``info`` only informs — the field it concerns, a plain message and,
where there is one, a concrete suggested value. The same findings are shown beside the
form's fields as the user types, answer the JSON API, and are checked again by the worker
before the first step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from . import advice
from .findings import Finding
from .quality import RED_ABOVE, format_target
from .sae import architectures
from .training_config import target_l0_count


@dataclass(frozen=True)
class SourceStats:
    """What the validator needs to know about the activations."""

    d_in: int
    n_tokens: int | None  # None: an unbounded (generated) stream
    name: str = ""
    l0_offset: float = 0.0  # the L0 model's shift for this source, learned from its earlier runs
    runs_seen: int = 0  # how many runs that shift is learned from
    l0_finding: dict | None = None  # the L0 finder's latest reading on this source (app/work/sweeps.py)
    hooks: tuple[str, ...] | None = None  # a streamed source's hook points (None: not streamed)
    corpus_tokens: int | None = None  # a streamed source's training tokens per pass over its corpus, if counted
    corpus_counted: bool = True  # False: the count stopped early; the corpus holds at least corpus_tokens
    resident_bytes: int = 0  # what the source itself holds on the device (a streamed source's model and buffers)


def kept_tokens(steps: int, batch: int, source: SourceStats) -> int:
    """The tokens a streamed run keeps in a store: those it trains on (the stream computes no more), never
    more than one pass over the corpus (a repeated pass is not kept again)."""
    tokens = steps * batch
    return min(tokens, source.corpus_tokens) if source.corpus_tokens is not None and source.corpus_counted else tokens


def kept_store_bytes(tokens: int, d_in: int, dtype: str) -> int:
    """A store's size on disk: each row's activations and its index (token id, document, position)."""
    return tokens * (d_in * (2 if dtype == "float16" else 4) + 12)


def recommended_l1_alpha(d_in: int, latent_dim: int, target_l0: float, steps: int = 3000,
                         batch_size: int = 1024, offset: float = 0.0) -> float:
    """The l1_alpha ``advice.suggest`` gives before any run: the L0 model's value for a run of
    ``steps`` × ``batch_size`` ending at ``target_l0`` (``offset``: the source's learned shift).

    Inside (1e-5, 0.1]. The defaults are the recommended run on a CPU.
    """
    return advice.suggest(advice.Known(d_in, latent_dim, target_l0, steps, batch_size, offset)).l1_alpha


def known_for(cfg: dict, source: SourceStats) -> advice.Known:
    """What ``advice.suggest`` needs of a config (form field names) on ``source``."""
    return advice.Known(source.d_in, cfg["latent_dim"], cfg["target_l0"], cfg["total_steps"], cfg["batch_size"],
                        source.l0_offset, source.runs_seen)


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.2g}%" if fraction < 0.1 else f"{100 * fraction:.0f}%"


def expected_l0_text(low: float, mid: float, high: float) -> str:
    """"expected L0 ≈ 38% (25–50%)"."""
    return f"expected L0 ≈ {_pct(mid)} ({_pct(low)}–{_pct(high)})"


def memory_estimate_bytes(d_in: int, latent_dim: int, batch_size: int, architecture: str) -> int:
    """Parameters, their gradients and both Adam moments, plus the batch's activations (fp32):
    the architecture's own estimate (``Architecture.memory_bytes``)."""
    return architectures.get(architecture).memory_bytes(d_in, latent_dim, batch_size)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


@dataclass(frozen=True)
class Room:
    """The GPUs a job may be placed on, as seen when it is submitted (``app.work.resources.submission_room``):
    a job larger than the largest one's total memory can never run; one larger than the most any of
    them has free now (less the running jobs' reservations) waits in the queue until one has room."""

    total_bytes: int  # the largest GPU's total memory
    total_on: str  # which GPU that is
    free_bytes: int  # the most any GPU has free now, less what is reserved there
    free_on: str


def validate_config(cfg: dict, source: SourceStats, *, free_memory_bytes: int | None = None,
                    device: str = "", room: Room | None = None, free_disk_bytes: int | None = None) -> list[Finding]:
    """All findings for a config (form field names) on ``source``. Pure; no I/O.
    ``free_disk_bytes``: what the data folder has free, for a store the run keeps.

    Memory: at submission ``room`` (the GPUs; an error only when no GPU could ever hold the run,
    information when it will wait for room); in the worker, or with no GPU, ``free_memory_bytes``
    (what ``device`` has free now: an error above it, a warning close to it)."""
    findings: list[Finding] = []
    add = findings.append
    arch = architectures.get(cfg["architecture"])
    latent, d_in, steps, batch = cfg["latent_dim"], source.d_in, cfg["total_steps"], cfg["batch_size"]
    target, lr, alpha, k = cfg["target_l0"], cfg["learning_rate"], cfg.get("l1_alpha"), cfg.get("k")

    if arch.l0_model and alpha is not None:
        _penalty_findings(add, cfg, source)
    if lr > 0.01:
        add(Finding("warning", "learning_rate",
                    f"A learning rate of {lr:g} is far above what SAEs train stably with; losses tend to explode.",
                    "Use about 0.001.", 0.001))

    count = target_l0_count(target, latent)
    if count < 1:
        add(Finding("error", "target_l0", f"A target of {100 * target:.3g}% of {latent:,} latents is {count:.2f} "
                    "latents per token: fewer than one.", f"Use at least {1 / latent:.2g}.", _round(2 / latent)))
    elif not 0.005 <= target <= 0.15:
        add(Finding("warning", "target_l0",
                    f"A target L0 of {100 * target:.3g}% is outside the usual 0.5%–15%: "
                    + ("features this dense are rarely interpretable." if target > 0.15
                       else "so few active latents usually cost most of the reconstruction."),
                    "Use 0.01–0.05.", 0.02))
    if arch.by_k and k is not None and round(count) > k:  # a target typed as a fraction rounds
        add(Finding("error", "target_l0", f"{arch.title} {arch.how_k} = {k}, so a target of {count:,.0f} latents per "
                    "token is unreachable.", f"Set the target to k / latent_dim = {k / latent:.3g}.", _round(k / latent)))
    elif arch.by_k and k is not None and count >= 1 and k > K_AGREE * count:
        # L0 is k by construction: a target well below it is a promise the run cannot keep (a preset
        # whose latent_dim was changed keeps its k while the target, a fraction, scales).
        add(Finding("warning", "k", f"k = {k} and the {format_target(target, latent)} disagree: "
                    f"{arch.title}'s L0 is k, so the run will end {k / count:.1f}× the target.",
                    f"Set k to {max(1, round(count))}, or set the target to {_pct_exact(k / latent)} "
                    f"(k / latent_dim = {k / latent:.4g}).", max(1, round(count))))
    finding = source.l0_finding
    if finding and finding.get("l0_fraction") and count >= 1:
        found = finding["l0_fraction"]
        trust = "" if finding.get("reliable") else " (a rough reading: see the sweep's page for why)"
        if abs(target / found - 1) > 0.25:
            add(Finding("info", "target_l0", f"The L0 finder (sweep #{finding['sweep_id']}) read about "
                        f"{_pct_exact(found)} as the right L0 on this source{trust}; this target is "
                        f"{_pct_exact(target)}.", f"Set the target to {_round(found)}.", _round(found)))
    arch.validate(cfg, source, add)

    if latent <= d_in:
        add(Finding("warning", "latent_dim", f"{latent:,} latents for d_in {d_in} is not overcomplete: an SAE this "
                    "small cannot separate features in superposition.", f"Use at least {4 * d_in:,} (4× d_in).",
                    4 * d_in))
    elif latent > 64 * d_in:
        add(Finding("warning", "latent_dim", f"{latent:,} latents is {latent / d_in:.0f}× d_in {d_in}, beyond the "
                    "64× at which most latents stay dead or split hairs.", f"Use at most {64 * d_in:,}.", 64 * d_in))
    if arch.by_k and k is not None and k > 0.1 * latent:
        add(Finding("warning", "k", f"k = {k} is {100 * k / latent:.0f}% of the latents: the codes will be dense.",
                    f"Use about {max(1, round(0.02 * latent))}.", max(1, round(0.02 * latent))))

    if cfg["lr_warmup_steps"] > steps / 3:
        add(Finding("warning", "lr_warmup_steps", f"The learning-rate warm-up takes {cfg['lr_warmup_steps']:,} of "
                    f"{steps:,} steps, more than a third of the run.", f"Use about {steps // 20:,}.", steps // 20))
    if arch.by_penalty and cfg["l1_warmup_steps"] > steps / 3:
        add(Finding("warning", "l1_warmup_steps", f"The sparsity warm-up takes {cfg['l1_warmup_steps']:,} of "
                    f"{steps:,} steps: the penalty is at full strength for too little of the run to reach sparse "
                    "features.", f"Use about {steps // 20:,}.", steps // 20))

    run_tokens = steps * batch
    window = cfg.get("dead_window_tokens")
    if window and run_tokens < 2 * window:
        add(Finding("info", "dead_window_tokens", f"The run sees {run_tokens:,} tokens, fewer than twice the dead-latent "
                    f"window of {window:,}: a latent will count as dead after {max(1, run_tokens // 2):,} tokens "
                    "without firing (half the run), so that the count is known by the end."))
    hook = (cfg.get("hook_point") or "").strip()
    if source.hooks is None and hook:
        add(Finding("error", "hook_point", f"{source.name or 'This source'} is not streamed from a model, so it has "
                    "no hook points: leave this empty.", "Leave it empty.", ""))
    elif source.hooks is not None and hook and hook not in source.hooks:
        add(Finding("error", "hook_point", f"{hook} is not a hook point of {source.name or 'this source'}; it streams "
                    f"{', '.join(source.hooks)}.", f"Use {source.hooks[0]}.", source.hooks[0]))
    _keep_findings(add, cfg, source, free_disk_bytes)
    if source.corpus_tokens is not None and not source.corpus_counted and steps * batch > source.corpus_tokens:
        add(Finding("info", "total_steps", f"The run consumes {steps * batch:,} tokens; the corpus holds at least "
                    f"{source.corpus_tokens:,} (its count stopped there), so the stream may read it more than once: "
                    "the run will say so if it does."))
    if source.corpus_tokens is not None and source.corpus_counted and steps * batch > source.corpus_tokens:
        passes = steps * batch / source.corpus_tokens
        add(Finding("warning" if passes > 10 else "info", "total_steps",
                    f"The run consumes {steps * batch:,} tokens but the corpus holds {source.corpus_tokens:,} (held-out "
                    f"tokens left out): the stream repeats it {passes:.1f} times"
                    + (", and the SAE may memorise it." if passes > 10 else "."),
                    f"At most {source.corpus_tokens // batch:,} steps reads it once; or stream a longer corpus.",
                    max(10, source.corpus_tokens // batch)))
    if source.n_tokens is not None:
        needed = steps * batch
        epochs = needed / source.n_tokens
        if epochs > 1:
            level = "warning" if epochs > 10 else "info"
            add(Finding(level, "total_steps", f"The run consumes {needed:,} tokens but the source holds "
                        f"{source.n_tokens:,} distinct ones: it repeats them {epochs:.1f} times"
                        + (", and the SAE may memorise them." if level == "warning" else "."),
                        f"At most {source.n_tokens * 10 // batch:,} steps keeps it under 10 passes.",
                        source.n_tokens * 10 // batch))

    if room is not None:
        need = arch.memory_bytes(d_in, latent, batch) + source.resident_bytes
        if need > room.total_bytes:
            add(Finding("error", "batch_size", f"Training needs about {_fmt_bytes(need)} but the largest GPU, "
                        f"{room.total_on}, has {_fmt_bytes(room.total_bytes)} in all: no device could ever run it.",
                        "Lower the batch size or latent_dim."))
        elif need > room.free_bytes:
            add(Finding("info", "batch_size", f"Training needs about {_fmt_bytes(need)}; no GPU has that free now "
                        f"(the most is {_fmt_bytes(room.free_bytes)}, on {room.free_on}). The run will wait in the "
                        "queue until one has room."))
    elif free_memory_bytes:
        need = arch.memory_bytes(d_in, latent, batch) + source.resident_bytes
        where = device or "the device"
        if need > free_memory_bytes:
            add(Finding("error", "batch_size", f"Training needs about {_fmt_bytes(need)} but {where} has "
                        f"{_fmt_bytes(free_memory_bytes)} free.", "Lower the batch size or latent_dim."))
        elif need > 0.8 * free_memory_bytes:
            add(Finding("warning", "batch_size", f"Training needs about {_fmt_bytes(need)} of the "
                        f"{_fmt_bytes(free_memory_bytes)} free on {where}; anything else running may push it over.",
                        "Lower the batch size."))
    return findings


def _keep_findings(add, cfg: dict, source: SourceStats, free_disk_bytes: int | None) -> None:
    """A store kept while streaming: only a streamed source has one to keep, and it must fit on disk."""
    dtype = cfg.get("keep_store") or "no"
    if dtype == "no":
        return
    if source.hooks is None:
        add(Finding("error", "keep_store", f"{source.name or 'This source'} is not streamed from a model: its "
                    "activations are stored or generated already, so there is no store to keep.", "Choose No.", "no"))
        return
    hook = (cfg.get("hook_point") or "").strip() or (source.hooks[0] if source.hooks else "?")
    tokens = kept_tokens(cfg["total_steps"], cfg["batch_size"], source)
    need = kept_store_bytes(tokens, source.d_in, dtype)
    text = (f"The run keeps a {dtype} store of the {tokens:,} tokens it streams at {hook}: about {_fmt_bytes(need)} "
            "on disk, a new source when the run ends.")
    smaller = " or keep it in float16" if dtype == "float32" else ""
    if free_disk_bytes is not None and need > free_disk_bytes:
        add(Finding("error", "keep_store", f"{text[:-1]}, but the data folder has {_fmt_bytes(free_disk_bytes)} free.",
                    f"Choose No, train fewer steps{smaller}, or free some disk.", "no"))
    elif free_disk_bytes is not None and need > 0.8 * free_disk_bytes:
        add(Finding("warning", "keep_store", f"{text} That is most of the {_fmt_bytes(free_disk_bytes)} the data "
                    "folder has free.", f"Train fewer steps{smaller}, or free some disk."))
    else:
        add(Finding("info", "keep_store", text))


def _penalty_findings(add, cfg: dict, source: SourceStats) -> None:
    """What the L0 model expects of this l1_alpha, and the swap with the learning rate.

    A predicted L0 whose range reaches red (above 15%) is a warning unless the expected L0
    is on the target (then a target that dense has its own finding); so is an expected L0
    more than 3× above the target or 5× below it (``advice.penalty_problem``). The value
    suggested is ``advice.suggest``'s, which stays clear of all three.
    Otherwise the prediction is shown as information beside the field, with the value that
    lands on the target if it misses by more than 1.5×.
    """
    latent, steps, target, lr, alpha = (cfg["latent_dim"], cfg["total_steps"], cfg["target_l0"],
                                        cfg["learning_rate"], cfg["l1_alpha"])
    known, d_in = known_for(cfg, source), source.d_in
    rec = advice.suggest(known).l1_alpha
    low, mid, high = advice.penalty_state(known, alpha)
    expected = expected_l0_text(low, mid, high)
    if source.runs_seen:
        expected += f", after {source.runs_seen} earlier run{'s' if source.runs_seen > 1 else ''} on this source"
    fix, value = f"Set l1_alpha to about {rec:.2g} (expected to end at the target).", _round(rec)
    steering = bool(cfg.get("steer_l1_alpha"))
    problem = advice.penalty_problem(known, alpha)
    dense, starved, over = problem == "dense", problem == "starved", problem == "over"
    # A value the L0 model puts within reach of the target is a penalty, whatever it looks like.
    swapped = problem is not None and (alpha == lr or (alpha < 1e-3 and lr >= 3e-3 and lr / alpha >= 10))
    if swapped and alpha == lr:
        add(Finding("warning", "l1_alpha", f"l1_alpha equals the learning rate ({alpha:g}). Did you swap them? "
                    f"l1_alpha is the sparsity penalty, not a step size; at {alpha:g}, {expected}.", fix, value))
    elif swapped:
        add(Finding("warning", "l1_alpha", f"l1_alpha {alpha:g} looks like a learning rate and learning_rate {lr:g} "
                    f"like a penalty. Did you swap them? At this l1_alpha, {expected}.",
                    f"Set l1_alpha to about {rec:.2g} and learning_rate to about 0.001.", value))
    elif steering:  # the controller moves l1_alpha to the target: the prediction is where it starts from
        add(Finding("info", "l1_alpha", f"Steering is on: it moves l1_alpha after the warm-up until L0 holds the "
                    f"{format_target(target, latent)}. Left alone, this l1_alpha would give {expected}.",
                    *((fix, value) if dense or starved or over else (None, None))))
    elif dense:
        verdict = "dense" if mid > RED_ABOVE else "possibly dense"
        add(Finding("warning", "l1_alpha", f"At l1_alpha {alpha:g} for {latent:,} latents on d_in {d_in} over "
                    f"{steps:,} steps, {expected}: {verdict}. The {format_target(target, latent)} needs a "
                    "stronger penalty.", fix, value))
    elif over:
        add(Finding("warning", "l1_alpha", f"At l1_alpha {alpha:g} for {latent:,} latents over {steps:,} steps, "
                    f"{expected}: {mid / target:.1f}× the {format_target(target, latent)}, denser than the SAE "
                    "asked for.", fix, value))
    elif starved:
        add(Finding("warning", "l1_alpha", f"At l1_alpha {alpha:g}, {expected}, {target / mid:.0f}× below the "
                    f"{format_target(target, latent)}: the reconstruction will suffer and latents will likely die.",
                    fix, value))
    else:
        on_target = advice.on_target(known, alpha)
        add(Finding("info", "l1_alpha", f"{expected[0].upper()}{expected[1:]} over {steps:,} steps "
                    f"({format_target(target, latent)}).", *((None, None) if on_target else (fix, value))))


K_AGREE = 1.5  # k and target_l0 × latent_dim further apart than this disagree


def _pct_exact(fraction: float) -> str:
    return f"{100 * fraction:.3g}%"


def _round(value: float) -> float:
    """Two significant figures: what a person would type."""
    if value == 0:
        return 0.0
    return float(f"{value:.2g}")


def blocking(findings: list[Finding], *, acknowledged: bool) -> list[Finding]:
    """The findings that stop a start: every error, and warnings unless acknowledged."""
    return [f for f in findings if f.level == "error" or (f.level == "warning" and not acknowledged)]


MIN_SETTLE_STEPS = 2000
MAX_SETTLE_PASSES = 5
MIN_BATCH = 64


def recommend_settings(source: SourceStats, *, latent_dim: int, target_l0: float, architecture: str,
                       on_gpu: bool) -> dict[str, tuple[float | int, str]]:
    """Settings that work for this source, latent_dim and target, each with a one-line reason."""
    batch = 4096 if on_gpu else 1024
    why_batch = "keeps the GPU busy" if on_gpu else "fits a CPU's caches while averaging out noise"
    if source.n_tokens is None:
        steps, why_steps = (20_000 if on_gpu else 3000), "the synthetic stream never repeats; enough steps to settle"
    else:
        # L0 settles slowly: the target is reached after about MIN_SETTLE_STEPS
        # (MiniLM, 1,536 latents: 4× the target at 300 steps, 1.5× at 1,000, 1.03× at 2,000).
        # A small source gets smaller batches, so those steps stay within a few passes.
        fit = 2 ** int(math.log2(max(1, source.n_tokens * MAX_SETTLE_PASSES // MIN_SETTLE_STEPS)))
        if fit < batch:
            batch = max(MIN_BATCH, fit)
            passes = MIN_SETTLE_STEPS * batch / source.n_tokens
            why_batch = (f"small enough that {MIN_SETTLE_STEPS:,} steps take at most {MAX_SETTLE_PASSES} passes over "
                         f"the source's {source.n_tokens:,} tokens" if passes <= MAX_SETTLE_PASSES else
                         f"the smallest that still averages out noise; even so {MIN_SETTLE_STEPS:,} steps pass over "
                         f"the source's {source.n_tokens:,} tokens {passes:.1f} times (extract more tokens to avoid it)")
        steps = max(MIN_SETTLE_STEPS, min(50_000, 3 * source.n_tokens // batch))
        why_steps = (f"three passes over the source's {source.n_tokens:,} tokens, and at least {MIN_SETTLE_STEPS:,} "
                     "steps: L0 settles only then (up to 50,000 steps)")
    lr = 1e-3 if latent_dim <= 16_384 else _round(1e-3 * math.sqrt(16_384 / latent_dim))
    out: dict[str, tuple[float | int, str]] = {
        "learning_rate": (lr, "Adam at 1e-3 trains SAEs stably up to 16k latents; larger dictionaries take a "
                              "proportionally smaller step"),
        "batch_size": (batch, why_batch),
        "total_steps": (steps, why_steps),
        "lr_warmup_steps": (max(10, steps // 20), "5% of the run: Adam's moment estimates settle first"),
        "l1_warmup_steps": (max(10, steps // 20), "5% of the run: the penalty at full strength from the start "
                                                  "kills latents before they find features"),
    }
    arch = architectures.find(architecture)  # an unknown one gets the shared settings; its field says why
    if arch is not None:
        arch.recommend(out, source=source, latent_dim=latent_dim, target_l0=target_l0, steps=steps, batch=batch)
    return out
