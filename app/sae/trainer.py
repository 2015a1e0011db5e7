"""The SAE trainer: takes any activation source, reports through callbacks.

One step: draw a batch, normalize it by the source's scale ``c``, compute the loss,
clip gradients, take an Adam step, apply the model's weight constraint. Metrics are
accumulated as device tensors and read only on logging steps, so a step has no
host-device synchronisation.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, make_dataclass

import torch

from ..training_config import BY_NAME, K_ARCHITECTURES, PARAMS, matryoshka_levels, parse_prefixes

from .metrics import DeadLatentTracker, WindowAccumulator, evaluate
from .models import SparseAutoencoder, build_sae, resample_dead_latents
from .sources import ActivationSource, normalization_scale


def _required_numbers(architecture: str) -> tuple[str, ...]:
    """The numeric hyper-parameters only ``architecture`` and a few others use (``Param.required_for``)."""
    return tuple(p.name for p in PARAMS if p.core and p.is_numeric and p.required_for is not None
                 and p.applies_to(architecture))


def _check(self) -> None:
    """Raise ``ValueError`` for a config the core cannot train.

    The core allows ``l1_alpha = 0`` (a dense baseline); the form's range is stricter.
    A missing penalty is never defaulted.
    """
    if self.architecture == "standard":
        if self.l1_alpha is None:
            raise ValueError("l1_alpha (the sparsity penalty) is required for a standard SAE")
        if not (math.isfinite(self.l1_alpha) and self.l1_alpha >= 0):
            raise ValueError(f"l1_alpha must be a finite number >= 0, got {self.l1_alpha}")
    elif self.architecture in K_ARCHITECTURES:
        if self.k is None or not 1 <= self.k <= self.latent_dim:
            raise ValueError(f"k must lie in [1, latent_dim], got {self.k}")
        if self.architecture == "matryoshka":
            sizes = parse_prefixes(self.matryoshka_prefixes)
            if sizes and sizes[-1] >= self.latent_dim:
                raise ValueError(f"matryoshka prefixes must be smaller than latent_dim, got {sizes}")
    elif self.architecture == "jumprelu":
        if self.target_l0 is None or not 0 < self.target_l0 * self.latent_dim <= self.latent_dim:
            raise ValueError(f"a JumpReLU SAE needs a target L0 in (0, 1], got {self.target_l0}")
        for name in _required_numbers(self.architecture):  # the L0 penalty weight and the bandwidth
            value = getattr(self, name)
            if value is None or not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number for a JumpReLU SAE, got {value}")
    else:
        raise ValueError(f"unknown architecture {self.architecture!r}")
    if self.dead_latent_remedy not in ("none", "resample"):
        raise ValueError(f"unknown dead-latent remedy {self.dead_latent_remedy!r}")
    for name in ("latent_dim", "batch_size", "total_steps", "log_every", "dead_window_tokens",
                 "checkpoint_every_steps"):
        if getattr(self, name) < 1:
            raise ValueError(f"{name} must be at least 1")
    if not self.learning_rate > 0:
        raise ValueError("learning_rate must be positive")


def _config_fields() -> list:
    """The hyper-parameters the core uses (from ``app.training_config``), then the core's own settings.

    A value that only one architecture uses (``l1_alpha``, ``k``) defaults to None: the
    penalty is never filled in silently.
    """
    fields = [(p.name, p.type | None, field(default=None)) if p.required_for else (p.name, p.type, field(default=p.default))
              for p in PARAMS if p.core]
    return fields + [
        ("lr_decay_fraction", float, field(default=0.2)),  # linear decay to 0 over this final share of the steps
        ("grad_clip", float, field(default=1.0)),
        ("norm_sample_tokens", int, field(default=8192)),
        ("eval_tokens", int, field(default=8192)),
        ("device", str, field(default="auto")),
    ]


TrainConfig = make_dataclass("TrainConfig", _config_fields(), namespace={"check": _check})
TrainConfig.__doc__ = ("Everything that defines a training run (``l1_alpha`` is the sparsity penalty): the "
                       "hyper-parameters of app.training_config, and the core's fixed settings.")


@dataclass
class LogPoint:
    """One logged metric point; means over the tokens since the previous point."""

    step: int
    tokens: int
    loss: float
    mse: float
    sparsity_loss: float
    l1: float
    l0: float
    l0_fraction: float
    fvu: float
    dead: int | None  # None until dead_window_tokens have been seen
    lr: float
    l1_alpha: float
    tokens_per_s: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    status: str  # "completed" or "stopped"
    steps: int
    tokens: int
    norm_scale: float
    device: str
    reason: str | None = None
    eval: dict = field(default_factory=dict)
    last: LogPoint | None = None


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or Inf; ``step`` says where."""

    def __init__(self, step: int, last: LogPoint | None) -> None:
        super().__init__(f"loss became NaN or Inf at step {step}")
        self.step, self.last = step, last


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a run uses on ``device``: "auto" is bfloat16 where matmuls run fast in it
    (CUDA from compute capability 8, CPUs with AVX512-BF16 or AMX), else float32; "tf32" is
    float32 off CUDA."""
    if precision == "auto":
        if device.type == "cuda":
            fast = torch.cuda.get_device_capability(device)[0] >= 8
        else:
            fast = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return "bfloat16" if fast else "float32"
    if precision == "tf32" and device.type != "cuda":
        return "float32"
    return precision


def precision_context(precision: str, device: torch.device):
    """The context a training step runs in: bfloat16 autocast, TF32 matmuls, or plain float32."""
    if precision == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    return contextlib.nullcontext()


def dead_window(cfg) -> int:
    """The dead-latent window the run can fill: the configured one, or half the run's tokens if it is shorter.

    A run that never sees the configured window would otherwise end with its dead latents
    "not yet known"; half the run leaves the second half to count them over.
    """
    return max(1, min(cfg.dead_window_tokens, cfg.total_steps * cfg.batch_size // 2))


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up from 0, constant, then linear decay to 0 over the last steps."""
    if cfg.lr_warmup_steps and step < cfg.lr_warmup_steps:
        return (step + 1) / cfg.lr_warmup_steps
    decay_steps = int(cfg.total_steps * cfg.lr_decay_fraction)
    decay_start = cfg.total_steps - decay_steps
    if decay_steps and step >= decay_start:
        return max(0.0, (cfg.total_steps - step) / decay_steps)
    return 1.0


def l1_alpha_at(step: int, cfg: TrainConfig, l1_alpha: float) -> float:
    """``l1_alpha`` ramped linearly from 0 over the sparsity warm-up steps."""
    if cfg.l1_warmup_steps and step < cfg.l1_warmup_steps:
        return l1_alpha * (step + 1) / cfg.l1_warmup_steps
    return l1_alpha


LogCallback = Callable[[LogPoint], "str | None"]
CHECKPOINT_FORMAT = 1


@dataclass
class Checkpointing:
    """When to hand the trainer's whole state to ``save``: every ``every_steps`` steps or
    ``every_s`` seconds, whichever comes first (checked on logging steps), and when the run
    stops before its end. ``save`` must write the state out before it returns: its tensors
    are the live ones."""

    save: Callable[[dict], None]
    every_steps: int
    every_s: float


def train(source: ActivationSource, cfg: TrainConfig, *,
          on_log: LogCallback | None = None,
          on_start: Callable[[dict], None] | None = None,
          should_stop: Callable[[], str | None] | None = None,
          l1_alpha_control: Callable[[LogPoint], float] | None = None,
          checkpointing: Checkpointing | None = None,
          resume: dict | None = None,
          ) -> tuple[TrainResult, SparseAutoencoder]:
    """Train an SAE on ``source`` as ``cfg`` says.

    ``on_start(info)`` is called once with the device and normalization scale.
    ``on_log(point)`` is called every ``cfg.log_every`` steps and at the last step; it may
    return a reason string to stop the run. ``should_stop()`` is polled every step (keep it
    cheap) and stops the run when it returns a reason. ``l1_alpha_control(point)``, if
    given, returns the l1_alpha to use after each log point. Raises ``NonFiniteLoss``
    when the loss is NaN or Inf.

    ``checkpointing`` saves the state (weights, Adam, schedule, random generators, the
    dead-latent tracker, the open metric window, the step and with it the source's read
    position) as it says; ``resume``, a state saved so, continues from it. On the CPU a
    resumed run takes exactly the steps an uninterrupted one would: same batches, same
    updates, bit-identical weights.
    """
    cfg.check()
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    if source.n_tokens is not None and cfg.batch_size > source.n_tokens:
        raise ValueError(f"batch size {cfg.batch_size} exceeds the source's {source.n_tokens} training tokens")

    sae = build_sae(cfg.architecture, source.d_in, cfg.latent_dim, k=cfg.k, generator=g, device=device,
                    target_l0=(cfg.target_l0 or 0) * cfg.latent_dim,
                    l0_coefficient=cfg.l0_coefficient or BY_NAME["l0_coefficient"].default,
                    bandwidth=cfg.jumprelu_bandwidth or BY_NAME["jumprelu_bandwidth"].default,
                    levels=matryoshka_levels(cfg.matryoshka_prefixes, cfg.latent_dim))
    optimizer = torch.optim.Adam(sae.param_groups(cfg.learning_rate), lr=cfg.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    tracker = DeadLatentTracker(cfg.latent_dim, dead_window(cfg), device)
    window = WindowAccumulator(device)
    base_l1_alpha = cfg.l1_alpha or 0.0
    resampled, tokens, start_step, last = 0, 0, 0, None
    if resume is None:
        raw = source.sample(cfg.norm_sample_tokens, device=device)  # read once: it sets c, b_dec and θ
        scale = normalization_scale(raw)
        with torch.no_grad():
            # Start the decoder bias at the mean activation: the first reconstructions are
            # then the mean rather than the origin.
            sample = raw * scale
            sae.b_dec.copy_(sample.mean(dim=0))
            if hasattr(sae, "calibrate_thresholds"):  # JumpReLU starts at its target L0
                sae.calibrate_thresholds(sample)
    else:
        check_resumable(resume, cfg, source.d_in)
        scale = float(resume["norm_scale"])
        sae.load_state_dict(resume["sae"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        tracker.load_state_dict(resume["tracker"])
        window.load_state_dict(resume["window"])
        torch.set_rng_state(resume["rng"]["torch"])
        g.set_state(resume["rng"]["generator"])
        if device.type == "cuda" and resume["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(resume["rng"]["cuda"], device)
        base_l1_alpha = float(resume["base_l1_alpha"])
        resampled, tokens, start_step = int(resume["resampled"]), int(resume["tokens"]), int(resume["step"])
        last = LogPoint(**resume["last"]) if resume.get("last") else None
    precision = resolve_precision(cfg.precision, device)
    step_context = precision_context(precision, device)
    if on_start:
        on_start({"device": str(device), "norm_scale": scale, "d_in": source.d_in, "resumed_from": start_step,
                  "precision": precision, "dead_window": dead_window(cfg)})

    def state(at_step: int) -> dict:
        return {
            "format": CHECKPOINT_FORMAT, "step": at_step, "tokens": tokens, "norm_scale": scale,
            "architecture": cfg.architecture, "d_in": source.d_in, "latent_dim": cfg.latent_dim,
            "sae": sae.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "tracker": tracker.state_dict(), "window": window.state_dict(), "base_l1_alpha": base_l1_alpha,
            "resampled": resampled, "last": asdict(last) if last else None,
            "rng": {"torch": torch.get_rng_state(), "generator": g.get_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
        }

    use_aux = cfg.architecture in K_ARCHITECTURES or cfg.architecture == "jumprelu"
    resample = cfg.architecture == "standard" and cfg.dead_latent_remedy == "resample"
    # Resample once per dead-latent window, never in the last fifth of training (a fresh
    # latent needs time to settle before the run ends).
    resample_every = max(cfg.log_every, math.ceil(cfg.dead_window_tokens / cfg.batch_size))
    resample_until = int(cfg.total_steps * 0.8)
    batches = source.batches(cfg.batch_size, seed=cfg.seed, device=device, start=start_step)
    window_start = saved_at = time.perf_counter()
    saved_step = start_step
    # AuxK runs only while latents are dead; whether any are is read on logging steps, where
    # the host reads the device anyway, so the step itself never waits for the answer.
    aux_active = use_aux and tracker.known and bool(tracker.dead_count().item())
    result_status, reason, step = "completed", None, start_step

    for step in range(start_step, cfg.total_steps):
        if should_stop is not None:
            reason = should_stop()
            if reason:
                result_status = "stopped"
                break
        x = next(batches) * scale
        alpha = l1_alpha_at(step, cfg, base_l1_alpha)
        dead_mask = tracker.dead_mask() if aux_active else None
        with step_context:
            parts, x_hat, f = sae.loss(x, l1_alpha=alpha, dead_mask=dead_mask)
        optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        lr_used = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        sae.after_step()
        tracker.update(f.detach())
        if resample and (step + 1) % resample_every == 0 and step < resample_until and tracker.known:
            mask = tracker.dead_mask()
            count = resample_dead_latents(sae, optimizer, x, mask, generator=g if device.type == "cpu" else None)
            if count:
                tracker.since_fired.masked_fill_(mask, 0)  # each gets a fresh window to prove itself
                resampled += count
        window.add(loss=parts.total, mse=parts.mse, sparsity=parts.sparsity, l1=parts.l1, f=f, x=x, x_hat=x_hat)
        tokens += x.shape[0]

        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.total_steps:
            values = window.read()
            if not math.isfinite(values["loss"]):
                raise NonFiniteLoss(step + 1, last)
            elapsed = max(time.perf_counter() - window_start, 1e-9)
            dead = int(tracker.dead_count().item()) if tracker.known else None
            aux_active = use_aux and bool(dead)
            last = LogPoint(
                step=step + 1, tokens=tokens, loss=values["loss"], mse=values["mse"],
                sparsity_loss=values["sparsity_loss"], l1=values["l1"], l0=values["l0"],
                l0_fraction=values["l0"] / cfg.latent_dim, fvu=values["fvu"], dead=dead,
                lr=lr_used, l1_alpha=alpha,
                tokens_per_s=window.tokens / elapsed,
            )
            window.reset()
            window_start = time.perf_counter()
            if l1_alpha_control is not None:
                base_l1_alpha = float(l1_alpha_control(last))
            if on_log is not None:
                reason = on_log(last)
                if reason:
                    result_status = "stopped"
                    step += 1
                    break
            due = (step + 1 - saved_step >= cfg.checkpoint_every_steps
                   or time.perf_counter() - saved_at >= cfg.checkpoint_every_minutes * 60)
            if checkpointing is not None and due and step + 1 < cfg.total_steps:
                checkpointing.save(state(step + 1))
                saved_at, saved_step = time.perf_counter(), step + 1
    else:
        step = cfg.total_steps

    if checkpointing is not None and result_status == "stopped":
        checkpointing.save(state(step))
    sae.eval()
    eval_metrics = evaluate(sae, source.eval_rows(cfg.eval_tokens, device=device) * scale)
    eval_metrics["dead"] = int(tracker.dead_count().item()) if tracker.known else None
    eval_metrics["resampled_latents"] = resampled
    result = TrainResult(status=result_status, steps=step, tokens=tokens, norm_scale=scale,
                         device=str(device), reason=reason, eval=eval_metrics, last=last)
    return result, sae


def check_resumable(state: dict, cfg: TrainConfig, d_in: int) -> None:
    """Refuse a checkpoint that is not of this run's shape (a changed source, a stray file)."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"the checkpoint's format {state.get('format')!r} is not {CHECKPOINT_FORMAT}")
    mine = {"architecture": cfg.architecture, "d_in": d_in, "latent_dim": cfg.latent_dim}
    theirs = {key: state.get(key) for key in mine}
    if mine != theirs:
        raise ValueError(f"the checkpoint holds {theirs}, but this run is {mine}")
    if not 0 <= int(state["step"]) <= cfg.total_steps:
        raise ValueError(f"the checkpoint's step {state['step']} lies outside this run's {cfg.total_steps} steps")
