"""Sparse autoencoders: the standard ReLU SAE and the TopK SAE.

Both work in normalized activation space (see DESIGN.md): the trainer multiplies raw
activations by the source's scale ``c`` before they reach the model.

Shapes follow the layout other tools read: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .metrics import SparseLatents
from .sparse_topk import TopKEncode, sparse_decode

ARCHITECTURES = ("standard", "topk")


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

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

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


class StandardSAE(SparseAutoencoder):
    """ReLU SAE trained with the decoder-norm-weighted L1 penalty of DESIGN.md.

    Loss per token: ``(1/d_in)·‖x − x̂‖² + l1_alpha · Σ_i f_i·‖W_dec,i‖``. Weighting the
    L1 by the decoder norms means the model cannot shrink ``f`` by growing ``W_dec``, so
    the decoder needs no norm constraint.
    """

    architecture = "standard"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.pre_activation(x))

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

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._topk(self.pre_activation(x), self.k)

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
              sparse_topk: bool = True) -> SparseAutoencoder:
    """Construct the SAE named by ``architecture`` ("standard" or "topk")."""
    if architecture == "standard":
        return StandardSAE(d_in, d_sae, generator=generator, device=device)
    if architecture == "topk":
        if k is None:
            raise ValueError("a TopK SAE needs k")
        return TopKSAE(d_in, d_sae, k=k, generator=generator, device=device, sparse=sparse_topk)
    raise ValueError(f"unknown architecture {architecture!r}; expected one of {ARCHITECTURES}")
