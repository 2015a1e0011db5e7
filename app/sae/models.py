"""What every sparse autoencoder shares: parameters, decoding, AuxK, resampling; the loss parts.

Each architecture's model class and loss live in its own module (``app/sae/architectures/``);
``build_sae`` and ``inference_sae`` reach them through the registry.

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

from . import architectures


@dataclass
class LossParts:
    """The terms of one batch's loss, each a 0-d tensor averaged over the batch."""

    total: torch.Tensor
    mse: torch.Tensor  # (1/d_in)·‖x − x̂‖², the reconstruction term
    sparsity: torch.Tensor  # the penalty with its coefficient, or the AuxK term: what the architecture adds
    l1: torch.Tensor  # Σ f_i‖W_dec,i‖ without its coefficient; reported for every architecture


class SparseAutoencoder(nn.Module):
    """Shared parameters and decoding. Subclasses define ``encode`` and ``loss``."""

    architecture = "base"
    aux_coeff = 1 / 32
    row_cut = False  # True: a latent fires only among its row's k largest (features.py records the cut)

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

    def latent_activations(self, xs: torch.Tensor, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pre, act)`` of ``latents[b]`` alone on the rows ``xs[b]`` ([B, M, d_in] → [B, M]): what
        ``encode`` gives those latents, short of a row's top-k cut (``pre`` is what the cut compares)."""
        pre = torch.einsum("bmd,db->bm", xs - self.b_dec, self.W_enc[:, latents]) + self.b_enc[latents].unsqueeze(1)
        act = torch.relu(pre)
        if hasattr(self, "threshold"):  # each latent's own threshold (JumpReLU, and BatchTopK at inference)
            act = torch.where(pre > self.threshold[latents].unsqueeze(1), act, torch.zeros_like(act))
        return pre, act

    def decoder_norms(self) -> torch.Tensor:
        return self.W_dec.norm(dim=1)

    def latent_biases(self) -> tuple[nn.Parameter, ...]:
        """The per-latent parameters besides W_enc and W_dec that a resampled latent starts again from
        zero: the encoder bias here; a Gated SAE's gate and magnitude parameters."""
        return (self.b_enc,)

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


@torch.no_grad()
def resample_dead_latents(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                          dead_mask: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """Point each dead latent at an input the SAE reconstructs badly; return how many.

    Inputs are drawn with probability proportional to their squared reconstruction error;
    a resampled latent's encoder and decoder take that input's direction (at a fifth of the
    live latents' mean norms, so it starts small), its biases are zeroed (``latent_biases``), and its Adam
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
    biases = sae.latent_biases()
    for bias in biases:
        bias[dead] = 0.0
    for param, index in ((sae.W_dec, (dead,)), (sae.W_enc, (slice(None), dead)), *((b, (dead,)) for b in biases)):
        state = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][index] = 0.0
    return int(dead.numel())


def build_sae(architecture: str, d_in: int, d_sae: int, *, k: int | None = None, cfg=None,
              generator: torch.Generator | None = None, device: torch.device | str = "cpu",
              sparse_topk: bool | None = None) -> SparseAutoencoder:
    """Construct the SAE named by ``architecture`` (a name in ``app.sae.architectures``) for training
    (``sparse_topk``: force TopK's sparse path on or off; None lets the shape choose).

    ``cfg`` (the trainer's ``TrainConfig``, or anything with its attributes) gives every setting;
    without it, ``k`` and the architecture's defaults.
    """
    if cfg is None:
        from types import SimpleNamespace

        cfg = SimpleNamespace(k=k, latent_dim=d_sae, target_l0=None)
    return architectures.get(architecture).build(d_in, d_sae, cfg, generator=generator, device=device,
                                                 sparse_topk=sparse_topk)


def inference_sae(architecture: str, d_in: int, d_sae: int, *, k: int | None = None,
                  device: torch.device | str = "cpu") -> SparseAutoencoder:
    """An SAE to load finished weights into: a thresholded architecture is the one it is at inference."""
    return architectures.get(architecture).inference_model(d_in, d_sae, k=k, device=device)


def __getattr__(name: str):
    """``StandardSAE``, ``TopKSAE``, …: each architecture's class, defined in its module."""
    if name.startswith("__"):
        raise AttributeError(name)
    for arch in architectures.all():
        cls = arch.model_class()
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
