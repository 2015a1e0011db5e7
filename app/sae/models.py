"""Sparse autoencoders: standard (ReLU + L1), TopK, BatchTopK, JumpReLU and Matryoshka BatchTopK.

All of them work in normalized activation space (see docs/design.md): the trainer multiplies raw
activations by the source's scale ``c`` before they reach the model.

Shapes follow the layout other tools read: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .metrics import SparseLatents
from .sparse_topk import TopKEncode, sparse_decode

from ..training_config import ARCHITECTURES as _CHOICES, K_ARCHITECTURES, THRESHOLD_ARCHITECTURES, matryoshka_levels

ARCHITECTURES = tuple(name for name, _ in _CHOICES)


@dataclass
class LossParts:
    """The terms of one batch's loss, each a 0-d tensor averaged over the batch."""

    total: torch.Tensor
    mse: torch.Tensor  # (1/d_in)·‖x − x̂‖², the reconstruction term
    sparsity: torch.Tensor  # l1_alpha·Σ f_i‖W_dec,i‖ (standard) or the AuxK term (topk)
    l1: torch.Tensor  # Σ f_i‖W_dec,i‖ without its coefficient; reported for both


class SparseAutoencoder(nn.Module):
    """Shared parameters and decoding. Subclasses define ``encode`` and ``loss``."""

    architecture = "base"
    aux_coeff = 1 / 32

    def __init__(self, d_in: int, d_sae: int, *, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.d_in, self.d_sae = d_in, d_sae
        # Decoder rows start as random directions of norm 0.1 and the encoder as their
        # transpose, so every latent starts aligned with the direction it writes to.
        w_dec = torch.randn(d_sae, d_in, generator=generator, device="cpu")
        w_dec = 0.1 * w_dec / w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec.to(device))
        self.W_enc = nn.Parameter(w_dec.t().clone().to(device))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d_in, device=device))

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def activate(self, pre: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """The latents at inference from the pre-activations."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_activation(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(x_hat, f)``: the reconstruction and the latent activations."""
        f = self.encode(x)
        return self.decode(f), f

    def decoder_norms(self) -> torch.Tensor:
        return self.W_dec.norm(dim=1)

    def aux_loss(self, x: torch.Tensor, x_hat: torch.Tensor, pre: torch.Tensor,
                 dead_mask: torch.Tensor | None) -> torch.Tensor:
        """AuxK: the ``k_aux`` largest pre-activations among dead latents reconstruct the residual.

        Gives dead TopK latents (positive pre-activations that never make the top k) a
        gradient toward what the live ones miss. Zero when no latent is dead. Masked top-k
        keeps the step free of host syncs: non-dead candidates are -inf and ReLU turns them
        into 0. (A dead ReLU latent has no positive pre-activation, so a standard SAE uses
        resampling instead: ``resample_dead_latents``.)
        """
        if dead_mask is None:
            return torch.zeros((), device=x.device)
        k_aux = max(1, min(self.d_in // 2, self.d_sae))
        dead_pre = pre.masked_fill(~dead_mask, float("-inf"))
        values, indices = dead_pre.topk(k_aux, dim=-1)
        values = torch.nan_to_num(torch.relu(values), nan=0.0, neginf=0.0)
        f_aux = torch.zeros_like(pre).scatter_(-1, indices, values)
        residual = (x - x_hat).detach()
        aux = self.aux_coeff * (residual - f_aux @ self.W_dec).pow(2).sum(dim=-1).mean() / self.d_in
        return aux * dead_mask.any()

    def after_step(self) -> None:
        """Hook run after each optimizer step (constraints on the weights)."""

    def param_groups(self, lr: float) -> list[dict]:
        """The optimizer's parameter groups (one, at ``lr``, unless a subclass needs more)."""
        return [{"params": list(self.parameters()), "lr": lr}]


class StandardSAE(SparseAutoencoder):
    """ReLU SAE trained with the decoder-norm-weighted L1 penalty of docs/design.md.

    Loss per token: ``(1/d_in)·‖x − x̂‖² + l1_alpha · Σ_i f_i·‖W_dec,i‖``. Weighting the
    L1 by the decoder norms means the model cannot shrink ``f`` by growing ``W_dec``, so
    the decoder needs no norm constraint.
    """

    architecture = "standard"

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def loss(self, x: torch.Tensor, *, l1_alpha: float | torch.Tensor,
             dead_mask: torch.Tensor | None = None) -> tuple[LossParts, torch.Tensor, torch.Tensor]:
        """Return ``(loss parts, x_hat, f)`` for a normalized batch ``x``."""
        f = self.encode(x)
        x_hat = self.decode(f)
        mse = (x - x_hat).pow(2).sum(dim=-1).mean() / self.d_in
        l1 = (f * self.decoder_norms()).sum(dim=-1).mean()
        sparsity = l1_alpha * l1
        return LossParts(mse + sparsity, mse, sparsity, l1), x_hat, f


class TopKSAE(SparseAutoencoder):
    """TopK SAE: exactly the ``k`` largest pre-activations (after ReLU) are kept per token.

    Dead latents get gradient from the AuxK loss: the ``k_aux`` largest pre-activations
    among dead latents reconstruct the main model's residual, weighted by ``aux_coeff``.
    Decoder rows are kept at unit norm after every step.
    """

    architecture = "topk"

    def __init__(self, d_in: int, d_sae: int, *, k: int, aux_coeff: float = 1 / 32,
                 generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                 sparse: bool = True) -> None:
        super().__init__(d_in, d_sae, generator=generator, device=device)
        if not 1 <= k <= d_sae:
            raise ValueError(f"k must lie in [1, {d_sae}], got {k}")
        self.k, self.aux_coeff = k, aux_coeff
        # sparse: the training step touches only the k chosen latents per token (sparse_topk);
        # dense: the same maths with dense matrices (kept as the reference the tests compare to)
        self.sparse = sparse
        with torch.no_grad():
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True))
            self.W_enc.copy_(self.W_dec.t())

    def _topk(self, pre: torch.Tensor, k: int) -> torch.Tensor:
        values, indices = pre.topk(k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, indices, torch.relu(values))

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return self._topk(pre, self.k)

    @property
    def k_aux(self) -> int:
        return max(1, min(self.d_in // 2, self.d_sae))

    def loss(self, x: torch.Tensor, *, l1_alpha: float | torch.Tensor = 0.0,
             dead_mask: torch.Tensor | None = None) -> tuple[LossParts, torch.Tensor, torch.Tensor]:
        if self.sparse:
            return self._sparse_loss(x, dead_mask)
        pre = self.pre_activation(x)
        f = self._topk(pre, self.k)
        x_hat = self.decode(f)
        mse = (x - x_hat).pow(2).sum(dim=-1).mean() / self.d_in
        l1 = (f * self.decoder_norms()).sum(dim=-1).mean().detach()
        aux = self.aux_loss(x, x_hat, pre, dead_mask)
        return LossParts(mse + aux, mse, aux, l1), x_hat, f

    def _sparse_loss(self, x: torch.Tensor, dead_mask: torch.Tensor | None):
        values, indices, aux_values, aux_indices = TopKEncode.apply(
            x - self.b_dec, self.W_enc, self.b_enc, self.k, dead_mask, self.k_aux)
        acts = torch.relu(values).float()
        x_hat = sparse_decode(indices, acts, self.W_dec, self.b_dec)
        mse = (x - x_hat).pow(2).sum(dim=-1).mean() / self.d_in
        l1 = (acts * self.decoder_norms()[indices]).sum(dim=-1).mean().detach()
        if dead_mask is None:
            aux = torch.zeros((), device=x.device)
        else:
            aux_acts = torch.relu(torch.nan_to_num(aux_values.float(), nan=0.0, neginf=0.0))
            residual = (x - x_hat).detach()
            aux_hat = sparse_decode(aux_indices, aux_acts, self.W_dec, torch.zeros_like(self.b_dec))
            aux = self.aux_coeff * (residual - aux_hat).pow(2).sum(dim=-1).mean() / self.d_in * dead_mask.any()
        return LossParts(mse + aux, mse, aux, l1), x_hat, SparseLatents(indices, acts.detach(), self.d_sae)

    def after_step(self) -> None:
        with torch.no_grad():
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))


class BatchTopKSAE(TopKSAE):
    """BatchTopK SAE: in training, the ``k · batch`` largest activations of the whole batch are kept,
    so a token keeps k latents on average but more when it holds more and fewer when it holds less.

    At inference a token cannot see its batch, so the SAE becomes a JumpReLU: a latent fires when
    its pre-activation exceeds ``threshold``. The threshold is an exponential moving average
    (rate ``threshold_rate``) of the batch's cut, the smallest activation the batch top-k kept.
    That cut is one value for the whole batch, so every latent's threshold is that value (with
    unit-norm decoder rows, the selection needs no per-latent scale); it is stored per latent,
    the layout JumpReLU SAEs export in.
    """

    architecture = "batchtopk"
    threshold_rate = 0.01

    def __init__(self, d_in: int, d_sae: int, *, k: int, aux_coeff: float = 1 / 32,
                 generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> None:
        super().__init__(d_in, d_sae, k=k, aux_coeff=aux_coeff, generator=generator, device=device, sparse=False)
        self.register_buffer("threshold", torch.zeros(d_sae, device=device))
        self.register_buffer("threshold_seen", torch.zeros((), dtype=torch.bool, device=device))

    def batch_topk(self, pre: torch.Tensor) -> torch.Tensor:
        acts = torch.relu(pre)
        flat = acts.flatten()
        values, indices = flat.topk(min(self.k * acts.shape[0], flat.numel()), sorted=False)
        return torch.zeros_like(flat).scatter_(0, indices, values).view_as(acts)

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.batch_topk(pre)
        return pre * (pre > self.threshold.to(pre.dtype))

    @torch.no_grad()
    def update_threshold(self, f: torch.Tensor) -> None:
        """Move the threshold toward this batch's cut; no host sync (a batch with nothing kept is skipped)."""
        f = f.detach().float()
        cut = f.masked_fill(f <= 0, float("inf")).min()
        found = torch.isfinite(cut)
        cut = torch.where(found, cut, torch.zeros_like(cut))
        moved = torch.where(self.threshold_seen, (1 - self.threshold_rate) * self.threshold + self.threshold_rate * cut,
                            cut.expand_as(self.threshold))
        self.threshold.copy_(torch.where(found, moved, self.threshold))
        self.threshold_seen.logical_or_(found)

    def _select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = self.pre_activation(x)
        f = self.batch_topk(pre)
        self.update_threshold(f)
        return pre, f

    def loss(self, x: torch.Tensor, *, l1_alpha: float | torch.Tensor = 0.0,
             dead_mask: torch.Tensor | None = None) -> tuple[LossParts, torch.Tensor, torch.Tensor]:
        pre, f = self._select(x)
        x_hat = self.decode(f)
        mse = (x - x_hat).pow(2).sum(dim=-1).mean() / self.d_in
        l1 = (f * self.decoder_norms()).sum(dim=-1).mean().detach()
        aux = self.aux_loss(x, x_hat, pre, dead_mask)
        return LossParts(mse + aux, mse, aux, l1), x_hat, f


class MatryoshkaSAE(BatchTopKSAE):
    """Matryoshka BatchTopK SAE: every prefix of the dictionary (``levels``, the whole last)
    reconstructs the input on its own, so general features settle in the early latents and
    specific ones cannot absorb them. The loss is the sum of every level's reconstruction term
    (plus AuxK); the reported ``mse`` is the whole dictionary's. Selection and inference are
    BatchTopK's.
    """

    architecture = "matryoshka"

    def __init__(self, d_in: int, d_sae: int, *, k: int, levels: tuple[int, ...] = (), aux_coeff: float = 1 / 32,
                 generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> None:
        super().__init__(d_in, d_sae, k=k, aux_coeff=aux_coeff, generator=generator, device=device)
        levels = tuple(levels) or matryoshka_levels("", d_sae)
        if list(levels) != sorted(set(levels)) or levels[0] < 1 or levels[-1] != d_sae:
            raise ValueError(f"matryoshka levels must increase and end at d_sae {d_sae}, got {levels}")
        self.levels = levels

    def loss(self, x: torch.Tensor, *, l1_alpha: float | torch.Tensor = 0.0,
             dead_mask: torch.Tensor | None = None) -> tuple[LossParts, torch.Tensor, torch.Tensor]:
        pre, f = self._select(x)
        x_hat = self.b_dec.expand_as(x)
        levels_mse, start = [], 0
        for end in self.levels:  # each level adds its segment of the dictionary to the previous one's
            x_hat = x_hat + f[:, start:end] @ self.W_dec[start:end]
            levels_mse.append((x - x_hat).pow(2).sum(dim=-1).mean() / self.d_in)
            start = end
        mse = levels_mse[-1]
        l1 = (f * self.decoder_norms()).sum(dim=-1).mean().detach()
        aux = self.aux_loss(x, x_hat, pre, dead_mask)
        return LossParts(torch.stack(levels_mse).sum() + aux, mse, aux, l1), x_hat, f


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """``pre · H(pre − θ)``; θ's gradient through the rectangle kernel of width ε (straight-through)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = (pre > threshold) * grad
        kernel = _rectangle((pre.float() - threshold) / eps)
        grad_threshold = -(threshold / eps * kernel * grad.float()).sum(dim=0)
        return grad_pre.to(pre.dtype), grad_threshold, None


class _Step(torch.autograd.Function):
    """``H(pre − θ)``, the count behind L0. Its gradient reaches θ; with ``to_input`` also the
    pre-activation, with the opposite sign (Anthropic's variant; off here, as in DeepMind's)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth, to_input=True):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth, ctx.to_input = bandwidth, to_input
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        ste = _rectangle((pre.float() - threshold) / eps) * grad.float() / eps
        return (ste.to(pre.dtype) if ctx.to_input else None), -ste.sum(dim=0), None, None


class JumpReLUSAE(SparseAutoencoder):
    """JumpReLU SAE trained to a target L0.

    A latent fires when its pre-activation exceeds its own learned ``threshold`` θ:
    ``f = pre · H(pre − θ)``. H has no useful gradient, so θ learns through a straight-through
    estimator: in the backward pass H's derivative is the rectangle kernel ``K((pre − θ)/ε)/ε``
    of bandwidth ε (``bandwidth``), for both the JumpReLU output and the L0 count.

    Loss per batch: ``(1/d_in)·‖x − x̂‖² + l0_coefficient · (L̄0 / L0_target − 1)²``, with L̄0
    the batch's mean count of active latents (through the estimator) and L0_target the form's
    target in latents. The penalty is the quadratic form Gemma Scope 2 trains to a target with,
    taken on the batch mean rather than per token (the target is a mean; a token with more in
    it may use more latents) and measured relative to the target so that one coefficient suits
    every width. The penalty's gradient reaches the thresholds only (as in DeepMind's JumpReLU).

    Three choices make it land on the target without tuning (measured on the synthetic sources:
    ``benchmarks/architectures.py``):

    - the thresholds start at each latent's quantile that puts the mean L0 at the target on a
      sample (``calibrate_thresholds``), so training starts on target instead of climbing to it;
    - they learn at ``threshold_lr_scale`` (3×) the learning rate: under Adam a threshold moves
      about one learning rate per step, while the encoder moves a pre-activation by up to
      lr·‖x‖₁. With the encoder started at full scale and equal rates, the pre-activations
      outran the thresholds and L0 fell to a fifth of its target (4 of 20 latents); at 30×
      L0 held but a third to a half of the latents died on the hierarchical source (thresholds
      overshoot, and a latent below its threshold everywhere gets no gradient); 3× with the
      default ``l0_coefficient`` 10 held both (L0 within 1% of the target on the synthetic
      sources, 145 of 512 dead where 30× left 288);
    - the encoder starts at a tenth of the decoder's transpose, so the first reconstructions
      undershoot rather than overshoot (overshooting taught the encoder to shrink everything).

    Latents dead for a window also get AuxK, as TopK's do. Decoder rows are kept at unit norm.
    """

    architecture = "jumprelu"
    ste_to_input = False
    threshold_lr_scale = 3.0

    def __init__(self, d_in: int, d_sae: int, *, target_l0: float = 1.0, l0_coefficient: float = 10.0,
                 bandwidth: float = 0.05, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> None:
        super().__init__(d_in, d_sae, generator=generator, device=device)
        if not 0 < target_l0 <= d_sae:
            raise ValueError(f"the target L0 must lie in (0, {d_sae}] latents, got {target_l0}")
        self.target_l0, self.l0_coefficient, self.bandwidth = float(target_l0), float(l0_coefficient), float(bandwidth)
        with torch.no_grad():
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True))
            self.W_enc.copy_(0.1 * self.W_dec.t())
        self.threshold = nn.Parameter(torch.full((d_sae,), 0.1, device=device))

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return pre * (pre > self.threshold.to(pre.dtype))

    def param_groups(self, lr: float) -> list[dict]:
        rest = [p for name, p in self.named_parameters() if name != "threshold"]
        return [{"params": rest, "lr": lr}, {"params": [self.threshold], "lr": lr * self.threshold_lr_scale}]

    @torch.no_grad()
    def calibrate_thresholds(self, x: torch.Tensor, *, block: int = 8192) -> None:
        """Set each latent's threshold to the pre-activation it exceeds on target_l0 / d_sae of ``x``."""
        rank = max(1, min(x.shape[0], round(x.shape[0] * self.target_l0 / self.d_sae)))
        for start in range(0, self.d_sae, block):
            pre = (x - self.b_dec) @ self.W_enc[:, start:start + block] + self.b_enc[start:start + block]
            cut = pre.topk(rank, dim=0).values[-1]
            self.threshold[start:start + block] = cut.clamp_min(1e-3)

    def loss(self, x: torch.Tensor, *, l1_alpha: float | torch.Tensor = 0.0,
             dead_mask: torch.Tensor | None = None) -> tuple[LossParts, torch.Tensor, torch.Tensor]:
        pre = self.pre_activation(x)
        f = _JumpReLU.apply(pre, self.threshold, self.bandwidth)
        x_hat = self.decode(f)
        mse = (x - x_hat).pow(2).sum(dim=-1).mean() / self.d_in
        mean_l0 = _Step.apply(pre, self.threshold, self.bandwidth, self.ste_to_input).float().sum(dim=-1).mean()
        sparsity = self.l0_coefficient * (mean_l0 / self.target_l0 - 1).pow(2)
        l1 = (f.detach() * self.decoder_norms().detach()).sum(dim=-1).mean()
        # A latent whose threshold has risen above every pre-activation gets no gradient again;
        # AuxK (as for TopK) lets dead latents reconstruct the residual, lifting them back.
        aux = self.aux_loss(x, x_hat, pre, dead_mask)
        return LossParts(mse + sparsity + aux, mse, sparsity + aux, l1), x_hat, f

    def after_step(self) -> None:
        with torch.no_grad():
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))
            self.threshold.clamp_(min=0.0)


@torch.no_grad()
def resample_dead_latents(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                          dead_mask: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """Point each dead latent at an input the SAE reconstructs badly; return how many.

    Inputs are drawn with probability proportional to their squared reconstruction error;
    a resampled latent's encoder and decoder take that input's direction (at a fifth of the
    live latents' mean norms, so it starts small), its encoder bias is zeroed, and its Adam
    moments are cleared so stale statistics do not throw it straight back.
    """
    dead = dead_mask.nonzero().flatten()
    if dead.numel() == 0:
        return 0
    x_hat, _ = sae(x)
    weights = (x - x_hat).pow(2).sum(dim=-1)
    if not torch.isfinite(weights).all() or weights.sum() <= 0:
        return 0
    picks = torch.multinomial(weights, dead.numel(), replacement=dead.numel() > x.shape[0],
                              generator=generator)
    directions = x[picks] - sae.b_dec
    directions = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    alive = ~dead_mask
    dec_norm = sae.W_dec[alive].norm(dim=1).mean() if alive.any() else torch.tensor(0.1)
    enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(0.1)
    sae.W_dec[dead] = directions * dec_norm * 0.2
    sae.W_enc[:, dead] = (directions * enc_norm * 0.2).t()
    sae.b_enc[dead] = 0.0
    for param, index in ((sae.W_dec, (dead,)), (sae.W_enc, (slice(None), dead)), (sae.b_enc, (dead,))):
        state = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][index] = 0.0
    return int(dead.numel())


def build_sae(architecture: str, d_in: int, d_sae: int, *, k: int | None = None,
              generator: torch.Generator | None = None, device: torch.device | str = "cpu",
              sparse_topk: bool = True, target_l0: float | None = None, l0_coefficient: float = 10.0,
              bandwidth: float = 0.05, levels: tuple[int, ...] = ()) -> SparseAutoencoder:
    """Construct the SAE named by ``architecture`` (one of ``ARCHITECTURES``).

    ``target_l0`` is in latents (JumpReLU). A BatchTopK or Matryoshka SAE loaded for use only
    (not training) is the JumpReLU its thresholds make it: see ``inference_sae``.
    """
    if architecture == "standard":
        return StandardSAE(d_in, d_sae, generator=generator, device=device)
    if architecture in K_ARCHITECTURES and k is None:
        raise ValueError(f"a {architecture} SAE needs k")
    if architecture == "topk":
        return TopKSAE(d_in, d_sae, k=k, generator=generator, device=device, sparse=sparse_topk)
    if architecture == "batchtopk":
        return BatchTopKSAE(d_in, d_sae, k=k, generator=generator, device=device)
    if architecture == "matryoshka":
        return MatryoshkaSAE(d_in, d_sae, k=k, levels=levels, generator=generator, device=device)
    if architecture == "jumprelu":
        return JumpReLUSAE(d_in, d_sae, target_l0=target_l0 or 1.0, l0_coefficient=l0_coefficient,
                           bandwidth=bandwidth, generator=generator, device=device)
    raise ValueError(f"unknown architecture {architecture!r}; expected one of {ARCHITECTURES}")


def inference_sae(architecture: str, d_in: int, d_sae: int, *, k: int | None = None,
                  device: torch.device | str = "cpu") -> SparseAutoencoder:
    """An SAE to load finished weights into: every thresholded architecture is a JumpReLU at inference."""
    if architecture in THRESHOLD_ARCHITECTURES:
        return JumpReLUSAE(d_in, d_sae, device=device).eval()
    return build_sae(architecture, d_in, d_sae, k=k, device=device).eval()
