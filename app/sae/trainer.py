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

from ..training_config import PARAMS

from . import architectures

from .metrics import DeadLatentTracker, WindowAccumulator, evaluate
from .models import SparseAutoencoder, build_sae, resample_dead_latents
from .sources import ActivationSource, normalization_scale


def _check(self) -> None:
    """Raise ``ValueError`` for a config the core cannot train.

    The core allows ``l1_alpha = 0`` (a dense baseline); the form's range is stricter.
    A missing penalty is never defaulted.
    """
    architectures.get(self.architecture).check(self)
    if self.dead_latent_remedy not in ("none", "resample"):
        raise ValueError(f"unknown dead-latent remedy {self.dead_latent_remedy!r}")
    for name in ("latent_dim", "batch_size", "total_steps", "log_every", "dead_window_tokens",
                 "checkpoint_every_steps"):
        if getattr(self, name) < 1:
            raise ValueError(f"{name} must be at least 1")
    if self.aux_window_tokens is not None and self.aux_window_tokens < 1:
        raise ValueError("aux_window_tokens must be at least 1")
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


def aux_window(cfg) -> int:
    """How long a latent may stay silent before AuxK gives it gradient: ``aux_window_tokens``, never
    longer than the dead-latent window (a run stored before the setting existed has none: the
    dead-latent window, as it then trained)."""
    window = dead_window(cfg)
    return window if cfg.aux_window_tokens is None else max(1, min(cfg.aux_window_tokens, window))


def adam(groups: list[dict], lr: float) -> torch.optim.Adam:
    """Adam with torch's fused kernel where the parameters' device has one (CUDA; the CPU since torch
    2.4): one pass over each tensor instead of a dozen, the same update up to rounding. In a 256 × 1,024
    SAE's training on one CPU thread Adam took 1.0 ms a step against 1.6 ms (of about 15 ms); on a GPU,
    where small steps wait on kernel launches, it saves more. A torch without it gets the per-tensor
    loop. A resumed run keeps the choice its checkpoint was made with (its saved parameter groups)."""
    try:
        from torch.optim.optimizer import _device_dtype_check_for_fused as check
    except ImportError:  # an older torch, whose constructor checks
        check = None
    try:
        if check is not None:  # a recent torch checks the device only at the first step: here, before it
            for group in groups:
                for param in group["params"]:
                    check(param)
        return torch.optim.Adam(groups, lr=lr, fused=True)
    except (RuntimeError, ValueError, TypeError):  # no fused kernel for this device or dtype in this torch
        return torch.optim.Adam(groups, lr=lr)


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


@dataclass
class Member:
    """One SAE to train, with how it reports (see ``train``). ``on_end(result, sae)`` is called as
    soon as this member ends (its last step, its stop, or its cancel), while the others train on;
    ``on_error(exc)``, when given, takes an exception that ends this member alone (without it the
    exception ends the whole call)."""

    cfg: TrainConfig
    on_log: LogCallback | None = None
    on_start: Callable[[dict], None] | None = None
    should_stop: Callable[[], str | None] | None = None
    l1_alpha_control: Callable[[LogPoint], float] | None = None
    checkpointing: Checkpointing | None = None
    resume: dict | None = None
    on_end: Callable[[TrainResult, SparseAutoencoder], None] | None = None
    on_error: Callable[[BaseException], None] | None = None
    hook: str | None = None  # a streamed source's hook point this member reads (None: a plain source)


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
    ended: list = []
    member = Member(cfg, on_log=on_log, on_start=on_start, should_stop=should_stop,
                    l1_alpha_control=l1_alpha_control, checkpointing=checkpointing, resume=resume,
                    on_end=lambda result, sae: ended.append((result, sae)))
    train_many(source, [member])
    return ended[0]


def train_many(source: ActivationSource, members: list[Member], *, data_seed: int | None = None) -> None:
    """Train every member on the same batches: each batch is read and moved to the device once, then
    scaled and fed to each SAE in turn (a sweep). Members share the batch size; the batch order comes
    from ``data_seed`` (default: the first member's seed), and each member's own seed draws its
    initial weights. A member ends alone (its steps, a stop, a cancel, an error with ``on_error``)
    and the rest train on. Members resumed from checkpoints at different steps each continue at
    their own: the batches start at the earliest, and a member skips those before its step, so it
    sees exactly the batches it would have seen uninterrupted."""
    if not members:
        return
    batch_size = members[0].cfg.batch_size
    if any(m.cfg.batch_size != batch_size for m in members):
        raise ValueError("the members of one training share their batch size")
    device = resolve_device(members[0].cfg.device)
    seed = members[0].cfg.seed if data_seed is None else data_seed
    torch.manual_seed(seed)
    trainees: list[_Trainee] = []
    for member in members:
        try:
            trainees.append(_Trainee(member, source, device))
        except Exception as exc:  # noqa: BLE001 - handed to the member's own handler, or raised
            _give(member, exc)
    fresh = [t for t in trainees if t.member.resume is None]
    raws = {}  # one normalization sample per hook point, shared by the members that read it
    for hook in dict.fromkeys(t.member.hook for t in fresh):
        need = max(t.cfg.norm_sample_tokens for t in fresh if t.member.hook == hook)
        raws[hook] = _view(source, hook).sample(need, device=device)
    for trainee in list(trainees):
        try:
            trainee.begin(raws.get(trainee.member.hook), restore_global_rng=trainee is trainees[0])
        except Exception as exc:  # noqa: BLE001
            trainees.remove(trainee)
            _give(trainee.member, exc)
    del raws
    eval_rows: dict[tuple, torch.Tensor] = {}
    active = list(trainees)
    if not active:
        return
    step = min(t.step for t in active)
    # a streamed source continues from the corpus position the earliest member's checkpoint holds
    position = next((t.member.resume.get("source_position") for t in active
                     if t.step == step and t.member.resume is not None), None)
    streamed = {}
    if getattr(source, "hooks", None):  # a model's stream: where to enter it, and where nobody reads on
        streamed = {"position": position, "until": max(t.cfg.total_steps for t in active)}
    batches = source.batches(batch_size, seed=seed, device=device, start=step, **streamed)
    try:
        _steps(source, batches, active, step, eval_rows)
    finally:
        batches.close()  # a streamed source's prefetch thread ends with it


def _steps(source: ActivationSource, batches, active: list[_Trainee], step: int, eval_rows: dict) -> None:
    while active:
        due = [t for t in active if t.step == step]  # a member resumed further on waits for its batch
        stopping = []
        for trainee in list(due):
            try:
                if trainee.stop_requested():
                    stopping.append(trainee)
            except Exception as exc:  # noqa: BLE001 - its stop check failed (its claim was lost): it ends alone
                due.remove(trainee)
                active.remove(trainee)
                _give(trainee.member, exc)
        for trainee in stopping:
            active.remove(trainee)
            trainee.end(source, eval_rows)
        due = [t for t in due if t not in stopping]
        if due:
            raw_batch = next(batches)
            scaled: dict[tuple, torch.Tensor] = {}
            for trainee in due:
                hook = trainee.member.hook
                key = (hook, trainee.scale)
                x = scaled.get(key)
                if x is None:
                    x = scaled[key] = (raw_batch if hook is None else raw_batch[hook]) * trainee.scale
                try:
                    finished = trainee.advance(x)
                except Exception as exc:  # noqa: BLE001
                    active.remove(trainee)
                    _give(trainee.member, exc)
                    continue
                if finished:
                    active.remove(trainee)
                    trainee.end(source, eval_rows)
            del raw_batch, scaled
        elif active:
            next(batches)  # nobody trains on this batch (members resumed further on): skip it
        step += 1


def _view(source: ActivationSource, hook: str | None) -> ActivationSource:
    """The plain source a member reads: the source itself, or its hook point of a streamed source."""
    return source if hook is None else source.view(hook)


def _give(member: Member, exc: BaseException) -> None:
    if member.on_error is None:
        raise exc
    member.on_error(exc)


class _Trainee:
    """One member's whole training state: its SAE, optimizer, schedule, trackers and position."""

    def __init__(self, member: Member, source: ActivationSource, device: torch.device) -> None:
        cfg = self.cfg = member.cfg
        cfg.check()
        self.member, self.device = member, device
        self.source = source  # a streamed source tells the corpus position of a step, for the checkpoint
        source = _view(source, member.hook)
        self.source_d_in = source.d_in
        if source.n_tokens is not None and cfg.batch_size > source.n_tokens:
            raise ValueError(f"batch size {cfg.batch_size} exceeds the source's {source.n_tokens} training tokens")
        self.g = torch.Generator().manual_seed(cfg.seed)
        self.arch = architectures.get(cfg.architecture)
        self.sae = build_sae(cfg.architecture, source.d_in, cfg.latent_dim, cfg=cfg, generator=self.g, device=device)
        self.optimizer = adam(list(self.sae.param_groups(cfg.learning_rate)), cfg.learning_rate)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.tracker = DeadLatentTracker(cfg.latent_dim, dead_window(cfg), device)
        self.aux_window = aux_window(cfg)
        self.window = WindowAccumulator(device)
        self.base_l1_alpha = cfg.l1_alpha or 0.0
        self.resampled, self.tokens, self.step, self.last = 0, 0, 0, None
        self.scale = 1.0
        self.status, self.reason = "completed", None

    def begin(self, raw: torch.Tensor | None, *, restore_global_rng: bool) -> None:
        """Start from scratch on ``raw`` (the shared normalization sample), or from the member's checkpoint."""
        cfg, sae, resume = self.cfg, self.sae, self.member.resume
        if resume is None:
            raw = raw[: cfg.norm_sample_tokens]
            self.scale = normalization_scale(raw)
            with torch.no_grad():
                # Start the decoder bias at the mean activation: the first reconstructions are
                # then the mean rather than the origin.
                sample = raw * self.scale
                sae.b_dec.copy_(sample.mean(dim=0))
                if hasattr(sae, "calibrate_thresholds"):  # JumpReLU starts at its target L0
                    sae.calibrate_thresholds(sample)
        else:
            check_resumable(resume, cfg, self.source_d_in)
            if resume.get("hook") != self.member.hook:
                raise ValueError(f"the checkpoint was trained on hook point {resume.get('hook')!r}, "
                                 f"not {self.member.hook!r}")
            self.scale = float(resume["norm_scale"])
            sae.load_state_dict(resume["sae"])
            self.optimizer.load_state_dict(resume["optimizer"])
            self.scheduler.load_state_dict(resume["scheduler"])
            self.tracker.load_state_dict(resume["tracker"])
            self.window.load_state_dict(resume["window"])
            if restore_global_rng:
                torch.set_rng_state(resume["rng"]["torch"])
            self.g.set_state(resume["rng"]["generator"])
            if self.device.type == "cuda" and resume["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(resume["rng"]["cuda"], self.device)
            self.base_l1_alpha = float(resume["base_l1_alpha"])
            self.resampled, self.tokens = int(resume["resampled"]), int(resume["tokens"])
            self.step = int(resume["step"])
            self.last = LogPoint(**resume["last"]) if resume.get("last") else None
        precision = resolve_precision(cfg.precision, self.device)
        self.step_context = precision_context(precision, self.device)
        if self.member.on_start:
            self.member.on_start({"device": str(self.device), "norm_scale": self.scale, "d_in": self.source_d_in,
                                  "resumed_from": self.step, "precision": precision, "dead_window": dead_window(cfg)})
        self.use_aux = self.arch.aux_k
        self.resample = self.arch.resample and cfg.dead_latent_remedy == "resample"
        # Resample once per dead-latent window, never in the last fifth of training (a fresh
        # latent needs time to settle before the run ends).
        self.resample_every = max(cfg.log_every, math.ceil(cfg.dead_window_tokens / cfg.batch_size))
        self.resample_until = int(cfg.total_steps * 0.8)
        self.window_start = self.saved_at = time.perf_counter()
        self.saved_step = self.step
        # AuxK runs only while latents are silent for its window; whether any are is read on logging
        # steps, where the host reads the device anyway, so the step itself never waits for the answer.
        self.aux_active = self._aux_needed()
        if self.step >= cfg.total_steps:
            self.step = cfg.total_steps

    def _aux_needed(self) -> bool:
        """Is any latent silent for AuxK's window? (Read on logging steps, where the host reads the device anyway.)"""
        tracker = self.tracker
        return (self.use_aux and tracker.tokens_seen >= self.aux_window
                and bool(tracker.silent_mask(self.aux_window).any().item()))

    def state(self, at_step: int) -> dict:
        cfg, device = self.cfg, self.device
        return {
            "format": CHECKPOINT_FORMAT, "step": at_step, "tokens": self.tokens, "norm_scale": self.scale,
            "architecture": cfg.architecture, "d_in": self.source_d_in, "latent_dim": cfg.latent_dim,
            "sae": self.sae.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "tracker": self.tracker.state_dict(),
            "window": self.window.state_dict(), "base_l1_alpha": self.base_l1_alpha,
            "resampled": self.resampled, "last": asdict(self.last) if self.last else None,
            "rng": {"torch": torch.get_rng_state(), "generator": self.g.get_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
            "hook": self.member.hook, "source_position": self._position(at_step),
        }

    def _position(self, step: int) -> dict | None:
        position_at = getattr(self.source, "position_at", None)
        return None if position_at is None else position_at(step, self.cfg.batch_size)

    def stop_requested(self) -> bool:
        """Poll the member's stop check before its step; True when it asks to stop (or it has no steps left)."""
        if self.step >= self.cfg.total_steps:
            return True
        if self.member.should_stop is not None:
            reason = self.member.should_stop()
            if reason:
                self.status, self.reason = "stopped", reason
                return True
        return False

    def advance(self, x: torch.Tensor) -> bool:
        """One training step on the scaled batch ``x``; True when the member has ended (its last step,
        or its log callback asked it to stop)."""
        cfg, sae, optimizer, tracker, step = self.cfg, self.sae, self.optimizer, self.tracker, self.step
        alpha = l1_alpha_at(step, cfg, self.base_l1_alpha)
        dead_mask = tracker.silent_mask(self.aux_window) if self.aux_active else None
        with self.step_context:
            parts, x_hat, f = sae.loss(x, l1_alpha=alpha, dead_mask=dead_mask)
        optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        lr_used = optimizer.param_groups[0]["lr"]
        optimizer.step()
        self.scheduler.step()
        sae.after_step()
        tracker.update(f.detach())
        if (self.resample and (step + 1) % self.resample_every == 0 and step < self.resample_until
                and tracker.known):
            mask = tracker.dead_mask()
            count = resample_dead_latents(sae, optimizer, x, mask,
                                          generator=self.g if self.device.type == "cpu" else None)
            if count:
                tracker.since_fired.masked_fill_(mask, 0)  # each gets a fresh window to prove itself
                self.resampled += count
        self.window.add(loss=parts.total, mse=parts.mse, sparsity=parts.sparsity, l1=parts.l1, f=f, x=x, x_hat=x_hat)
        self.tokens += x.shape[0]
        self.step = step + 1
        if self.step % cfg.log_every and self.step != cfg.total_steps:
            return False
        return self._log(alpha, lr_used)

    def _log(self, alpha: float, lr_used: float) -> bool:
        cfg, member, step = self.cfg, self.member, self.step
        values = self.window.read()
        if not math.isfinite(values["loss"]):
            raise NonFiniteLoss(step, self.last)
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        dead = int(self.tracker.dead_count().item()) if self.tracker.known else None
        self.aux_active = self._aux_needed()
        self.last = LogPoint(
            step=step, tokens=self.tokens, loss=values["loss"], mse=values["mse"],
            sparsity_loss=values["sparsity_loss"], l1=values["l1"], l0=values["l0"],
            l0_fraction=values["l0"] / cfg.latent_dim, fvu=values["fvu"], dead=dead,
            lr=lr_used, l1_alpha=alpha, tokens_per_s=self.window.tokens / elapsed,
        )
        self.window.reset()
        self.window_start = time.perf_counter()
        if member.l1_alpha_control is not None:
            self.base_l1_alpha = float(member.l1_alpha_control(self.last))
        if member.on_log is not None:
            reason = member.on_log(self.last)
            if reason:
                self.status, self.reason = "stopped", reason
                return True
        due = (step - self.saved_step >= cfg.checkpoint_every_steps
               or time.perf_counter() - self.saved_at >= cfg.checkpoint_every_minutes * 60)
        if member.checkpointing is not None and due and step < cfg.total_steps:
            member.checkpointing.save(self.state(step))
            self.saved_at, self.saved_step = time.perf_counter(), step
        return step >= cfg.total_steps

    def end(self, source: ActivationSource, eval_rows: dict[tuple, torch.Tensor]) -> None:
        """Save a stopped member's checkpoint, evaluate it on held-out rows and hand the result over."""
        cfg, member = self.cfg, self.member
        try:
            if member.checkpointing is not None and self.status == "stopped":
                member.checkpointing.save(self.state(self.step))
            self.sae.eval()
            key = (member.hook, cfg.eval_tokens)
            rows = eval_rows.get(key)
            if rows is None:  # read once for every member that evaluates on as many tokens of its hook point
                rows = eval_rows[key] = _view(source, member.hook).eval_rows(cfg.eval_tokens, device=self.device)
            eval_metrics = evaluate(self.sae, rows * self.scale)
            eval_metrics["dead"] = int(self.tracker.dead_count().item()) if self.tracker.known else None
            eval_metrics["resampled_latents"] = self.resampled
            result = TrainResult(status=self.status, steps=self.step, tokens=self.tokens, norm_scale=self.scale,
                                 device=str(self.device), reason=self.reason, eval=eval_metrics, last=self.last)
            if member.on_end is not None:
                member.on_end(result, self.sae)
        except Exception as exc:  # noqa: BLE001
            _give(member, exc)
        finally:
            self.optimizer.state.clear()  # an ended member frees its Adam moments at once


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
