"""The SAE trainer: takes any activation source, reports through callbacks.

One step: draw a batch, normalize it by the source's scale ``c``, compute the loss,
clip gradients, take an Adam step, apply the model's weight constraint. Metrics are
accumulated as device tensors and read only on logging steps, so a step has no
host-device synchronisation.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from .metrics import DeadLatentTracker, WindowAccumulator, evaluate
from .models import SparseAutoencoder, build_sae, resample_dead_latents
from .sources import ActivationSource, normalization_scale


@dataclass
class TrainConfig:
    """Everything that defines a training run. ``l1_alpha`` is the sparsity penalty."""

    latent_dim: int
    architecture: str = "standard"
    l1_alpha: float | None = None
    k: int | None = None
    learning_rate: float = 1e-3
    batch_size: int = 1024
    total_steps: int = 2000
    lr_warmup_steps: int = 100
    l1_warmup_steps: int = 200
    lr_decay_fraction: float = 0.2  # linear decay to 0 over this final share of the steps
    seed: int = 0
    log_every: int = 20
    dead_window_tokens: int = 200_000
    grad_clip: float = 1.0
    dead_latent_remedy: str = "none"  # standard SAE: "none" or "resample" (TopK always uses AuxK)
    norm_sample_tokens: int = 8192
    eval_tokens: int = 8192
    device: str = "auto"

    def check(self) -> None:
        """Raise ``ValueError`` for a config the core cannot train.

        The core allows ``l1_alpha = 0`` (a dense baseline); the form's range is stricter.
        A missing penalty is never defaulted.
        """
        if self.architecture == "standard":
            if self.l1_alpha is None:
                raise ValueError("l1_alpha (the sparsity penalty) is required for a standard SAE")
            if not (math.isfinite(self.l1_alpha) and self.l1_alpha >= 0):
                raise ValueError(f"l1_alpha must be a finite number >= 0, got {self.l1_alpha}")
        elif self.architecture == "topk":
            if self.k is None or not 1 <= self.k <= self.latent_dim:
                raise ValueError(f"k must lie in [1, latent_dim], got {self.k}")
        else:
            raise ValueError(f"unknown architecture {self.architecture!r}")
        if self.dead_latent_remedy not in ("none", "resample"):
            raise ValueError(f"unknown dead-latent remedy {self.dead_latent_remedy!r}")
        for name in ("latent_dim", "batch_size", "total_steps", "log_every", "dead_window_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not self.learning_rate > 0:
            raise ValueError("learning_rate must be positive")


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


def train(source: ActivationSource, cfg: TrainConfig, *,
          on_log: LogCallback | None = None,
          on_start: Callable[[dict], None] | None = None,
          should_stop: Callable[[], str | None] | None = None,
          l1_alpha_control: Callable[[LogPoint], float] | None = None,
          ) -> tuple[TrainResult, SparseAutoencoder]:
    """Train an SAE on ``source`` as ``cfg`` says.

    ``on_start(info)`` is called once with the device and normalization scale.
    ``on_log(point)`` is called every ``cfg.log_every`` steps and at the last step; it may
    return a reason string to stop the run. ``should_stop()`` is polled every step (keep it
    cheap) and stops the run when it returns a reason. ``l1_alpha_control(point)``, if
    given, returns the l1_alpha to use after each log point. Raises ``NonFiniteLoss``
    when the loss is NaN or Inf.
    """
    cfg.check()
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    if source.n_tokens is not None and cfg.batch_size > source.n_tokens:
        raise ValueError(f"batch size {cfg.batch_size} exceeds the source's {source.n_tokens} training tokens")

    scale = normalization_scale(source.sample(cfg.norm_sample_tokens, device=device))
    sae = build_sae(cfg.architecture, source.d_in, cfg.latent_dim, k=cfg.k, generator=g, device=device)
    with torch.no_grad():
        # Start the decoder bias at the mean activation: the first reconstructions are
        # then the mean rather than the origin.
        sae.b_dec.copy_(source.sample(cfg.norm_sample_tokens, device=device).mean(dim=0) * scale)
    optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    if on_start:
        on_start({"device": str(device), "norm_scale": scale, "d_in": source.d_in})

    tracker = DeadLatentTracker(cfg.latent_dim, cfg.dead_window_tokens, device)
    window = WindowAccumulator(device)
    base_l1_alpha = cfg.l1_alpha or 0.0
    use_aux = cfg.architecture == "topk"
    resample = cfg.architecture == "standard" and cfg.dead_latent_remedy == "resample"
    # Resample once per dead-latent window, never in the last fifth of training (a fresh
    # latent needs time to settle before the run ends).
    resample_every = max(cfg.log_every, math.ceil(cfg.dead_window_tokens / cfg.batch_size))
    resample_until = int(cfg.total_steps * 0.8)
    resampled = 0
    batches = source.batches(cfg.batch_size, seed=cfg.seed, device=device)
    tokens = 0
    last: LogPoint | None = None
    window_start = time.perf_counter()
    result_status, reason, step = "completed", None, 0

    for step in range(cfg.total_steps):
        if should_stop is not None:
            reason = should_stop()
            if reason:
                result_status = "stopped"
                break
        x = next(batches) * scale
        alpha = l1_alpha_at(step, cfg, base_l1_alpha)
        dead_mask = tracker.dead_mask() if use_aux else None
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
            last = LogPoint(
                step=step + 1, tokens=tokens, loss=values["loss"], mse=values["mse"],
                sparsity_loss=values["sparsity_loss"], l1=values["l1"], l0=values["l0"],
                l0_fraction=values["l0"] / cfg.latent_dim, fvu=values["fvu"],
                dead=int(tracker.dead_count().item()) if tracker.known else None,
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
    else:
        step = cfg.total_steps

    sae.eval()
    eval_metrics = evaluate(sae, source.eval_rows(cfg.eval_tokens, device=device) * scale)
    eval_metrics["dead"] = int(tracker.dead_count().item()) if tracker.known else None
    eval_metrics["resampled_latents"] = resampled
    result = TrainResult(status=result_status, steps=step, tokens=tokens, norm_scale=scale,
                         device=str(device), reason=reason, eval=eval_metrics, last=last)
    return result, sae
