"""Metric definitions, one meaning each (docs/design.md), used by trainer, tests and benchmarks.

- L0: mean number of active latents (f > 0) per token; L0 fraction = L0 / latent_dim.
- FVU: Σ‖x − x̂‖² / Σ‖x − x̄‖², x̄ the mean over the evaluated set; explained variance = 1 − FVU.
- Dead latent: did not fire in the last ``dead_window_tokens`` tokens; unknown before that
  many tokens have been seen.
"""
from __future__ import annotations

import math

import torch


class SparseLatents:
    """The latents of a batch as ``k`` (index, value) pairs per token: what a sparse TopK step
    produces. Answers what the metrics need without building the dense ``[batch, d_sae]`` matrix."""

    def __init__(self, indices: torch.Tensor, values: torch.Tensor, d_sae: int) -> None:
        self.indices, self.values, self.d_sae = indices, values, d_sae
        self.shape = (values.shape[0], d_sae)

    def detach(self) -> SparseLatents:
        return self

    def fired(self) -> torch.Tensor:
        """Per latent: did it fire on any token of the batch."""
        fired = torch.zeros(self.d_sae, dtype=torch.bool, device=self.values.device)
        return fired.index_fill_(0, self.indices[self.values > 0], True)

    def dense(self) -> torch.Tensor:
        return torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device).scatter_(
            -1, self.indices, self.values)


def l0_per_token(f) -> torch.Tensor:
    """Number of active latents for each token (a float tensor of shape [batch])."""
    if isinstance(f, SparseLatents):
        return (f.values > 0).sum(dim=-1, dtype=torch.float32)
    return (f > 0).sum(dim=-1, dtype=torch.float32)


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained over the rows of ``x`` (0-d tensor)."""
    err = (x - x_hat).pow(2).sum()
    var = (x - x.mean(dim=0, keepdim=True)).pow(2).sum()
    return err / var.clamp_min(torch.finfo(var.dtype).tiny)


class DeadLatentTracker:
    """Counts, per latent, the tokens seen since it last fired. Stays on the device."""

    def __init__(self, d_sae: int, window_tokens: int, device: torch.device | str) -> None:
        self.window_tokens = window_tokens
        self.tokens_seen = 0
        self.since_fired = torch.zeros(d_sae, dtype=torch.int64, device=device)

    def update(self, f) -> None:
        fired = f.fired() if isinstance(f, SparseLatents) else (f > 0).any(dim=0)
        self.since_fired += f.shape[0]
        self.since_fired.masked_fill_(fired, 0)
        self.tokens_seen += f.shape[0]

    def dead_mask(self) -> torch.Tensor:
        """Latents silent for a whole window (all False until a window has been seen)."""
        return self.since_fired >= self.window_tokens

    def silent_mask(self, tokens: int) -> torch.Tensor:
        """Latents silent for at least ``tokens`` tokens (AuxK's window, which may be shorter)."""
        return self.since_fired >= tokens

    @property
    def known(self) -> bool:
        return self.tokens_seen >= self.window_tokens

    def dead_count(self) -> torch.Tensor:
        return self.dead_mask().sum()

    def state_dict(self) -> dict:
        return {"tokens_seen": self.tokens_seen, "since_fired": self.since_fired}

    def load_state_dict(self, state: dict) -> None:
        self.tokens_seen = int(state["tokens_seen"])
        self.since_fired.copy_(state["since_fired"])


class WindowAccumulator:
    """Sums per-step quantities as device tensors; read once per logging step.

    Keeping the sums on the device avoids a host-device sync on every step.
    """

    KEYS = ("loss", "mse", "sparsity", "l1", "l0", "err", "var")

    def __init__(self, device: torch.device | str) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(self.KEYS), dtype=torch.float64, device=self.device)
        self.steps = 0
        self.tokens = 0

    def add(self, *, loss, mse, sparsity, l1, f, x, x_hat) -> None:
        with torch.no_grad():
            n = x.shape[0]
            row = torch.stack([
                loss.detach() * n, mse.detach() * n, sparsity.detach() * n, l1.detach() * n,
                l0_per_token(f).sum(),
                (x - x_hat).pow(2).sum(),
                (x - x.mean(dim=0, keepdim=True)).pow(2).sum(),
            ]).to(torch.float64)
            self.sums += row
        self.steps += 1
        self.tokens += n

    def state_dict(self) -> dict:
        """The open window (a run stopped between logging steps carries it into its checkpoint)."""
        return {"sums": self.sums, "steps": self.steps, "tokens": self.tokens}

    def load_state_dict(self, state: dict) -> None:
        self.sums = state["sums"].to(device=self.device, dtype=torch.float64).clone()
        self.steps, self.tokens = int(state["steps"]), int(state["tokens"])

    def read(self) -> dict[str, float]:
        """Means per token over the window, and the window's FVU (batch means as x̄)."""
        s = dict(zip(self.KEYS, self.sums.tolist()))
        n = max(self.tokens, 1)
        return {
            "loss": s["loss"] / n, "mse": s["mse"] / n, "sparsity_loss": s["sparsity"] / n,
            "l1": s["l1"] / n, "l0": s["l0"] / n,
            "fvu": s["err"] / s["var"] if s["var"] > 0 else math.nan,
        }


@torch.no_grad()
def evaluate(sae, x: torch.Tensor, *, batch_size: int = 4096) -> dict[str, float]:
    """L0, FVU and firing statistics of ``sae`` on the normalized rows ``x``.

    ``frequencies`` is each latent's share of tokens it fired on; ``dense_latents`` counts
    those above 10%.
    """
    err = torch.zeros((), dtype=torch.float64, device=x.device)
    l0_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    fired = torch.zeros(sae.d_sae, dtype=torch.int64, device=x.device)
    mean = x.mean(dim=0, keepdim=True)
    var = (x - mean).pow(2).sum().to(torch.float64)
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size]
        x_hat, f = sae(xb)
        err += (xb - x_hat).pow(2).sum()
        l0_sum += l0_per_token(f).sum()
        fired += (f > 0).sum(dim=0)
    n = x.shape[0]
    frequency = (fired.to(torch.float64) / n)
    fvu_value = (err / var).item() if var.item() > 0 else math.nan
    l0 = l0_sum.item() / n
    return {
        "l0": l0,
        "l0_fraction": l0 / sae.d_sae,
        "fvu": fvu_value,
        "explained_variance": 1.0 - fvu_value,
        "eval_tokens": n,
        "never_fired": int((fired == 0).sum().item()),
        "dense_latents": int((frequency > 0.1).sum().item()),
        "frequencies": frequency.tolist(),
    }
